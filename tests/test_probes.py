"""Probes: the readiness decision (pure), the HTTP server over real sockets (limits, timeouts,
methods), and /healthz, /readyz, /admitting, /startupz of a real daemon."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Iterator

import psutil
import pytest
import trio

from supervisor import metrics
from supervisor.probes import OwnAddresses, ProbeServer, Readiness, Slot, choose_victim, evaluate, parse_listen, peer_group
from tests.conftest import is_root, pure_cgroup_v2, v1_controllers_mounted
from tests.harness import Daemon, poll, started
from tests.probe_client import get, get_json, probes_address

needs_kernel = pytest.mark.skipif(
    not (is_root() and (v1_controllers_mounted() or pure_cgroup_v2())),
    reason="needs root and cgroup controllers (v1 cpu/memory/pids/freezer, or pure v2)",
)


# ---- the decision ------------------------------------------------------------------------------------


def _facts(**changes: Any) -> dict[str, Any]:
    facts: dict[str, Any] = dict(started=True, draining=False, occupied=3, capacity=10, cgroup_error=None, registry_ok=True)
    facts.update(changes)
    return facts


def test_ready_and_admitting_when_started_with_room_and_working_cgroups() -> None:
    r = evaluate(**_facts())
    assert (r.ready, r.reasons, r.admitting, r.not_admitting, r.degraded) == (True, (), True, (), ())


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"started": False}, "starting"),
        ({"cgroup_error": "cannot create x: /sys/fs/cgroup/pids/ws is missing"}, "cgroups_failing"),
    ],
)
def test_not_ready_when_the_daemon_cannot_serve(changes: dict[str, Any], reason: str) -> None:
    r = evaluate(**_facts(**changes))
    assert not r.ready and not r.admitting
    assert [f.reason for f in r.reasons] == [f.reason for f in r.not_admitting] == [reason]
    assert r.reasons[0].message


@pytest.mark.parametrize(("changes", "reason"), [({"draining": True}, "draining"), ({"occupied": 10}, "full")])
def test_a_full_or_draining_pod_stays_ready_but_admits_no_one(changes: dict[str, Any], reason: str) -> None:
    r = evaluate(**_facts(**changes))
    assert r.ready and r.reasons == ()
    assert not r.admitting and [f.reason for f in r.not_admitting] == [reason] and r.not_admitting[0].message
    body = r.to_dict()
    assert (body["ready"], body["admitting"], body["not_admitting"][0]["reason"]) == (True, False, reason)


def test_every_reason_is_listed_at_once() -> None:
    r = evaluate(**_facts(draining=True, occupied=10, cgroup_error="broken"))
    assert [f.reason for f in r.reasons] == ["cgroups_failing"]
    assert [f.reason for f in r.not_admitting] == ["cgroups_failing", "draining", "full"]


def test_a_registry_outage_degrades_but_keeps_the_pod_ready() -> None:
    r = evaluate(**_facts(registry_ok=False, registry_error="registry_unavailable: locked"))
    assert r.ready
    assert [(f.reason, f.message) for f in r.degraded] == [("registry_unreachable", "registry_unavailable: locked")]
    body = r.to_dict()
    assert body["version"] == 2 and body["ready"] is True and body["degraded"][0]["reason"] == "registry_unreachable"
    assert body["admitting"] is True  # the pod keeps admitting the users routed to it


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert parse_listen("[::]:9100") == ("::", 9100)
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)


def test_peer_groups_put_every_address_a_user_can_pick_in_one() -> None:
    for peer in ("127.0.0.1", "127.0.0.77", "127.255.0.3", "::1", "::ffff:127.0.0.9"):
        assert peer_group(peer, "127.0.0.1") == "local"
    assert peer_group("10.1.2.3", "10.1.2.3") == "local"  # the pod's own address
    assert peer_group("10.1.0.1", "10.1.2.3") == "10.1.0.1"  # e.g. the kubelet on the node
    assert peer_group("::ffff:10.1.0.1", "::ffff:10.1.2.3") == "10.1.0.1"
    assert peer_group("fe80::1%eth0", "fe80::2%eth0") == "fe80::1"
    assert peer_group("10.1.2.3", "127.0.0.1") == "local"  # the pod's address to a loopback one: only the pod can
    assert peer_group("10.9.9.9", "10.1.2.3", lambda ip: ip == "10.9.9.9") == "local"  # another address of the pod


def _own_addresses() -> list[str]:
    """The host's non-loopback IPv4 addresses (a pod's: what a user may bind a connection to)."""
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback]


def test_own_addresses_are_those_that_can_be_bound() -> None:
    own = OwnAddresses(limit=2)
    for address in _own_addresses():
        assert own(address)
    assert not own("192.0.2.254" if "192.0.2.254" not in _own_addresses() else "198.51.100.254")
    assert own("127.0.0.1") and len(own.known) <= 2


async def test_a_user_connecting_from_the_pods_addresses_is_still_one_peer() -> None:
    """Connections from loopback addresses and from the pod's own address, to loopback and to the
    pod's address, all count against one cap."""
    sources = ["127.0.0.1", "127.0.0.9", *_own_addresses()]
    if len(sources) < 3:
        pytest.skip("the host has no non-loopback IPv4 address")
    async with trio.open_nursery() as nursery:
        server = ProbeServer("0.0.0.0:0", FakeSource(), max_per_peer=4, max_connections=64, request_timeout=30, head_timeout=30)
        _, port = parse_listen(await nursery.start(server.serve))
        held = []
        for i in range(24):
            sock = socket.socket()
            sock.bind((sources[i % len(sources)], 0))
            sock.connect((sources[(i // len(sources)) % len(sources)], port))
            held.append(sock)

        def closed_by_server() -> int:
            closed = 0
            for sock in held:
                try:
                    closed += sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
                except BlockingIOError:
                    pass
            return closed

        with trio.fail_after(5):
            while closed_by_server() < 20:  # one peer: all but its 4 newest closed
                await trio.sleep(0.02)
        assert server.connections == 4 and {slot.peer for slot in server.open} == {"local"}
        for sock in held:
            sock.close()
        nursery.cancel_scope.cancel()


def _slots(*peers: str, answering: tuple[int, ...] = ()) -> list[Slot]:
    return [Slot(peer, answering=i in answering) for i, peer in enumerate(peers)]


def test_room_means_no_victim() -> None:
    assert choose_victim(_slots("local", "kubelet"), "local", max_connections=3, max_per_peer=2) is None


def test_a_peer_at_its_cap_loses_its_oldest_waiting_connection() -> None:
    slots = _slots("local", "local", "local", "kubelet", answering=(0,))
    assert choose_victim(slots, "local", max_connections=10, max_per_peer=3) is slots[1]
    slots = _slots("local", "local", answering=(0, 1))  # all being answered: the oldest
    assert choose_victim(slots, "local", max_connections=10, max_per_peer=2) is slots[0]
    # The newest half is spared even while waiting (its request is likely in flight): the oldest.
    slots = _slots("local", "local", "local", "local", answering=(0, 1))
    assert choose_victim(slots, "local", max_connections=10, max_per_peer=4) is slots[0]


def test_a_full_port_takes_from_the_peer_holding_the_most() -> None:
    slots = _slots("kubelet", "local", "prometheus", "local", "local")
    assert choose_victim(slots, "kubelet", max_connections=5, max_per_peer=4) is slots[1]
    assert choose_victim(slots, "other", max_connections=5, max_per_peer=4) is slots[1]


# ---- the server, over real sockets ----------------------------------------------------------------------


class FakeSource:
    def __init__(self) -> None:
        self.started = False
        self.ready = Readiness(True)
        self.scrapes = 0

    def is_started(self) -> bool:
        return self.started

    def readiness(self) -> Readiness:
        return self.ready

    def metrics(self) -> bytes:
        self.scrapes += 1
        return b"# HELP x y\n# TYPE x gauge\nx 1.0\n"


async def _exchange(address: str, request: bytes, *, read_timeout: float = 5.0) -> bytes:
    host, port = parse_listen(address)
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(read_timeout):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


async def _serve(nursery: trio.Nursery, source: FakeSource, **kwargs: Any) -> str:
    server = ProbeServer("127.0.0.1:0", source, **kwargs)
    address: str = await nursery.start(server.serve)
    return address


async def test_routes_and_status_codes() -> None:
    source = FakeSource()
    async with trio.open_nursery() as nursery:
        address = await _serve(nursery, source)
        assert address.startswith("127.0.0.1:") and not address.endswith(":0")

        def request(method: str, path: str) -> bytes:
            return f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()

        answer = await _exchange(address, request("GET", "/healthz"))
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok\n")
        assert b"connection: close" in answer.lower()
        assert (await _exchange(address, request("GET", "/startupz"))).startswith(b"HTTP/1.1 503 ")
        source.started = True
        assert (await _exchange(address, request("GET", "/startupz"))).startswith(b"HTTP/1.1 200 ")

        answer = await _exchange(address, request("GET", "/readyz?verbose=1"))
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 ") and b"application/json" in head
        assert json.loads(body)["ready"] is True
        assert (await _exchange(address, request("GET", "/admitting"))).startswith(b"HTTP/1.1 200 ")
        source.ready = evaluate(**_facts(draining=True))
        assert (await _exchange(address, request("GET", "/readyz"))).startswith(b"HTTP/1.1 200 ")
        answer = await _exchange(address, request("GET", "/admitting"))
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["not_admitting"][0]["reason"] == "draining"
        source.ready = evaluate(**_facts(started=False))
        answer = await _exchange(address, request("GET", "/readyz"))
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["reasons"][0]["reason"] == "starting"

        answer = await _exchange(address, request("HEAD", "/readyz"))
        assert answer.startswith(b"HTTP/1.1 503 ") and answer.endswith(b"\r\n\r\n")  # no body

        answer = await _exchange(address, request("GET", "/metrics"))
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"x 1.0\n") and source.scrapes == 1

        assert (await _exchange(address, request("GET", "/admin"))).startswith(b"HTTP/1.1 404 ")
        answer = await _exchange(address, request("POST", "/healthz"))
        assert answer.startswith(b"HTTP/1.1 405 ") and b"allow: get, head" in answer.lower()
        nursery.cancel_scope.cancel()


async def test_an_oversized_head_gets_431_and_garbage_gets_400() -> None:
    async with trio.open_nursery() as nursery:
        address = await _serve(nursery, FakeSource(), max_head_bytes=1024)
        answer = await _exchange(address, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 431 ")
        answer = await _exchange(address, b"BLAH\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
        nursery.cancel_scope.cancel()


async def test_a_slow_client_is_cut_off_and_others_are_still_served() -> None:
    async with trio.open_nursery() as nursery:
        address = await _serve(nursery, FakeSource(), request_timeout=0.5)
        host, port = parse_listen(address)
        slow = await trio.open_tcp_stream(host, port)
        async with slow:
            await slow.send_all(b"GET /healthz HTTP/1.1\r\nHo")  # and never the rest
            answer = await _exchange(address, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 ")
            with trio.fail_after(5):
                assert await slow.receive_some(1024) == b""  # closed by the server after 0.5 s
        nursery.cancel_scope.cancel()


async def test_a_new_connection_is_served_by_closing_the_oldest_waiting_one() -> None:
    async with trio.open_nursery() as nursery:
        server = ProbeServer("127.0.0.1:0", FakeSource(), max_connections=2, request_timeout=5)
        address = await nursery.start(server.serve)
        host, port = parse_listen(address)
        idle = [await trio.open_tcp_stream(host, port) for _ in range(2)]  # they send nothing
        with trio.fail_after(5):
            while server.connections < 2:
                await trio.sleep(0.01)
        assert (await _exchange(address, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        with trio.fail_after(5):
            assert await idle[0].receive_some(1024) == b""  # the oldest, closed to make room
        assert server.connections == 1  # the other idle one
        for stream in idle:
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_the_server_answers_500_when_the_source_fails() -> None:
    class Broken(FakeSource):
        def readiness(self) -> Readiness:
            raise RuntimeError("boom")

    async with trio.open_nursery() as nursery:
        address = await _serve(nursery, Broken())
        answer = await _exchange(address, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 500 ")
        assert (await _exchange(address, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        nursery.cancel_scope.cancel()


class BigMetrics(FakeSource):
    def metrics(self) -> bytes:
        return b"# " + b"x" * (1 << 20) + b"\n"  # more than the kernel buffers between the server and a reader that never reads


@asynccontextmanager
async def flood(style: str, count: int, address: str) -> AsyncIterator[None]:
    """A hostile user process holding ``count`` connections to ``address`` (tests/probe_flood.py)."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.probe_flood", style, str(count), address], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        with trio.fail_after(30):
            assert (await proc.stdout.receive_some(100)).startswith(b"holding ")
        yield
    finally:
        proc.kill()
        await proc.wait()


def _timed_healthz(address: str) -> tuple[float, int]:
    begun = time.monotonic()
    status = get(address, "/healthz", timeout=1.0)[0]
    return time.monotonic() - begun, status


@pytest.mark.parametrize("style", ["idle", "slowloris", "half", "unread"])
async def test_healthz_answers_within_a_second_while_a_user_holds_600_connections(style: str) -> None:
    closed = {r: metrics.PROBE_CONNECTIONS_CLOSED.labels(reason=r)._value.get() for r in ("evicted", "timeout")}
    async with trio.open_nursery() as nursery:
        server = ProbeServer("127.0.0.1:0", BigMetrics())
        address: str = await nursery.start(server.serve)
        async with flood(style, 600, address):  # from 127.0.0.2-251, the kubelet stand-in from 127.0.0.1: one group
            for _ in range(10):
                elapsed, status = await trio.to_thread.run_sync(_timed_healthz, address)
                assert status == 200 and elapsed < 1.0, (status, elapsed)
            assert server.connections <= server.max_per_peer
        nursery.cancel_scope.cancel()
    evicted = metrics.PROBE_CONNECTIONS_CLOSED.labels(reason="evicted")._value.get() - closed["evicted"]
    assert evicted >= 600 - server.max_per_peer  # the flood was accepted and pushed out, not left in the queue


# ---- a real daemon -------------------------------------------------------------------------------------------


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    yield from started(**{"pod__capacity": 2})


@needs_kernel
def test_real_probes_follow_the_pod(daemon: Daemon) -> None:
    address = probes_address(daemon)
    assert get(address, "/healthz")[0] == 200
    assert get(address, "/startupz")[0] == 200
    status, body = get_json(address, "/readyz")
    assert status == 200, body
    assert body["ready"] is True and body["reasons"] == [] and body["degraded"] == []
    assert body["pod"]["capacity"] == 2 and body["registry"]["state"] == "ok"

    assert daemon.ctl("start", "alice").returncode == 0
    assert get_json(address, "/readyz")[1]["pod"]["occupied"] == 1
    assert daemon.ctl("start", "bob").returncode == 0
    status, body = get_json(address, "/readyz")
    assert status == 200, body  # full: its users stay in the Service
    assert body["reasons"] == [] and body["admitting"] is False
    assert [r["reason"] for r in body["not_admitting"]] == ["full"]
    status, body = get_json(address, "/admitting")
    assert status == 503 and [r["reason"] for r in body["not_admitting"]] == ["full"]
    assert get(address, "/healthz")[0] == 200  # full is not unhealthy

    assert daemon.ctl("stop", "bob").returncode == 0
    assert get_json(address, "/admitting")[0] == 200


@needs_kernel
@pytest.mark.skipif(not v1_controllers_mounted() or pure_cgroup_v2(), reason="removes the daemon's v1 subtree from under it (cgroup v1 hosts)")
def test_a_broken_cgroup_hierarchy_makes_the_pod_unready() -> None:
    # No launcher pool: its spare groups would keep the subtree from being removed.
    daemon = Daemon(**{"pod__capacity": 2, "ide__launcher_pool": 0})
    daemon.start()
    try:
        _broken_hierarchy_makes_the_pod_unready(daemon)
    finally:
        daemon.cleanup()


def _broken_hierarchy_makes_the_pod_unready(daemon: Daemon) -> None:
    address = probes_address(daemon)
    assert get(address, "/readyz")[0] == 200
    subtrees = [p for p in daemon.cgroup_dirs() if p.name == daemon.name]
    assert subtrees
    for subtree in subtrees:  # empty: no user has started yet
        subtree.rmdir()
    result = daemon.ctl("start", "carol")
    assert result.returncode == 1
    status, body = get_json(address, "/readyz")
    assert status == 503, body
    assert [r["reason"] for r in body["reasons"]] == ["cgroups_failing"]
    assert "missing" in body["reasons"][0]["message"]
    assert get(address, "/healthz")[0] == 200
    # The hierarchy comes back (an operator re-creates it): the next successful start clears it.
    for subtree in subtrees:
        subtree.mkdir()
    assert daemon.ctl("start", "carol").returncode == 0
    poll(lambda: get(address, "/readyz")[0] == 200, 5, "ready again")


def test_probes_port_in_use_stops_the_daemon_with_a_hint() -> None:
    if not is_root() or not (v1_controllers_mounted() or pure_cgroup_v2()):
        pytest.skip("needs root and cgroup controllers to start a daemon")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = Daemon(**{"probes__listen": f"127.0.0.1:{port}"})
        try:
            with pytest.raises(AssertionError, match="exited early"):
                d.start()
            assert d.proc is not None and d.proc.wait(10) == 1
            assert f"cannot listen on 127.0.0.1:{port} for the probes" in d.log_text()
            assert "[probes] listen" in d.log_text()
        finally:
            d.cleanup()


@needs_kernel
def test_a_real_daemon_answers_its_probes_while_a_user_holds_600_connections(daemon: Daemon) -> None:
    address = probes_address(daemon)

    async def probe_under_flood() -> None:
        for style in ("half", "unread"):
            async with flood(style, 600, address):
                for path in ("/healthz", "/readyz", "/startupz", "/healthz"):
                    begun = time.monotonic()
                    status = (await trio.to_thread.run_sync(lambda: get(address, path, timeout=1.0)))[0]
                    assert status == 200 and time.monotonic() - begun < 1.0, (style, path, status)

    trio.run(probe_under_flood)
    assert "Traceback" not in daemon.log_text()
