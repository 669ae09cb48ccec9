r"""Per-user lifecycle state machine and pod capacity. Pure logic: no I/O, no clock reads.

Events go in (``UserSession.on_*`` methods, each given ``now``), actions come out (a list the
trio adapter in :mod:`supervisor.manager` carries out). States:

    STOPPED --start--> STARTING --ready--> RUNNING --pause--> PAUSED --resume--> RUNNING
    STARTING/RUNNING --exit--> STARTING (healthy run: restart at once)
                           \-> BACKOFF --retry due--> STARTING  (fast failure: 1s, 2s, 4s ... capped)
                           \-> FATAL  (after max_failures fast failures in a row; start clears it)
                           \-> EXITED (clean exit status 0 while RUNNING: not restarted)
    any state --an effect failed--> BACKOFF/FATAL as after a fast failure (FATAL when stopping/down)
    any live state --stop--> STOPPING --exit--> STOPPED
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from supervisor.errors import CapacityExceeded, Draining, InvalidTransition


class State(str, enum.Enum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"
    PAUSED = "PAUSED"


#: States in which a user occupies a slot of the pod (counted against capacity).
OCCUPYING = frozenset({State.STARTING, State.RUNNING, State.BACKOFF, State.STOPPING, State.PAUSED})
#: States in which a process tree may exist.
LIVE = frozenset({State.STARTING, State.RUNNING, State.STOPPING, State.PAUSED})


@dataclass(frozen=True)
class RestartPolicy:
    healthy_after: float = 10.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    max_failures: int = 5

    def backoff(self, failures: int) -> float:
        """Delay before retry number ``failures`` (1-based): initial * 2**(failures-1), capped."""
        return min(self.backoff_max, self.backoff_initial * 2 ** max(0, failures - 1))


# ---- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spawn:
    """Start the user's process tree (cgroup created, limits applied)."""


@dataclass(frozen=True)
class Terminate:
    """SIGTERM the main process; kill the whole tree after ``grace`` seconds."""

    grace: float


@dataclass(frozen=True)
class KillTree:
    """Kill whatever is left of the tree (after the main process exited)."""


@dataclass(frozen=True)
class Cleanup:
    """The tree is gone: remove the cgroup and the socket."""


@dataclass(frozen=True)
class ScheduleRetry:
    delay: float


@dataclass(frozen=True)
class CancelRetry:
    pass


@dataclass(frozen=True)
class Freeze:
    pass


@dataclass(frozen=True)
class Thaw:
    pass


Action = Spawn | Terminate | KillTree | Cleanup | ScheduleRetry | CancelRetry | Freeze | Thaw


@dataclass(frozen=True)
class ExitInfo:
    """How a process ended. ``code``/``signal`` are None when unknown (an adopted process)."""

    code: int | None = None
    signal: int | None = None
    oom: bool = False

    def describe(self) -> str:
        if self.oom:
            return "killed by the kernel OOM killer (memory limit reached)"
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        if self.code is not None:
            return f"exited with status {self.code}"
        return "exited (status unknown: adopted process)"


@dataclass
class UserSession:
    """The lifecycle of one user's IDE. Mutated only through the ``on_*`` methods."""

    user: str
    tier: str
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    state: State = State.STOPPED
    since: float = 0.0  # when the current state was entered
    started_at: float | None = None  # when the current process was spawned
    running_since: float | None = None
    pid: int | None = None
    restarts: int = 0  # automatic restarts since the operator last started the user
    failures: int = 0  # fast failures in a row
    retry_at: float | None = None
    last_exit: ExitInfo | None = None
    reason: str = ""  # why the user is in its state, for operators

    def _enter(self, state: State, now: float, reason: str = "") -> None:
        self.state = state
        self.since = now
        self.reason = reason

    def on_start(self, now: float) -> list[Action]:
        """Operator or front door asks for the IDE. No-op when already live."""
        if self.state in (State.STARTING, State.RUNNING, State.PAUSED):
            return []
        if self.state is State.STOPPING:
            raise InvalidTransition(f"user {self.user} is stopping; start it again once it is STOPPED")
        actions: list[Action] = [CancelRetry()] if self.state is State.BACKOFF else []
        self.failures = 0
        if self.state in (State.STOPPED, State.EXITED, State.FATAL):
            self.restarts = 0
        return actions + self._spawn(now, "start requested")

    def _spawn(self, now: float, reason: str) -> list[Action]:
        self._enter(State.STARTING, now, reason)
        self.started_at = now
        self.running_since = None
        self.pid = None
        self.retry_at = None
        return [Spawn()]

    def on_spawned(self, pid: int) -> None:
        self.pid = pid

    def on_ready(self, now: float) -> list[Action]:
        if self.state is not State.STARTING:
            return []
        self._enter(State.RUNNING, now)
        self.running_since = now
        return []

    def on_ready_timeout(self, now: float, timeout: float) -> list[Action]:
        """The IDE did not answer in time: stop this attempt; its exit counts as a fast failure."""
        if self.state is not State.STARTING:
            return []
        self.reason = f"not ready within {timeout:g}s"
        return [KillTree()]

    def on_effect_failed(self, now: float, what: str) -> list[Action]:
        """Carrying out something for this user failed (``what``: the effect and its error), so the
        daemon can no longer vouch for the tree: kill it. A user meant to run retries as after a
        fast failure (BACKOFF, then FATAL); one being stopped or already down becomes FATAL, and
        the operator's start retries. ``last_exit`` is kept: no process exit was seen."""
        self.pid = None
        if self.state in (State.STARTING, State.RUNNING, State.PAUSED, State.BACKOFF):
            return self._fast_failure(now, self.last_exit, what)
        self._enter(State.FATAL, now, f"{what}; `workspacectl start {self.user}` retries")
        return [CancelRetry(), KillTree(), Cleanup()]

    def on_exit(self, now: float, info: ExitInfo) -> list[Action]:
        """The main process is gone (noticed via pidfd/SIGCHLD)."""
        self.last_exit = info
        self.pid = None
        if self.state is State.STOPPING:
            self._enter(State.STOPPED, now, "stopped")
            return [KillTree(), Cleanup()]
        if self.state not in (State.STARTING, State.RUNNING, State.PAUSED):
            return []
        healthy = (
            self.running_since is not None
            and now - self.running_since >= self.policy.healthy_after
        )
        if healthy and info.code == 0 and info.signal is None and not info.oom:
            self._enter(State.EXITED, now, info.describe())
            return [KillTree(), Cleanup()]
        if healthy:
            self.failures = 0
            self.restarts += 1
            return [KillTree()] + self._spawn(now, f"restarted at once: {info.describe()}")
        return self._fast_failure(now, info, info.describe())

    def _fast_failure(self, now: float, info: ExitInfo | None, what: str) -> list[Action]:
        self.last_exit = info
        self.pid = None
        self.failures += 1
        if self.failures >= self.policy.max_failures:
            self._enter(
                State.FATAL, now,
                f"{self.failures} fast failures in a row, last: {what}; `workspacectl start {self.user}` retries",
            )
            return [KillTree(), Cleanup()]
        delay = self.policy.backoff(self.failures)
        self._enter(State.BACKOFF, now, f"failure {self.failures}: {what}; retry in {delay:g}s")
        self.retry_at = now + delay
        self.restarts += 1
        return [KillTree(), ScheduleRetry(delay)]

    def on_retry_due(self, now: float) -> list[Action]:
        if self.state is not State.BACKOFF:
            return []
        return self._spawn(now, f"retry after failure {self.failures}")

    def on_stop(self, now: float, grace: float) -> list[Action]:
        if self.state in (State.STARTING, State.RUNNING, State.PAUSED):
            actions: list[Action] = [Thaw()] if self.state is State.PAUSED else []
            self._enter(State.STOPPING, now, "stop requested")
            if self.pid is None:
                # Spawn in flight or already dead: nothing to signal, just collect the tree.
                self._enter(State.STOPPED, now, "stopped")
                return actions + [KillTree(), Cleanup()]
            return actions + [Terminate(grace)]
        if self.state is State.BACKOFF:
            self._enter(State.STOPPED, now, "stopped")
            return [CancelRetry(), Cleanup()]
        if self.state in (State.FATAL, State.EXITED):
            self._enter(State.STOPPED, now, "stopped")
            return []
        return []

    def on_pause(self, now: float) -> list[Action]:
        if self.state is State.PAUSED:
            return []
        if self.state is not State.RUNNING:
            raise InvalidTransition(f"user {self.user} is {self.state.value}; only a RUNNING user can be paused")
        self._enter(State.PAUSED, now, "paused by operator")
        return [Freeze()]

    def on_resume(self, now: float) -> list[Action]:
        if self.state is State.RUNNING:
            return []
        if self.state is not State.PAUSED:
            raise InvalidTransition(f"user {self.user} is {self.state.value}; only a PAUSED user can be resumed")
        self._enter(State.RUNNING, now, "resumed")
        return [Thaw()]


@dataclass
class Pod:
    """The users of one pod and its capacity."""

    capacity: int
    users: dict[str, UserSession] = field(default_factory=dict)
    draining: bool = False

    def occupied(self) -> int:
        return sum(1 for s in self.users.values() if s.state in OCCUPYING)

    def free_slots(self) -> int:
        return max(0, self.capacity - self.occupied())

    def check_admission(self, user: str) -> None:
        """Raise unless ``user`` may take a slot now (already occupying users always may)."""
        session = self.users.get(user)
        if session is not None and session.state in OCCUPYING:
            return
        if self.draining:
            raise Draining(f"pod is draining; not admitting {user}")
        if self.occupied() >= self.capacity:
            raise CapacityExceeded(f"pod is at capacity ({self.capacity} users); cannot start {user}")

    def counts_by_state(self) -> dict[str, int]:
        counts = {state.value: 0 for state in State}
        for session in self.users.values():
            counts[session.state.value] += 1
        return counts
