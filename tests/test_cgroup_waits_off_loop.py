"""Freezing, thawing, killing a tree and removing its groups wait for the kernel (the driver polls
until it is done, up to its ``wait_timeout`` when a task sleeps uninterruptibly, e.g. on NFS). That
wait happens in a worker thread: the daemon's trio loop - every other user's starts, stops,
proxying and probes - keeps running meanwhile. The slow kernel is played by a driver double here;
the driver itself is tested for real in the cgroup, daemon and idle-ladder tests."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, cast

import trio

from supervisor import config as config_module
from supervisor.cgroups.base import CgroupDriver
from supervisor.idle import Stage
from supervisor.manager import SessionManager
from supervisor.reclaim import IdleService
from supervisor.sessions import Cleanup, KillTree, State

SLOW = 0.6  # how long the "kernel" takes to report frozen / thawed


class SlowKernel:
    """Just what these paths call of a driver; each wait takes SLOW seconds and blocks its thread."""

    version = 1

    def __init__(self) -> None:
        self.frozen: set[str] = set()
        self.calls: list[tuple[str, str, bool]] = []  # (what, user, ran on the main thread)

    def _wait(self, what: str, user: str) -> None:
        self.calls.append((what, user, threading.current_thread() is threading.main_thread()))
        time.sleep(SLOW)

    def freeze(self, user: str) -> None:
        self._wait("freeze", user)
        self.frozen.add(user)

    def thaw(self, user: str) -> None:
        self._wait("thaw", user)
        self.frozen.discard(user)

    def exists(self, user: str) -> bool:
        return True

    def is_frozen(self, user: str) -> bool:
        return user in self.frozen

    def thaw_processes(self, user: str) -> None:
        pass

    def kill(self, user: str) -> None:
        self._wait("kill", user)

    def remove(self, user: str) -> None:
        self._wait("remove", user)

    def pids(self, user: str) -> list[int]:
        return []


def manager_with(tmp_path: Path, driver: SlowKernel) -> SessionManager:
    config = config_module.from_dict({"daemon": {"state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run")},
                                      "workspace": {"root": str(tmp_path / "workspace")},
                                      "registry": {"path": str(tmp_path / "registry.db")}})
    (tmp_path / "state" / "users").mkdir(parents=True)
    (tmp_path / "workspace").mkdir()
    manager = SessionManager(config, cast(CgroupDriver, driver))
    rt = manager._new_runtime("alice", "free")
    rt.session.state, rt.session.pid = State.RUNNING, 4242
    return manager


async def longest_stall_while(work: Callable[[], Awaitable[Any]]) -> float:
    """Run ``work`` beside a task that ticks every 10 ms; the longest gap between ticks."""
    gaps: list[float] = []

    async def tick(cancel: trio.CancelScope) -> None:
        last = time.monotonic()
        with cancel:
            while True:
                await trio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

    cancel = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick, cancel)
        await trio.sleep(0.05)
        await work()
        cancel.cancel()
    return max(gaps)


async def test_an_operator_pause_and_resume_do_not_stall_the_daemon(tmp_path: Path) -> None:
    driver = SlowKernel()
    manager = manager_with(tmp_path, driver)
    assert await longest_stall_while(lambda: manager.pause("alice")) < SLOW / 2
    assert manager.runtimes["alice"].session.state is State.PAUSED
    assert await longest_stall_while(lambda: manager.resume("alice")) < SLOW / 2
    assert manager.runtimes["alice"].session.state is State.RUNNING
    assert [(what, main) for what, _, main in driver.calls] == [("freeze", False), ("thaw", False)]


async def test_the_idle_ladder_freezes_and_wakes_without_stalling_the_daemon(tmp_path: Path) -> None:
    driver = SlowKernel()
    manager = manager_with(tmp_path, driver)
    idle = IdleService(manager, tick=3600)
    idle._reconcile(manager.clock())
    state = idle.states["alice"]
    state.stage = Stage.RECLAIMED
    state.activity.since = manager.clock() - manager.config.idle_for("free").freeze_after - 1  # idle just long enough
    rt = manager.runtimes["alice"]
    rt.cpu_sampled_at, rt.cpu_millicores = manager.clock(), 0

    assert await longest_stall_while(idle.step) < SLOW / 2
    assert state.stage is Stage.FROZEN
    assert await longest_stall_while(lambda: idle.wake("alice")) < SLOW / 2
    assert state.stage is Stage.ACTIVE
    assert [(what, main) for what, _, main in driver.calls] == [("freeze", False), ("thaw", False)]


async def test_killing_a_tree_and_removing_its_groups_do_not_stall_the_daemon(tmp_path: Path) -> None:
    driver = SlowKernel()
    manager = manager_with(tmp_path, driver)
    rt = manager.runtimes["alice"]
    assert await longest_stall_while(lambda: manager._execute(rt, KillTree())) < SLOW / 2
    assert await longest_stall_while(lambda: manager._execute(rt, Cleanup())) < SLOW / 2
    assert [(what, main) for what, _, main in driver.calls] == [("kill", False), ("remove", False)]
