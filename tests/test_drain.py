"""Drain: the wait policy (fast, on trio's autojump clock) and real drains of a real daemon with
real IDE processes and the SQLite registry - nothing a user saved is lost."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Collection, Iterator, cast

import pytest
import trio

from supervisor.drain import Drainer
from supervisor.manager import SessionManager
from supervisor.publisher import Publisher
from supervisor.registry import SqliteRegistry
from supervisor.sessions import Pod, State, UserSession
from tests.conftest import is_root, pure_cgroup_v2, v1_controllers_mounted
from tests.harness import Daemon, http_get, poll, started
from tests.probe_client import get_json, probes_address, scrape, value

needs_kernel = pytest.mark.skipif(
    not (is_root() and (v1_controllers_mounted() or pure_cgroup_v2())),
    reason="needs root and cgroup controllers (v1 cpu/memory/pids/freezer, or pure v2)",
)


# ---- the policy, with stand-ins for the manager and the publisher --------------------------------------


class FakeManager:
    def __init__(self, states: dict[str, State]) -> None:
        self.pod = Pod(capacity=10)
        for user, state in states.items():
            self.pod.users[user] = UserSession(user=user, tier="free", state=state)
        self.config = SimpleNamespace(daemon=SimpleNamespace(shutdown_deadline=30.0))
        self.stopped_at: float | None = None

    async def stop_all(self, deadline: float) -> None:
        self.stopped_at = trio.current_time()
        for session in self.pod.users.values():
            session.state = State.STOPPED


class FakePublisher:
    def __init__(self) -> None:
        self.wakes = 0
        self.withdrawn_at: float | None = None

    def wake(self) -> None:
        self.wakes += 1

    async def withdraw(self) -> bool:
        self.withdrawn_at = trio.current_time()
        return True


def _drainer(states: dict[str, State], idle_users: Any = None) -> tuple[Drainer, FakeManager, FakePublisher]:
    manager, publisher = FakeManager(states), FakePublisher()
    drainer = Drainer(cast(SessionManager, manager), cast(Publisher, publisher), idle_users=idle_users)
    return drainer, manager, publisher


async def test_without_activity_tracking_running_users_get_the_whole_deadline(autojump_clock: Any) -> None:
    drainer, manager, publisher = _drainer({"alice": State.RUNNING, "bob": State.PAUSED, "carol": State.FATAL})
    async with trio.open_nursery() as nursery:
        await nursery.start(drainer.serve)
        start = trio.current_time()
        status = drainer.request(60.0, by="test")
        assert manager.pod.draining and publisher.wakes == 1
        assert (status["phase"], status["deadline_in_s"], status["active_users"]) == ("waiting", 60.0, 1)
        await drainer.finished.wait()
    assert manager.stopped_at == pytest.approx(start + 60.0, abs=0.6)
    assert manager.stopped_at is not None and publisher.withdrawn_at is not None
    assert publisher.withdrawn_at >= manager.stopped_at
    assert (drainer.phase, drainer.ended_wait) == ("done", "deadline passed")


async def test_no_running_user_means_no_wait(autojump_clock: Any) -> None:
    drainer, manager, _ = _drainer({"bob": State.PAUSED, "carol": State.BACKOFF})
    async with trio.open_nursery() as nursery:
        await nursery.start(drainer.serve)
        start = trio.current_time()
        drainer.request(600.0, by="test")
        await drainer.finished.wait()
    assert manager.stopped_at == pytest.approx(start, abs=0.01)
    assert drainer.ended_wait == "no active users"


async def test_the_idle_hook_ends_the_wait_once_every_running_user_is_idle(autojump_clock: Any) -> None:
    idle: set[str] = {"bob"}

    def idle_users() -> Collection[str]:
        return idle

    drainer, manager, _ = _drainer({"alice": State.RUNNING, "bob": State.RUNNING, "carol": State.PAUSED}, idle_users)
    async with trio.open_nursery() as nursery:
        await nursery.start(drainer.serve)
        start = trio.current_time()
        drainer.request(600.0, by="test")
        assert drainer.active_users() == ["alice"]  # bob is connected but idle; carol is paused
        await trio.sleep(42)
        idle.add("alice")  # alice goes idle too
        await drainer.finished.wait()
    assert manager.stopped_at is not None and 42 <= manager.stopped_at - start <= 43
    assert drainer.ended_wait == "no active users"


async def test_a_starting_user_is_always_waited_for(autojump_clock: Any) -> None:
    drainer, manager, _ = _drainer({"alice": State.STARTING, "bob": State.RUNNING}, lambda: ["alice", "bob"])
    async with trio.open_nursery() as nursery:
        await nursery.start(drainer.serve)
        start = trio.current_time()
        drainer.request(30.0, by="test")
        assert drainer.active_users() == ["alice"]
        await trio.sleep(5)
        manager.pod.users["alice"].state = State.RUNNING  # ready, and (per the hook) idle
        await drainer.finished.wait()
    assert manager.stopped_at is not None and 5 <= manager.stopped_at - start <= 6


async def test_a_second_request_only_moves_the_deadline_earlier(autojump_clock: Any) -> None:
    drainer, manager, publisher = _drainer({"alice": State.RUNNING})
    async with trio.open_nursery() as nursery:
        await nursery.start(drainer.serve)
        start = trio.current_time()
        drainer.request(100.0, by="first")
        assert drainer.request(500.0, by="later")["deadline_in_s"] == 100.0
        await trio.sleep(10)
        assert drainer.request(5.0, by="sooner")["deadline_in_s"] == 5.0
        await drainer.finished.wait()
    assert manager.stopped_at == pytest.approx(start + 15.0, abs=0.6)
    assert drainer.requested_by == "first" and publisher.wakes == 1


# ---- real drains -------------------------------------------------------------------------------------------


def _registry_pod(d: Daemon) -> Any:
    with SqliteRegistry(d.base / "registry.db") as registry:
        return registry.get_pod("test-pod", include_expired=True)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_a_file(d: Daemon, user: str) -> tuple[Path, str]:
    """What a user saved before the drain: a file in the workspace, owned by the user."""
    info = d.user(user)
    saved = Path(info["workspace"]) / "src" / "main.py"
    saved.parent.mkdir(exist_ok=True)
    saved.write_bytes(b"print('saved before the drain')\n" * 1000)
    for path in (saved.parent, saved):
        os.chown(path, info["uid"], info["uid"])
    return saved, _sha(saved)


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    yield from started(**{"daemon__drain_deadline": "60s"})


@needs_kernel
def test_drain_admits_nobody_lets_users_finish_then_stops_them_gracefully_and_loses_nothing(daemon: Daemon) -> None:
    for user in ("saver-1", "alice"):
        assert daemon.ctl("start", user).returncode == 0
    saver = daemon.user("saver-1")
    saved, digest = _save_a_file(daemon, "saver-1")
    pids = [saver["pid"], daemon.user("alice")["pid"]]
    poll(lambda: _registry_pod(daemon) and _registry_pod(daemon).active_users == 2, 5, "published")

    started = time.monotonic()
    result = daemon.ctl("drain", "--deadline", "3s", "--json")
    assert result.returncode == 0, result.stderr
    drain = json.loads(result.stdout)
    assert drain["version"] == 1 and drain["drain"]["phase"] == "waiting" and drain["drain"]["active_users"] == 2

    # Draining: still ready (its users stay in the Service), not admitting, not offered by the
    # registry, no new user; running users carry on.
    address = probes_address(daemon)
    status, body = get_json(address, "/readyz")
    assert status == 200 and body["reasons"] == [] and body["admitting"] is False
    status, body = get_json(address, "/admitting")
    assert status == 503 and [r["reason"] for r in body["not_admitting"]] == ["draining"]
    poll(lambda: _registry_pod(daemon).draining, 5, "draining published")
    assert (_registry_pod(daemon).free_slots, _registry_pod(daemon).room) == (0, 0)
    refused = daemon.ctl("start", "bob")
    assert refused.returncode == 1 and "draining" in refused.stderr and "hint:" in refused.stderr
    assert value(scrape(daemon), "workspace_supervisor_draining") == 1
    assert "uid=" in http_get(daemon.ide_socket("saver-1"))
    assert daemon.user("saver-1")["state"] == "RUNNING"

    # After the deadline: every IDE gets SIGTERM (the saver flushes), the pod leaves the registry,
    # and the daemon exits 0.
    assert daemon.proc is not None
    assert daemon.proc.wait(30) == 0
    assert time.monotonic() - started >= 3.0
    flushed = Path(saver["workspace"]) / "flushed-on-sigterm.txt"
    assert flushed.read_text() == "flushed by saver-1 on SIGTERM\n"
    assert flushed.stat().st_uid == saver["uid"]
    assert _sha(saved) == digest and saved.stat().st_uid == saver["uid"]
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    assert daemon.cgroup_dirs("saver-1") == [] and daemon.cgroup_dirs("alice") == []
    assert _registry_pod(daemon) is None
    log = daemon.log_text()
    assert "drain started by workspacectl drain" in log and "drain finished" in log
    assert f"user=saver-1 pid {saver['pid']} exited with status 0" in log  # flushed and exited on SIGTERM, not killed


@needs_kernel
def test_sigterm_drains_and_a_second_sigterm_ends_the_wait(daemon: Daemon) -> None:
    assert daemon.ctl("start", "saver-2").returncode == 0
    saver = daemon.user("saver-2")
    saved, digest = _save_a_file(daemon, "saver-2")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    poll(lambda: daemon.ctl_json("pod")["pod"]["drain"]["phase"] == "waiting", 5, "draining")
    pod = daemon.ctl_json("pod")["pod"]
    assert pod["draining"] is True and pod["drain"]["requested_by"] == "SIGTERM"
    assert 50 < pod["drain"]["deadline_in_s"] <= 60
    assert daemon.user("saver-2")["state"] == "RUNNING"  # a 60 s drain_deadline: users may finish

    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(20) == 0
    assert time.monotonic() - started < 10
    assert (Path(saver["workspace"]) / "flushed-on-sigterm.txt").exists()
    assert _sha(saved) == digest
    assert _registry_pod(daemon) is None
    assert "SIGTERM received again: ending the drain's wait now" in daemon.log_text()


@needs_kernel
def test_drain_wait_without_running_users_returns_once_the_daemon_is_gone(daemon: Daemon) -> None:
    assert daemon.ctl("start", "crash-3").returncode == 1  # FATAL users are not waited for
    poll(lambda: daemon.user("crash-3")["state"] == "FATAL", 10, "FATAL")
    started = time.monotonic()
    result = daemon.ctl("drain", "--wait")  # the 60 s default deadline: nobody to wait for
    assert result.returncode == 0, result.stderr
    assert "draining:" in result.stdout and "the daemon has exited" in result.stderr
    assert time.monotonic() - started < 15
    assert daemon.proc is not None and daemon.proc.wait(10) == 0
    assert daemon.ctl("pod").returncode == 4


@needs_kernel
def test_drain_usage_errors(daemon: Daemon) -> None:
    bad = daemon.ctl("drain", "--deadline", "soon")
    assert bad.returncode == 2 and "bad deadline" in bad.stderr and "hint:" in bad.stderr
    assert daemon.ctl_json("pod")["pod"]["draining"] is False
