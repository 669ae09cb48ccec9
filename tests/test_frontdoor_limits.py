"""What one client can hold of the front door (supervisor/frontdoor/limits.py and its use in server.py).

The pure pieces (client keys, the token bucket, slots) as unit tests; then a real in-process front
door with stub IDEs (the fixtures of test_frontdoor_server): connections without credentials per
client address, rejected tokens per client address, WebSockets and requests in flight per user -
each flooded from 127.0.0.1 while another address (127.0.0.2) or another user keeps working.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import time
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.frontdoor.auth import Identity
from supervisor.frontdoor.limits import RejectionLimiter, Slots, Waiting, client_key
from supervisor.metrics import FRONTDOOR_LIMITS
from tests.frontdoor_client import outside_address, ws_recv, ws_send
from tests.test_frontdoor_server import Door, FakeIdes, _cookies, bearer, ides, in_thread, open_door, token  # noqa: F401 - ides is a fixture

OTHER = outside_address()  # another client (a browser outside the pod)
needs_other = pytest.mark.skipif(not OTHER, reason="this host has no non-loopback IPv4 address to be another client from")


# ---- pure logic ----------------------------------------------------------------------------------


@pytest.mark.parametrize("host, local, key", [
    ("192.0.2.7", "192.0.2.1", "192.0.2.7"),
    ("127.0.0.1", "127.0.0.1", "local"),
    ("127.0.0.2", "127.0.0.1", "local"),  # any loopback address: a user in the pod can pick any
    ("127.45.6.7", "10.0.0.5", "local"),
    ("::1", "::1", "local"),
    ("::ffff:127.0.0.3", "::ffff:10.0.0.5", "local"),
    ("10.0.0.5", "10.0.0.5", "local"),  # the pod's own address, to itself
    ("::ffff:10.0.0.5", "10.0.0.5", "local"),
    ("10.0.0.5", "127.0.0.1", "10.0.0.5"),  # the pod's address to loopback: one more client, not one per port
    ("::ffff:192.0.2.7", "::ffff:192.0.2.1", "192.0.2.7"),  # IPv4-mapped: the IPv4 client
    ("2001:db8:1:2:aaaa::1", "2001:db8:9::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:9::1", "2001:db8:1:2::/64"),  # any address of one host's /64: one client
    ("2001:db8:1:3::1", "2001:db8:9::1", "2001:db8:1:3::/64"),
    ("2001:db8:9::1", "2001:db8:9::1", "local"),
    ("fe80::1%eth0", "fe80::2%eth0", "fe80::/64"),
    ("?", "", "?"),
])
def test_client_key(host: str, local: str, key: str) -> None:
    assert client_key(host, local) == key


def test_rejection_limiter_allows_a_burst_then_one_per_interval() -> None:
    limiter = RejectionLimiter(burst=3, rate=0.5)  # one more every 2 s
    for _ in range(3):
        assert limiter.retry_after("a", 100.0) == 0
        limiter.rejected("a", 100.0)
    assert limiter.retry_after("a", 100.0) == pytest.approx(2.0)
    assert limiter.retry_after("a", 101.0) == pytest.approx(1.0)
    assert limiter.retry_after("b", 100.0) == 0  # another client is not held back
    assert limiter.retry_after("a", 102.0) == 0
    limiter.rejected("a", 102.0)
    assert limiter.retry_after("a", 102.5) == pytest.approx(1.5)
    assert limiter.retry_after("a", 1000.0) == 0  # refilled, never above the burst
    for _ in range(3):
        limiter.rejected("a", 1000.0)
    assert limiter.retry_after("a", 1000.0) > 0


def test_rejection_limiter_memory_is_bounded_and_keeps_the_limited() -> None:
    limiter = RejectionLimiter(burst=2, rate=1.0, max_clients=10)
    limiter.rejected("attacker", 0.0)
    limiter.rejected("attacker", 0.0)  # the first client seen, and empty
    for i in range(1000):  # many addresses (an IPv6 attacker has many /64s), one rejection each
        limiter.rejected(f"c{i}", 0.0)
        assert len(limiter) <= 10
    assert limiter.retry_after("attacker", 0.5) > 0  # the most limited are kept


def test_slots() -> None:
    slots = Slots()
    assert slots.take("u", 2) and slots.take("u", 2)
    assert not slots.take("u", 2)
    assert slots.take("v", 2)
    assert (slots.count("u"), slots.total()) == (2, 3)
    slots.give_back("u")
    assert slots.take("u", 2)
    for _ in range(3):
        slots.give_back("u")
    assert slots.count("u") == 0 and "u" not in slots.held  # no entry left behind


def test_waiting_gives_the_oldest_of_the_client_holding_the_most() -> None:
    waiting: Waiting[str] = Waiting()
    assert waiting.victim() is None
    for key, item in (("a", "a1"), ("b", "b1"), ("b", "b2"), ("c", "c1"), ("b", "b3")):
        waiting.add(key, item)
    waiting.discard("b", "b2")  # went on to send a request
    assert len(waiting) == 4
    assert waiting.victim(unless="b") is None  # b holds the most: never closed for b's newcomers
    assert waiting.victim() == "b1"  # b holds the most: its oldest
    assert waiting.victim(unless="a") in ("b3", "c1")  # now all hold one: another's
    rest = {waiting.victim(), waiting.victim()}
    assert "a1" in rest and None not in rest
    assert waiting.victim() is None and not waiting.by_key and len(waiting) == 0  # no key left behind


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "discard", "victim", "victim_unless"]), st.integers(0, 3), st.integers(0, 5)), max_size=60))
def test_waiting_always_gives_the_oldest_of_another_client_holding_the_most(ops: list[tuple[str, int, int]]) -> None:
    waiting: Waiting[tuple[int, int]] = Waiting()
    model: dict[int, list[tuple[int, int]]] = {}  # key -> items, oldest first
    for op, k, i in ops:
        key, item = str(k), (k, i)
        if op == "add":
            waiting.add(key, item)
            if item not in model.setdefault(k, []):
                model[k].append(item)
        elif op == "discard":
            waiting.discard(key, item)
            if item in model.get(k, []):
                model[k].remove(item)
        else:
            unless = key if op == "victim_unless" else ""
            got = waiting.victim(unless=unless)
            held = {key_: items for key_, items in model.items() if items}
            most = max((len(items) for items in held.values()), default=0)
            candidates = [key_ for key_, items in held.items() if len(items) == most and str(key_) != unless]
            if not candidates:
                assert got is None
            else:
                assert got is not None and got[0] in candidates and got == held[got[0]][0]
            if got is not None:
                model[got[0]].remove(got)
        assert len(waiting) == sum(len(items) for items in model.values())


# ---- a real front door ---------------------------------------------------------------------------


def limit_count(limit: str) -> float:
    return FRONTDOOR_LIMITS.labels(limit=limit)._value.get()


def raw(port: int, data: bytes, *, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.sendall(data)
    return sock


def read_answer(sock: socket.socket) -> bytes:
    """Everything until the head and the body announced (or EOF)."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            return data
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length and (piece := sock.recv(65536)):
        body += piece
    return head + b"\r\n\r\n" + body


def closed(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True if the peer closes ``sock`` within ``timeout`` (anything it still sends is read and dropped)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def get(port: int, target: str, headers: dict[str, str], *, source: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", target, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def theia_cookie(user: str) -> str:
    """The stub IDE's connection-token cookie (as Theia, it wants it on a WebSocket upgrade)."""
    return "theia-connection-token=stub-" + hashlib.sha256(user.encode()).hexdigest()[:16]


NO_CREDENTIALS = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


@needs_other
async def test_connections_without_credentials_are_capped_per_address(nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes) -> None:
    door = await open_door(nursery, tmp_path, ides, max_unauthenticated=5)
    before = limit_count("unauthenticated")

    def flood() -> None:
        held = [raw(door.port, NO_CREDENTIALS) for _ in range(5)]
        try:
            for sock in held:
                assert read_answer(sock).startswith(b"HTTP/1.1 401 ")  # answered and kept alive
            for _ in range(3):
                over = raw(door.port, NO_CREDENTIALS)
                answer = read_answer(over)
                assert answer.startswith(b"HTTP/1.1 429 ") and b"\r\nretry-after: 1\r\n" in answer, answer
                assert json.loads(answer.partition(b"\r\n\r\n")[2])["reason"] == "too_many_connections"
                assert closed(over)
                over.close()
            # Another address is not held back, and neither are valid credentials from it.
            assert get(door.port, "/", bearer("bob"), source=OTHER)[0] == 200
            # A connection that presents valid credentials gives its place back.
            held[0].sendall(b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token().encode() + b"\r\n\r\n")
            assert read_answer(held[0]).startswith(b"HTTP/1.1 200 ")
            extra = raw(door.port, NO_CREDENTIALS)
            assert read_answer(extra).startswith(b"HTTP/1.1 401 ")
            held.append(extra)
            assert door.front.status()["unauthenticated_connections"] == 5
            held.append(raw(door.port, NO_CREDENTIALS))
            assert read_answer(held[-1]).startswith(b"HTTP/1.1 429 ")
        finally:
            for sock in held:
                sock.close()

    await in_thread(flood)
    assert limit_count("unauthenticated") - before == 4
    with trio.fail_after(5):  # every place given back once the connections are gone
        while door.front.unauthenticated.total():
            await trio.sleep(0.01)


async def test_a_connection_without_credentials_gets_a_short_idle_timeout(nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes) -> None:
    door = await open_door(nursery, tmp_path, ides, unauthenticated_timeout="300ms", keepalive_timeout="60s")
    before = limit_count("unauthenticated_idle")

    def check() -> None:
        anonymous = raw(door.port, NO_CREDENTIALS)
        signed = raw(door.port, b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token().encode() + b"\r\n\r\n")
        try:
            assert read_answer(anonymous).startswith(b"HTTP/1.1 401 ")
            assert read_answer(signed).startswith(b"HTTP/1.1 200 ")
            began = time.monotonic()
            assert closed(anonymous, timeout=5)
            assert time.monotonic() - began < 3
            assert not closed(signed, timeout=1.0)  # keepalive_timeout: still open
            signed.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # and usable (401: no credentials this time)
            assert read_answer(signed).startswith(b"HTTP/1.1 401 ")
        finally:
            anonymous.close()
            signed.close()

    await in_thread(check)
    assert limit_count("unauthenticated_idle") - before >= 1


@needs_other
async def test_rejected_tokens_are_rate_limited_per_address_before_any_check(nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes) -> None:
    door = await open_door(nursery, tmp_path, ides, rejected_tokens=5, rejected_tokens_interval="60s")
    port = door.port
    verified = token("alice")
    browser = door.client()
    await in_thread(lambda: browser.get("/?token=" + token("carol")))  # a cookie session from 127.0.0.1
    assert (await in_thread(lambda: get(port, "/", {"Authorization": f"Bearer {verified}"})))[0] == 200
    checks = 0
    real_verify = door.front.auth.tokens._verify

    def counting(text: str) -> Identity:
        nonlocal checks
        checks += 1
        return real_verify(text)

    door.front.auth.tokens._verify = counting  # type: ignore[method-assign,assignment]
    before = limit_count("rejected_tokens")
    garbage = token("alice")[:-8] + "AAAAAAAA"

    def storm() -> None:
        for _ in range(5):
            assert get(port, "/", {"Authorization": f"Bearer {garbage}"})[0] == 401
        for target, headers in ((f"/?token={garbage}", {}), ("/", {"Authorization": f"Bearer {garbage}x"}),
                                ("/", {"Authorization": f"Bearer {token('alice', sid='fresh')}"})):
            status, head, body = get(port, target, headers)
            assert status == 429 and json.loads(body)["reason"] == "too_many_rejections", (status, body)
            assert 55 <= int(head["retry-after"]) <= 60
            assert head.get("connection") == "close"

    await in_thread(storm)
    assert checks == 5  # none once the bucket was empty (not even the valid new token's)
    assert limit_count("rejected_tokens") - before == 3
    # Not held back: a token verified before, the cookie session (from the same address), and
    # anything from another address.
    assert (await in_thread(lambda: get(port, "/", {"Authorization": f"Bearer {verified}"})))[0] == 200
    assert (await in_thread(lambda: browser.get("/"))).status == 200
    assert (await in_thread(lambda: get(port, "/", {"Authorization": f"Bearer {token('bob')}"}, source=OTHER)))[0] == 200
    assert (await in_thread(lambda: get(port, "/", {"Authorization": f"Bearer {garbage}"}, source=OTHER)))[0] == 401
    # The sign-in form is held back too.
    body = b"token=" + garbage.encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    await in_thread(lambda: conn.request("POST", "/.wsup/sign-in", body=body, headers={
        "Content-Type": "application/x-www-form-urlencoded", "Origin": f"http://127.0.0.1:{port}", "Host": f"127.0.0.1:{port}"}))
    answer = await in_thread(conn.getresponse)
    assert answer.status == 429
    conn.close()
    assert checks == 7  # the two from the other address only


async def test_websockets_per_user_are_capped_by_the_tier(nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes) -> None:
    door = await open_door(nursery, tmp_path, ides)
    door.front.config.tiers["free"].__dict__["max_websockets"] = 3  # frozen dataclass: as if configured
    before = limit_count("websockets")
    auth = {"Authorization": f"Bearer {token('alice')}", "Cookie": theia_cookie("alice")}
    opened = [await in_thread(lambda: door.ws("/ws", headers=auth)) for _ in range(3)]
    assert [ws.status for ws in opened] == [101] * 3
    over = await in_thread(lambda: door.ws("/ws", headers=auth))
    assert over.status == 429 and over.header("retry-after")
    assert b'"reason": "too_many_connections"' in bytes(over.pending) or b"too_many_connections" in await in_thread(lambda: over.sock.recv(4096))
    assert limit_count("websockets") - before == 1
    # Another user is not held back; the capped user's open WebSockets keep working.
    other = await in_thread(lambda: door.ws("/ws", headers={"Authorization": f"Bearer {token('bob')}", "Cookie": theia_cookie("bob")}))
    assert other.status == 101
    await in_thread(lambda: ws_send(opened[0], b"still here"))
    assert await in_thread(lambda: ws_recv(opened[0])) == (2, b"still here")
    # Closing one gives its place back.
    opened[1].close()
    with trio.fail_after(5):
        while door.front.websockets.count("alice") > 2:
            await trio.sleep(0.01)
    again = await in_thread(lambda: door.ws("/ws", headers=auth))
    assert again.status == 101


async def test_requests_in_flight_per_user_are_capped_by_the_tier(nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes) -> None:
    door = await open_door(nursery, tmp_path, ides)
    door.front.config.tiers["free"].__dict__["max_requests"] = 2
    before = limit_count("requests")
    auth = "Authorization: Bearer " + token("alice")
    await in_thread(lambda: get(door.port, "/", {"Authorization": f"Bearer {token('alice')}"}))
    # Two uploads that never finish: two requests in flight.
    head = f"POST /upload HTTP/1.1\r\nHost: x\r\n{auth}\r\nContent-Length: 1000000\r\n\r\n".encode() + b"x" * 1000
    stuck = [await in_thread(lambda: raw(door.port, head)) for _ in range(2)]
    try:
        with trio.fail_after(5):
            while door.front.requests.count("alice") < 2:
                await trio.sleep(0.01)
        status, headers, body = await in_thread(lambda: get(door.port, "/", {"Authorization": f"Bearer {token('alice')}"}))
        assert status == 429 and json.loads(body)["reason"] == "too_many_connections" and "retry-after" in headers
        assert limit_count("requests") - before == 1
        assert (await in_thread(lambda: get(door.port, "/", {"Authorization": f"Bearer {token('bob')}"})))[0] == 200
    finally:
        stuck[0].close()
    with trio.fail_after(5):
        while door.front.requests.count("alice") > 1:
            await trio.sleep(0.01)
    assert (await in_thread(lambda: get(door.port, "/", {"Authorization": f"Bearer {token('alice')}"})))[0] == 200
    stuck[1].close()


def mid_request(door: Door) -> socket.socket:
    """A connection in the middle of a request head without credentials, as the front door sees
    it: registered as waiting idle once accepted, no longer once the first bytes arrived."""
    waiting = door.front.waiting

    def settle(count: int) -> None:
        deadline = time.monotonic() + 5
        while len(waiting) != count:
            assert time.monotonic() < deadline, f"{len(waiting)} connections waiting idle, not {count}"
            time.sleep(0.005)

    before = len(waiting)
    sock = socket.create_connection(("127.0.0.1", door.port), timeout=5)
    settle(before + 1)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    settle(before)
    return sock


def hold(port: int, request: bytes = NO_CREDENTIALS, *, source: str = "127.0.0.1", status: bytes = b"") -> socket.socket:
    """A kept-alive connection that has had one request answered (read; with ``status``)."""
    sock = raw(port, request, source=source)
    answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:300]
    return sock


async def test_every_loopback_address_is_one_client(nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes) -> None:
    """A user in the pod can pick any 127.x source address: all of them count as one client."""
    door = await open_door(nursery, tmp_path, ides, max_unauthenticated=3)

    def flood() -> None:
        held = [hold(door.port, source=f"127.0.0.{i}", status=b"401") for i in (1, 2, 3)]
        try:
            assert door.front.unauthenticated.held == {"local": 3}
            over = raw(door.port, NO_CREDENTIALS, source="127.9.9.9")
            held.append(over)
            assert read_answer(over).startswith(b"HTTP/1.1 429 ") and closed(over)
        finally:
            for sock in held:
                sock.close()

    await in_thread(flood)


async def test_connections_per_user_are_capped_by_the_tier(nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes) -> None:
    """A user's own token cannot hold the front door's connections: at most the tier's
    max_connections kept alive at once; one more gets 429 and is closed; other users are served."""
    door = await open_door(nursery, tmp_path, ides)
    door.front.config.tiers["free"].__dict__["max_connections"] = 3
    before = limit_count("connections")
    alice = b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token("alice").encode() + b"\r\n\r\n"

    def flood() -> None:
        held = [raw(door.port, alice) for _ in range(3)]
        try:
            for sock in held:
                assert read_answer(sock).startswith(b"HTTP/1.1 200 ")
            over = raw(door.port, alice)
            answer = read_answer(over)
            assert answer.startswith(b"HTTP/1.1 429 ") and b"\r\nconnection: close\r\n" in answer.lower(), answer
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["reason"] == "too_many_connections"
            assert closed(over)
            over.close()
            assert door.front.user_connections.count("alice") == 3
            assert get(door.port, "/", bearer("bob"))[0] == 200  # another user, same address
            # The held connections keep working (they are alice's already).
            held[0].sendall(alice)
            assert read_answer(held[0]).startswith(b"HTTP/1.1 200 ")
            # A connection that moves to another user's credentials moves its place.
            held[1].sendall(b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token("bob").encode() + b"\r\n\r\n")
            assert read_answer(held[1]).startswith(b"HTTP/1.1 200 ")
            assert door.front.user_connections.count("alice") == 2
            again = raw(door.port, alice)
            held.append(again)
            assert read_answer(again).startswith(b"HTTP/1.1 200 ")
        finally:
            for sock in held:
                sock.close()

    await in_thread(flood)
    assert limit_count("connections") - before == 1
    with trio.fail_after(5):  # every place given back once the connections are gone
        while door.front.user_connections.total():
            await trio.sleep(0.01)


@needs_other
async def test_when_every_connection_is_taken_an_idle_one_without_credentials_makes_room(
        nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes) -> None:
    """All max_connections open: a new connection is served by closing a connection that has
    presented no credentials and waits for a request - the oldest of the client holding the
    most, but never for that client's own newcomers (503: a flood must not churn); never a
    signed-in one, never one in the middle of a request. None left: 503."""
    door = await open_door(nursery, tmp_path, ides, max_connections=6, header_timeout="30s")
    before = limit_count("evicted")
    signed = b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token("alice").encode() + b"\r\n\r\n"
    bob = b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token("bob").encode() + b"\r\n\r\n"

    def refused(request: bytes, source: str = "127.0.0.1") -> bool:
        sock = raw(door.port, request, source=source)
        try:
            return read_answer(sock).startswith(b"HTTP/1.1 503 ") and closed(sock)
        finally:
            sock.close()

    def flood() -> None:
        socks: list[socket.socket] = []
        try:
            other = socket.create_connection(("127.0.0.1", door.port), timeout=5, source_address=(OTHER, 0))
            socks.append(other)  # another client's connection, nothing sent yet
            attacker = [hold(door.port, status=b"401") for _ in range(3)]  # idle after a 401 ("local")
            socks += attacker
            browser = hold(door.port, signed, status=b"200")  # signed in, kept alive
            socks.append(browser)
            deadline = time.monotonic() + 5
            while len(door.front.waiting) != 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            half = mid_request(door)
            socks.append(half)
            assert door.front.connections == 6 and len(door.front.waiting) == 4
            # The attacker's client holds the most: its newcomers are refused, not served by
            # closing its own.
            assert refused(NO_CREDENTIALS)
            assert not closed(attacker[0], timeout=0.2)
            # Another client's newcomers are served; the attacker's oldest idle ones closed for them.
            for n in range(3):
                socks.append(hold(door.port, bob, source=OTHER, status=b"200"))
                assert closed(attacker[n])
            # Now only that client's own idle connection is left: its newcomer is refused, and
            # a newcomer from the attacker's address is served by closing it.
            assert refused(bob, OTHER)
            socks.append(hold(door.port, signed, status=b"200"))
            assert closed(other)
            # Never the half-sent request nor the signed-in connection.
            assert not closed(half, timeout=0.3) and not closed(browser, timeout=0.3)
            browser.sendall(signed)
            assert read_answer(browser).startswith(b"HTTP/1.1 200 ")
            # Nothing left to close: 503 and closed.
            assert refused(signed) and refused(signed, OTHER)
        finally:
            for sock in socks:
                sock.close()

    await in_thread(flood)
    assert limit_count("evicted") - before == 4
