"""The control socket: only root, the daemon's uid (and [control] allowed_gid) are served, checked
on the peer's credentials whatever the socket's mode; `workspacectl tail` never lets a user's log
drive the operator's terminal."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from typing import Iterator

import pytest

from supervisor.cli import escape_controls
from supervisor.control import MAX_REQUEST, peer_allowed
from tests.conftest import is_root, pure_cgroup_v2, v1_controllers_mounted
from tests.harness import Daemon, started

needs_kernel = pytest.mark.skipif(
    not (is_root() and (v1_controllers_mounted() or pure_cgroup_v2())),
    reason="needs root and cgroup controllers (v1 cpu/memory/pids/freezer, or pure v2) to start a daemon",
)
NOBODY = 65534


def test_who_is_served() -> None:
    assert peer_allowed(0, 0, own_uid=0, allowed_gid=-1)
    assert peer_allowed(990, 990, own_uid=990, allowed_gid=-1)  # a daemon running as its own uid
    assert not peer_allowed(1000, 1000, own_uid=0, allowed_gid=-1)
    assert not peer_allowed(1000, -1 & 0xFFFFFFFF, own_uid=0, allowed_gid=-1)
    assert peer_allowed(1000, 4242, own_uid=0, allowed_gid=4242)
    assert not peer_allowed(1000, 1000, own_uid=0, allowed_gid=4242)


def test_escape_controls_keeps_text_newlines_and_tabs() -> None:
    assert escape_controls("plain\ttext\nnext line: héllo ✓\n") == "plain\ttext\nnext line: héllo ✓\n"
    hostile = "\x1b]0;pwned\x07\x1b[2J\rhidden\x9b31m\x7f\u202egnp.exe\x00"
    assert escape_controls(hostile) == "\\x1b]0;pwned\\x07\\x1b[2J\\x0dhidden\\x9b31m\\x7f\\u202egnp.exe\\x00"
    assert escape_controls(b"bad \xff\xc3 byte".decode("utf-8", "surrogateescape")) == "bad \\xff\\xc3 byte"


def _ask_as(uid: int, gid: int, path: str, request: bytes = json.dumps({"verb": "status", "args": {}}).encode() + b"\n") -> bytes:
    """Connect to ``path`` from a forked child running as ``uid``/``gid``, send ``request`` (if
    any; the connection is kept open), return the answer."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the other uid, then talk to the daemon
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(20)
                sock.connect(path)
                try:
                    sock.sendall(request)
                except BrokenPipeError:
                    pass  # the daemon stopped reading a flood; its answer is still to be read
                answer = b""
                try:
                    while chunk := sock.recv(65536):
                        answer += chunk
                except ConnectionResetError:  # closed with a flood unread: after the answer
                    if not answer:
                        raise
            os.write(write_end, answer)
            code = 0
        except BaseException as exc:  # noqa: BLE001 - the parent shows it
            os.write(write_end, repr(exc).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, answer
    return answer


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    yield from started()


@needs_kernel
def test_another_uid_is_refused_even_when_the_socket_mode_lets_it_in(daemon: Daemon) -> None:
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600
    os.chmod(daemon.socket.parent, 0o755)
    os.chmod(daemon.socket, 0o666)  # as if someone loosened it
    answer = json.loads(_ask_as(NOBODY, NOBODY, str(daemon.socket)))
    assert answer["ok"] is False and answer["error"]["reason"] == "control_peer_refused"
    assert f"uid {NOBODY} may not use the control socket" in answer["error"]["message"]
    assert "run workspacectl as root" in answer["error"]["hint"]
    assert f"refused a client running as uid {NOBODY}" in daemon.log_text()
    started_at = time.monotonic()  # refused before its request is read: one that sends nothing is told at once
    silent = json.loads(_ask_as(NOBODY, NOBODY, str(daemon.socket), request=b""))
    assert silent["error"]["reason"] == "control_peer_refused" and time.monotonic() - started_at < 5
    flood = json.loads(_ask_as(NOBODY, NOBODY, str(daemon.socket), request=b"x" * (4 * MAX_REQUEST)))  # never parsed
    assert flood["error"]["reason"] == "control_peer_refused"
    assert json.loads(_ask_as(0, 0, str(daemon.socket)))["ok"] is True  # root still is served
    assert daemon.ctl("status").returncode == 0


@needs_kernel
def test_allowed_gid_opens_the_socket_to_that_group_only() -> None:
    for d in started(**{"control__allowed_gid": 4242}):
        mode = d.socket.stat()
        assert (stat.S_IMODE(mode.st_mode), mode.st_uid, mode.st_gid) == (0o660, 0, 4242)
        os.chmod(d.socket.parent, 0o755)
        assert json.loads(_ask_as(NOBODY, 4242, str(d.socket)))["ok"] is True
        os.chmod(d.socket, 0o666)
        assert json.loads(_ask_as(NOBODY, NOBODY, str(d.socket)))["error"]["reason"] == "control_peer_refused"


@needs_kernel
def test_tail_escapes_what_a_user_writes_to_their_log_and_raw_gives_the_bytes(daemon: Daemon) -> None:
    assert daemon.ctl("start", "loud").returncode == 0
    hostile = b"\x1b]0;owned\x07\x1b[1A\x1b[2Kerased\rover \xff\xfe half \xe2\x9c\n"
    with open(daemon.base / "log" / "loud.log", "ab") as log:
        log.write(hostile)
    shown = daemon.ctl("tail", "-n", "2", "loud")  # (a CR ends a line for the line count)
    assert shown.returncode == 0
    assert shown.stdout == "\\x1b]0;owned\\x07\\x1b[1A\\x1b[2Kerased\\x0dover \\xff\\xfe half \\xe2\\x9c\n"
    raw = subprocess.run([sys.executable, "-m", "supervisor.cli", "--socket", str(daemon.socket), "tail", "-n", "2", "--raw", "loud"],
                         capture_output=True, timeout=60)
    assert raw.returncode == 0 and raw.stdout == hostile
    data = json.loads(daemon.ctl("tail", "-n", "2", "--json", "loud").stdout)["data"]
    assert data.encode("utf-8", "surrogateescape") == hostile
    with open(daemon.base / "log" / "loud.log", "ab") as log:
        log.write(b"ends inside a character \xe2\x9c")
    cut = daemon.ctl("tail", "-n", "1", "loud")  # the bytes the decoder held back are shown, escaped
    assert cut.returncode == 0 and cut.stdout.endswith("ends inside a character \\xe2\\x9c"), cut.stdout
