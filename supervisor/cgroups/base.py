"""The contract every cgroup driver fulfils (v2 unified hierarchy, v1 via cgroupspy).

A driver manages one subtree of user groups named by validated user id. All methods are
synchronous and quick (a few file reads or writes); the daemon calls them from its event loop.
Errors raise :class:`supervisor.errors.CgroupError` with the path involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable


@dataclass(frozen=True)
class Limits:
    """Resource limits for one user group."""

    cpu_millicores: int  # 1000 = one full core
    memory_bytes: int  # hard limit (memory.max / memory.limit_in_bytes)
    memory_high_bytes: int | None  # soft limit below memory_bytes (v2 memory.high); None = unset
    pids: int  # pids.max
    cpu_period_us: int = 100_000


@dataclass(frozen=True)
class Usage:
    """A snapshot of one user group's resource use."""

    memory_bytes: int
    cpu_usage_us: int  # cumulative CPU time of the group
    oom_kills: int  # cumulative OOM kills inside the group since it was created
    pids: int  # number of tasks now in the group


@runtime_checkable
class CgroupDriver(Protocol):
    """What the daemon needs from a cgroup hierarchy."""

    version: Literal[1, 2]

    def describe(self) -> str:
        """One line for logs and `workspacectl pod`, e.g. 'cgroup v2 at /sys/fs/cgroup/ws (cpu memory pids)'."""
        ...

    def prepare(self) -> None:
        """Create the supervisor's subtree (idempotent). v2: move the daemon (and every other process
        in its cgroup) into the leaf ``<base>/daemon`` and enable cpu, memory and pids for the users'
        subtree ``<base>/<name>`` (no-internal-process rule); raises CgroupError with reason
        ``cgroup_controllers_missing`` when they are not delegated."""
        ...

    def create(self, user: str, limits: Limits) -> None:
        """Create the user's group (idempotent) and apply ``limits``."""
        ...

    def set_limits(self, user: str, limits: Limits) -> None:
        """Rewrite the limits of an existing group in place; processes stay where they are."""
        ...

    def procs_files(self, user: str) -> list[str]:
        """Absolute paths of the ``cgroup.procs`` files a child writes ``0`` into, before exec, to
        join the user's group in every hierarchy (one for v2, one per controller for v1)."""
        ...

    def pids(self, user: str) -> list[int]:
        """Pids of every process in the group (empty when the group does not exist)."""
        ...

    def exists(self, user: str) -> bool:
        ...

    def users(self) -> list[str]:
        """Names of the user groups that exist now (for re-adoption after a daemon restart)."""
        ...

    def freeze(self, user: str) -> None:
        """Freeze every process in the group; returns once the kernel reports it frozen."""
        ...

    def thaw(self, user: str) -> None:
        """Undo :meth:`freeze`; returns once the kernel reports it thawed."""
        ...

    def is_frozen(self, user: str) -> bool:
        ...

    def freeze_processes(self, user: str, pids: list[int]) -> list[int]:
        """Move ``pids`` (processes of the user's tree, e.g. its language servers) into the
        user's child group ``paused`` and freeze that group only; they stay under the user's
        limits. Returns the pids that were moved (the others had exited)."""
        ...

    def thaw_processes(self, user: str) -> None:
        """Thaw the user's ``paused`` child group; a no-op when there is none."""
        ...

    def reclaim_memory(self, user: str) -> bool:
        """Ask the kernel to reclaim what it can of the group's memory (v2 ``memory.reclaim``).
        False where unsupported or when nothing could be reclaimed (e.g. no swap for anon pages)."""
        ...

    def kill(self, user: str) -> None:
        """SIGKILL every process in the group, forks in flight included (v2 ``cgroup.kill``; v1:
        freeze, kill each task, thaw, repeat until empty). v2 does not wait for them to exit; v1
        returns once the group is empty. Works on a frozen group. A missing group is a no-op."""
        ...

    def remove(self, user: str) -> None:
        """Remove the user's (empty) group in every hierarchy; a missing group is not an error.
        Waits briefly while the kernel reaps tasks that are dying after :meth:`kill`."""
        ...

    def usage(self, user: str) -> Usage:
        """Current usage of the group (CgroupError when it does not exist)."""
        ...


#: Name prefix of spare groups (never a valid user id: those start with a letter or digit).
SPARE_PREFIX = ".spare-"


@runtime_checkable
class SpareGroups(Protocol):
    """Optional driver capability: groups made and joined ahead of time, then given to a user.

    A launcher process joins a spare group off the critical path (the kernel's attach is slow, see
    ``integration/bench/README.md``); on a start the spare is renamed to the user's group, so the
    process is in the user's group without migrating. cgroup v1 allows ``rename(2)`` of a group
    within its parent; v2 refuses it, so only the v1 driver has this capability. ``spare`` is an id
    (``[0-9a-z]+``); the directories are ``<subtree>/.spare-<id>`` and :meth:`CgroupDriver.users`
    never lists them.
    """

    def create_spare(self, spare: str) -> list[str]:
        """Create the spare group in every hierarchy (idempotent) with what :meth:`CgroupDriver.create`
        sets besides the limits; return its ``cgroup.procs`` files, in the order a process must
        write ``0`` into them. Once assigned, :meth:`CgroupDriver.set_limits` completes it."""
        ...

    def assign_spare(self, spare: str, user: str) -> None:
        """Rename the spare group to ``user``'s in every hierarchy, all or nothing. An empty leftover
        group of ``user`` (left by a kill before a restart) is removed first; a populated one, or one
        with child groups, makes it raise CgroupError and leaves everything as it was."""
        ...

    def spares(self) -> list[str]:
        """Ids of the spare groups that exist now (leftovers of a daemon that was killed)."""
        ...

    def remove_spare(self, spare: str) -> None:
        """Kill whatever is in the spare group and remove it; a missing group is not an error."""
        ...
