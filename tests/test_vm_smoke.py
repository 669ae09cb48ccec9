"""Smoke test for the VM tier (integration/vm/run): the guest is a pure cgroup v2 kernel, as root.

Skips (via the ``cgroupv2`` marker in conftest.py) everywhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CGROUP = Path("/sys/fs/cgroup")

pytestmark = pytest.mark.cgroupv2


def _mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) for every line of /proc/self/mounts."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        out.append((fields[1], fields[2]))
    return out


def test_runs_as_root() -> None:
    assert os.geteuid() == 0


def test_cgroup_mount_is_pure_v2() -> None:
    mounts = _mounts()
    assert ("/sys/fs/cgroup", "cgroup2") in mounts, mounts
    v1 = [m for m in mounts if m[1] == "cgroup"]
    assert v1 == [], f"cgroup v1 hierarchies mounted: {v1}"
    # No controller may be bound to a v1 hierarchy.
    for line in Path("/proc/cgroups").read_text().splitlines()[1:]:
        name, hierarchy = line.split()[:2]
        assert hierarchy == "0", f"controller {name} is bound to v1 hierarchy {hierarchy}"


def test_controllers_available_at_root() -> None:
    available = set((CGROUP / "cgroup.controllers").read_text().split())
    assert {"cpu", "memory", "pids", "io"} <= available, available


def test_own_cgroup_is_in_the_v2_tree() -> None:
    # A pure v2 process has exactly one line, "0::<path>".
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("0::"), lines
