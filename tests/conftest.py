"""Shared fixtures and skip conditions for kernel-level tests.

Tests that need root or a kernel feature skip with the reason when it is missing; CI runs as
root on a host with cgroup v1 controllers and a core-only v2 hierarchy, and runs the tests marked
``cgroupv2`` inside a pure cgroup v2 VM (integration/vm/run).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CGROUP_MOUNT = Path("/sys/fs/cgroup")


def is_root() -> bool:
    return os.geteuid() == 0


def pure_cgroup_v2() -> bool:
    """True on a pure v2 host with cpu, memory and pids controllers available at the root."""
    controllers = CGROUP_MOUNT / "cgroup.controllers"
    try:
        available = set(controllers.read_text().split())
    except OSError:
        return False
    return {"cpu", "memory", "pids"} <= available


def v1_controllers_mounted() -> bool:
    return all((CGROUP_MOUNT / c / "cgroup.procs").exists() for c in ("cpu", "memory", "pids", "freezer"))


needs_root = pytest.mark.skipif(not is_root(), reason="needs root (cgroups, uid changes, chown)")
needs_v1 = pytest.mark.skipif(
    not (is_root() and v1_controllers_mounted()),
    reason="needs root and cgroup v1 cpu/memory/pids/freezer hierarchies under /sys/fs/cgroup",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if is_root() and pure_cgroup_v2():
        return
    skip = pytest.mark.skip(
        reason="needs root on a pure cgroup v2 kernel with cpu/memory/pids controllers; run integration/vm/run"
    )
    for item in items:
        if "cgroupv2" in item.keywords:
            item.add_marker(skip)
