"""The idle ladder's effects: watch activity, walk idle users down, wake them on any activity.

:mod:`supervisor.idle` decides; this module acts, against the kernel and the user's processes:

- LSP_PAUSED: language servers and extension hosts (descendants of the IDE whose command line
  matches ``[idle] lsp_patterns``) move into the user's ``paused`` child cgroup, which is frozen;
  SIGSTOP where the driver cannot. The IDE backend gets SIGUSR2 (its GC preload runs
  ``global.gc()``, then ``malloc_trim(0)``, which returns the ~40 MiB of free C heap an idle Theia
  holds - most of what an idle tree can give back while it runs, so the first rung returns it);
- RECLAIMED: SIGUSR2 again, and the cgroup's ``memory.reclaim`` (page cache) where the kernel has it;
- FROZEN: the whole tree is frozen;
- STOPPED: the IDE is stopped (SIGTERM first); the next request cold-starts it.

Only RUNNING users are walked (never STARTING, STOPPING or operator-PAUSED ones), and a user
whose own work keeps the CPU above ``cpu_busy_threshold`` is active by definition.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Collection

import trio

from supervisor import metrics
from supervisor.config import IdleConfig
from supervisor.errors import CgroupError
from supervisor.filewatch import FileWatcher
from supervisor.idle import SIGNALS, Activity, Ladder, Stage, Step, decide, explain, lsp_matches, pressure_victims
from supervisor.manager import SessionManager, UserRuntime
from supervisor.podlimits import pod_resources
from supervisor.sessions import State

log = logging.getLogger(__name__)
GC_SIGNAL = signal.SIGUSR2  # images/theia/gc-preload.js collects garbage on it
CMDLINE_LIMIT = 4096  # enough for [idle] lsp_patterns to match; a user's command line may be MiBs


@dataclass
class IdleState:
    """One user's place on the ladder (reset whenever the IDE process starts anew)."""

    pid: int
    activity: Activity
    stage: Stage = Stage.ACTIVE
    reason: str = "active"
    stopped: list[int] = field(default_factory=list)  # pidfds of processes SIGSTOPped (no paused cgroup)
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))
    cpu_seen_at: float | None = None


def ladder_for(idle: IdleConfig) -> Ladder:
    return Ladder(
        lsp_pause_after=idle.lsp_pause_after,
        gc_after=idle.gc_after,
        freeze_after=idle.freeze_after,
        stop_after=idle.stop_after,
        cpu_busy_threshold=idle.cpu_busy_threshold,
    )


def select_lsps(tree: dict[int, tuple[int, list[str]]], root_pid: int, patterns: list[str]) -> list[int]:
    """From a process tree (pid -> (parent pid, command line)), the language servers and extension
    hosts (command line matches a pattern; never the IDE itself) with all their descendants."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in tree.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    for pid, (_, cmdline) in tree.items():
        if pid == root_pid or pid in found or not lsp_matches(cmdline, patterns):
            continue
        pending = [pid]
        while pending:
            current = pending.pop()
            if current not in found:
                found.add(current)
                pending.extend(children.get(current, []))
    return sorted(found)


def _read_proc(path: str, limit: int) -> bytes:
    """At most ``limit`` bytes of a /proc file (a user's command line can be many MiB)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def process_tree(pids: list[int]) -> dict[int, tuple[int, list[str]]]:
    """Parent and command line (its first ``CMDLINE_LIMIT`` bytes) of each of ``pids`` (a user's
    cgroup: no scan of the host's /proc)."""
    tree: dict[int, tuple[int, list[str]]] = {}
    for pid in pids:
        try:
            stat = _read_proc(f"/proc/{pid}/stat", 4096)  # the comm field is at most 16 bytes
            cmdline = [arg.decode(errors="replace") for arg in _read_proc(f"/proc/{pid}/cmdline", CMDLINE_LIMIT).split(b"\0") if arg]
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
        tree[pid] = (ppid, cmdline)
    return tree


def open_pidfds(pids: list[int], members: Callable[[], Collection[int]]) -> list[int]:
    """pidfds of those of ``pids`` that are in the user's cgroup (``members``) once opened: a
    pidfd names one process for good, and the check after opening proves it was the user's (a pid
    reused by another user's process in between is not in the group). The caller closes them."""
    opened = {}
    for pid in pids:
        try:
            opened[pid] = os.pidfd_open(pid)
        except OSError:
            continue  # exited meanwhile
    try:
        inside = set(members())
    except BaseException:
        for fd in opened.values():
            os.close(fd)
        raise
    for pid, fd in list(opened.items()):
        if pid not in inside:
            os.close(opened.pop(pid))
    return list(opened.values())


def signal_pidfds(pidfds: list[int], signum: int) -> None:
    """Send ``signum`` through each pidfd (a process gone by now is skipped)."""
    for fd in pidfds:
        try:
            signal.pidfd_send_signal(fd, signum)
        except ProcessLookupError:
            pass


def _take_pidfds(state: IdleState) -> list[int]:
    """Take the stopped processes' pidfds out of ``state`` (one by one with ``list.pop``, atomic:
    the ladder's worker thread and the event loop never both own, send through or close one)."""
    taken = []
    while True:
        try:
            taken.append(state.stopped.pop())
        except IndexError:
            return taken


def _close_pidfds(state: IdleState) -> None:
    for fd in _take_pidfds(state):
        os.close(fd)


def catches_signal(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (``SigCgt`` in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


class IdleService:
    """Runs the ladder for every user of one :class:`SessionManager`."""

    def __init__(self, manager: SessionManager, *, tick: float = 1.0, pod_memory_bytes: int | None = None) -> None:
        self.manager = manager
        self.config = manager.config
        self.clock = manager.clock
        self.tick = tick
        self.states: dict[str, IdleState] = {}
        self._ladders: dict[str, Ladder] = {}
        self.watcher = FileWatcher(self.note_file_change, max_watches=self.config.idle.max_watches)
        self.pod_memory_bytes = pod_memory_bytes or pod_resources(self.config).memory_bytes
        self._nursery: trio.Nursery | None = None
        self._waking: set[str] = set()

    # ---- activity in -----------------------------------------------------------------------

    def note_input(self, user: str) -> None:
        """The browser sent something to the IDE (called by the front door for every request and
        every piece of a body or WebSocket). A user down the ladder is woken at once, not at the
        next tick: bytes on an open WebSocket are already waiting in the frozen IDE's socket."""
        state = self.states.get(user)
        if state is None:
            return
        state.activity.note("input", self.clock())
        if Stage.ACTIVE < state.stage < Stage.STOPPED and self._nursery is not None and user not in self._waking:
            self._waking.add(user)
            self._nursery.start_soon(self._wake_now, user)

    async def _wake_now(self, user: str) -> None:
        try:
            await self.wake(user)
        finally:
            self._waking.discard(user)

    def note_file_change(self, user: str) -> None:
        state = self.states.get(user)
        if state is not None:
            state.activity.note("files", self.clock())

    async def wake(self, user: str) -> None:
        """Bring ``user`` back to ACTIVE at once (before its request is delivered)."""
        state = self.states.get(user)
        if state is None:
            return
        state.activity.note("input", self.clock())
        if state.stage is Stage.ACTIVE or state.stage is Stage.STOPPED:
            return
        rt = self.manager.runtimes.get(user)
        if rt is None:
            return
        async with rt.lock:
            if state.stage not in (Stage.ACTIVE, Stage.STOPPED) and rt.session.state is State.RUNNING:
                await trio.to_thread.run_sync(self._apply, rt, state, Step(user, state.stage, Stage.ACTIVE, "woken by a request"))

    # ---- the loop --------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[IdleService] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.watcher.run)
            self._nursery = nursery
            task_status.started(self)
            while True:
                await self.step()
                await trio.sleep(self.tick)

    async def step(self) -> None:
        """One pass over every user: follow process changes, sample CPU, move on the ladder."""
        now = self.clock()
        self._reconcile(now)
        for user, state in list(self.states.items()):
            rt = self.manager.runtimes.get(user)
            if rt is None or rt.session.state is not State.RUNNING:
                continue
            ladder = self._ladder(rt.session.tier)
            if rt.cpu_sampled_at is not None and rt.cpu_sampled_at != state.cpu_seen_at:
                state.cpu_seen_at = rt.cpu_sampled_at
                state.activity.note_cpu(rt.cpu_millicores / 1000, rt.cpu_sampled_at, ladder.cpu_busy_threshold)
            if state.stage is Stage.FROZEN and not self._kernel_frozen(user):
                state.stage = Stage.RECLAIMED  # an operator resumed it meanwhile
            step = decide(user, state.stage, state.activity, now, ladder)
            if step is None:
                continue
            if not step.waking and not self._fresh_cpu_sample(rt, now):
                continue  # no recent evidence that its CPU is idle (e.g. a late sample): do not act
            if step.target is Stage.STOPPED:
                await self._stop(rt, state, step)
                continue
            async with rt.lock:
                if rt.session.state is State.RUNNING and rt.session.pid == state.pid:
                    await trio.to_thread.run_sync(self._apply, rt, state, step)
        await self._relieve_pressure(now)

    def _ladder(self, tier: str) -> Ladder:
        ladder = self._ladders.get(tier)
        if ladder is None:
            ladder = self._ladders[tier] = ladder_for(self.config.idle_for(tier))
        return ladder

    def _reconcile(self, now: float) -> None:
        """Track every RUNNING or PAUSED IDE process; forget the rest (a new process starts ACTIVE)."""
        for user, rt in self.manager.runtimes.items():
            self._track(user, rt, now)
        for stage in Stage:
            metrics.IDLE_USERS.labels(stage=stage.label).set(sum(1 for st in self.states.values() if st.stage is stage))

    def _track(self, user: str, rt: UserRuntime, now: float) -> IdleState | None:
        """Follow one user's IDE process (also called by the readers, so that a user started since
        the last tick is shown ACTIVE, not untracked or with the stage of its previous process)."""
        live = rt.session.state in (State.RUNNING, State.PAUSED) and rt.session.pid is not None
        state = self.states.get(user)
        if live and (state is None or state.pid != rt.session.pid):
            if state is not None:
                _close_pidfds(state)
            history = state.history if state is not None and state.stage is Stage.STOPPED else None
            state = IdleState(pid=rt.session.pid or 0, activity=Activity(since=now))
            if history is not None:  # stopped by the ladder, started again: keep its history for `why`
                state.history = history
                state.stage = Stage.STOPPED
                self._record(state, Stage.ACTIVE, "started again")
            self.states[user] = state
            self.watcher.watch(user, rt.paths.workspace)
        elif not live and state is not None and state.stage is not Stage.STOPPED:
            # Stopped by someone else: forget it. (Stopped by the ladder: keep it for `why`.)
            self.watcher.unwatch(user)
            _close_pidfds(state)
            del self.states[user]
            return None
        return state

    def _fresh_cpu_sample(self, rt: UserRuntime, now: float) -> bool:
        """Whether the last CPU sample is recent enough to call the user idle."""
        if rt.cpu_sampled_at is None:
            return False
        return now - rt.cpu_sampled_at <= 2 * self.config.daemon.usage_interval + self.tick

    def _kernel_frozen(self, user: str) -> bool:
        try:
            return self.manager.driver.is_frozen(user)
        except CgroupError:
            return False

    # ---- acting ----------------------------------------------------------------------------

    def _apply(self, rt: UserRuntime, state: IdleState, step: Step) -> None:
        """Carry out one move (caller holds ``rt.lock``); failures are logged, never raised. Runs in
        a worker thread: freezing waits for the kernel, up to the driver's ``wait_timeout`` when a
        task is in uninterruptible sleep, and no other user may wait for that."""
        user = rt.session.user
        driver = self.manager.driver
        started = time.perf_counter()
        try:
            if step.waking:
                if state.stage >= Stage.FROZEN:
                    driver.thaw(user)
                if state.stage >= Stage.LSP_PAUSED:
                    self._resume_lsps(user, state)
            elif step.target is Stage.LSP_PAUSED:
                self._pause_lsps(rt, state)
                self._collect_garbage(rt)
            elif step.target is Stage.RECLAIMED:
                self._collect_garbage(rt)
                self.manager.driver.reclaim_memory(user)
            elif step.target is Stage.FROZEN:
                driver.freeze(user)
        except (CgroupError, OSError) as exc:
            log.error("user=%s idle step %s -> %s failed: %s", user, state.stage.label, step.target.label, exc)
            return
        took = (time.perf_counter() - started) * 1000
        log.info("user=%s idle: %s -> %s (%s) in %.1f ms", user, state.stage.label, step.target.label, step.reason, took)
        self._record(state, step.target, step.reason)

    def _record(self, state: IdleState, target: Stage, reason: str) -> None:
        metrics.IDLE_TRANSITIONS.labels(stage=target.label).inc()
        state.history.append({"at": time.time(), "from": state.stage.label, "to": target.label, "reason": reason})
        state.stage = target
        state.reason = reason

    def _pause_lsps(self, rt: UserRuntime, state: IdleState) -> None:
        tree = process_tree(self.manager.driver.pids(rt.session.user))
        pids = select_lsps(tree, state.pid, self.config.idle.lsp_patterns)
        if not pids:
            return
        try:
            self.manager.driver.freeze_processes(rt.session.user, pids)
        except CgroupError as exc:
            log.warning("user=%s cannot freeze language servers in a child cgroup (%s); using SIGSTOP", rt.session.user, exc)
            pidfds = open_pidfds(pids, lambda: self.manager.driver.pids(rt.session.user))
            signal_pidfds(pidfds, signal.SIGSTOP)
            state.stopped.extend(pidfds)

    def _resume_lsps(self, user: str, state: IdleState) -> None:
        self.manager.driver.thaw_processes(user)
        pidfds = _take_pidfds(state)
        try:
            signal_pidfds(pidfds, signal.SIGCONT)
        finally:
            for fd in pidfds:
                os.close(fd)

    def _collect_garbage(self, rt: UserRuntime) -> None:
        """Ask the IDE to collect garbage and trim its heap (SIGUSR2), if it handles the signal."""
        pid = rt.session.pid
        if pid is None:
            return
        if catches_signal(pid, GC_SIGNAL):
            rt.signal(GC_SIGNAL)  # through the pidfd: the pid may be reused by now
        else:  # its default action would kill the IDE
            log.warning("user=%s the IDE (pid %d) does not catch SIGUSR2: no garbage collection "
                        "(run it with --expose-gc --require gc-preload.js)", rt.session.user, pid)

    async def _stop(self, rt: UserRuntime, state: IdleState, step: Step) -> None:
        user = rt.session.user
        log.info("user=%s idle: stopping the IDE (%s); the next request cold-starts it", user, step.reason)
        self._record(state, Stage.STOPPED, step.reason)
        self.watcher.unwatch(user)
        _close_pidfds(state)
        await self.manager.stop(user)

    async def _relieve_pressure(self, now: float) -> None:
        """Under memory pressure on the pod, stop idle users early, longest idle first."""
        limit = self.config.idle.memory_pressure * self.pod_memory_bytes
        used = sum(rt.memory_bytes for rt in self.manager.runtimes.values() if rt.session.state is State.RUNNING)
        if used <= limit:
            return
        candidates = {u: (s.stage, s.activity.idle_for(now)) for u, s in self.states.items()}
        for user in pressure_victims(candidates, 1):
            state = self.states[user]
            reason = (
                f"memory pressure: users hold {used // 2**20} MiB of {self.pod_memory_bytes // 2**20} MiB; "
                f"longest idle ({explain(state.activity, now)})"
            )
            await self._stop(self.manager.runtimes[user], state, Step(user, state.stage, Stage.STOPPED, reason))

    # ---- reading -----------------------------------------------------------------------------

    def describe(self, user: str) -> dict[str, Any]:
        """Idle fields of `workspacectl status` for one user."""
        rt = self.manager.runtimes.get(user)
        state = self._track(user, rt, self.clock()) if rt is not None else self.states.get(user)
        if state is None:
            return {"idle_stage": None, "idle_for_s": None, "last_activity_s": None}
        now = self.clock()
        return {
            "idle_stage": state.stage.label,
            "idle_for_s": round(state.activity.idle_for(now), 3),
            "last_activity_s": {
                signal_name: (round(now - state.activity.last[signal_name], 3) if signal_name in state.activity.last else None)
                for signal_name in SIGNALS
            },
        }

    def why(self, user: str) -> dict[str, Any]:
        """`workspacectl why USER`: where the user is on the ladder, and why."""
        rt = self.manager.runtime(user)
        state = self._track(user, rt, self.clock())
        if state is None:
            return {"user": user, "state": rt.session.state.value, "idle_stage": None,
                    "explanation": f"not tracked: the IDE is {rt.session.state.value}"
                                   + (f" ({rt.session.reason})" if rt.session.reason else ""), "history": []}
        now = self.clock()
        ladder = self._ladder(rt.session.tier)
        following = next((s for s in Stage if s > state.stage), None)
        return {
            "user": user,
            "state": rt.session.state.value,
            **self.describe(user),
            "explanation": explain(state.activity, now),
            "reason": state.reason,
            "cpu_percent": round(state.activity.cpu_share * 100, 2),
            "next_step": None if following is None else {
                "stage": following.label,
                "in_s": round(max(0.0, ladder.threshold(following) - state.activity.idle_for(now)), 3),
            },
            "history": list(state.history),
        }

