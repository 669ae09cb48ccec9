"""systemd's notification protocol (supervisor/sdnotify.py) against a real datagram socket that
reads the sender's credentials as systemd does (SO_PASSCRED); then the real daemon, run as the
unit's main process and under `workspace-supervisor init` as the shipped unit runs it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from supervisor.daemon import status_line
from supervisor.sdnotify import Notifier
from tests.conftest import is_root, pure_cgroup_v2, v1_controllers_mounted
from tests.harness import Daemon

UCRED = struct.Struct("3i")


class Listener:
    """A bound notification socket, as systemd's: every message with its sender's pid."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.seen: list[tuple[int, list[str]]] = []

    def until(self, predicate: Callable[[int, list[str]], bool], timeout: float = 20.0) -> tuple[int, list[str]]:
        """Receive until a message satisfies ``predicate``; return it (every message is kept in ``seen``)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
            except TimeoutError:
                break
            pid = next(UCRED.unpack(d)[0] for level, kind, d in ancillary if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS))
            message = (pid, data.decode().split("\n"))
            self.seen.append(message)
            if predicate(*message):
                return message
        raise AssertionError(f"no such notification within {timeout}s; seen: {self.seen}")


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    listen = Listener(str(tmp_path / "notify"))
    with contextlib.closing(listen.sock):
        yield listen


# ---- the environment ----------------------------------------------------------------------------------


def test_without_notify_socket_every_send_is_a_no_op() -> None:
    environ: dict[str, str] = {"WATCHDOG_USEC": "1000000"}
    notifier = Notifier.from_environ(environ)
    assert notifier == Notifier() and not notifier.send("READY=1")
    assert environ == {}


def test_the_variables_are_taken_out_and_the_watchdog_is_half_the_interval() -> None:
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    notifier = Notifier.from_environ(environ)
    assert notifier == Notifier("/run/systemd/notify", None, 15.0)
    assert environ == {"PATH": "/bin"}  # nothing the daemon starts inherits them


def test_abstract_socket_names_and_the_main_pid_of_the_init() -> None:
    init = os.getpid() + 1
    environ = {"NOTIFY_SOCKET": "@sd-notify", "MAINPID": str(init), "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(init)}
    assert Notifier.from_environ(environ) == Notifier(b"\0sd-notify", init, 1.0)


def test_a_watchdog_meant_for_another_process_or_garbage_is_off() -> None:
    other = Notifier.from_environ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_interval is None
    garbage = Notifier.from_environ({"NOTIFY_SOCKET": "relative", "WATCHDOG_USEC": "-5", "MAINPID": "x"})
    assert garbage == Notifier()


def test_status_line_says_the_occupancy() -> None:
    assert status_line("serving", 12, 100) == "serving: 12/100 users"
    assert status_line("waiting", 3, 100) == "draining (waiting): 3 user(s) left"


# ---- datagrams ------------------------------------------------------------------------------------------


def test_a_message_arrives_with_our_own_pid(listener: Listener) -> None:
    notifier = Notifier(listener.sock.getsockname())
    assert notifier.send("READY=1", "STATUS=serving: 0/10 users")
    assert listener.until(lambda pid, lines: True) == (os.getpid(), ["READY=1", "STATUS=serving: 0/10 users"])


def test_an_abstract_socket(tmp_path: Path) -> None:
    name = f"\0wsup-test-notify-{os.getpid()}".encode()
    listen = Listener(name)
    with contextlib.closing(listen.sock):
        env = {"NOTIFY_SOCKET": "@" + name[1:].decode()}
        assert Notifier.from_environ(env).send("WATCHDOG=1")
        assert listen.until(lambda pid, lines: True)[1] == ["WATCHDOG=1"]


@pytest.mark.skipif(not is_root(), reason="naming another pid in SCM_CREDENTIALS needs CAP_SYS_ADMIN (root)")
def test_root_sends_on_behalf_of_the_main_process(listener: Listener) -> None:
    parent = os.getppid()
    assert Notifier(listener.sock.getsockname(), on_behalf_of=parent).send("READY=1")
    assert listener.until(lambda pid, lines: True) == (parent, ["READY=1"])


def test_nobody_listening_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert not Notifier(str(tmp_path / "gone")).send("READY=1")
    assert "sd_notify READY=1" in caplog.text


# ---- the real daemon --------------------------------------------------------------------------------------

needs_kernel = pytest.mark.skipif(
    not (is_root() and (v1_controllers_mounted() or pure_cgroup_v2())),
    reason="needs root and cgroup controllers (v1 cpu/memory/pids/freezer, or pure v2)",
)


@needs_kernel
def test_the_daemon_as_main_process_ready_watchdog_status_and_stopping(listener: Listener) -> None:
    d = Daemon()
    try:
        d.start(env={"NOTIFY_SOCKET": listener.sock.getsockname(), "WATCHDOG_USEC": "400000"})
        assert d.proc is not None
        pid, lines = listener.until(lambda pid, lines: "READY=1" in lines)
        assert pid == d.proc.pid and "STATUS=serving: 0/10 users" in lines
        assert d.ctl("start", "alice").returncode == 0
        listener.until(lambda pid, lines: "STATUS=serving: 1/10 users" in lines)
        listener.until(lambda pid, lines: "WATCHDOG=1" in lines)  # every 0.2s from the event loop
        assert listener.until(lambda pid, lines: "WATCHDOG=1" in lines, timeout=2)[0] == d.proc.pid
        d.proc.send_signal(signal.SIGTERM)
        assert listener.until(lambda pid, lines: "STOPPING=1" in lines)[0] == d.proc.pid
        assert d.proc.wait(30) == 0
    finally:
        d.cleanup()


@needs_kernel
def test_under_the_init_the_daemon_notifies_for_it_reload_and_stop(listener: Listener) -> None:
    """As the shipped unit runs it: the init is the main process (NotifyAccess=main)."""
    d = Daemon()
    try:
        d.start(env={"NOTIFY_SOCKET": listener.sock.getsockname(), "WATCHDOG_USEC": "400000"}, command="init")
        assert d.proc is not None
        init = d.proc.pid
        assert listener.until(lambda pid, lines: "READY=1" in lines)[0] == init
        assert listener.until(lambda pid, lines: "WATCHDOG=1" in lines)[0] == init
        d.proc.send_signal(signal.SIGUSR2)  # systemctl reload: an upgrade in place
        assert listener.until(lambda pid, lines: "RELOADING=1" in lines)[0] == init
        ready = len(listener.seen)
        assert listener.until(lambda pid, lines: "READY=1" in lines)[0] == init  # the new daemon
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
        # Only the init's exit ends the unit: the daemon never says STOPPING=1 under it.
        assert not any("STOPPING=1" in lines for _, lines in listener.seen[ready:])
    finally:
        d.cleanup()
