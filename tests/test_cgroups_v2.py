"""The cgroup v2 driver.

Three tiers: pure functions (everywhere); core features (procs, freeze, kill, remove, prepare's
leaf) for real on this host's hybrid v2 hierarchy at /sys/fs/cgroup/unified, which has no
controllers; and the controllers (cpu.max, memory.max/high, pids.max, memory.events) for real on
a pure v2 kernel (tests marked ``cgroupv2``, run by integration/vm/run).

The test process never moves itself: every test works in a fresh ``base`` directory, and
prepare()'s moving of the daemon is exercised by a helper process placed in that base.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from cgroup_conformance import (
    DEADLINE,
    GENEROUS,
    REPO,
    SLEEPER,
    UNIFIED,
    CgroupDriverConformance,
    Spawner,
    force_remove_tree,
    join_preexec,
    needs_unified,
    read_line,
    unique,
)
from conftest import CGROUP_MOUNT

from supervisor.cgroups.base import CgroupDriver, Limits
from supervisor.cgroups.v2 import (
    V2Driver,
    base_for,
    cpu_max,
    cpu_quota_us,
    limit_files,
    parse_flat_keyed,
    parse_own_cgroup,
    read_pids,
    wait_until,
)
from supervisor.errors import CgroupError

CONTROLLERS = {"cpu", "memory", "pids"}
SUBTREE = "workspace-supervisor"


# --- pure -------------------------------------------------------------------------------------


def test_cpu_max_is_quota_and_period() -> None:
    assert cpu_max(Limits(cpu_millicores=200, memory_bytes=1, memory_high_bytes=None, pids=1)) == "20000 100000"
    assert cpu_max(Limits(cpu_millicores=2500, memory_bytes=1, memory_high_bytes=None, pids=1, cpu_period_us=50_000)) == "125000 50000"
    assert cpu_quota_us(1, 100_000) == 1000  # the kernel's minimum quota


def test_limit_files() -> None:
    limits = Limits(cpu_millicores=500, memory_bytes=2**30, memory_high_bytes=None, pids=100)
    assert dict(limit_files(limits)) == {
        "cpu.max": "50000 100000",
        "memory.max": str(2**30),
        "memory.swap.max": "0",
        "memory.high": "max",
        "pids.max": "100",
    }
    assert dict(limit_files(Limits(500, 2**30, 2**29, 100)))["memory.high"] == str(2**29)


def test_parse_flat_keyed() -> None:
    assert parse_flat_keyed("populated 1\nfrozen 0\n") == {"populated": 1, "frozen": 0}
    assert parse_flat_keyed("low 0\nhigh 3\nmax 7\noom 1\noom_kill 1\noom_group_kill 0\n")["oom_kill"] == 1


def test_parse_own_cgroup() -> None:
    assert parse_own_cgroup("0::/system.slice/wsup.service\n") == "/system.slice/wsup.service"
    hybrid = "9:name=systemd:/\n4:memory:/x\n1:cpu:/\n0::/\n"
    assert parse_own_cgroup(hybrid) == "/"
    with pytest.raises(CgroupError):
        parse_own_cgroup("4:memory:/x\n")


def test_base_is_the_daemons_cgroup_or_the_parent_of_its_leaf() -> None:
    mount = Path("/sys/fs/cgroup")
    assert base_for(mount, "/") == mount
    assert base_for(mount, "/system.slice/wsup.service") == mount / "system.slice/wsup.service"
    assert base_for(mount, "/system.slice/wsup.service/daemon") == mount / "system.slice/wsup.service"


def test_wait_until() -> None:
    assert wait_until(lambda: True, 0.0)
    assert not wait_until(lambda: False, 0.01)


def test_refuses_bad_names(tmp_path: Path) -> None:
    with pytest.raises(CgroupError):
        V2Driver(tmp_path, "daemon", base=tmp_path)  # the daemon's own leaf
    with pytest.raises(CgroupError):
        V2Driver(tmp_path, "../x", base=tmp_path)


# --- fixtures ---------------------------------------------------------------------------------


def enable_root_controllers(mount: Path) -> None:
    """In the throwaway VM only: let the root's children use cpu, memory and pids (the root cgroup
    is exempt from the no-internal-process rule)."""
    control = mount / "cgroup.subtree_control"
    todo = CONTROLLERS - set(control.read_text().split())
    if todo:
        control.write_text(" ".join(f"+{c}" for c in sorted(todo)))


@pytest.fixture
def hybrid_base() -> Iterator[Path]:
    base = UNIFIED / unique("wsup-test")
    base.mkdir()
    try:
        yield base
    finally:
        force_remove_tree(base)


@pytest.fixture
def pure_base() -> Iterator[Path]:
    enable_root_controllers(CGROUP_MOUNT)
    base = CGROUP_MOUNT / unique("wsup-test")
    base.mkdir()
    try:
        yield base
    finally:
        force_remove_tree(base)


@needs_unified
class TestV2CoreOnHybridHost(CgroupDriverConformance):
    """procs, freeze, kill and remove on a v2 hierarchy with no controllers."""

    enforces_limits = False

    @pytest.fixture
    def driver(self, hybrid_base: Path) -> V2Driver:
        driver = V2Driver(UNIFIED, SUBTREE, base=hybrid_base, require_controllers=False)
        driver.prepare()
        return driver

    def assert_limits_applied(self, driver: CgroupDriver, user: str, limits: Limits) -> None:
        assert isinstance(driver, V2Driver)
        group = driver.users_dir / user
        for filename in ("cpu.max", "memory.max", "memory.high", "pids.max"):
            assert not (group / filename).exists()

    def test_describe_names_no_controllers(self, driver: V2Driver) -> None:
        assert driver.describe() == f"cgroup v2 at {driver.users_dir} (no controllers)"


@pytest.mark.cgroupv2
class TestV2DriverOnPureV2(CgroupDriverConformance):
    """Everything, controllers included, on a pure cgroup v2 kernel."""

    cpu_share_bounds = (0.10, 0.30)  # 200m quota in an emulated VM

    @pytest.fixture
    def driver(self, pure_base: Path) -> V2Driver:
        driver = V2Driver(CGROUP_MOUNT, SUBTREE, base=pure_base)
        driver.prepare()
        return driver

    def assert_limits_applied(self, driver: CgroupDriver, user: str, limits: Limits) -> None:
        assert isinstance(driver, V2Driver)
        group = driver.users_dir / user

        def read(filename: str) -> str:
            return (group / filename).read_text().strip()

        quota = limits.cpu_millicores * limits.cpu_period_us // 1000
        assert read("cpu.max") == f"{quota} {limits.cpu_period_us}"
        assert read("memory.max") == str(limits.memory_bytes)
        high = "max" if limits.memory_high_bytes is None else str(limits.memory_high_bytes)
        assert read("memory.high") == high
        assert read("pids.max") == str(limits.pids)
        if (group / "memory.swap.max").exists():
            assert read("memory.swap.max") == "0"

    def test_describe_names_controllers(self, driver: V2Driver) -> None:
        assert driver.describe() == f"cgroup v2 at {driver.users_dir} (cpu memory pids)"


# --- prepare() --------------------------------------------------------------------------------

# Run as a separate process placed in the base beforehand: it plays the daemon, whose own cgroup
# (from /proc/self/cgroup) is the base.
PREPARE = """
import json, sys
from pathlib import Path
from supervisor.cgroups.v2 import V2Driver
driver = V2Driver(Path(sys.argv[1]), sys.argv[2], require_controllers=sys.argv[3] == "1")
driver.prepare()
print(json.dumps({"base": str(driver.base), "cgroup": Path("/proc/self/cgroup").read_text()}))
"""


def run_prepare_as_daemon(mount: Path, join: Path, require: bool) -> dict[str, str]:
    result = subprocess.run(
        [sys.executable, "-c", PREPARE, str(mount), SUBTREE, "1" if require else "0"],
        preexec_fn=join_preexec([str(join / "cgroup.procs")]),
        capture_output=True,
        cwd=REPO,
        timeout=DEADLINE * 3,
    )
    assert result.returncode == 0, result.stderr.decode()
    info: dict[str, str] = json.loads(result.stdout)
    return info


@pytest.mark.parametrize(
    "mount, require",
    [
        pytest.param(UNIFIED, False, marks=needs_unified, id="hybrid-core"),
        pytest.param(CGROUP_MOUNT, True, marks=pytest.mark.cgroupv2, id="pure-v2"),
    ],
)
def test_prepare_moves_the_daemon_and_others_into_a_leaf(mount: Path, require: bool) -> None:
    if require:
        enable_root_controllers(mount)
    base = mount / unique("wsup-test")
    base.mkdir()
    bystander: subprocess.Popen[bytes] | None = None
    try:
        bystander = subprocess.Popen(["sleep", "600"], preexec_fn=join_preexec([str(base / "cgroup.procs")]))
        info = run_prepare_as_daemon(mount, base, require)

        assert Path(info["base"]) == base
        assert parse_own_cgroup(info["cgroup"]) == f"/{base.relative_to(mount)}/daemon"
        assert read_pids(base / "cgroup.procs") == []
        assert read_pids(base / "daemon" / "cgroup.procs") == [bystander.pid]
        users = base / SUBTREE
        assert users.is_dir()
        if require:
            assert CONTROLLERS <= set((base / "cgroup.subtree_control").read_text().split())
            assert CONTROLLERS <= set((users / "cgroup.subtree_control").read_text().split())

        # A daemon restarted inside its leaf finds the same base; prepare() is idempotent.
        assert Path(run_prepare_as_daemon(mount, base / "daemon", require)["base"]) == base

        # A user group works under the prepared subtree.
        driver = V2Driver(mount, SUBTREE, base=base, require_controllers=require)
        driver.create("alice", GENEROUS)
        assert driver.users() == ["alice"]
        spawner = Spawner(driver)
        try:
            proc = spawner("alice", SLEEPER)
            assert read_line(proc) == "ready"
            assert driver.pids("alice") == [proc.pid]
            if require:
                assert (users / "alice" / "pids.max").read_text().strip() == str(GENEROUS.pids)
            driver.kill("alice")
            assert proc.wait(timeout=DEADLINE) == -signal.SIGKILL
        finally:
            spawner.close()
        driver.remove("alice")
        assert not (users / "alice").exists()
    finally:
        if bystander is not None:
            bystander.kill()
            bystander.wait()
        force_remove_tree(base)


@needs_unified
def test_prepare_refuses_missing_controllers_and_changes_nothing(hybrid_base: Path) -> None:
    bystander = subprocess.Popen(["sleep", "600"], preexec_fn=join_preexec([str(hybrid_base / "cgroup.procs")]))
    try:
        driver = V2Driver(UNIFIED, SUBTREE, base=hybrid_base)
        with pytest.raises(CgroupError) as info:
            driver.prepare()
        assert "cpu, memory, pids" in str(info.value)
        assert info.value.reason == "cgroup_controllers_missing"
        assert "subtree_control" in info.value.hint
        assert read_pids(hybrid_base / "cgroup.procs") == [bystander.pid]
        assert not (hybrid_base / "daemon").exists() and not (hybrid_base / SUBTREE).exists()
    finally:
        bystander.kill()
        bystander.wait()


@needs_unified
def test_usage_without_controllers_reads_zeros_and_counts_procs(hybrid_base: Path) -> None:
    driver = V2Driver(UNIFIED, SUBTREE, base=hybrid_base, require_controllers=False)
    driver.prepare()
    driver.create("bob", GENEROUS)
    spawner = Spawner(driver)
    try:
        proc = spawner("bob", SLEEPER)
        assert read_line(proc) == "ready"
        usage = driver.usage("bob")
        assert (usage.memory_bytes, usage.oom_kills, usage.pids) == (0, 0, 1)
    finally:
        spawner.close()
    strict = V2Driver(UNIFIED, SUBTREE, base=hybrid_base)
    with pytest.raises(CgroupError):
        strict.usage("bob")


# --- controllers on a pure v2 kernel ----------------------------------------------------------

# Allocates until its own group's memory.current is 4 MiB over memory.high, then holds it.
# (Far over memory.high the kernel throttles each allocation for up to 2 s.)
OVER_HIGH = """
import time
from pathlib import Path
group = Path("/sys/fs/cgroup") / Path("/proc/self/cgroup").read_text().strip()[3:].lstrip("/")
high = int((group / "memory.high").read_text())
chunks = []
while int((group / "memory.current").read_text()) < high + (4 << 20):
    chunks.append(b"x" * (256 << 10))
print("over", flush=True)
time.sleep(600)
"""


@pytest.mark.cgroupv2
def test_memory_high_below_max_throttles_without_killing(pure_base: Path) -> None:
    driver = V2Driver(CGROUP_MOUNT, SUBTREE, base=pure_base)
    driver.prepare()
    high = 48 * 2**20
    driver.create("carol", Limits(cpu_millicores=1000, memory_bytes=256 * 2**20, memory_high_bytes=high, pids=64))
    spawner = Spawner(driver)
    try:
        proc = spawner("carol", OVER_HIGH)
        assert read_line(proc, DEADLINE * 3) == "over"
        events = parse_flat_keyed((driver.users_dir / "carol" / "memory.events").read_text())
        assert events["high"] >= 1, events
        assert events["oom_kill"] == 0, events
        assert driver.usage("carol").memory_bytes > high  # anonymous memory stays: no swap
        assert proc.poll() is None
    finally:
        spawner.close()


@pytest.mark.cgroupv2
def test_own_cgroup_default_base_is_read_from_proc() -> None:
    own = parse_own_cgroup(Path("/proc/self/cgroup").read_text())
    driver = V2Driver(CGROUP_MOUNT, SUBTREE, require_controllers=False)
    assert driver.base == base_for(CGROUP_MOUNT, own)
    assert os.path.isdir(driver.base)
