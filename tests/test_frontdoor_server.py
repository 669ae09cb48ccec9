"""The front door in-process (trio), in front of real stub IDE processes on Unix sockets.

The session manager is replaced by :class:`FakeIdes`, which starts ``tests/fixtures/ide_http_stub.py``
per user (as the current uid) - so cold starts, refusals from the manager, FATAL users and
concurrency limits can be arranged exactly, while the HTTP, WebSocket and socket behaviour is real.
Clients are real blocking sockets run in worker threads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, TypeVar

import pytest
import trio

from supervisor import config as config_module
from supervisor import idesocket
from supervisor.errors import CapacityExceeded, Draining
from supervisor.frontdoor import proxy
from supervisor.frontdoor.auth import Authenticator
from supervisor.frontdoor.server import FrontDoor, IdeInfo
from supervisor.manager import probe_http
from supervisor.sessions import State
from tests.frontdoor_client import Client, WebSocket, mint, ws_connect, ws_recv, ws_send
from tests.harness import on_fd3

STUB = Path(__file__).parent / "fixtures" / "ide_http_stub.py"
SECRET = b"in-process-front-door-secret-0123456789"
T = TypeVar("T")


class FakeIdes:
    """Starts one stub IDE process per user; ``start_error`` makes the next start raise."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.infos: dict[str, IdeInfo] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: list[str] = []
        self.start_error: Exception | None = None

    def socket_of(self, user: str) -> Path:
        return idesocket.socket_path(self.base, user)

    def lookup(self, user: str) -> IdeInfo | None:
        return self.infos.get(user)

    async def start(self, user: str, tier: str) -> None:
        if self.start_error is not None:
            raise self.start_error
        info = self.infos.get(user)
        if info is not None and info.state in (State.RUNNING, State.STARTING):
            self.infos[user] = IdeInfo(info.state, tier, info.socket_path, info.uid)
            return
        self.starts.append(user)
        with idesocket.listen(self.base, user) as listener:  # as the daemon does: the stub gets fd 3
            self.procs[user] = subprocess.Popen(
                on_fd3(listener.fileno(), [sys.executable, "-I", "-S", str(STUB), user]), env={"LISTEN_FDS": "1"},
                pass_fds=(listener.fileno(),), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        self.infos[user] = IdeInfo(State.STARTING, tier, self.socket_of(user), os.getuid())

    async def wait_settled(self, user: str, timeout: float) -> IdeInfo | None:
        info = self.infos[user]
        with trio.move_on_after(timeout):
            while info.state is State.STARTING:
                proc = self.procs[user]
                if proc.poll() is not None:
                    info = self.infos[user] = IdeInfo(
                        State.FATAL, info.tier, info.socket_path, info.uid, f"exited with status {proc.returncode}",
                    )
                elif await probe_http(info.socket_path, 0.5):  # the manager's readiness probe
                    info = self.infos[user] = IdeInfo(State.RUNNING, info.tier, info.socket_path, info.uid)
                else:
                    await trio.sleep(0.01)
        return self.infos[user]

    async def open_port(self, user: str, port: int) -> trio.SocketStream | None:
        raise AssertionError("these IDEs share the host's network: /port/ must never be opened")

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()


class Door:
    """A running in-process front door and what the tests need to reach it."""

    def __init__(self, front: FrontDoor, ides: FakeIdes) -> None:
        self.front = front
        self.ides = ides
        self.host, self.port = front.addresses[0]
        self.clients: list[Client] = []
        self.sockets: list[WebSocket] = []

    def client(self, **kwargs: Any) -> Client:
        client = Client(self.host, self.port, **kwargs)
        self.clients.append(client)
        return client

    def ws(self, target: str, headers: dict[str, str] | None = None) -> WebSocket:
        """A WebSocket handshake through the door (closed at teardown even if the test fails)."""
        ws = ws_connect(self.host, self.port, target, headers=headers)
        self.sockets.append(ws)
        return ws

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for ws in self.sockets:
            ws.close()


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


def make_config(tmp_path: Path, auth: dict[str, Any] | None = None, **http: Any) -> config_module.Config:
    secret = tmp_path / "hs256.key"
    secret.write_bytes(SECRET)
    return config_module.from_dict({
        "http": {"listen": "127.0.0.1:0", "header_timeout": "2s", "session_linger": "300ms", "start_timeout": "5s", **http},
        "auth": {"hs256_secret_file": str(secret), "issuer": "https://auth.test", "cookie_secure": False, **(auth or {})},
        "daemon": {"state_dir": str(tmp_path / "state")},
        "tiers": {"free": {"sessions": 1}, "starter": {"sessions": 2}},
    })


OPENED: list[Door] = []


@pytest.fixture
def ides(tmp_path: Path) -> Iterator[FakeIdes]:
    fake = FakeIdes(tmp_path)
    yield fake
    while OPENED:
        OPENED.pop().close()
    fake.close()


async def open_door(nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes, auth: dict[str, Any] | None = None, **http: Any) -> Door:
    config = make_config(tmp_path, auth, **http)
    auth = Authenticator.from_config(config.auth, config.daemon.state_dir)
    front = FrontDoor(config, ides, auth)
    await nursery.start(front.serve)
    door = Door(front, ides)
    OPENED.append(door)
    return door


@pytest.fixture
async def door(nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes) -> AsyncIterator[Door]:
    yield await open_door(nursery, tmp_path, ides)


def token(user: str = "alice", **claims: Any) -> str:
    """A token for ``user``; one browser session (sid) per user unless ``sid`` is given."""
    claims.setdefault("sid", f"{user}-tab")
    return mint(SECRET, user, **claims)


def bearer(user: str = "alice", **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user, **claims)}"}


# ---- sign-in, cookie, cold start ---------------------------------------------------------------


async def test_first_load_with_a_token_redirects_sets_the_cookie_and_cold_starts(door: Door, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    browser = door.client()
    tok = token("alice", sid="tab-1")
    signed_in = await in_thread(lambda: browser.get(f"/files/a.txt?x=1&token={tok}&y=2"))
    assert signed_in.status == 303
    assert signed_in.header("location") == "/files/a.txt?x=1&y=2"
    assert signed_in.header("cache-control") == "no-store"
    cookie = signed_in.header("set-cookie") or ""
    assert cookie.startswith("wsup_session=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie and tok not in cookie
    assert door.ides.starts == []  # nothing started for the redirect itself
    page = await in_thread(lambda: browser.get("/files/a.txt?x=1&y=2"))
    assert page.status == 200, page.body
    assert page.body.startswith(b"stub-ide user=alice ") and b"path=/files/a.txt?x=1&y=2" in page.body
    assert door.ides.starts == ["alice"]
    assert "theia-connection-token" in browser.cookies
    seen = (await in_thread(lambda: browser.get("/headers", headers={"Host": "pod-7.example:8080"}))).json()
    names = {k.lower(): v for k, v in seen}
    assert names["host"] == "pod-7.example:8080"
    assert "wsup_session" not in names["cookie"] and "theia-connection-token=" in names["cookie"]
    assert all(tok not in record.getMessage() for record in caplog.records), "the token reached the log"


async def test_bearer_requests_are_routed_by_the_token_on_one_connection(door: Door) -> None:
    client = door.client()
    first = await in_thread(lambda: client.get("/bob/anything", headers=bearer("alice")))
    second = await in_thread(lambda: client.get("/alice/anything", headers=bearer("bob")))
    third = await in_thread(lambda: client.get("/headers", headers=bearer("bob")))
    assert first.body.startswith(b"stub-ide user=alice ") and second.body.startswith(b"stub-ide user=bob ")
    assert client.conn is not None, "keep-alive connection was closed"
    assert not any(k.lower() == "authorization" for k, _ in third.json()), "the bearer token reached the IDE"


async def test_missing_and_bad_tokens_get_401_with_a_reason(door: Door) -> None:
    client = door.client()
    missing = await in_thread(lambda: client.get("/"))
    assert missing.status == 401 and missing.json()["reason"] == "missing_token"
    assert (missing.header("www-authenticate") or "").startswith("Bearer")
    expired = await in_thread(lambda: client.get("/", headers=bearer(exp=int(time.time()) - 3600)))
    assert expired.status == 401 and expired.json()["reason"] == "expired"
    forged = await in_thread(lambda: client.get("/", headers={"Cookie": "wsup_session=1.eyJ1IjoiYm9iIn0.AAAA"}))
    assert forged.status == 401 and forged.json()["reason"] == "bad_cookie"
    bad_user = await in_thread(lambda: client.get("/?token=" + token("Not_Valid")))
    assert bad_user.status == 401 and bad_user.json()["reason"] == "invalid_user_id"
    assert door.ides.starts == []


async def test_unknown_tier_is_403_before_anything_starts(door: Door) -> None:
    answer = await in_thread(lambda: door.client().get("/", headers=bearer(tier="platinum")))
    assert answer.status == 403 and answer.json()["reason"] == "unknown_tier"
    assert door.ides.starts == []


# ---- limits: sessions, cold starts, capacity -----------------------------------------------------


async def test_second_session_beyond_the_tier_is_409_until_the_first_ends(door: Door) -> None:
    first = await in_thread(lambda: door.client().get("/", headers=bearer(sid="tab-1")))
    assert first.status == 200
    browser = door.client()
    await in_thread(lambda: browser.get("/?token=" + token(sid="tab-1")))
    await in_thread(lambda: browser.get("/"))  # Theia's connection cookie
    ws = await in_thread(lambda: door.ws("/ws", headers={"Cookie": _cookies(browser)}))
    assert ws.status == 101
    refused = await in_thread(lambda: door.client().get("/", headers=bearer(sid="tab-2")))
    assert refused.status == 409 and refused.json()["reason"] == "too_many_sessions"
    again = await in_thread(lambda: door.client().get("/", headers=bearer(sid="tab-1")))
    assert again.status == 200  # the live session itself is never refused
    starter = await in_thread(lambda: door.client().get("/", headers=bearer("bob", tier="starter", sid="b1")))
    assert starter.status == 200
    ws.close()
    with trio.fail_after(10):  # released session_linger (300ms) after its WebSocket closed
        while (await in_thread(lambda: door.client().get("/", headers=bearer(sid="tab-2")))).status != 200:
            await trio.sleep(0.05)


def _cookies(client: Client) -> str:
    return "; ".join(f"{k}={v}" for k, v in client.cookies.items())


async def test_more_cold_starts_than_allowed_get_429_and_the_same_user_joins(nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes) -> None:
    door = await open_door(nursery, tmp_path, ides, max_cold_starts=1)
    results: dict[str, Any] = {}

    async def fetch(name: str, user: str) -> None:
        results[name] = await in_thread(lambda: door.client().get("/", headers=bearer(user)))

    async with trio.open_nursery() as clients:
        clients.start_soon(fetch, "first", "slow-a")
        while "slow-a" not in ides.starts:
            await trio.sleep(0.01)
        clients.start_soon(fetch, "joiner", "slow-a")
        await trio.sleep(0.2)
        refused = await in_thread(lambda: door.client().get("/", headers=bearer("slow-b")))
    assert refused.status == 429 and refused.json()["reason"] == "too_many_cold_starts"
    assert refused.header("retry-after") == "5"
    assert results["first"].status == 200 and results["joiner"].status == 200
    assert ides.starts == ["slow-a"]


async def test_pod_full_and_draining_are_503_with_retry_after(door: Door) -> None:
    door.ides.start_error = CapacityExceeded("pod is at capacity (1 users)")
    full = await in_thread(lambda: door.client().get("/", headers=bearer()))
    assert full.status == 503 and full.json()["reason"] == "pod_full" and full.header("retry-after") == "5"
    door.ides.start_error = Draining("pod is draining")
    draining = await in_thread(lambda: door.client().get("/", headers=bearer()))
    assert draining.status == 503 and draining.json()["reason"] == "draining" and draining.header("retry-after")


async def test_failed_ide_gets_an_error_page_and_only_a_page_load_retries(door: Door) -> None:
    page = await in_thread(lambda: door.client().get("/", headers={**bearer("crash-1"), "Accept": "text/html"}))
    assert page.status == 502 and b"could not start" in page.body and page.header("content-type", ).startswith("text/html")  # type: ignore[union-attr]
    assert door.ides.starts == ["crash-1"]
    api = await in_thread(lambda: door.client().get("/api", headers=bearer("crash-1")))
    assert api.status == 502 and api.json()["reason"] == "ide_failed"
    assert door.ides.starts == ["crash-1"], "a background request restarted a FATAL IDE"
    await in_thread(lambda: door.client().get("/", headers={**bearer("crash-1"), "Sec-Fetch-Mode": "navigate"}))
    assert door.ides.starts == ["crash-1", "crash-1"]


async def test_a_slow_start_gets_the_self_reloading_starting_page(nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes) -> None:
    door = await open_door(nursery, tmp_path, ides, start_timeout="200ms")
    page = await in_thread(lambda: door.client().get("/", headers={**bearer("slow-c"), "Accept": "text/html"}))
    assert page.status == 503 and b'http-equiv="refresh"' in page.body and page.header("retry-after")
    api = await in_thread(lambda: door.client().get("/x", headers=bearer("slow-c")))
    assert api.status == 503 and api.json()["reason"] == "starting"
    with trio.fail_after(15):  # the page's reloads land once the IDE is up; nothing starts it twice
        while (await in_thread(lambda: door.client().get("/", headers=bearer("slow-c")))).status != 200:
            await trio.sleep(0.2)
    assert ides.starts == ["slow-c"]


async def test_ide_that_vanished_gets_502(door: Door) -> None:
    door.ides.infos["ghost"] = IdeInfo(State.RUNNING, "free", door.ides.socket_of("ghost"), os.getuid())
    answer = await in_thread(lambda: door.client().get("/", headers=bearer("ghost")))
    assert answer.status == 502 and answer.json()["reason"] == "ide_unavailable"


# ---- bodies and WebSockets ----------------------------------------------------------------------


async def test_bodies_stream_both_ways(door: Door) -> None:
    client = door.client()
    big = await in_thread(lambda: client.get("/big?mb=12", headers=bearer(), keep_body=False))
    assert big.status == 200 and big.length == 12 * 2**20
    chunked = await in_thread(lambda: client.get("/chunked?kb=300", headers=bearer()))
    assert chunked.status == 200 and chunked.body == b"y" * 300 * 1024
    payload = os.urandom(5 * 2**20)
    echoed = await in_thread(lambda: client.request("POST", "/echo", headers=bearer(), body=payload))
    assert echoed.status == 200 and echoed.body == payload
    head = await in_thread(lambda: client.request("HEAD", "/", headers=bearer()))
    assert head.status == 200 and head.body == b""
    after = await in_thread(lambda: client.get("/", headers=bearer()))
    assert after.status == 200  # the connection survived all of it


@pytest.mark.parametrize("kernel_splice", [True, False], ids=["os.splice", "copy"])
async def test_websocket_is_spliced_and_a_refused_upgrade_is_passed_on(
    nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes, kernel_splice: bool,
) -> None:
    door = await open_door(nursery, tmp_path, ides, kernel_splice=kernel_splice)
    browser = door.client()
    await in_thread(lambda: browser.get("/?token=" + token("dana")))
    refused = await in_thread(lambda: door.ws("/ws", headers={"Cookie": _cookies(browser)}))
    assert refused.status == 403  # like Theia: no theia-connection-token cookie yet
    refused.close()
    await in_thread(lambda: browser.get("/"))
    ws = await in_thread(lambda: door.ws("/ws", headers={"Cookie": _cookies(browser)}))
    assert ws.status == 101 and "theia-connection-token" in (ws.header("set-cookie") or "")
    for payload in (b"hello", os.urandom(70_000), os.urandom(2**20)):
        await in_thread(lambda p=payload: ws_send(ws, p))  # type: ignore[misc]
        assert await in_thread(lambda: ws_recv(ws)) == (2, payload)
    await in_thread(lambda: ws_send(ws, b"\x03\xe8", opcode=0x8))
    assert (await in_thread(lambda: ws_recv(ws)))[0] == 0x8
    ws.close()


async def test_an_open_websocket_is_closed_when_its_credentials_expire(
    nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="supervisor.frontdoor")
    door = await open_door(nursery, tmp_path, ides, auth={"leeway": "1s"})
    browser = door.client()
    await in_thread(lambda: browser.get("/?token=" + token("fran", ttl=2)))  # the cookie carries exp too
    await in_thread(lambda: browser.get("/"))
    ws = await in_thread(lambda: door.ws("/ws", headers={"Cookie": _cookies(browser)}))
    assert ws.status == 101
    began = time.monotonic()
    await in_thread(lambda: ws_send(ws, b"still in time"))
    assert await in_thread(lambda: ws_recv(ws)) == (2, b"still in time")
    opcode, payload = await in_thread(lambda: ws_recv(ws))  # waits for the expiry (exp + leeway)
    waited = time.monotonic() - began
    assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1008 and b"expired" in payload
    assert 0.5 < waited < 4.5, waited
    assert await in_thread(lambda: ws.sock.recv(100)) == b""  # then the connection is closed
    ws.close()  # as a browser does
    refused = await in_thread(lambda: browser.get("/"))  # as new requests with it are refused
    assert refused.status == 401
    with trio.fail_after(2):
        while "WebSocket /ws closed: its credentials expired" not in caplog.text:
            await trio.sleep(0.02)


async def test_a_user_paused_by_an_operator_gets_503_at_once(door: Door) -> None:
    await in_thread(lambda: door.client().get("/", headers=bearer("gus")))
    info = door.ides.infos["gus"]
    door.ides.infos["gus"] = IdeInfo(State.PAUSED, info.tier, info.socket_path, info.uid)
    with trio.fail_after(2):
        api = await in_thread(lambda: door.client().get("/api", headers=bearer("gus")))
        page = await in_thread(lambda: door.client().get("/", headers={**bearer("gus"), "Accept": "text/html"}))
        ws = await in_thread(lambda: door.ws("/ws", headers=bearer("gus")))
    assert api.status == 503 and api.json()["reason"] == "paused" and api.header("retry-after") == "5"
    assert "operator paused" in api.json()["message"] and "workspacectl resume gus" in api.json()["hint"]
    assert page.status == 503 and b"paused" in page.body and page.header("retry-after") == "5"
    assert ws.status == 503
    assert door.ides.starts == ["gus"], "a paused user was started again"
    door.ides.infos["gus"] = info  # resumed
    assert (await in_thread(lambda: door.client().get("/api", headers=bearer("gus")))).status == 200


async def test_large_bodies_spliced_both_ways_on_a_kept_alive_connection_stay_in_step(
    door: Door, monkeypatch: pytest.MonkeyPatch,
) -> None:
    spliced: list[int] = []
    real = proxy.splice_exactly

    async def recording(*args: Any, **kwargs: Any) -> bool:
        moved = await real(*args, **kwargs)
        spliced.append(args[2] if moved else -1)
        return moved

    monkeypatch.setattr(proxy, "splice_exactly", recording)
    client = door.client()
    for target in ("/big?mb=3", "/", "/big?mb=1", "/chunked?kb=100", "/big?mb=2"):
        answer = await in_thread(lambda t=target: client.get(t, headers=bearer()))  # type: ignore[misc]
        assert answer.status == 200, target
        if target.startswith("/big"):
            assert answer.body == b"x" * int(target.rpartition("=")[2]) * 2**20
        elif target.startswith("/chunked"):
            assert answer.body == b"y" * 100 * 1024
        else:
            assert answer.body.startswith(b"stub-ide user=alice")
    head = await in_thread(lambda: client.request("HEAD", "/big?mb=4", headers=bearer()))
    assert head.status == 200 and head.body == b"" and head.header("content-length") == str(4 * 2**20)
    for size in (3 * 2**20, 100, 2**20 + 7):  # uploads: spliced when large, on the same connection
        payload = os.urandom(size)
        counted = await in_thread(lambda p=payload: client.request("POST", "/count", headers=bearer(), body=p))  # type: ignore[misc]
        assert counted.status == 200 and counted.json() == {"length": size, "sha256": hashlib.sha256(payload).hexdigest()}
    assert (await in_thread(lambda: client.get("/", headers=bearer()))).status == 200
    # 3 + 1 + 2 MiB down, 3 MiB + 1 MiB up; less the pieces h11 had already read with the heads
    assert len(spliced) == 5 and all(n > 2**20 // 2 for n in spliced), spliced


async def test_websocket_with_a_token_parameter_is_served_not_redirected(door: Door) -> None:
    client = door.client()
    await in_thread(lambda: client.get("/", headers=bearer("erin")))  # Theia's connection cookie
    ws = await in_thread(lambda: door.ws(f"/ws?x=1&token={token('erin')}",
                                            headers={"Cookie": _cookies(client)}))
    assert ws.status == 101
    await in_thread(lambda: ws_send(ws, b"ping"))
    assert await in_thread(lambda: ws_recv(ws)) == (2, b"ping")
    ws.close()


async def test_unauthenticated_websocket_gets_401(door: Door) -> None:
    ws = await in_thread(lambda: door.ws("/ws"))
    assert ws.status == 401
    ws.close()


# ---- hostile clients -------------------------------------------------------------------------------


def raw_exchange(host: str, port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while True:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            received += piece
    return received


async def test_malformed_and_oversized_requests_are_answered_and_closed(door: Door) -> None:
    garbage = await in_thread(lambda: raw_exchange(door.host, door.port, b"\x16\x03\x01 not http at all\r\n\r\n"))
    assert garbage.startswith(b"HTTP/1.1 400 ")
    huge = await in_thread(lambda: raw_exchange(door.host, door.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"))
    assert huge.startswith(b"HTTP/1.1 431 ")
    ok = await in_thread(lambda: door.client().get("/", headers=bearer()))
    assert ok.status == 200


async def test_slowloris_is_cut_off_while_others_are_served(nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes) -> None:
    door = await open_door(nursery, tmp_path, ides, header_timeout="1s")

    def slow_client() -> tuple[float, bytes]:
        began = time.monotonic()
        with socket.create_connection((door.host, door.port), timeout=10) as sock:
            received = b""
            try:
                for piece in [b"GET / HTTP/1.1\r\n", b"Host: x\r\n"] + [b"X-Drip: 1\r\n"] * 50:
                    sock.sendall(piece)
                    time.sleep(0.2)
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                while piece := sock.recv(4096):
                    received += piece
            except ConnectionResetError:
                pass
        return time.monotonic() - began, received

    async with trio.open_nursery() as clients:
        outcome: dict[str, Any] = {}

        async def run_slow() -> None:
            outcome["slow"] = await in_thread(slow_client)

        clients.start_soon(run_slow)
        await trio.sleep(0.3)
        served = await in_thread(lambda: door.client().get("/", headers=bearer()))
        assert served.status == 200
    took, received = outcome["slow"]
    assert received == b"" or received.startswith(b"HTTP/1.1 408 ")  # a client still sending may see a reset
    assert took < 5, f"slow client held its connection for {took:.1f}s (it drips for 10s)"


async def test_idle_keepalive_connection_is_closed(nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes) -> None:
    door = await open_door(nursery, tmp_path, ides, keepalive_timeout="300ms")

    def idle_client() -> bytes:
        with socket.create_connection((door.host, door.port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(1.0)
            data = b""
            while piece := sock.recv(4096):
                data += piece
            return data

    data = await in_thread(idle_client)
    assert data.startswith(b"HTTP/1.1 401 ") and data.count(b"HTTP/1.1") == 1  # answered, then closed when idle


async def test_a_failing_connection_does_not_disturb_the_server(door: Door) -> None:
    for _ in range(20):
        with socket.create_connection((door.host, door.port)) as sock:
            sock.sendall(b"GET /big?mb=50 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token().encode() + b"\r\n\r\n")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
    client = door.client()
    ok = await in_thread(lambda: client.get("/", headers=bearer()))
    assert ok.status == 200
    client.close()
    with trio.fail_after(10):  # every reset connection is noticed and released
        while door.front.connections:
            await trio.sleep(0.02)


async def test_a_kept_alive_ide_connection_closed_under_a_get_is_retried_once(
    nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes,
) -> None:
    """An IDE may close an idle kept-alive connection just as the next request is sent (node's
    keepAliveTimeout): an idempotent GET is sent again on a fresh connection."""
    path = tmp_path / "flaky.sock"
    exchanges: list[int] = []

    async def serve_flaky(stream: trio.SocketStream) -> None:
        # Answers the first request of each connection; closes on the second without answering.
        data = b""
        answered = 0
        async with stream:
            while True:
                piece = await stream.receive_some(65536)
                if not piece:
                    return
                data += piece
                while b"\r\n\r\n" in data:
                    _, data = data.split(b"\r\n\r\n", 1)
                    if answered:
                        return
                    answered += 1
                    exchanges.append(answered)
                    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(str(path))
    sock.listen(16)
    listener = trio.SocketListener(sock)
    nursery.start_soon(trio.serve_listeners, serve_flaky, [listener])
    ides.infos["flaky"] = IdeInfo(State.RUNNING, "free", path, os.getuid())
    door = await open_door(nursery, tmp_path, ides)
    client = door.client()
    answers = [await in_thread(lambda: client.get("/", headers=bearer("flaky"))) for _ in range(3)]
    assert [(a.status, a.body) for a in answers] == [(200, b"ok")] * 3
    assert exchanges == [1, 1, 1]  # three IDE connections, each answered once
    assert door.front.connections == 1  # ... and the browser's one connection carried all three


async def test_an_ide_socket_served_by_another_uid_gets_502_and_no_byte(
    nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes,
) -> None:
    """SO_PEERCRED names whoever last listen()ed on the socket: a listener of another uid than the
    user's (here this process, for a user of uid 65534) is refused before a byte is sent, for
    requests and WebSocket upgrades alike - answered 502 ide_unavailable, logged and counted."""
    from supervisor.metrics import REGISTRY

    received: list[bytes] = []
    ended = 0

    async def record(stream: trio.SocketStream) -> None:
        nonlocal ended
        async with stream:
            while piece := await stream.receive_some(65536):
                received.append(piece)
        ended += 1

    path = tmp_path / "other.sock"
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(str(path))
    sock.listen(16)
    nursery.start_soon(trio.serve_listeners, record, [trio.SocketListener(sock)])
    assert os.getuid() != 65534
    ides.infos["mallory"] = IdeInfo(State.RUNNING, "free", path, 65534)
    door = await open_door(nursery, tmp_path, ides)

    def rejected() -> float:
        return REGISTRY.get_sample_value("workspace_supervisor_upstream_rejections_total", {"reason": "peer_uid"}) or 0.0

    before = rejected()
    answer = await in_thread(lambda: door.client().get("/", headers=bearer("mallory")))
    assert answer.status == 502 and answer.json()["reason"] == "ide_unavailable"
    ws = await in_thread(lambda: door.ws("/ws", bearer("mallory")))
    assert ws.status == 502
    assert rejected() == before + 2
    with trio.fail_after(5):  # the refused connections were made, then closed unused
        while ended < 2:
            await trio.sleep(0.01)
    assert received == []


async def test_ports_are_not_served_without_a_network_namespace_of_the_ides_own(door: Door) -> None:
    client = door.client()
    assert (await in_thread(lambda: client.get("/", headers=bearer()))).status == 200
    refused = await in_thread(lambda: client.get("/port/3000/", headers=bearer()))
    assert refused.status == 404 and refused.json()["reason"] == "ports_not_served"
    again = await in_thread(lambda: client.get("/after", headers=bearer()))
    assert again.status == 200 and b"path=/after" in again.body
