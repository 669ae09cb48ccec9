"""The pure lifecycle state machine: every transition, back-off and capacity rule."""

from __future__ import annotations

import pytest

from supervisor.errors import CapacityExceeded, Draining, InvalidTransition
from supervisor.sessions import (
    CancelRetry, Cleanup, ExitInfo, Freeze, KillTree, Pod, RestartPolicy, ScheduleRetry, Spawn,
    State, Terminate, Thaw, UserSession,
)

POLICY = RestartPolicy(healthy_after=10, backoff_initial=1, backoff_max=8, max_failures=5)


def running(now: float = 0.0) -> UserSession:
    s = UserSession(user="alice", tier="free", policy=POLICY)
    assert s.on_start(now) == [Spawn()]
    s.on_spawned(100)
    s.on_ready(now + 0.5)
    assert s.state is State.RUNNING
    return s


def test_start_spawns_and_ready_runs() -> None:
    s = UserSession(user="alice", tier="free", policy=POLICY)
    assert s.on_start(0) == [Spawn()]
    assert s.state is State.STARTING
    assert s.on_start(0.1) == []  # idempotent while starting
    s.on_spawned(42)
    s.on_ready(0.2)
    assert (s.state, s.pid, s.running_since) == (State.RUNNING, 42, 0.2)


def test_healthy_exit_restarts_at_once() -> None:
    s = running()
    actions = s.on_exit(100, ExitInfo(signal=9))
    assert actions == [KillTree(), Spawn()]
    assert s.state is State.STARTING and s.restarts == 1 and s.failures == 0


def test_clean_exit_of_healthy_process_is_exited_not_restarted() -> None:
    s = running()
    assert s.on_exit(100, ExitInfo(code=0)) == [KillTree(), Cleanup()]
    assert s.state is State.EXITED


def test_fast_failures_back_off_exponentially_then_fatal() -> None:
    s = UserSession(user="alice", tier="free", policy=POLICY)
    s.on_start(0)
    delays = []
    now = 0.0
    for _ in range(POLICY.max_failures - 1):
        s.on_spawned(1)
        actions = s.on_exit(now, ExitInfo(code=1))
        assert s.state is State.BACKOFF
        delay = [a for a in actions if isinstance(a, ScheduleRetry)][0].delay
        delays.append(delay)
        now += delay
        assert s.on_retry_due(now) == [Spawn()]
    assert delays == [1, 2, 4, 8]
    s.on_spawned(1)
    assert s.on_exit(now, ExitInfo(code=1)) == [KillTree(), Cleanup()]
    assert s.state is State.FATAL
    assert "fast failures" in s.reason
    assert s.on_start(now + 1) == [Spawn()]  # an operator start clears FATAL
    assert s.failures == 0


def test_backoff_is_capped() -> None:
    assert [POLICY.backoff(n) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]


def test_exit_soon_after_ready_is_a_fast_failure() -> None:
    s = running(0)
    s.on_exit(3, ExitInfo(code=1))
    assert s.state is State.BACKOFF and s.failures == 1


def test_stop_terminates_then_exit_stops_and_cleans_up() -> None:
    s = running()
    assert s.on_stop(5, grace=10) == [Terminate(10)]
    assert s.state is State.STOPPING
    assert s.on_exit(6, ExitInfo(signal=15)) == [KillTree(), Cleanup()]
    assert s.state is State.STOPPED


def test_stop_during_backoff_cancels_retry() -> None:
    s = UserSession(user="alice", tier="free", policy=POLICY)
    s.on_start(0)
    s.on_spawned(1)
    s.on_exit(1, ExitInfo(code=1))
    assert s.on_stop(1.5, grace=10) == [CancelRetry(), Cleanup()]
    assert s.state is State.STOPPED
    assert s.on_retry_due(2) == []


def test_pause_and_resume() -> None:
    s = running()
    assert s.on_pause(1) == [Freeze()]
    assert s.state is State.PAUSED
    assert s.on_resume(2) == [Thaw()]
    assert s.state is State.RUNNING


def test_pause_requires_running() -> None:
    s = UserSession(user="alice", tier="free", policy=POLICY)
    with pytest.raises(InvalidTransition):
        s.on_pause(0)
    with pytest.raises(InvalidTransition):
        s.on_resume(0)


def test_stop_of_paused_user_thaws_first() -> None:
    s = running()
    s.on_pause(1)
    assert s.on_stop(2, grace=3) == [Thaw(), Terminate(3)]


def test_ready_timeout_kills_attempt_and_exit_counts_as_failure() -> None:
    s = UserSession(user="alice", tier="free", policy=POLICY)
    s.on_start(0)
    s.on_spawned(7)
    assert s.on_ready_timeout(60, 60) == [KillTree()]
    s.on_exit(60.1, ExitInfo(signal=9))
    assert s.state is State.BACKOFF


def test_stale_events_are_ignored() -> None:
    s = UserSession(user="alice", tier="free", policy=POLICY)
    assert s.on_ready(0) == []
    assert s.on_exit(0, ExitInfo()) == []
    assert s.on_retry_due(0) == []
    assert s.on_stop(0, 1) == []


def test_pod_capacity_and_draining() -> None:
    pod = Pod(capacity=2)
    for name in ("a", "b"):
        pod.check_admission(name)
        pod.users[name] = UserSession(user=name, tier="free", policy=POLICY)
        pod.users[name].on_start(0)
    with pytest.raises(CapacityExceeded):
        pod.check_admission("c")
    pod.check_admission("a")  # an occupying user is always admitted again
    pod.users["a"].on_stop(0, 1)  # pid None: straight to STOPPED
    pod.check_admission("c")
    pod.draining = True
    with pytest.raises(Draining):
        pod.check_admission("c")
    assert pod.counts_by_state()["STARTING"] == 1
    assert pod.free_slots() == 1


def test_effect_failure_of_a_running_user_backs_off_then_goes_fatal() -> None:
    s = running()
    s.on_exit(1, ExitInfo(code=3))  # a fast failure first: the effect failure must not hide it
    s.on_retry_due(2)
    s.on_spawned(101)
    actions = s.on_effect_failed(3, "spawn: [Errno 21] Is a directory: 'ide.sock'")
    assert actions == [KillTree(), ScheduleRetry(2)]
    assert (s.state, s.pid, s.failures) == (State.BACKOFF, None, 2)
    assert "Is a directory" in s.reason and "retry in 2s" in s.reason
    assert s.last_exit == ExitInfo(code=3)  # no exit was seen: the last one stays
    for now in (10, 20, 30):
        s.on_retry_due(now)
        actions = s.on_effect_failed(now + 1, "spawn: no space left")
    assert s.state is State.FATAL and actions == [KillTree(), Cleanup()]
    assert "5 fast failures" in s.reason and "no space left" in s.reason


@pytest.mark.parametrize("state", [State.STARTING, State.PAUSED, State.BACKOFF])
def test_effect_failure_of_a_user_meant_to_run_is_a_fast_failure(state: State) -> None:
    s = running()
    if state is State.PAUSED:
        s.on_pause(1)
    elif state is State.BACKOFF:
        s.on_exit(1, ExitInfo(code=1))
    elif state is State.STARTING:
        s.on_exit(100, ExitInfo(code=1))  # healthy: restarted at once
    failures = s.failures
    actions = s.on_effect_failed(200, "freeze: EIO")
    assert s.state is State.BACKOFF and s.failures == failures + 1 and s.pid is None
    assert actions[0] == KillTree() and isinstance(actions[1], ScheduleRetry)


@pytest.mark.parametrize("state", [State.STOPPING, State.STOPPED, State.EXITED, State.FATAL])
def test_effect_failure_while_stopping_or_down_is_fatal(state: State) -> None:
    s = running()
    if state is State.STOPPING:
        s.on_stop(1, 5)
    elif state is State.STOPPED:
        s.on_stop(1, 5)
        s.on_exit(2, ExitInfo(code=0))
    elif state is State.EXITED:
        s.on_exit(100, ExitInfo(code=0))
    else:
        s.failures = POLICY.max_failures - 1
        s.on_exit(1, ExitInfo(code=1))
    assert s.state is state
    actions = s.on_effect_failed(200, "cleanup: cannot remove the cgroup")
    assert s.state is State.FATAL and s.pid is None
    assert actions == [CancelRetry(), KillTree(), Cleanup()]
    assert s.reason == "cleanup: cannot remove the cgroup; `workspacectl start alice` retries"
    assert s.on_start(201) == [Spawn()]  # the operator's start clears it
