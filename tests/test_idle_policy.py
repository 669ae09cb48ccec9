"""The reclaim ladder policy (pure): stages, waking, explanations, pressure victims."""

from __future__ import annotations

from supervisor.idle import Activity, Ladder, Stage, decide, explain, lsp_matches, pressure_victims

LADDER = Ladder(lsp_pause_after=120, gc_after=300, freeze_after=900, stop_after=3600, cpu_busy_threshold=0.05)


def walk(activity: Activity, now: float) -> list[Stage]:
    stage, path = Stage.ACTIVE, []
    while (step := decide("u", stage, activity, now, LADDER)) is not None:
        stage = step.target
        path.append(stage)
    return path


def test_stages_by_idle_time() -> None:
    assert [LADDER.stage_for(t) for t in (0, 119, 120, 299, 300, 899, 900, 3599, 3600)] == [
        Stage.ACTIVE, Stage.ACTIVE, Stage.LSP_PAUSED, Stage.LSP_PAUSED, Stage.RECLAIMED,
        Stage.RECLAIMED, Stage.FROZEN, Stage.FROZEN, Stage.STOPPED,
    ]


def test_ladder_goes_down_one_step_at_a_time() -> None:
    activity = Activity(since=0)
    assert walk(activity, 100) == []
    assert walk(activity, 310) == [Stage.LSP_PAUSED, Stage.RECLAIMED]
    assert walk(activity, 4000) == [Stage.LSP_PAUSED, Stage.RECLAIMED, Stage.FROZEN, Stage.STOPPED]


def test_any_signal_wakes_straight_to_active() -> None:
    activity = Activity(since=0)
    activity.note("files", 1000)
    step = decide("u", Stage.FROZEN, activity, 1001, LADDER)
    assert step is not None and step.waking and step.target is Stage.ACTIVE


def test_stopped_users_do_not_wake_through_the_ladder() -> None:
    activity = Activity(since=0)
    activity.note("input", 5000)
    assert decide("u", Stage.STOPPED, activity, 5001, LADDER) is None


def test_cpu_above_threshold_counts_as_activity_below_does_not() -> None:
    activity = Activity(since=0)
    activity.note_cpu(0.01, 600, LADDER.cpu_busy_threshold)  # idle housekeeping
    assert LADDER.stage_for(activity.idle_for(600)) is Stage.RECLAIMED
    activity.note_cpu(0.9, 600, LADDER.cpu_busy_threshold)  # a build
    assert activity.idle_for(600) == 0
    assert walk(activity, 610) == []


def test_explanation_names_every_signal() -> None:
    activity = Activity(since=0)
    activity.cpu_share = 0.001
    assert explain(activity, 312) == "idle 5m12s: no input, no file changes, cpu 0.1%"
    activity.note("input", 300)
    assert "last input 12s ago" in explain(activity, 312)


def test_pressure_victims_are_the_longest_idle_never_active() -> None:
    candidates = {
        "busy": (Stage.ACTIVE, 10.0),
        "a": (Stage.LSP_PAUSED, 200.0),
        "b": (Stage.FROZEN, 1000.0),
        "c": (Stage.RECLAIMED, 400.0),
        "gone": (Stage.STOPPED, 5000.0),
    }
    assert pressure_victims(candidates, 2) == ["b", "c"]
    assert pressure_victims(candidates, 10) == ["b", "c", "a"]


def test_lsp_patterns() -> None:
    patterns = ["tsserver", "pylsp", "plugin-host"]
    assert lsp_matches(["node", "/app/lib/backend/plugin-host"], patterns)
    assert lsp_matches(["/usr/bin/python3", "-m", "pylsp"], patterns)
    assert not lsp_matches(["node", "/app/lib/backend/main.js"], patterns)


def test_select_lsps_takes_matching_processes_with_their_descendants() -> None:
    from supervisor.reclaim import select_lsps

    tree = {
        10: (1, ["node", "/app/lib/backend/main.js", "--plugin-host-ok"]),  # the IDE itself (root)
        11: (10, ["node", "/app/lib/backend/ipc-bootstrap"]),
        12: (10, ["node", "/app/lib/backend/plugin-host"]),
        13: (12, ["/usr/bin/python3", "-m", "pylsp"]),
        14: (13, ["python3", "worker"]),
        15: (10, ["bash"]),
    }
    assert select_lsps(tree, 10, ["plugin-host", "pylsp"]) == [12, 13, 14]
    assert select_lsps(tree, 10, ["gopls"]) == []
