"""cgroup v1 driver, built on cgroupspy.

One group per user in every hierarchy the driver needs: ``<hierarchy>/<name>/<user>`` where a
hierarchy is a v1 mount under ``<mount>`` holding one or more of cpu, cpuacct, memory, pids and
freezer (``cpu`` and ``cpuacct`` may be mounted apart or together as ``cpu,cpuacct``). Which mount
holds which controller is read from ``/proc/self/mountinfo``, not guessed from directory names.

cgroupspy provides the tree nodes, the walk over a subtree and the typed memory files; the
freezer file, which it lacks, is declared below the same way (a controller class with file
descriptors). The files every start writes and every usage sample reads (limits, cpu/memory/pids
usage) are plain reads and writes: cgroupspy lists a group's children on each access.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

from cgroupspy.controllers import Controller, MemoryController
from cgroupspy.interfaces import BaseFileInterface
from cgroupspy.nodes import Node
from cgroupspy.trees import BaseTree

from supervisor.cgroups.base import SPARE_PREFIX, Limits, Usage
from supervisor.cgroups.v2 import (
    PAUSED_GROUP,
    check_group_name,
    cpu_quota_us,
    move_pids,
    parse_flat_keyed,
    read_pids,
    read_text,
    rmdir_when_empty,
    wait_until,
    write_text,
)
from supervisor.errors import CgroupError

REQUIRED_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "freezer")

MISSING_HIERARCHIES_HINT = (
    "mount the missing cgroup v1 controllers under the configured [cgroups] mount "
    "(e.g. mount -t cgroup -o pids cgroup /sys/fs/cgroup/pids), or use a cgroup v2 host"
)


# --- mount discovery (pure parsing apart from reading the file) --------------------------------


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``."""

    mount_point: Path
    fstype: str
    super_options: tuple[str, ...]


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse ``/proc/self/mountinfo`` (see proc(5)): fields, optional fields, ``-``, fs type, source, super options."""
    entries: list[MountEntry] = []
    for line in text.splitlines():
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        entries.append(MountEntry(Path(_unescape(fields[4])), tail[0], tuple(tail[2].split(","))))
    return entries


def read_mountinfo() -> list[MountEntry]:
    try:
        return parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    except OSError as exc:
        raise CgroupError(f"cannot read /proc/self/mountinfo: {exc.strerror}") from exc


def v1_hierarchies(entries: list[MountEntry], mount: Path) -> dict[str, Path]:
    """Map each required v1 controller to the mount point of its hierarchy directly under ``mount``."""
    found: dict[str, Path] = {}
    for entry in entries:
        if entry.fstype != "cgroup" or entry.mount_point.parent != mount:
            continue
        for option in entry.super_options:
            if option in REQUIRED_CONTROLLERS:
                found.setdefault(option, entry.mount_point)
    return found


# --- controller files cgroupspy lacks ---------------------------------------------------------


class FreezerController(Controller):
    """freezer.state: THAWED, FREEZING or FROZEN."""

    state = BaseFileInterface("freezer.state")


def _oom_kills(oom_control: Mapping[str, int] | Any, failcnt: int) -> int:
    """OOM kills from memory.oom_control's ``oom_kill`` (Linux 4.13+), else memory.failcnt."""
    if isinstance(oom_control, Mapping) and "oom_kill" in oom_control:
        return int(oom_control["oom_kill"])
    return failcnt


# --- the driver -------------------------------------------------------------------------------


class V1Driver:
    """A :class:`~supervisor.cgroups.base.CgroupDriver` for cgroup v1 hierarchies.

    ``memory_bytes`` is a hard limit on RAM and swap together (``memory.memsw.limit_in_bytes``
    where swap accounting exists); ``memory_high_bytes`` becomes the soft limit. Lowering the
    memory limit below what the group uses fails with EBUSY (v1 reclaims; it does not OOM-kill
    on a write). :meth:`kill` returns only once the group is empty.
    """

    version: Literal[1, 2] = 1
    wait_timeout = 5.0

    def __init__(self, mount: Path, name: str) -> None:
        check_group_name("subtree", name)
        self.mount = Path(mount)
        self.name = name
        self._controller_mounts = v1_hierarchies(read_mountinfo(), self.mount)
        missing = [c for c in REQUIRED_CONTROLLERS if c not in self._controller_mounts]
        if missing:
            raise CgroupError(
                f"cgroup v1 controllers {', '.join(missing)} are not mounted under {self.mount}",
                reason="cgroup_controllers_missing",
                hint=MISSING_HIERARCHIES_HINT,
            )
        # One entry per hierarchy: co-mounted controllers share a directory.
        self._hierarchies = list(dict.fromkeys(self._controller_mounts[c] for c in REQUIRED_CONTROLLERS))

    # -- navigation (fresh cgroupspy nodes each time: a Node caches its children)

    def _subtree(self, hierarchy: Path) -> Node:
        return Node(self.name, parent=Node(str(hierarchy)))

    def _node(self, controller: str, user: str) -> Node:
        check_group_name("user", user)
        return Node(user, parent=self._subtree(self._controller_mounts[controller]))

    def _dirs(self, user: str) -> list[Path]:
        check_group_name("user", user)
        return [h / self.name / user for h in self._hierarchies]

    def _freezer(self, user: str) -> Any:
        return FreezerController(self._node("freezer", user))

    def _require(self, user: str) -> None:
        missing = [d for d in self._dirs(user) if not d.is_dir()]
        if missing:
            raise CgroupError(f"cgroup {missing[0]} does not exist", reason="cgroup_missing", hint="create() the user's group first")

    # -- introspection and set-up

    def describe(self) -> str:
        return f"cgroup v1 at {self.mount} ({' '.join(REQUIRED_CONTROLLERS)}), subtree {self.name}"

    def prepare(self) -> None:
        for hierarchy in self._hierarchies:
            with _errors(f"create {hierarchy / self.name}"):
                Node(str(hierarchy)).create_cgroup(self.name)
        memory = MemoryController(self._subtree(self._controller_mounts["memory"]))
        with _errors(f"enable memory.use_hierarchy in {self._controller_mounts['memory'] / self.name}"):
            if not memory.use_hierarchy:  # always on since Linux 5.x; older kernels need it set
                memory.use_hierarchy = True

    # create() and set_limits() are on every start's path: plain mkdir and writes, no cgroupspy
    # nodes (whose create_cgroup lists every sibling group, i.e. every user, each time).

    def create(self, user: str, limits: Limits) -> None:
        check_group_name("user", user)
        for hierarchy in self._hierarchies:
            if not (hierarchy / self.name).is_dir():
                raise CgroupError(f"cannot create {user!r}: {hierarchy / self.name} is missing", hint="call prepare() first")
            with _errors(f"create {hierarchy / self.name / user}"):
                try:
                    os.mkdir(hierarchy / self.name / user)
                except FileExistsError:
                    pass
        # oom_kill_disable 0: the kernel kills, as by default
        write_text(self._controller_mounts["memory"] / self.name / user / "memory.oom_control", "0")
        self.set_limits(user, limits)

    def set_limits(self, user: str, limits: Limits) -> None:
        self._require(user)
        cpu = self._controller_mounts["cpu"] / self.name / user
        write_text(cpu / "cpu.cfs_period_us", str(limits.cpu_period_us))
        write_text(cpu / "cpu.cfs_quota_us", str(cpu_quota_us(limits.cpu_millicores, limits.cpu_period_us)))
        memory = self._controller_mounts["memory"] / self.name / user
        self._set_memory(memory, limits.memory_bytes)
        soft = -1 if limits.memory_high_bytes is None else limits.memory_high_bytes  # -1: unlimited
        write_text(memory / "memory.soft_limit_in_bytes", str(soft))
        write_text(self._controller_mounts["pids"] / self.name / user / "pids.max", str(limits.pids))

    @staticmethod
    def _set_memory(memory: Path, limit: int) -> None:
        """Set RAM and RAM+swap to ``limit``; the kernel keeps limit <= memsw at every step."""
        memsw_file, limit_file = memory / "memory.memsw.limit_in_bytes", memory / "memory.limit_in_bytes"
        if not memsw_file.exists():
            write_text(limit_file, str(limit))
            return
        if limit > int(read_text(memsw_file)):
            write_text(memsw_file, str(limit))
            write_text(limit_file, str(limit))
        else:
            write_text(limit_file, str(limit))
            write_text(memsw_file, str(limit))

    # -- membership

    def procs_files(self, user: str) -> list[str]:
        return [str(d / "cgroup.procs") for d in self._dirs(user)]

    def pids(self, user: str) -> list[int]:
        found: set[int] = set()
        for directory in self._dirs(user):
            for node in _tree(directory):
                found.update(read_pids(Path(os.fsdecode(node.full_path)) / "cgroup.procs"))
        return sorted(found)

    def exists(self, user: str) -> bool:
        return any(d.is_dir() for d in self._dirs(user))

    def users(self) -> list[str]:
        names: set[str] = set()
        for hierarchy in self._hierarchies:
            try:
                names.update(e.name for e in os.scandir(hierarchy / self.name) if e.is_dir() and not e.name.startswith(SPARE_PREFIX))
            except FileNotFoundError:
                continue
        return sorted(names)

    # -- spare groups (:class:`~supervisor.cgroups.base.SpareGroups`)

    def create_spare(self, spare: str) -> list[str]:
        name = _spare_name(spare)
        for hierarchy in self._hierarchies:
            with _errors(f"create {hierarchy / self.name / name}"):
                (hierarchy / self.name / name).mkdir(exist_ok=True)
        write_text(self._controller_mounts["memory"] / self.name / name / "memory.oom_control", "0")  # as create()
        return self.procs_files(name)

    def assign_spare(self, spare: str, user: str) -> None:
        name = _spare_name(spare)
        check_group_name("user", user)
        for directory in self._dirs(user):  # an empty leftover of a kill: its tasks are gone
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise CgroupError(f"cannot give a spare group to {user}: {directory} exists and cannot be removed ({exc.strerror})") from exc
        done: list[tuple[Path, Path]] = []
        try:
            for hierarchy in self._hierarchies:
                source, target = hierarchy / self.name / name, hierarchy / self.name / user
                os.rename(source, target)
                done.append((source, target))
        except OSError as exc:
            for source, target in reversed(done):
                try:
                    os.rename(target, source)
                except OSError:
                    pass  # best effort; remove_spare/users() sort out what is left
            raise CgroupError(f"cannot rename {exc.filename} to {exc.filename2}: {exc.strerror}") from exc

    def spares(self) -> list[str]:
        found: set[str] = set()
        for hierarchy in self._hierarchies:
            try:
                found.update(e.name[len(SPARE_PREFIX):] for e in os.scandir(hierarchy / self.name) if e.is_dir() and e.name.startswith(SPARE_PREFIX))
            except FileNotFoundError:
                continue
        return sorted(found)

    def remove_spare(self, spare: str) -> None:
        name = _spare_name(spare)
        self.kill(name)
        self.remove(name)

    # -- freezer and kill

    def _set_state(self, user: str, state: str) -> bool:
        """Write freezer.state and wait until the kernel reports it; False on timeout."""
        freezer = self._freezer(user)
        with _errors(f"set freezer.state of {user} to {state}"):
            freezer.state = state
        return wait_until(lambda: bool(freezer.state == state), self.wait_timeout)

    def freeze(self, user: str) -> None:
        self._require(user)
        if not self._set_state(user, "FROZEN"):
            raise CgroupError(
                f"{user} was not reported FROZEN within {self.wait_timeout:g} s",
                hint="a task in uninterruptible sleep (e.g. on NFS) delays freezing",
            )

    def thaw(self, user: str) -> None:
        self._require(user)
        if not self._set_state(user, "THAWED"):
            raise CgroupError(f"{user} was not reported THAWED within {self.wait_timeout:g} s", hint="a frozen parent keeps its children frozen")

    def is_frozen(self, user: str) -> bool:
        if not self.exists(user):
            return False
        with _errors(f"read freezer.state of {user}"):
            return bool(self._freezer(user).state == "FROZEN")

    def _paused_dir(self, user: str) -> Path:
        check_group_name("user", user)
        return self._controller_mounts["freezer"] / self.name / user / PAUSED_GROUP

    def freeze_processes(self, user: str, pids: list[int]) -> list[int]:
        """The ``paused`` child exists in the freezer hierarchy only: the processes stay in the
        user's cpu, memory and pids groups."""
        self._require(user)
        paused = self._paused_dir(user)
        with _errors(f"create {paused}"):
            paused.mkdir(exist_ok=True)
        moved = move_pids(paused, pids)
        state = paused / "freezer.state"
        write_text(state, "FROZEN")
        if not wait_until(lambda: read_text(state).strip() == "FROZEN", self.wait_timeout):
            raise CgroupError(f"{paused} was not reported FROZEN within {self.wait_timeout:g} s")
        return moved

    def thaw_processes(self, user: str) -> None:
        paused = self._paused_dir(user)
        if not paused.is_dir():
            return
        state = paused / "freezer.state"
        write_text(state, "THAWED")
        # Under a frozen parent (the whole user frozen) the child reports FROZEN until that thaws.
        if not wait_until(lambda: read_text(state).strip() == "THAWED" or self.is_frozen(user), self.wait_timeout):
            raise CgroupError(f"{paused} was not reported THAWED within {self.wait_timeout:g} s")

    def reclaim_memory(self, user: str) -> bool:
        return False  # v1 has no memory.reclaim; force_empty only works on an empty group

    def kill(self, user: str) -> None:
        """Freeze, SIGKILL every task, thaw, and repeat until the group is empty.

        Frozen, nothing can fork, so each round sees every task; a fork in flight completes
        before its parent freezes and its child is then in the group for the next round.
        """
        if not self.exists(user):
            return
        self._require(user)
        self.thaw_processes(user)  # a self-frozen child would keep its tasks from dying
        for _round in range(20):
            self._set_state(user, "FROZEN")  # proceed even if a task is slow to freeze
            pids = self.pids(user)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not self._set_state(user, "THAWED"):
                raise CgroupError(f"{user} was not reported THAWED after killing its tasks")
            if not pids or wait_until(lambda: not self.pids(user), self.wait_timeout):
                return
        raise CgroupError(f"tasks of {user} survive SIGKILL", hint="a task in uninterruptible sleep cannot die until it wakes")

    def remove(self, user: str) -> None:
        for directory in self._dirs(user):
            for node in reversed(list(_tree(directory))):  # deepest first
                rmdir_when_empty(Path(os.fsdecode(node.full_path)), self.wait_timeout)

    # -- usage

    def usage(self, user: str) -> Usage:
        """Read straight from the files (called for every user every few seconds: no cgroupspy
        node building, no existence checks beyond the reads themselves)."""
        check_group_name("user", user)
        memory = self._controller_mounts["memory"] / self.name / user
        try:
            oom_control = parse_flat_keyed((memory / "memory.oom_control").read_text())
            failcnt = 0 if "oom_kill" in oom_control else int((memory / "memory.failcnt").read_text())
            return Usage(
                memory_bytes=int((memory / "memory.usage_in_bytes").read_text()),
                cpu_usage_us=int((self._controller_mounts["cpuacct"] / self.name / user / "cpuacct.usage").read_text()) // 1000,
                oom_kills=_oom_kills(oom_control, failcnt),
                pids=int((self._controller_mounts["pids"] / self.name / user / "pids.current").read_text()),
            )
        except FileNotFoundError:
            raise CgroupError(f"cgroup of {user} does not exist", reason="cgroup_missing", hint="create() the user's group first") from None
        except (OSError, ValueError) as exc:
            raise CgroupError(f"cannot read the usage of {user}: {exc}") from exc


def _spare_name(spare: str) -> str:
    if not spare.isalnum() or not spare.isascii():
        raise CgroupError(f"invalid spare group id {spare!r}", hint="use letters and digits")
    return SPARE_PREFIX + spare


def _tree(directory: Path) -> Iterator[Node]:
    """``directory`` and every cgroup below it, pre-order (cgroupspy's tree walk); none if gone."""
    try:
        return iter(list(BaseTree(root_path=str(directory)).walk()))
    except FileNotFoundError:
        return iter([])


@contextmanager
def _errors(doing: str) -> Iterator[None]:
    """Turn an OSError from a cgroup file into a CgroupError naming what was being done."""
    try:
        yield
    except OSError as exc:
        where = f" ({exc.filename!r})" if exc.filename else ""
        raise CgroupError(f"cannot {doing}: {exc.strerror}{where}") from exc
