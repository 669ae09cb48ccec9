"""Runs the real daemon as a subprocess, driven through the real `workspacectl`, for kernel tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from supervisor.config import ISOLATION_MECHANISMS

STUB = Path(__file__).parent / "fixtures" / "ide_stub.py"
#: Timeouts stretch inside the emulated VM of the cgroup v2 tier (integration/vm/guest-run sets it).
SLOW = 8.0 if os.environ.get("WSUP_VM_TIER") else 1.0
SYSTEM_PYTHON = "/usr/bin/python3"


def poll(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until truthy (returning its value) or fail after ``timeout`` seconds."""
    timeout *= SLOW
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class Daemon:
    """One daemon with its own workspace root, state, sockets and cgroup subtree."""

    def __init__(self, **overrides: Any) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="wsup-test-", dir="/tmp"))
        os.chmod(self.base, 0o755)
        self.name = f"wsup-test-{uuid.uuid4().hex[:8]}"
        (self.base / "workspace").mkdir(mode=0o755)
        # Inside the workspace root: the one path below /tmp a user's own view keeps ([isolation] mount).
        stub = self.base / "workspace" / ".stub" / "ide_stub.py"
        stub.parent.mkdir(mode=0o755)
        shutil.copy(STUB, stub)
        os.chmod(stub, 0o644)
        self.stub_dir = stub.parent
        self.socket = self.base / "run" / "control.sock"
        sections: dict[str, dict[str, Any]] = {
            "pod": {"id": "test-pod", "capacity": 10},
            "workspace": {"root": str(self.base / "workspace"), "shards": 4},
            "ide": {"command": [SYSTEM_PYTHON, "-I", "-S", str(stub), "{user}"], "ready_timeout": f"{10 * SLOW:g}s", "stop_grace": "3s",
                    "env": {"STUB_MARK": "{user}"}},
            "restart": {"healthy_after": "2s", "backoff_initial": "50ms", "backoff_max": "200ms", "max_failures": 3},
            "control": {"socket": str(self.socket)},
            "daemon": {"state_dir": str(self.base / "state"), "run_dir": str(self.base / "run"),
                       "log_dir": str(self.base / "log"), "usage_interval": "200ms", "log_level": "debug",
                       "drain_deadline": "0s"},
            "cgroups": {"name": self.name},
            # Port 0: a free port, shown by `workspacectl pod` as "probes"; a registry of its own.
            "probes": {"listen": "127.0.0.1:0"},
            "registry": {"path": str(self.base / "registry.db"), "heartbeat": "250ms", "lease": "3s"},
            # Off unless a test turns a mechanism on (tests/test_isolation.py, the hostile suite).
            "isolation": {name: "off" for name in ISOLATION_MECHANISMS},
        }
        for key, value in overrides.items():
            section, _, name = key.partition("__")
            sections.setdefault(section, {})[name] = value
        self.config = self.base / "config.toml"
        self.config.write_text(_toml(sections))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.base / "daemon.log"

    def ide_socket(self, user: str) -> Path:
        """The listening socket the daemon makes for ``user``'s IDE (root-only directory)."""
        return self.base / "run" / "ide" / f"{user}.sock"

    def start(self, *, env: dict[str, str] | None = None, wrapper: list[str] | None = None, command: str = "run") -> None:
        """Start ``workspace-supervisor COMMAND --config ...`` (``init``: the daemon under the container
        init) behind ``wrapper``, and wait for the control socket."""
        # The daemon refuses unknown WSUP_* variables; the test runner's own (e.g. WSUP_VM_TIER) stay here.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("WSUP_")}
        full_env = {**inherited, "DAEMON_TEST_SECRET": "hunter2", **(env or {})}
        argv = [*(wrapper or []), sys.executable, "-m", "supervisor.daemon", command, "--config", str(self.config)]
        # The daemon's stderr, as the journal or the container runtime would keep it: root's only
        # (the base directory is 0755 so that users reach their workspaces).
        with open(os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=full_env, start_new_session=True)
        poll(lambda: self.ctl("pod").returncode == 0 or self._died(), 20, "the control socket")
        if self._died():
            raise AssertionError(f"daemon exited early:\n{self.log.read_text()}")

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        timeout *= SLOW
        return subprocess.run(
            [sys.executable, "-m", "supervisor.cli", "--socket", str(self.socket), *args],
            capture_output=True, text=True, timeout=timeout,
        )

    def ctl_json(self, *args: str) -> dict[str, Any]:
        result = self.ctl(*args, "--json")
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        assert data["version"] == 1
        return data

    def user(self, user: str) -> dict[str, Any]:
        users: list[dict[str, Any]] = self.ctl_json("status", user)["users"]
        return users[0]

    def kill(self, signum: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cgroup_dirs(self, user: str | None = None) -> list[Path]:
        """Every directory of this daemon's subtree (or one user's group) in every hierarchy."""
        found = []
        for path in Path("/sys/fs/cgroup").rglob(self.name):
            target = path / user if user else path
            if target.is_dir():
                found.append(target)
        return found

    def cleanup(self) -> None:
        self.stop()
        for group in sorted(self.cgroup_dirs(), key=lambda p: len(p.parts), reverse=True):
            remove_cgroup_tree(group)
        shutil.rmtree(self.base, ignore_errors=True)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def started(**overrides: Any) -> Iterator[Daemon]:
    """A started :class:`Daemon` for a pytest fixture (``yield from started(...)``), cleaned up
    afterwards - also when it fails to start."""
    d = Daemon(**overrides)
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


def isolation_available() -> tuple[dict[str, str], dict[str, str]]:
    """Daemon overrides (``isolation__<name>``) turning on every ``[isolation]`` mechanism this
    machine can give and off the rest, and why each of those is missing."""
    from supervisor import config, isolation

    missing = isolation.probe(config.from_dict({})) if os.geteuid() == 0 else {m: "not root" for m in ISOLATION_MECHANISMS}
    return {f"isolation__{name}": "off" if name in missing else "on" for name in ISOLATION_MECHANISMS}, missing


def remove_cgroup_tree(group: Path) -> list[Path]:
    """Thaw, kill whatever is left in, and remove ``group`` and every cgroup below it; returns the
    groups that could not be removed (benchmarks clean up with it too)."""
    left = []
    subdirs = sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for child in [*subdirs, group]:
        for state, thawed in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
            try:
                (child / state).write_text(thawed)
            except OSError:
                pass
        try:
            for pid in (child / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        except OSError:
            pass
        for _ in range(300):
            try:
                child.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)
        else:
            left.append(child)
    return left


def lsp_ticks(home: Path) -> int:
    """How often the language-server stand-in (``lsp-ticks`` in the user's home) has ticked."""
    try:
        return (home / "lsp-ticks").stat().st_size
    except FileNotFoundError:
        return 0


def lsp_progressing(home: Path, window: float) -> bool:
    """Whether the stand-in ticks during ``window`` seconds (it writes every 20 ms while it runs)."""
    before = lsp_ticks(home)
    time.sleep(window)  # a measurement window, not a wait for a transition
    return lsp_ticks(home) > before


def on_fd3(listen_fd: int, argv: list[str]) -> list[str]:
    """``argv`` run with ``listen_fd`` at fd 3, as the daemon hands an IDE its listening socket
    (start it with ``pass_fds=(listen_fd,)`` and ``LISTEN_FDS=1`` in its environment)."""
    move = "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd == 3 or os.close(fd); os.execvp(sys.argv[2], sys.argv[2:])"
    return [SYSTEM_PYTHON, "-I", "-S", "-c", move, str(listen_fd), *argv]


def http_get(socket_path: Path, target: str = "/", timeout: float = 5.0) -> str:
    import socket as socketlib

    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode(errors="replace")


def descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def _toml(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)
