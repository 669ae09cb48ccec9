"""Probes: the readiness decision (pure), the HTTP server over real sockets (limits, timeouts,
methods), and /healthz, /readyz, /startupz of a real daemon."""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest
import trio

from supervisor.probes import ProbeServer, Readiness, evaluate, parse_listen
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


def test_ready_when_started_with_room_and_working_cgroups() -> None:
    r = evaluate(**_facts())
    assert (r.ready, r.reasons, r.degraded) == (True, (), ())


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"started": False}, "starting"),
        ({"draining": True}, "draining"),
        ({"occupied": 10}, "full"),
        ({"cgroup_error": "cannot create x: /sys/fs/cgroup/pids/ws is missing"}, "cgroups_failing"),
    ],
)
def test_not_ready_and_why(changes: dict[str, Any], reason: str) -> None:
    r = evaluate(**_facts(**changes))
    assert not r.ready
    assert [f.reason for f in r.reasons] == [reason]
    assert r.reasons[0].message


def test_every_reason_is_listed_at_once() -> None:
    r = evaluate(**_facts(draining=True, occupied=10, cgroup_error="broken"))
    assert [f.reason for f in r.reasons] == ["draining", "full", "cgroups_failing"]


def test_a_registry_outage_degrades_but_keeps_the_pod_ready() -> None:
    r = evaluate(**_facts(registry_ok=False, registry_error="registry_unavailable: locked"))
    assert r.ready
    assert [(f.reason, f.message) for f in r.degraded] == [("registry_unreachable", "registry_unavailable: locked")]
    body = r.to_dict()
    assert body["version"] == 1 and body["ready"] is True and body["degraded"][0]["reason"] == "registry_unreachable"


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert parse_listen("[::]:9100") == ("::", 9100)
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)


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
        source.ready = evaluate(**_facts(draining=True))
        answer = await _exchange(address, request("GET", "/readyz"))
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["reasons"][0]["reason"] == "draining"

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


async def test_connections_above_the_limit_are_closed() -> None:
    async with trio.open_nursery() as nursery:
        server = ProbeServer("127.0.0.1:0", FakeSource(), max_connections=2, request_timeout=5)
        address = await nursery.start(server.serve)
        host, port = parse_listen(address)
        idle = [await trio.open_tcp_stream(host, port) for _ in range(2)]  # they send nothing
        with trio.fail_after(5):
            while server.connections < 2:
                await trio.sleep(0.01)
        try:  # closed at once, unanswered (a reset when the request was already in flight)
            assert await _exchange(address, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == b""
        except trio.BrokenResourceError:
            pass
        for stream in idle:
            await stream.aclose()
        with trio.fail_after(5):
            while server.connections:
                await trio.sleep(0.01)
        assert (await _exchange(address, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
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
    assert status == 503
    assert [r["reason"] for r in body["reasons"]] == ["full"]
    assert get(address, "/healthz")[0] == 200  # full is not unhealthy

    assert daemon.ctl("stop", "bob").returncode == 0
    assert get_json(address, "/readyz")[0] == 200


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
