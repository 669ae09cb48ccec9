"""cgroup v2 driver: plain files under the unified hierarchy.

Layout under ``<base>``, the daemon's own cgroup (a delegated subtree: systemd ``Delegate=yes``, or
the container's cgroup-namespace root)::

    <base>/daemon/          the daemon and whatever else was in <base> (no-internal-process rule)
    <base>/<name>/          the users' subtree; cpu, memory and pids enabled for its children
    <base>/<name>/<user>/   one user's group

The pure helpers at the top (file formats, limit values) are kept apart from the driver, which
only reads and writes files.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Callable, Literal

from supervisor.cgroups.base import Limits, Usage
from supervisor.errors import CgroupError

REQUIRED_CONTROLLERS = ("cpu", "memory", "pids")
DAEMON_LEAF = "daemon"
PAUSED_GROUP = "paused"  # a user's child group holding its frozen language servers
MIN_CPU_QUOTA_US = 1000  # the kernel refuses a smaller quota in cpu.max / cpu.cfs_quota_us
# Limit files that may be absent even when every required controller is enabled
# (memory.swap.max needs swap accounting); they are skipped rather than failing.
OPTIONAL_LIMIT_FILES = frozenset({"memory.swap.max"})

MISSING_CONTROLLERS_HINT = (
    "delegate the controllers to the daemon's cgroup: enable them in the parent's "
    "cgroup.subtree_control (systemd: Delegate=yes on the service; containers: cgroup v2 with a "
    "private cgroup namespace), or set [cgroups] driver = \"v1\" on a cgroup v1 host"
)


# --- pure helpers -----------------------------------------------------------------------------


def cpu_quota_us(millicores: int, period_us: int) -> int:
    """CPU time per period for ``millicores`` (1000 = one core), at least the kernel's minimum."""
    return max(MIN_CPU_QUOTA_US, millicores * period_us // 1000)


def cpu_max(limits: Limits) -> str:
    """The ``cpu.max`` line for ``limits``: ``"<quota> <period>"``."""
    return f"{cpu_quota_us(limits.cpu_millicores, limits.cpu_period_us)} {limits.cpu_period_us}"


def limit_files(limits: Limits) -> list[tuple[str, str]]:
    """The (file, value) writes that apply ``limits`` to a v2 group, in order.

    ``memory_bytes`` is a hard limit on RAM and swap together, so swap is turned off
    (``memory.swap.max`` 0) where swap accounting exists, as v1 does with ``memsw``.
    """
    high = "max" if limits.memory_high_bytes is None else str(limits.memory_high_bytes)
    return [
        ("cpu.max", cpu_max(limits)),
        ("memory.max", str(limits.memory_bytes)),
        ("memory.swap.max", "0"),
        ("memory.high", high),
        ("pids.max", str(limits.pids)),
    ]


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Parse ``key value`` lines (cgroup.events, memory.events, cpu.stat)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            values[key] = int(value)
    return values


def parse_own_cgroup(proc_self_cgroup: str) -> str:
    """The unified-hierarchy path (``0::/path``) of a ``/proc/<pid>/cgroup`` text."""
    for line in proc_self_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip()
    raise CgroupError(
        "this process has no cgroup v2 membership (no '0::' line in /proc/self/cgroup)",
        hint="mount cgroup2 or use [cgroups] driver = \"v1\"",
    )


def base_for(mount: Path, own_path: str) -> Path:
    """The directory of the daemon's base cgroup, given its own cgroup path.

    A daemon that already sits in its ``daemon`` leaf (re-exec after prepare()) uses the leaf's
    parent, so a restart finds the same users' subtree.
    """
    parts = [p for p in own_path.split("/") if p]
    if parts and parts[-1] == DAEMON_LEAF:
        parts = parts[:-1]
    return mount.joinpath(*parts)


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` with a short back-off until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def check_group_name(kind: str, value: str) -> None:
    """Refuse names that would leave the intended directory."""
    if not value or value in (".", "..") or "/" in value or "\0" in value:
        raise CgroupError(f"invalid cgroup {kind} name {value!r}", hint="use a plain directory name")


# --- file effects -----------------------------------------------------------------------------


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise CgroupError(f"cannot read {path}: {exc.strerror}") from exc


def write_text(path: Path, value: str) -> None:
    """Write one value to a cgroup file (one write() call, as the kernel expects)."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        raise CgroupError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def read_pids(procs_file: Path) -> list[int]:
    """Pids listed in a ``cgroup.procs`` file; empty when the group is gone."""
    try:
        text = procs_file.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CgroupError(f"cannot read {procs_file}: {exc.strerror}") from exc
    return [int(line) for line in text.split()]


def move_pids(group: Path, pids: list[int]) -> list[int]:
    """Move each of ``pids`` into ``group`` (a cgroup directory); returns those that still existed."""
    moved = []
    for pid in pids:
        try:
            write_text(group / "cgroup.procs", str(pid))
        except CgroupError as exc:
            if isinstance(exc.__cause__, ProcessLookupError):
                continue  # exited meanwhile
            raise
        moved.append(pid)
    return moved


def subgroups_bottom_up(root: Path) -> list[Path]:
    """``root`` and every cgroup below it, deepest first (the order rmdir needs)."""
    found: list[Path] = []
    for dirpath, _dirnames, _files in os.walk(root, topdown=False):
        found.append(Path(dirpath))
    return found


def rmdir_when_empty(path: Path, timeout: float) -> None:
    """rmdir a cgroup, retrying while the kernel still reaps its dying tasks; gone is fine."""
    failure: list[OSError] = []

    def attempt() -> bool:
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise CgroupError(f"cannot remove {path}: {exc.strerror}") from exc
            failure[:] = [exc]
            return False
        return True

    if not wait_until(attempt, timeout):
        raise CgroupError(
            f"cannot remove {path}: still busy after {timeout:g} s",
            hint="kill the group's processes first; a task stuck in uninterruptible sleep delays it",
        )


# --- the driver -------------------------------------------------------------------------------


class V2Driver:
    """A :class:`~supervisor.cgroups.base.CgroupDriver` for the unified (v2) hierarchy.

    ``base`` defaults to the daemon's own cgroup read from ``/proc/self/cgroup``.
    ``require_controllers=False`` lets the core features (procs, freeze, kill) work on a v2
    hierarchy without cpu/memory/pids (a hybrid host): limit and usage files that do not exist
    are skipped or read as zero instead of failing.
    """

    version: Literal[1, 2] = 2
    wait_timeout = 5.0  # freeze/thaw acknowledgement and rmdir of a dying group

    def __init__(
        self, mount: Path, name: str, *, base: Path | None = None, require_controllers: bool = True
    ) -> None:
        check_group_name("subtree", name)
        if name == DAEMON_LEAF:
            raise CgroupError(f"the users' subtree cannot be named {DAEMON_LEAF!r}: the daemon's leaf uses it")
        self.mount = Path(mount)
        self.name = name
        self.require_controllers = require_controllers
        if base is None:
            base = base_for(self.mount, parse_own_cgroup(read_text(Path("/proc/self/cgroup"))))
        self.base = Path(base)
        self.daemon_dir = self.base / DAEMON_LEAF
        self.users_dir = self.base / name

    # -- introspection

    def describe(self) -> str:
        enabled = self._subtree_control(self.users_dir) if self.users_dir.is_dir() else set()
        controllers = " ".join(c for c in REQUIRED_CONTROLLERS if c in enabled) or "no controllers"
        return f"cgroup v2 at {self.users_dir} ({controllers})"

    def available_controllers(self) -> set[str]:
        """Controllers the parent has delegated to ``base`` (its ``cgroup.controllers``)."""
        return set(read_text(self.base / "cgroup.controllers").split())

    def missing_controllers(self) -> list[str]:
        available = self.available_controllers()
        return [c for c in REQUIRED_CONTROLLERS if c not in available]

    # -- set-up

    def prepare(self) -> None:
        """Create the subtree (idempotent), honouring the no-internal-process rule.

        Every process in ``base`` (the daemon, and anything else) moves to ``base/daemon`` first,
        because a non-root cgroup with processes cannot enable controllers for its children. The
        true root cgroup is exempt and is left as it is (it holds kernel threads).
        """
        self.base.mkdir(exist_ok=True)
        missing = self.missing_controllers()
        if missing and self.require_controllers:
            raise CgroupError(
                f"cgroup v2 controllers {', '.join(missing)} are not available in {self.base} "
                f"(cgroup.controllers: {' '.join(sorted(self.available_controllers())) or 'none'})",
                reason="cgroup_controllers_missing",
                hint=MISSING_CONTROLLERS_HINT,
            )
        wanted = [c for c in REQUIRED_CONTROLLERS if c not in missing]
        if not self._is_root(self.base):
            self._move_processes_to_leaf()
        self._enable(self.base, wanted)
        self.users_dir.mkdir(exist_ok=True)
        self._enable(self.users_dir, wanted)

    def _is_root(self, path: Path) -> bool:
        # cgroup.type exists in every cgroup but the root (of the hierarchy, not of a namespace).
        return not (path / "cgroup.type").exists()

    def _move_processes_to_leaf(self) -> None:
        self.daemon_dir.mkdir(exist_ok=True)
        target = self.daemon_dir / "cgroup.procs"
        for _round in range(100):  # processes forked meanwhile appear in the next round
            pids = read_pids(self.base / "cgroup.procs")
            if not pids:
                return
            for pid in pids:
                try:
                    write_text(target, str(pid))
                except CgroupError as exc:
                    if isinstance(exc.__cause__, ProcessLookupError):
                        continue  # exited meanwhile
                    raise
        raise CgroupError(f"processes keep appearing in {self.base}; cannot empty it into {self.daemon_dir}")

    def _subtree_control(self, path: Path) -> set[str]:
        return set(read_text(path / "cgroup.subtree_control").split())

    def _enable(self, path: Path, controllers: list[str]) -> None:
        enabled = self._subtree_control(path)
        todo = [c for c in controllers if c not in enabled]
        if not todo:
            return
        try:
            write_text(path / "cgroup.subtree_control", " ".join(f"+{c}" for c in todo))
        except CgroupError as exc:
            if isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.EBUSY:
                raise CgroupError(
                    f"cannot enable {' '.join(todo)} in {path}: it holds processes",
                    hint="the no-internal-process rule: move them into a leaf cgroup first",
                ) from exc
            raise

    # -- groups

    def _group(self, user: str) -> Path:
        check_group_name("user", user)
        return self.users_dir / user

    def _existing(self, user: str) -> Path:
        group = self._group(user)
        if not group.is_dir():
            raise CgroupError(f"cgroup {group} does not exist", reason="cgroup_missing", hint="create() the user's group first")
        return group

    def create(self, user: str, limits: Limits) -> None:
        group = self._group(user)
        try:
            group.mkdir(exist_ok=True)
        except FileNotFoundError:
            raise CgroupError(f"cannot create {group}: {self.users_dir} is missing", hint="call prepare() first") from None
        except OSError as exc:
            raise CgroupError(f"cannot create {group}: {exc.strerror}") from exc
        self.set_limits(user, limits)

    def set_limits(self, user: str, limits: Limits) -> None:
        group = self._existing(user)
        for filename, value in limit_files(limits):
            path = group / filename
            if not path.exists() and (filename in OPTIONAL_LIMIT_FILES or not self.require_controllers):
                continue
            write_text(path, value)

    def procs_files(self, user: str) -> list[str]:
        return [str(self._group(user) / "cgroup.procs")]

    def pids(self, user: str) -> list[int]:
        group = self._group(user)
        if not group.is_dir():
            return []
        return sorted({pid for sub in subgroups_bottom_up(group) for pid in read_pids(sub / "cgroup.procs")})

    def exists(self, user: str) -> bool:
        return self._group(user).is_dir()

    def users(self) -> list[str]:
        try:
            return sorted(entry.name for entry in os.scandir(self.users_dir) if entry.is_dir())
        except FileNotFoundError:
            return []

    # -- freezer and kill

    def _events(self, group: Path) -> dict[str, int]:
        return parse_flat_keyed(read_text(group / "cgroup.events"))

    def _set_frozen(self, user: str, frozen: bool) -> None:
        group = self._existing(user)
        write_text(group / "cgroup.freeze", "1" if frozen else "0")
        want = 1 if frozen else 0
        if not wait_until(lambda: self._events(group).get("frozen") == want, self.wait_timeout):
            state = "frozen" if frozen else "thawed"
            raise CgroupError(
                f"{group} was not reported {state} in cgroup.events within {self.wait_timeout:g} s",
                hint="a frozen parent keeps its children frozen; check the parent's cgroup.freeze",
            )

    def freeze(self, user: str) -> None:
        self._set_frozen(user, True)

    def thaw(self, user: str) -> None:
        self._set_frozen(user, False)

    def is_frozen(self, user: str) -> bool:
        group = self._group(user)
        return group.is_dir() and self._events(group).get("frozen") == 1

    def freeze_processes(self, user: str, pids: list[int]) -> list[int]:
        paused = self._existing(user) / PAUSED_GROUP
        paused.mkdir(exist_ok=True)
        moved = move_pids(paused, pids)
        write_text(paused / "cgroup.freeze", "1")
        if not wait_until(lambda: self._events(paused).get("frozen") == 1, self.wait_timeout):
            raise CgroupError(f"{paused} was not reported frozen within {self.wait_timeout:g} s")
        return moved

    def thaw_processes(self, user: str) -> None:
        paused = self._group(user) / PAUSED_GROUP
        if not paused.is_dir():
            return
        write_text(paused / "cgroup.freeze", "0")
        # Under a frozen parent (the whole user frozen) the child stays frozen until that thaws.
        thawed = lambda: self._events(paused).get("frozen") == 0 or self.is_frozen(user)  # noqa: E731
        if not wait_until(thawed, self.wait_timeout):
            raise CgroupError(f"{paused} was not reported thawed within {self.wait_timeout:g} s")

    def reclaim_memory(self, user: str) -> bool:
        group = self._existing(user)
        target = group / "memory.reclaim"
        if not target.exists():
            return False
        amount = self._counter(group / "memory.current")
        try:
            with open(target, "w") as f:
                f.write(str(amount))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EBUSY):
                return False  # only part (or none) could be reclaimed, e.g. anon memory without swap
            raise CgroupError(f"cannot write {target}: {exc.strerror}") from exc
        return True

    def kill(self, user: str) -> None:
        group = self._group(user)
        if not group.is_dir():
            return
        kill_file = group / "cgroup.kill"
        if not kill_file.exists():
            raise CgroupError(f"{kill_file} is missing", hint="cgroup.kill needs Linux 5.14 or later")
        write_text(kill_file, "1")

    def remove(self, user: str) -> None:
        group = self._group(user)
        if not group.is_dir():
            return
        for sub in subgroups_bottom_up(group):
            rmdir_when_empty(sub, self.wait_timeout)

    # -- usage

    def _counter(self, path: Path, key: str | None = None) -> int:
        """One number from a usage file; 0 for a missing controller file when that is allowed."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            if self.require_controllers or not path.parent.is_dir():
                raise CgroupError(f"cannot read {path}: it does not exist") from None
            return 0
        except OSError as exc:
            raise CgroupError(f"cannot read {path}: {exc.strerror}") from exc
        if key is None:
            return int(text.strip())
        return parse_flat_keyed(text).get(key, 0)

    def usage(self, user: str) -> Usage:
        group = self._existing(user)
        if (group / "pids.current").exists():
            pids = self._counter(group / "pids.current")
        else:
            pids = len(self.pids(user))
        return Usage(
            memory_bytes=self._counter(group / "memory.current"),
            cpu_usage_us=self._counter(group / "cpu.stat", "usage_usec"),
            oom_kills=self._counter(group / "memory.events", "oom_kill"),
            pids=pids,
        )
