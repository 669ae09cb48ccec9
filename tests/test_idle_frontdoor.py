"""The idle ladder behind the real front door, with the stub IDE (fast; the real Theia is in
tests/test_idle_theia.py).

The daemon runs ``tests/fixtures/ide_http_stub.py`` per user (HTTP keep-alive and a WebSocket echo)
with thresholds in seconds and a deliberately slow ladder tick, so that anything that waits for the
next tick shows up as a delay of about a tick: a frozen user's bytes must be delivered right after
the thaw the front door triggers, not when the ladder next looks at the user.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import is_root, pure_cgroup_v2, v1_controllers_mounted
from tests.frontdoor_client import ISSUER, Client, mint, ws_connect, ws_recv, ws_send
from tests.harness import SLOW, SYSTEM_PYTHON, Daemon, poll

pytestmark = pytest.mark.skipif(
    not (is_root() and (v1_controllers_mounted() or pure_cgroup_v2())),
    reason="needs root and cgroup controllers (v1 cpu/memory/pids/freezer, or pure v2)",
)

STUB = Path(__file__).parent / "fixtures" / "ide_http_stub.py"
SECRET = b"idle-front-door-test-secret-0123456789ab"
TICK = 3.0  # the ladder looks at users every 3 s here: a wake that waits for a tick takes ~2-3 s
LADDER = {
    "idle__lsp_pause_after": "3500ms", "idle__gc_after": "4s", "idle__freeze_after": "4500ms",
    "idle__stop_after": "1h", "idle__tick": f"{TICK:g}s", "idle__cpu_busy_threshold": "20%",
}


@pytest.fixture(scope="module")
def fd() -> Iterator[tuple[Daemon, int]]:
    shared = Path(tempfile.mkdtemp(prefix="wsup-idle-fd-", dir="/tmp"))
    os.chmod(shared, 0o755)
    shutil.copy(STUB, shared / "ide_http_stub.py")
    os.chmod(shared / "ide_http_stub.py", 0o644)
    (shared / "hs256.key").write_bytes(SECRET)
    os.chmod(shared / "hs256.key", 0o600)
    d = Daemon(**{
        "http__listen": "127.0.0.1:0",
        "auth__hs256_secret_file": str(shared / "hs256.key"),
        "auth__issuer": ISSUER,
        "auth__cookie_secure": False,
        "ide__command": [SYSTEM_PYTHON, "-I", "-S", str(shared / "ide_http_stub.py"), "{user}"],
        **LADDER,
        "tiers__quick": {"idle": {"lsp_pause_after": "1s", "gc_after": "1s", "freeze_after": "1s", "stop_after": "1s"}},
    })
    try:
        d.start()
        port = int(poll(lambda: (m := re.search(r"front door listening on 127\.0\.0\.1:(\d+)", d.log_text())) and m.group(1), 10, "front door"))
        yield d, port
        assert "Traceback" not in d.log_text(), d.log_text()[-4000:]
    finally:
        d.cleanup()
        shutil.rmtree(shared, ignore_errors=True)


def signed_in(port: int, user: str, tier: str = "free") -> Client:
    browser = Client("127.0.0.1", port, timeout=30)
    assert browser.get(f"/?token={mint(SECRET, user, tier=tier, sid=user + '-tab')}").status == 303
    return browser


def stage(d: Daemon, user: str) -> Any:
    return d.user(user)["idle_stage"]


def test_the_gc_step_never_kills_an_ide_that_does_not_collect_on_its_signal(fd: tuple[Daemon, int]) -> None:
    """The stub IDE has no SIGUSR2 handler (only Theia started with gc-preload.js has one): the
    signal's default action would kill it. The ladder must skip the GC signal for such an IDE, not
    turn every idle user into a crash and a restart."""
    d, port = fd
    browser = signed_in(port, "no-gc")
    assert browser.get("/").status == 200
    browser.close()
    before = d.user("no-gc")
    poll(lambda: stage(d, "no-gc") == "frozen", 30, "the user to walk past the GC step to frozen")
    after = d.user("no-gc")
    assert after["state"] == "RUNNING" and after["pid"] == before["pid"], (before, after)
    assert after["restarts"] == 0, after
    assert re.search(r"user=no-gc .*does not catch SIGUSR2", d.log_text()), "the skipped GC is not logged"


def test_websocket_bytes_wake_a_frozen_user_at_once(fd: tuple[Daemon, int]) -> None:
    """A browser with an open WebSocket (Theia's one socket.io connection) sends to a frozen user:
    the bytes sit in the frozen IDE's socket until the thaw, and the thaw must follow at once, not
    at the ladder's next tick."""
    d, port = fd
    browser = signed_in(port, "ws-frozen")
    assert browser.get("/").status == 200  # cold start
    cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    ws = ws_connect("127.0.0.1", port, "/ws", headers={"Cookie": cookie}, timeout=30)
    try:
        assert ws.status == 101, ws.head
        ws_send(ws, b"hello")
        assert ws_recv(ws) == (2, b"hello")
        # The freeze happens on a tick; the next tick is ~TICK away from the moment we see it.
        poll(lambda: stage(d, "ws-frozen") == "frozen", 30, "the user to be frozen by the ladder")
        began = time.monotonic()
        ws_send(ws, b"are you there?")
        assert ws_recv(ws) == (2, b"are you there?")
        took = time.monotonic() - began
        print(f"frozen user, WebSocket message to echo: {took * 1000:.1f} ms (ladder tick {TICK:g} s)")
        assert took < 1.0 * SLOW, f"the frozen user answered after {took:.2f}s: woken by the next tick, not by the bytes"
        assert stage(d, "ws-frozen") == "active"
        why = d.ctl_json("why", "ws-frozen")["why"]
        assert why["history"][-1]["to"] == "active" and why["history"][-1]["reason"] == "woken by a request"
    finally:
        ws.close()
        browser.close()


def test_http_request_wakes_a_frozen_user_before_it_is_delivered(fd: tuple[Daemon, int]) -> None:
    d, port = fd
    browser = signed_in(port, "http-frozen")
    assert browser.get("/").status == 200
    browser.close()  # a fresh connection after the freeze, as a browser's next page load
    poll(lambda: stage(d, "http-frozen") == "frozen", 30, "the user to be frozen by the ladder")
    began = time.monotonic()
    answer = browser.get("/after-thaw")
    took = time.monotonic() - began
    print(f"frozen user, HTTP request to answer: {took * 1000:.1f} ms")
    assert answer.status == 200 and b"path=/after-thaw" in answer.body
    assert took < 1.0 * SLOW
    assert stage(d, "http-frozen") == "active"
    browser.close()


def test_a_user_just_started_is_shown_active_not_a_stale_stage(fd: tuple[Daemon, int]) -> None:
    """`workspacectl status` / `why` right after an IDE (re)starts must not wait for the ladder's
    next tick: not "no stage" for a new user, not "stopped" for one the ladder stopped before."""
    d, port = fd
    browser = signed_in(port, "fresh", tier="quick")
    assert browser.get("/").status == 200  # cold start; the ladder ticks only every TICK seconds
    info = d.user("fresh")
    assert info["state"] == "RUNNING" and info["idle_stage"] == "active", info
    assert d.ctl_json("why", "fresh")["why"]["idle_stage"] == "active"
    browser.close()
    poll(lambda: d.user("fresh")["state"] == "STOPPED", 30, "the ladder to stop the user")
    assert d.user("fresh")["idle_stage"] == "stopped"
    assert browser.get("/").status == 200  # cold start again
    info = d.user("fresh")
    assert info["state"] == "RUNNING" and info["idle_stage"] == "active", info
    why = d.ctl_json("why", "fresh")["why"]
    assert why["idle_stage"] == "active" and why["history"][-1]["to"] == "active", why
    browser.close()



CLOSING_IDE = r'''
import socket, threading
server = socket.socket(fileno=3)  # the daemon's listening socket (LISTEN_FDS=1)
server.listen(16)
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

def serve(conn):
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = conn.recv(65536)
        if not data:
            break
        buffer += data
    conn.sendall(ANSWER)  # one request per connection, and it says so
    conn.close()

while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''


def test_the_browser_connection_survives_an_ide_that_closes_its_own() -> None:
    shared = Path(tempfile.mkdtemp(prefix="wsup-idle-close-", dir="/tmp"))
    os.chmod(shared, 0o755)
    (shared / "ide.py").write_text(CLOSING_IDE)
    os.chmod(shared / "ide.py", 0o644)
    (shared / "hs256.key").write_bytes(SECRET)
    os.chmod(shared / "hs256.key", 0o600)
    d = Daemon(**{
        "http__listen": "127.0.0.1:0", "auth__hs256_secret_file": str(shared / "hs256.key"), "auth__issuer": ISSUER,
        "auth__cookie_secure": False, "ide__command": [SYSTEM_PYTHON, "-I", "-S", str(shared / "ide.py")],
    })
    try:
        d.start()
        port = int(poll(lambda: (m := re.search(r"front door listening on 127\.0\.0\.1:(\d+)", d.log_text())) and m.group(1), 10, "front door"))
        browser = signed_in(port, "closer")
        first = browser.get("/first")
        assert first.status == 200
        time.sleep(0.2)  # the front door has finished with the first exchange
        # Either the connection stays usable, or the answer said it would not be.
        if (first.header("connection") or "").lower() != "close":
            assert browser.get("/second").status == 200
        browser.close()
    finally:
        d.cleanup()
        shutil.rmtree(shared, ignore_errors=True)
