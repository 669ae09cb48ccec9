"""The real Eclipse Theia browser app built by images/theia/build, launched as the daemon will.

Launches ``images/theia/app/lib/backend/main.js`` as an arbitrary non-root uid with no passwd
entry, with a private HOME and workspace, serving on the listening socket the daemon hands over as
fd 3 (made by :func:`supervisor.idesocket.listen`, adopted by ``images/theia/unix-socket-preload.js``)
and collecting garbage on SIGUSR2 through ``images/theia/gc-preload.js`` - the exact command line and
environment the daemon uses (see images/theia/README.md). Checks: ``GET /`` answers 200 over the
socket, whose peer credentials name the user (Node's own listen() on fd 3), SIGUSR2 writes one GC
JSON line to stderr and leaves the IDE serving, and (when Debian's Chromium is installed to load
the workbench, which makes Theia fork its file watcher and open a terminal) no child of the backend
inherits ``LISTEN_*``, fd 3 or the backend's node flags.

Needs root (uid change, chown) and a built app: run ``images/theia/build`` first.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from supervisor import idesocket
from tests.harness import on_fd3

REPO = Path(__file__).resolve().parent.parent
THEIA = REPO / "images" / "theia"
APP = THEIA / "app"
MAIN_JS = APP / "lib" / "backend" / "main.js"
SOCKET_PRELOAD = THEIA / "unix-socket-preload.js"
GC_PRELOAD = THEIA / "gc-preload.js"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

UID = GID = 65001
START_DEADLINE = 60.0  # generous: cold caches and other suites sharing two cores
LISTEN_ENV = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "ide"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not MAIN_JS.is_file(),
        reason=f"Theia app not built ({MAIN_JS.relative_to(REPO)} missing): run images/theia/build",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the IDE as another uid and chown its directories"),
    pytest.mark.skipif(shutil.which("node") is None, reason="node is not on PATH"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed"),
]


def ide_command(workspace: Path) -> list[str]:
    """The daemon's IDE argv (images/theia/README.md), with this checkout's paths."""
    return [
        shutil.which("node") or "node",
        "--expose-gc",
        "--require",
        str(SOCKET_PRELOAD),
        "--require",
        str(GC_PRELOAD),
        str(MAIN_JS),
        str(workspace),
        "--hostname",
        "127.0.0.1",
        "--session-preference=security.workspace.trust.enabled=false",
    ]


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over an AF_UNIX stream socket."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def get(path: str, url: str = "/") -> tuple[int, bytes]:
    conn = UnixHTTPConnection(path)
    try:
        conn.request("GET", url)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@dataclass
class Ide:
    proc: subprocess.Popen[bytes]
    socket_path: Path
    home: Path
    workspace: Path
    started_at: float
    ready_after: float = 0.0
    stdout: list[str] = field(default_factory=list, repr=False)
    stderr: list[str] = field(default_factory=list, repr=False)
    cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    seen: dict[int, psutil.Process] = field(default_factory=dict, repr=False)

    def wait_for_line(self, predicate, timeout: float, after: int = 0) -> str:  # type: ignore[no-untyped-def]
        """The first stderr line from index ``after`` on that matches ``predicate``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.stderr[after:]:
                    if predicate(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no matching stderr line within {timeout}s; stderr tail: {self.stderr[-10:]}")
                self.cond.wait(left)

    def descendants(self) -> list[psutil.Process]:
        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            found = []
        for p in found:
            self.seen[p.pid] = p
        return found

    def logs(self) -> str:
        with self.cond:
            return "\n".join(["--- stdout", *self.stdout[-30:], "--- stderr", *self.stderr[-30:]])


def _reader(ide: Ide, stream, sink: list[str]) -> None:  # type: ignore[no-untyped-def]
    with stream:
        for raw in stream:
            with ide.cond:
                sink.append(raw.decode("utf-8", "replace").rstrip("\n"))
                ide.cond.notify_all()


def _stop(ide: Ide) -> None:
    """SIGTERM the backend, then kill anything of its tree still alive (terminals run in their own
    sessions and would outlive it)."""
    ide.descendants()
    if ide.proc.poll() is None:
        ide.proc.terminate()
        try:
            ide.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            ide.proc.kill()
            ide.proc.wait()
    leftovers = [p for p in ide.seen.values() if p.is_running()]
    for p in leftovers:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leftovers, timeout=10)


@pytest.fixture(scope="module")
def ide() -> Iterator[Ide]:
    base = Path(tempfile.mkdtemp(prefix="wsup-theia-test-"))
    base.chmod(0o711)  # traversable by the user; the per-user directories below are 0700
    home, workspace = base / "home", base / "workspace"
    for d in (home, workspace):
        d.mkdir(mode=0o700)
    (workspace / "hello.txt").write_text("hello from the workspace\n")
    for p in (home, workspace, workspace / "hello.txt"):
        os.chown(p, UID, GID)

    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "SHELL": "/bin/bash", **LISTEN_ENV}
    argv = ["setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups", "--no-new-privs", *ide_command(workspace)]
    started = time.monotonic()
    with idesocket.listen(base / "run", "theia-user") as listener:  # as the daemon does
        proc = subprocess.Popen(
            on_fd3(listener.fileno(), argv), pass_fds=(listener.fileno(),), env=env, cwd=str(workspace),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
    handle = Ide(proc=proc, socket_path=idesocket.socket_path(base / "run", "theia-user"), home=home, workspace=workspace,
                 started_at=started)
    readers = [
        threading.Thread(target=_reader, args=(handle, proc.stdout, handle.stdout), daemon=True),
        threading.Thread(target=_reader, args=(handle, proc.stderr, handle.stderr), daemon=True),
    ]
    for t in readers:
        t.start()
    try:
        deadline = started + START_DEADLINE
        last_error: Exception | None = None
        while True:
            if proc.poll() is not None:
                pytest.fail(f"IDE exited with {proc.returncode} before serving GET /\n{handle.logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"IDE not answering GET / with 200 within {START_DEADLINE}s ({last_error!r})\n{handle.logs()}")
            try:
                status, _ = get(str(handle.socket_path))
                if status == 200:
                    break
                last_error = AssertionError(f"status {status}")
            except (OSError, http.client.HTTPException) as exc:  # not listening yet / stale socket
                last_error = exc
            with handle.cond:
                handle.cond.wait(0.02)  # poll interval; the deadline above bounds the wait
        handle.ready_after = time.monotonic() - started
        print(f"Theia answered GET / 200 over its socket {handle.ready_after:.2f}s after exec")
        yield handle
    finally:
        _stop(handle)
        for t in readers:
            t.join(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


def test_serves_workbench_over_unix_socket_as_the_user(ide: Ide) -> None:
    status, body = get(str(ide.socket_path))
    assert status == 200
    assert b"<html" in body.lower()
    backend = psutil.Process(ide.proc.pid)
    assert backend.uids().real == UID and backend.uids().effective == UID
    assert backend.gids().real == GID
    assert "main.js" in " ".join(backend.cmdline())
    # Theia logs the server's address from the listen callback: the callback fired.
    with ide.cond:
        assert any("listening on fd 3 (LISTEN_FDS)" in line for line in ide.stdout + ide.stderr), ide.logs()
        # Theia keeps its per-user state under the given HOME, not root's.
        assert any(f"Configuration directory URI: 'file://{ide.home}/.theia'" in line for line in ide.stdout), ide.logs()


def test_the_socket_is_the_daemons_and_its_peer_is_the_user(ide: Ide) -> None:
    directory = os.lstat(ide.socket_path.parent)
    assert (directory.st_uid, stat.S_IMODE(directory.st_mode)) == (0, 0o700)
    assert stat.S_ISSOCK(os.lstat(ide.socket_path).st_mode)
    # Node's listen() on fd 3 re-stamped the peer credentials: the front door sees the user.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(ide.socket_path))
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    assert (pid, uid) == (ide.proc.pid, UID)
    # ... and nothing listens on TCP: the port/hostname arguments were redirected.
    listening = [c for c in psutil.net_connections("inet") if c.pid == ide.proc.pid and c.status == psutil.CONN_LISTEN]
    assert listening == []


def test_sigusr2_collects_garbage_and_reports_on_stderr(ide: Ide) -> None:
    with ide.cond:
        already = len(ide.stderr)
    os.kill(ide.proc.pid, signal.SIGUSR2)
    line = ide.wait_for_line(lambda text: text.startswith('{"wsup":"gc"'), 15, after=already)
    report = json.loads(line)
    print(f"GC report: {report}")
    assert report["ok"] is True, report
    assert report["pid"] == ide.proc.pid
    for key in ("heap_used_before", "heap_used_after", "heap_total_before", "heap_total_after", "rss_before", "rss_after"):
        assert isinstance(report[key], int) and report[key] > 0, (key, report)
    assert report["heap_used_after"] <= report["heap_used_before"] + 2**20, report
    # The signal did not kill or disturb the IDE.
    assert ide.proc.poll() is None
    assert get(str(ide.socket_path))[0] == 200


class _TcpToUnix:
    """A byte-for-byte TCP -> Unix socket forwarder, so a browser can reach the IDE's socket."""

    def __init__(self, unix_path: str) -> None:
        self.unix_path = unix_path
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = threading.Event()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.unix_path)
            except OSError:
                client.close()
                upstream.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        with self.lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        self.thread.join(timeout=5)


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium to load the workbench (apt-get install chromium)")
def test_children_inherit_neither_socket_env_nor_node_flags(ide: Ide, tmp_path: Path) -> None:
    """Loading the workbench makes the backend fork its file watcher (node ipc-bootstrap) and open a
    terminal (bash via node-pty): neither sees LISTEN_*, fd 3, --require or --expose-gc."""
    forwarder = _TcpToUnix(str(ide.socket_path))
    profile = tmp_path / "chromium-profile"
    browser = subprocess.Popen(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",  # we are root
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",  # keeps headless chromium running with the page open
            f"http://127.0.0.1:{forwarder.port}/",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        watcher = shell = None
        while time.monotonic() < deadline and (watcher is None or shell is None):
            for p in ide.descendants():
                argv = _cmdline(p)
                if any(a.endswith("ipc-bootstrap") or a.endswith("ipc-bootstrap.js") for a in argv):
                    watcher = p
                elif argv and os.path.basename(argv[0]) in ("bash", "-bash", "sh"):
                    shell = p
            if browser.poll() is not None:
                pytest.fail(f"chromium exited with {browser.returncode}")
            with ide.cond:
                ide.cond.wait(0.1)  # poll interval; the deadline bounds the wait
        assert watcher is not None, f"no file watcher child appeared within 90s\n{ide.logs()}"
        assert shell is not None, f"no terminal shell appeared within 90s\n{ide.logs()}"

        children = ide.descendants()
        print("backend descendants:", [(p.pid, _cmdline(p)[:3]) for p in children])
        tree = [psutil.Process(ide.proc.pid), *children]
        listening = os.stat(f"/proc/{ide.proc.pid}/fd/3").st_ino  # the backend's listening socket
        rss = {p.pid: p.memory_info().rss // 2**20 for p in tree if p.is_running()}
        print(f"tree RSS with a workbench loaded: {sum(rss.values())} MiB {rss}")
        for p in children:
            try:
                env = p.environ()
                uids = p.uids()
            except psutil.NoSuchProcess:
                continue  # e.g. a short-lived ripgrep
            argv = _cmdline(p)
            assert not any(k.startswith("LISTEN_") for k in env), (p.pid, argv)
            with contextlib.suppress(FileNotFoundError):
                assert os.stat(f"/proc/{p.pid}/fd/3").st_ino != listening, (p.pid, argv)
            assert uids.real == UID and uids.effective == UID, (p.pid, argv, uids)
            if argv and os.path.basename(argv[0]) == "node":
                assert not any(a in ("--require", "-r", "--expose-gc") or a.startswith("--require=") for a in argv), argv
        assert "THEIA_PARENT_PID" in watcher.environ()  # we really read the child's environment
        assert shell.environ().get("HOME") == str(ide.home)
        assert psutil.Process(shell.pid).cwd() == str(ide.workspace)
        # Once a workbench connected, Theia wrote its state under the given HOME, as the user.
        assert (ide.home / ".theia").is_dir() and (ide.home / ".theia").stat().st_uid == UID
        # The backend itself still serves, with the socket in place.
        assert get(str(ide.socket_path))[0] == 200
    finally:
        if browser.poll() is None:
            os.killpg(browser.pid, signal.SIGTERM)
            try:
                browser.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(browser.pid, signal.SIGKILL)
                browser.wait()
        forwarder.close()


def test_stops_on_sigterm_and_its_socket_with_it(ide: Ide) -> None:
    """Runs last (module order): SIGTERM stops the backend promptly; its socket refuses connections
    (the daemon unlinks the file when it cleans up)."""
    ide.descendants()
    t0 = time.monotonic()
    ide.proc.terminate()
    code = ide.proc.wait(timeout=15)
    print(f"backend exited with {code} {time.monotonic() - t0:.2f}s after SIGTERM")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn, pytest.raises(ConnectionRefusedError):
        conn.connect(str(ide.socket_path))
    gone, alive = psutil.wait_procs(list(ide.seen.values()), timeout=5)
    print(f"descendants gone after the backend's exit: {[p.pid for p in gone]}; still alive: {[p.pid for p in alive]}")
    # Theia exits 1 on SIGTERM (after stopping its contributions): not a crash.
    assert code in (0, 1, -signal.SIGTERM), ide.logs()


def _user_dirs() -> tuple[Path, Path, Path]:
    base = Path(tempfile.mkdtemp(prefix="wsup-theia-test-"))
    base.chmod(0o711)
    dirs = [base / name for name in ("home", "workspace")]
    for d in dirs:
        d.mkdir(mode=0o700)
        os.chown(d, UID, GID)
    return base, *dirs  # type: ignore[return-value]


def _run_until_exit(env_extra: dict[str, str], home: Path, workspace: Path) -> tuple[int, str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "SHELL": "/bin/bash", **env_extra}
    argv = ["setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups", "--no-new-privs", *ide_command(workspace)]
    proc = subprocess.Popen(argv, env=env, cwd=str(workspace), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=START_DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"IDE kept running although it could not listen:\n{out.decode(errors='replace')[-3000:]}")
    return proc.returncode, out.decode("utf-8", "replace")


def test_without_a_handed_over_socket_the_preload_refuses_tcp() -> None:
    """Fail closed: a backend started with the preload but no LISTEN_FDS exits at once instead
    of listening on a TCP port every tenant of the pod could reach."""
    base, home, workspace = _user_dirs()
    try:
        code, out = _run_until_exit({}, home, workspace)
        assert code != 0
        assert "LISTEN_FDS is not set: no listening socket was handed over; refusing to listen on TCP" in out, out[-3000:]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_preload_refuses_a_socket_meant_for_another_process() -> None:
    """LISTEN_PID names the process the descriptors are for (systemd's rule): another pid's is refused."""
    base, home, workspace = _user_dirs()
    try:
        code, out = _run_until_exit({**LISTEN_ENV, "LISTEN_PID": "1"}, home, workspace)
        assert code != 0
        assert "LISTEN_PID 1 is not this process" in out, out[-3000:]
    finally:
        shutil.rmtree(base, ignore_errors=True)
