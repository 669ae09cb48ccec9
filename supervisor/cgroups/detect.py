"""Pick the cgroup driver for this host: ``[cgroups] driver = auto | v1 | v2``.

``auto`` prefers v2 when ``<mount>`` is a cgroup2 mount and the daemon's own cgroup has cpu,
memory and pids delegated to it; otherwise v1 when the v1 cpu, cpuacct, memory, pids and freezer
hierarchies are mounted under ``<mount>``; otherwise it refuses, saying what it found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from supervisor.cgroups.base import CgroupDriver
from supervisor.cgroups.v1 import REQUIRED_CONTROLLERS as V1_CONTROLLERS
from supervisor.cgroups.v1 import MountEntry, V1Driver, read_mountinfo, v1_hierarchies
from supervisor.cgroups.v2 import REQUIRED_CONTROLLERS as V2_CONTROLLERS
from supervisor.cgroups.v2 import V2Driver
from supervisor.config import CgroupsConfig
from supervisor.errors import CgroupError


def is_cgroup2_mount(entries: list[MountEntry], mount: Path) -> bool:
    """Whether ``mount`` itself is a cgroup2 mount point (the last mount there wins)."""
    fstypes = [e.fstype for e in entries if e.mount_point == mount]
    return bool(fstypes) and fstypes[-1] == "cgroup2"


def choose(mount: Path, entries: list[MountEntry], v2_controllers: set[str] | None) -> Literal[1, 2]:
    """The decision of ``auto``, without I/O.

    ``v2_controllers`` are the controllers available in the daemon's own v2 cgroup (None when
    ``mount`` is not cgroup2). Raises :class:`CgroupError` describing what was found.
    """
    findings: list[str] = []
    if is_cgroup2_mount(entries, mount):
        missing = [c for c in V2_CONTROLLERS if c not in (v2_controllers or set())]
        if not missing:
            return 2
        findings.append(
            f"{mount} is cgroup v2 but the daemon's cgroup lacks {', '.join(missing)} "
            f"(available: {' '.join(sorted(v2_controllers or ())) or 'none'})"
        )
    else:
        findings.append(f"{mount} is not a cgroup2 mount")
    hierarchies = v1_hierarchies(entries, mount)
    missing_v1 = [c for c in V1_CONTROLLERS if c not in hierarchies]
    if not missing_v1:
        return 1
    findings.append(
        f"cgroup v1 controllers {', '.join(missing_v1)} are not mounted under {mount}"
        + (f" (found {', '.join(sorted(hierarchies))})" if hierarchies else "")
    )
    raise CgroupError(
        "no usable cgroup hierarchy: " + "; ".join(findings),
        reason="cgroup_unavailable",
        hint="on cgroup v2, delegate cpu, memory and pids to the daemon's cgroup (systemd Delegate=yes, "
        "or a container with its own cgroup namespace); on v1, mount cpu, cpuacct, memory, pids and "
        "freezer under [cgroups] mount",
    )


def detect(config: CgroupsConfig) -> CgroupDriver:
    """The driver ``config`` asks for, checked against the mounts of this host."""
    mount = Path(config.mount)
    if config.driver == "v1":
        return V1Driver(mount, config.name)
    entries = read_mountinfo()
    if config.driver == "v2":
        if not is_cgroup2_mount(entries, mount):
            raise CgroupError(
                f"[cgroups] driver is v2 but {mount} is not a cgroup2 mount",
                reason="cgroup_unavailable",
                hint="set [cgroups] mount to the cgroup2 mount point, or driver = \"auto\"",
            )
        return V2Driver(mount, config.name)
    v2: V2Driver | None = None
    controllers: set[str] | None = None
    if is_cgroup2_mount(entries, mount):
        v2 = V2Driver(mount, config.name)
        controllers = v2.available_controllers()
    if choose(mount, entries, controllers) == 2 and v2 is not None:
        return v2
    return V1Driver(mount, config.name)
