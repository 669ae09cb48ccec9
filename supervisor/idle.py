"""Activity tracking and the reclaim ladder policy. Pure logic: no I/O, no clock reads.

A user's activity comes from several signals, each with its last time:

- ``input``: bytes the browser sent through the front door (not Theia's own pushes);
- ``files``: changes in the user's workspace (inotify);
- ``cpu``: the user's own work - the cgroup's CPU rate above ``cpu_busy_threshold`` (a build or
  a test run counts; an idle IDE's housekeeping and frozen language servers stay below it).

The ladder walks an idle user down, one stage at a time, and any activity brings it back:

    ACTIVE -> LSP_PAUSED (language servers frozen) -> RECLAIMED (GC + memory reclaim)
           -> FROZEN (whole tree frozen) -> STOPPED (IDE stopped; files stay, next request cold-starts)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from supervisor.units import format_duration

SIGNALS = ("input", "files", "cpu")


class Stage(enum.IntEnum):
    ACTIVE = 0
    LSP_PAUSED = 1
    RECLAIMED = 2
    FROZEN = 3
    STOPPED = 4

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Ladder:
    """When each step happens, in seconds of idleness (per tier)."""

    lsp_pause_after: float = 120.0
    gc_after: float = 300.0
    freeze_after: float = 900.0
    stop_after: float = 3600.0
    cpu_busy_threshold: float = 0.05  # share of one core

    def threshold(self, stage: Stage) -> float:
        return {
            Stage.ACTIVE: 0.0,
            Stage.LSP_PAUSED: self.lsp_pause_after,
            Stage.RECLAIMED: self.gc_after,
            Stage.FROZEN: self.freeze_after,
            Stage.STOPPED: self.stop_after,
        }[stage]

    def stage_for(self, idle_for: float) -> Stage:
        """The deepest stage an idle time calls for."""
        target = Stage.ACTIVE
        for stage in Stage:
            if idle_for >= self.threshold(stage):
                target = stage
        return target


@dataclass
class Activity:
    """The last time each signal fired for one user (``since`` = when tracking began)."""

    since: float
    last: dict[str, float] = field(default_factory=dict)
    cpu_share: float = 0.0  # the latest measured CPU rate of the user's cgroup, in cores

    def note(self, signal: str, now: float) -> None:
        self.last[signal] = max(now, self.last.get(signal, now))

    def note_cpu(self, share: float, now: float, threshold: float) -> None:
        self.cpu_share = share
        if share > threshold:
            self.note("cpu", now)

    def last_active(self) -> float:
        return max([self.since, *self.last.values()])

    def idle_for(self, now: float) -> float:
        return max(0.0, now - self.last_active())


@dataclass(frozen=True)
class Step:
    """Move a user from ``current`` to ``target``; ``reason`` is for logs and `workspacectl why`."""

    user: str
    current: Stage
    target: Stage
    reason: str

    @property
    def waking(self) -> bool:
        return self.target < self.current


def explain(activity: Activity, now: float) -> str:
    """``"idle 5m12s: no input, no file changes, cpu 0.1%"`` (or what was last active)."""
    parts = []
    for signal, missing in (("input", "no input"), ("files", "no file changes")):
        last = activity.last.get(signal)
        parts.append(missing if last is None else f"last {signal} {format_duration(now - last)} ago")
    parts.append(f"cpu {activity.cpu_share * 100:.1f}%")
    return f"idle {format_duration(activity.idle_for(now))}: " + ", ".join(parts)


def decide(user: str, stage: Stage, activity: Activity, now: float, ladder: Ladder) -> Step | None:
    """The next step for one user, or None. Steps go down the ladder one stage at a time (each
    stage's action runs in turn); waking goes straight back to ACTIVE."""
    target = ladder.stage_for(activity.idle_for(now))
    if target < stage:
        if stage is Stage.STOPPED:
            return None  # a stopped user wakes through a cold start, not through the ladder
        return Step(user, stage, Stage.ACTIVE, f"activity {format_duration(activity.idle_for(now))} ago")
    if target > stage:
        return Step(user, stage, Stage(stage + 1), explain(activity, now))
    return None


def pressure_victims(
    candidates: Mapping[str, tuple[Stage, float]], count: int
) -> list[str]:
    """Under memory pressure, which idle users to stop first: the longest idle, never ACTIVE ones.

    ``candidates`` maps user -> (stage, idle seconds)."""
    idle = [(seconds, user) for user, (stage, seconds) in candidates.items() if Stage.ACTIVE < stage < Stage.STOPPED]
    idle.sort(reverse=True)
    return [user for _, user in idle[:count]]


def lsp_matches(cmdline: Iterable[str], patterns: Iterable[str]) -> bool:
    """Whether a process command line looks like a language server or an extension host."""
    text = " ".join(cmdline)
    return any(pattern in text for pattern in patterns)
