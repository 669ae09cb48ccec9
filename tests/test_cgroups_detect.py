"""Driver detection: the decision (pure, from mountinfo text) and detect() on this host."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CGROUP_MOUNT, needs_v1
from cgroup_conformance import UNIFIED, needs_unified

from supervisor.cgroups import V1Driver, V2Driver, detect
from supervisor.cgroups.detect import choose, is_cgroup2_mount
from supervisor.cgroups.v1 import parse_mountinfo
from supervisor.config import CgroupsConfig
from supervisor.errors import CgroupError

MOUNT = Path("/sys/fs/cgroup")
PURE_V2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
HYBRID = """\
24 1 0:21 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
25 24 0:22 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
26 24 0:23 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct
27 24 0:24 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
28 24 0:25 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
29 24 0:26 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer
31 24 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
"""
COMOUNTED = """\
24 1 0:21 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
25 24 0:22 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
27 24 0:24 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
28 24 0:25 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
29 24 0:26 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer
"""


def test_pure_v2_with_delegated_controllers_is_v2() -> None:
    assert choose(MOUNT, parse_mountinfo(PURE_V2), {"cpu", "memory", "pids", "io"}) == 2


def test_pure_v2_without_controllers_is_refused_with_what_was_found() -> None:
    with pytest.raises(CgroupError) as info:
        choose(MOUNT, parse_mountinfo(PURE_V2), {"cpu", "io"})
    message = str(info.value)
    assert "lacks memory, pids" in message and "available: cpu io" in message
    assert "not mounted under /sys/fs/cgroup" in message
    assert info.value.reason == "cgroup_unavailable"


def test_hybrid_and_v1_hosts_are_v1() -> None:
    assert choose(MOUNT, parse_mountinfo(HYBRID), None) == 1
    assert choose(MOUNT, parse_mountinfo(COMOUNTED), None) == 1


def test_hybrid_unified_mount_alone_is_not_enough() -> None:
    with pytest.raises(CgroupError) as info:
        choose(MOUNT / "unified", parse_mountinfo(HYBRID), {"hugetlb"})
    assert "lacks cpu, memory, pids" in str(info.value)


def test_partial_v1_is_refused() -> None:
    partial = "\n".join(line for line in HYBRID.splitlines() if "freezer" not in line)
    with pytest.raises(CgroupError) as info:
        choose(MOUNT, parse_mountinfo(partial), None)
    assert "freezer are not mounted" in str(info.value)
    assert "found cpu, cpuacct, memory, pids" in str(info.value)


def test_is_cgroup2_mount_uses_the_last_mount_on_a_path() -> None:
    entries = parse_mountinfo(PURE_V2 + "40 30 0:50 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")
    assert not is_cgroup2_mount(entries, MOUNT)
    assert is_cgroup2_mount(parse_mountinfo(PURE_V2), MOUNT)
    assert not is_cgroup2_mount(parse_mountinfo(PURE_V2), Path("/sys/fs"))


# --- real -------------------------------------------------------------------------------------


@needs_v1
def test_auto_on_this_hybrid_host_is_v1() -> None:
    driver = detect(CgroupsConfig(driver="auto", mount=CGROUP_MOUNT, name="workspace-supervisor"))
    assert isinstance(driver, V1Driver) and driver.version == 1


@needs_v1
def test_explicit_v2_on_a_non_cgroup2_mount_is_refused() -> None:
    with pytest.raises(CgroupError, match="not a cgroup2 mount"):
        detect(CgroupsConfig(driver="v2", mount=CGROUP_MOUNT))


@needs_unified
def test_explicit_v2_on_the_unified_hierarchy() -> None:
    driver = detect(CgroupsConfig(driver="v2", mount=UNIFIED, name="workspace-supervisor"))
    assert isinstance(driver, V2Driver) and driver.version == 2
    assert driver.base.is_relative_to(UNIFIED)


@needs_unified
def test_auto_on_the_unified_hierarchy_explains_what_it_found() -> None:
    with pytest.raises(CgroupError) as info:
        detect(CgroupsConfig(driver="auto", mount=UNIFIED))
    assert "lacks cpu, memory, pids" in str(info.value)


def test_explicit_v1_without_hierarchies_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="not mounted under"):
        detect(CgroupsConfig(driver="v1", mount=tmp_path))


@pytest.mark.cgroupv2
def test_auto_on_a_pure_v2_kernel_is_v2() -> None:
    driver = detect(CgroupsConfig(driver="auto", mount=CGROUP_MOUNT, name="workspace-supervisor"))
    assert isinstance(driver, V2Driver) and driver.version == 2
