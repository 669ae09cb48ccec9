"""The cgroup v1 driver: mount discovery (pure) and the conformance suite on this host's v1 hierarchies."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from cgroup_conformance import GENEROUS, CgroupDriverConformance, force_remove_tree, unique
from conftest import CGROUP_MOUNT, needs_v1

from supervisor.cgroups.base import CgroupDriver, Limits
from supervisor.cgroups.v1 import V1Driver, _oom_kills, parse_mountinfo, v1_hierarchies
from supervisor.errors import CgroupError

SEPARATE = """\
24 1 0:21 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
25 24 0:22 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
26 24 0:23 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
27 24 0:24 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
28 24 0:25 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
29 24 0:26 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
30 24 0:27 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
31 24 0:28 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

COMOUNTED = """\
24 1 0:21 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
25 24 0:22 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:5 master:2 - cgroup cgroup rw,cpu,cpuacct
27 24 0:24 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
28 24 0:25 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
29 24 0:26 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer
40 1 0:26 / /mnt/other\\040place rw - cgroup cgroup rw,freezer
"""


# --- pure -------------------------------------------------------------------------------------


def test_hierarchies_mounted_apart() -> None:
    found = v1_hierarchies(parse_mountinfo(SEPARATE), Path("/sys/fs/cgroup"))
    assert found == {c: Path("/sys/fs/cgroup") / c for c in ("cpu", "cpuacct", "memory", "pids", "freezer")}


def test_cpu_and_cpuacct_mounted_together() -> None:
    found = v1_hierarchies(parse_mountinfo(COMOUNTED), Path("/sys/fs/cgroup"))
    assert found["cpu"] == found["cpuacct"] == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert found["freezer"] == Path("/sys/fs/cgroup/freezer")  # not the second mount elsewhere


def test_mountinfo_unescapes_paths_and_reads_optional_fields() -> None:
    entries = parse_mountinfo(COMOUNTED)
    assert entries[-1].mount_point == Path("/mnt/other place")
    assert entries[1].fstype == "cgroup" and entries[1].super_options == ("rw", "cpu", "cpuacct")


def test_nothing_mounted_under_another_root() -> None:
    assert v1_hierarchies(parse_mountinfo(SEPARATE), Path("/elsewhere")) == {}


def test_oom_kills_from_oom_control_else_failcnt() -> None:
    assert _oom_kills({"oom_kill_disable": 0, "under_oom": 0, "oom_kill": 3}, 17) == 3
    assert _oom_kills({"oom_kill_disable": 0, "under_oom": 0}, 17) == 17


# --- real, on this host -----------------------------------------------------------------------


def test_refuses_a_mount_without_v1_hierarchies(tmp_path: Path) -> None:
    with pytest.raises(CgroupError) as info:
        V1Driver(tmp_path, "workspace-supervisor")
    assert "cpu, cpuacct, memory, pids, freezer" in str(info.value)
    assert info.value.reason == "cgroup_controllers_missing"


@pytest.fixture
def v1_driver() -> Iterator[V1Driver]:
    name = unique("wsup-test")
    driver = V1Driver(CGROUP_MOUNT, name)
    try:
        driver.prepare()
        yield driver
    finally:
        for controller in ("cpu", "cpuacct", "memory", "pids", "freezer"):
            force_remove_tree(CGROUP_MOUNT / controller / name)


@needs_v1
class TestV1Driver(CgroupDriverConformance):
    @pytest.fixture
    def driver(self, v1_driver: V1Driver) -> V1Driver:
        return v1_driver

    def assert_limits_applied(self, driver: CgroupDriver, user: str, limits: Limits) -> None:
        assert isinstance(driver, V1Driver)
        name = driver.name

        def read(controller: str, filename: str) -> str:
            return (CGROUP_MOUNT / controller / name / user / filename).read_text().strip()

        quota = limits.cpu_millicores * limits.cpu_period_us // 1000
        assert read("cpu", "cpu.cfs_period_us") == str(limits.cpu_period_us)
        assert read("cpu", "cpu.cfs_quota_us") == str(quota)
        assert read("memory", "memory.limit_in_bytes") == str(limits.memory_bytes)
        assert read("memory", "memory.memsw.limit_in_bytes") == str(limits.memory_bytes)
        if limits.memory_high_bytes is not None:
            assert read("memory", "memory.soft_limit_in_bytes") == str(limits.memory_high_bytes)
        else:
            assert int(read("memory", "memory.soft_limit_in_bytes")) >= 2**62  # unlimited
        assert read("pids", "pids.max") == str(limits.pids)
        assert "oom_kill_disable 0" in read("memory", "memory.oom_control")


@needs_v1
def test_groups_exist_in_every_hierarchy(v1_driver: V1Driver) -> None:
    user = unique("u")
    v1_driver.prepare()  # idempotent
    v1_driver.create(user, GENEROUS)
    files = v1_driver.procs_files(user)
    assert files == [str(CGROUP_MOUNT / c / v1_driver.name / user / "cgroup.procs") for c in ("cpu", "cpuacct", "memory", "pids", "freezer")]
    assert (CGROUP_MOUNT / "memory" / v1_driver.name / "memory.use_hierarchy").read_text().strip() == "1"
    assert "cgroup v1" in v1_driver.describe()


@needs_v1
def test_memory_limit_moves_up_and_down_with_memsw(v1_driver: V1Driver) -> None:
    # memsw must stay >= the RAM limit at every step, so the order of writes flips.
    user = unique("u")
    v1_driver.create(user, Limits(cpu_millicores=500, memory_bytes=64 * 2**20, memory_high_bytes=None, pids=32))
    for size in (1024 * 2**20, 32 * 2**20, 256 * 2**20):
        v1_driver.set_limits(user, Limits(cpu_millicores=500, memory_bytes=size, memory_high_bytes=None, pids=32))
        group = CGROUP_MOUNT / "memory" / v1_driver.name / user
        assert (group / "memory.limit_in_bytes").read_text().strip() == str(size)
        assert (group / "memory.memsw.limit_in_bytes").read_text().strip() == str(size)


@needs_v1
def test_tiny_cpu_limit_is_clamped_to_the_kernel_minimum(v1_driver: V1Driver) -> None:
    user = unique("u")
    v1_driver.create(user, Limits(cpu_millicores=1, memory_bytes=64 * 2**20, memory_high_bytes=None, pids=32))
    assert (CGROUP_MOUNT / "cpu" / v1_driver.name / user / "cpu.cfs_quota_us").read_text().strip() == "1000"
