"""The real Eclipse Theia browser app built by images/theia/build, launched as the daemon will.

Launches ``images/theia/app/lib/backend/main.js`` as an arbitrary non-root uid with no passwd
entry, with a private HOME and workspace, listening on a Unix socket through
``images/theia/unix-socket-preload.js`` and collecting garbage on SIGUSR2 through
``images/theia/gc-preload.js`` - the exact command line and environment the daemon uses (see
images/theia/README.md). Checks: ``GET /`` answers 200 over the socket, the socket is 0600 and
owned by the user, SIGUSR2 writes one GC JSON line to stderr and leaves the IDE serving, and (when
Debian's Chromium is installed to load the workbench, which makes Theia fork its file watcher and
open a terminal) no child of the backend inherits ``WSUP_IDE_SOCKET`` or the backend's node flags.

Needs root (uid change, chown) and a built app: run ``images/theia/build`` first.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
THEIA = REPO / "images" / "theia"
APP = THEIA / "app"
MAIN_JS = APP / "lib" / "backend" / "main.js"
SOCKET_PRELOAD = THEIA / "unix-socket-preload.js"
GC_PRELOAD = THEIA / "gc-preload.js"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

UID = GID = 65001
START_DEADLINE = 60.0  # generous: cold caches and other suites sharing two cores
SOCKET_ENV = "WSUP_IDE_SOCKET"

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
    home, workspace, run = base / "home", base / "workspace", base / "run"
    for d in (home, workspace, run):
        d.mkdir(mode=0o700)
    (workspace / "hello.txt").write_text("hello from the workspace\n")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(run / "ide.sock"))
    stale.close()  # a stale socket file with nobody listening, as after a crash
    for p in (home, workspace, run, workspace / "hello.txt", run / "ide.sock"):
        os.chown(p, UID, GID)

    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "SHELL": "/bin/bash",
        SOCKET_ENV: str(run / "ide.sock"),
    }
    argv = ["setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups", "--no-new-privs", *ide_command(workspace)]
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, env=env, cwd=str(workspace), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    handle = Ide(proc=proc, socket_path=run / "ide.sock", home=home, workspace=workspace, started_at=started)
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
    # Theia logs the socket path from the listen callback: the callback fired.
    with ide.cond:
        assert any(f"listening on {ide.socket_path}" in line for line in ide.stdout + ide.stderr), ide.logs()
        # Theia keeps its per-user state under the given HOME, not root's.
        assert any(f"Configuration directory URI: 'file://{ide.home}/.theia'" in line for line in ide.stdout), ide.logs()


def test_socket_is_private_to_the_user(ide: Ide) -> None:
    st = os.lstat(ide.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == UID
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
    terminal (bash via node-pty): neither sees WSUP_IDE_SOCKET, --require or --expose-gc."""
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
        rss = {p.pid: p.memory_info().rss // 2**20 for p in tree if p.is_running()}
        print(f"tree RSS with a workbench loaded: {sum(rss.values())} MiB {rss}")
        for p in children:
            try:
                env = p.environ()
                uids = p.uids()
            except psutil.NoSuchProcess:
                continue  # e.g. a short-lived ripgrep
            argv = _cmdline(p)
            assert SOCKET_ENV not in env, (p.pid, argv)
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


def test_stops_on_sigterm_and_removes_its_socket(ide: Ide) -> None:
    """Runs last (module order): SIGTERM stops the backend promptly and the socket file goes."""
    ide.descendants()
    t0 = time.monotonic()
    ide.proc.terminate()
    code = ide.proc.wait(timeout=15)
    print(f"backend exited with {code} {time.monotonic() - t0:.2f}s after SIGTERM")
    assert not ide.socket_path.exists()
    gone, alive = psutil.wait_procs(list(ide.seen.values()), timeout=5)
    print(f"descendants gone after the backend's exit: {[p.pid for p in gone]}; still alive: {[p.pid for p in alive]}")
    # Theia exits 1 on SIGTERM (after stopping its contributions): not a crash.
    assert code in (0, 1, -signal.SIGTERM), ide.logs()


def _user_dirs() -> tuple[Path, Path, Path, Path]:
    base = Path(tempfile.mkdtemp(prefix="wsup-theia-test-"))
    base.chmod(0o711)
    dirs = [base / name for name in ("home", "workspace", "run")]
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


def test_without_socket_variable_the_preload_refuses_tcp() -> None:
    """Fail closed: a backend started with the preload but no WSUP_IDE_SOCKET exits at once instead
    of listening on a TCP port every tenant of the pod could reach."""
    base, home, workspace, _run = _user_dirs()
    try:
        code, out = _run_until_exit({}, home, workspace)
        assert code != 0
        assert "WSUP_IDE_SOCKET is not set: refusing to listen on TCP" in out, out[-3000:]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_preload_never_deletes_a_non_socket_at_the_path() -> None:
    base, home, workspace, run = _user_dirs()
    try:
        victim = run / "ide.sock"
        victim.write_text("not a socket\n")
        code, out = _run_until_exit({SOCKET_ENV: str(victim)}, home, workspace)
        assert code != 0
        assert "exists and is not a socket" in out, out[-3000:]
        assert victim.read_text() == "not a socket\n"
    finally:
        shutil.rmtree(base, ignore_errors=True)
