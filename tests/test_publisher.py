"""The registry publisher: pod resources, heartbeats, outages and catching up - against real SQLite
files and a real daemon (outages are real: an unopenable path, a write lock held by another
process)."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, cast

import pytest
import trio

from supervisor import config as config_module
from supervisor.cgroups import CgroupDriver
from supervisor.manager import SessionManager
from supervisor.podlimits import PodResources, detect
from supervisor.publisher import Publisher, advertised_address, host_ip
from supervisor.registry import SessionRecord, SqliteRegistry, place
from supervisor.sessions import State, UserSession
from tests.conftest import is_root, pure_cgroup_v2, v1_controllers_mounted
from tests.harness import Daemon, http_get, poll, started
from tests.probe_client import get_json, probes_address, scrape, value

needs_kernel = pytest.mark.skipif(
    not (is_root() and (v1_controllers_mounted() or pure_cgroup_v2())),
    reason="needs root and cgroup controllers (v1 cpu/memory/pids/freezer, or pure v2)",
)


# ---- a publisher on a real SQLite file (no daemon) ---------------------------------------------------


class _Driver:
    version = 2


def _manager(tmp_path: Path, registry_path: Path, heartbeat: str = "1s", lease: str = "5s", **pod: Any) -> SessionManager:
    config = config_module.from_dict({
        "pod": {"id": "pod-a", "capacity": 4, **pod},
        "daemon": {"state_dir": str(tmp_path / "state")},
        "registry": {"path": str(registry_path), "heartbeat": heartbeat, "lease": lease},
    })
    manager = SessionManager(config, cast(CgroupDriver, _Driver()))
    for user, state in (("alice", State.RUNNING), ("bob", State.STARTING), ("carol", State.FATAL)):
        session = UserSession(user=user, tier="free", state=state)
        manager.pod.users[user] = session
    return manager


def _session(sid: str, user: str = "alice") -> SessionRecord:
    return SessionRecord(session_id=sid, user=user, pod_id="pod-a", workspace=f"/workspace/shard-1/{user}", since=1.0)


@pytest.mark.parametrize("configured, bound, found, expected", [
    ("ws-3.pods.svc:8080", [("0.0.0.0", 8080)], "10.0.0.5", "ws-3.pods.svc:8080"),  # the operator's word wins
    ("", [("10.1.2.3", 8080)], None, "10.1.2.3:8080"),  # a concrete listen address, as is
    ("", [("0.0.0.0", 8080)], "10.0.0.5", "10.0.0.5:8080"),  # every interface: this host's address
    ("", [("::", 8443)], "fd00::5", "[fd00::5]:8443"),
    ("", [("0.0.0.0", 8080)], None, ""),  # no usable address: empty (the daemon warns)
    ("", [], "10.0.0.5", ""),  # front door off
])
def test_the_address_routers_are_given(configured: str, bound: list[tuple[str, int]], found: str | None, expected: str) -> None:
    asked: list[bool] = []

    def lookup() -> str | None:
        asked.append(True)
        return found

    assert advertised_address(configured, bound, lookup) == expected
    assert asked == ([True] if not configured and bound and bound[0][0] in ("0.0.0.0", "::") else [])


def test_this_hosts_address_is_never_loopback() -> None:
    ip = host_ip()
    assert ip is None or not ipaddress.ip_address(ip).is_loopback


async def test_heartbeat_publishes_the_pod_and_claims_its_users_reservations(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    manager = _manager(tmp_path, path)
    publisher = Publisher(manager.config, manager,
                          resources=PodResources(cpu_millicores=8000, memory_bytes=16 * 2**30))
    with SqliteRegistry(path, lease=5) as router:
        assert await publisher.heartbeat()
        held = place(router, "alice")  # a router reserved a slot for alice, who is now running here
        assert [r.user for r in router.list_reservations()] == ["alice"]
        publisher.session_opened(_session("s1"))
        assert await publisher.heartbeat()
        [pod] = router.list_pods()
        assert (pod.pod_id, pod.capacity, pod.active_users, pod.free_slots, pod.sessions) == ("pod-a", 4, 2, 2, 1)
        assert (pod.cgroup_version, pod.draining, pod.daemon_version) == (2, False, "0.1.0")
        assert (pod.cpu_headroom_millicores, pod.memory_headroom_bytes) == (8000, 16 * 2**30)
        assert pod.lease_expires_at - pod.heartbeat_at == pytest.approx(5)
        assert router.list_reservations() == [], f"{held} not claimed"
        assert [s.session_id for s in router.list_sessions(pod="pod-a")] == ["s1"]

        manager.pod.draining = True
        assert await publisher.heartbeat()
        [pod] = router.list_pods()
        assert (pod.draining, pod.free_slots, pod.room) == (True, 0, 0)

        assert await publisher.withdraw()
        assert router.list_pods(include_expired=True) == [] and router.list_sessions() == []
        assert publisher.status()["state"] == "withdrawn"


async def test_an_unopenable_registry_is_counted_then_caught_up(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the registry's directory should be")
    path = blocker / "registry.db"
    manager = _manager(tmp_path, path)
    publisher = Publisher(manager.config, manager, resources=PodResources(cpu_millicores=1000, memory_bytes=2**30))
    publisher.session_opened(_session("s1"))
    publisher.session_opened(_session("s2", "bob"))
    assert not await publisher.heartbeat()
    publisher.session_closed("s1")
    assert not await publisher.heartbeat()
    status = publisher.status()
    assert (status["state"], status["failures"], status["consecutive_failures"]) == ("unreachable", 2, 2)
    assert status["last_error"].startswith("registry_unavailable: cannot create the registry directory")
    assert status["pending_session_writes"] == 2
    assert not publisher.healthy

    blocker.unlink()  # the outage ends
    assert await publisher.heartbeat()
    status = publisher.status()
    assert (status["state"], status["consecutive_failures"], status["failures"]) == ("ok", 0, 2)
    assert status["pending_session_writes"] == 0 and status["last_success_age_s"] is not None
    with SqliteRegistry(path) as router:
        [pod] = router.list_pods()
        assert (pod.active_users, pod.sessions) == (2, 1)
        assert [s.session_id for s in router.list_sessions()] == ["s2"]


async def test_the_service_heartbeats_at_once_and_when_woken(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    manager = _manager(tmp_path, path, heartbeat="30s", lease="60s")
    publisher = Publisher(manager.config, manager, resources=PodResources(cpu_millicores=1000, memory_bytes=2**30))
    with SqliteRegistry(path) as router:
        async with trio.open_nursery() as nursery:
            await nursery.start(publisher.serve)
            with trio.fail_after(5):
                while router.get_pod("pod-a") is None:  # the first heartbeat does not wait for the period
                    await trio.sleep(0.01)
            manager.pod.draining = True
            publisher.wake()  # e.g. a drain began: publish now, not in 30 s
            with trio.fail_after(5):
                while not router.get_pod("pod-a").draining:  # type: ignore[union-attr]
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


async def test_the_configured_pod_memory_replaces_the_detected_one(tmp_path: Path) -> None:
    manager = _manager(tmp_path, tmp_path / "registry.db", memory="12Gi")
    publisher = Publisher(manager.config, manager)
    async with trio.open_nursery() as nursery:
        await nursery.start(publisher.serve)
        nursery.cancel_scope.cancel()
    assert publisher.resources is not None and publisher.resources.memory_bytes == 12 * 2**30
    assert publisher.resources.cpu_millicores == detect().cpu_millicores


# ---- a real daemon ---------------------------------------------------------------------------------------------


def _record(d: Daemon) -> Any:
    with SqliteRegistry(d.base / "registry.db") as registry:
        return registry.get_pod("test-pod")


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    yield from started()


@needs_kernel
def test_a_real_daemon_publishes_its_occupancy(daemon: Daemon) -> None:
    pod = poll(lambda: _record(daemon), 5, "the first heartbeat")
    assert (pod.capacity, pod.active_users, pod.free_slots, pod.draining) == (10, 0, 10, False)
    assert pod.cgroup_version == daemon.ctl_json("pod")["pod"]["cgroup_version"]
    assert pod.cpu_headroom_millicores > 0 and pod.memory_headroom_bytes > 0
    assert pod.lease_expires_at - pod.heartbeat_at == pytest.approx(3)

    with SqliteRegistry(daemon.base / "registry.db") as router:
        place(router, "alice")
    assert daemon.ctl("start", "alice").returncode == 0
    poll(lambda: (p := _record(daemon)).active_users == 1 and p.free_slots == 9 and p.reserved == 0, 5,
         "alice published and her reservation claimed")
    pods = daemon.ctl_json("pods")["pods"]
    assert [(p["pod_id"], p["active_users"], p["room"]) for p in pods] == [("test-pod", 1, 9)]
    text = daemon.ctl("pods").stdout
    assert text.splitlines()[0].split()[:3] == ["POD", "USERS", "SESSIONS"] and "1/10" in text
    assert pod.address == "" and text.splitlines()[1].split()[-1] == "-"  # front door off, no [pod] address


@needs_kernel
def test_the_configured_address_is_published() -> None:
    with contextmanager(started)(pod__address="ws-3.pods.svc:8080") as daemon:
        pod = poll(lambda: _record(daemon), 5, "the first heartbeat")
        assert pod.address == "ws-3.pods.svc:8080"
        assert daemon.ctl_json("pods")["pods"][0]["address"] == "ws-3.pods.svc:8080"
        assert "ws-3.pods.svc:8080" in daemon.ctl("pods").stdout


@needs_kernel
def test_a_registry_outage_at_start_never_stops_the_daemon_and_it_catches_up(tmp_path: Path) -> None:
    blocker = tmp_path / "registry-dir"
    blocker.write_text("a file where the registry's directory should be")
    d = Daemon(**{"registry__path": str(blocker / "registry.db")})
    d.start()
    try:
        assert d.ctl("start", "alice").returncode == 0
        assert "uid=" in http_get(d.ide_socket("alice"))
        registry = d.ctl_json("pod")["pod"]["registry"]
        assert registry["state"] == "unreachable" and registry["failures"] >= 1
        assert "cannot create the registry directory" in registry["last_error"]
        assert re.search(r"^registry +state=unreachable, ", d.ctl("pod").stdout, re.M)
        status, body = get_json(probes_address(d), "/readyz")
        assert status == 200 and body["ready"] is True
        assert [f["reason"] for f in body["degraded"]] == ["registry_unreachable"]
        text = scrape(d)
        assert value(text, "workspace_supervisor_registry_up") == 0
        assert value(text, "workspace_supervisor_registry_heartbeat_failures_total", reason="registry_unavailable") >= 1
        failed = d.ctl("pods")
        assert failed.returncode == 1 and "hint:" in failed.stderr

        blocker.unlink()  # the registry comes back
        poll(lambda: d.ctl_json("pod")["pod"]["registry"]["state"] == "ok", 5, "registry reachable again")
        with SqliteRegistry(blocker / "registry.db") as router:
            [pod] = router.list_pods()
        assert (pod.pod_id, pod.active_users) == ("test-pod", 1)
        assert get_json(probes_address(d), "/readyz")[1]["degraded"] == []
        assert value(scrape(d), "workspace_supervisor_registry_up") == 1
        assert "registry: reachable again" in d.log_text()
    finally:
        d.cleanup()


@needs_kernel
def test_a_locked_registry_mid_run_disturbs_no_user(daemon: Daemon) -> None:
    assert daemon.ctl("start", "alice").returncode == 0
    poll(lambda: _record(daemon) and _record(daemon).active_users == 1, 5, "alice published")
    other = sqlite3.connect(daemon.base / "registry.db", isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")  # another process holds the write lock: heartbeats wait, then fail
        poll(lambda: daemon.ctl_json("pod")["pod"]["registry"]["consecutive_failures"] >= 1, 15, "a failed heartbeat")
        # Meanwhile users run, start and answer as usual.
        started = time.monotonic()
        assert daemon.ctl("start", "bob").returncode == 0
        assert time.monotonic() - started < 3
        assert "uid=" in http_get(daemon.ide_socket("alice"))
        registry = daemon.ctl_json("pod")["pod"]["registry"]
        assert registry["state"] == "unreachable" and "locked" in registry["last_error"]
        assert get_json(probes_address(daemon), "/readyz")[0] == 200
    finally:
        other.execute("ROLLBACK")
        other.close()
    # The lock is gone: the next heartbeat publishes the pod as it is now (bob included).
    poll(lambda: (p := _record(daemon)) is not None and p.active_users == 2, 15, "caught up")
    assert daemon.ctl_json("pod")["pod"]["registry"]["state"] == "ok"


@needs_kernel
def test_a_clean_exit_removes_the_pod_and_a_detach_leaves_it(daemon: Daemon) -> None:
    poll(lambda: _record(daemon), 5, "the first heartbeat")
    daemon.kill(signal.SIGUSR2)  # detach: the next daemon takes over the record
    assert daemon.proc is not None and daemon.proc.returncode == 0
    assert _record(daemon) is not None
    daemon.start()
    poll(lambda: _record(daemon), 5, "republished")
    daemon.kill(signal.SIGTERM)
    assert daemon.proc is not None and daemon.proc.returncode == 0
    with SqliteRegistry(daemon.base / "registry.db") as registry:
        assert registry.get_pod("test-pod", include_expired=True) is None
