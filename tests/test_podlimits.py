"""The pod's own limits (supervisor/podlimits.py): the pure parsing, file trees laid out as v1 and
v2 mounts, and a real process moved into real cgroups this test makes with limits."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from supervisor import config as config_module
from supervisor.podlimits import (
    UNLIMITED, PodResources, ancestors, detect, membership, parse_memory_limit, parse_v1_cpu, parse_v2_cpu, pod_resources,
)
from tests.conftest import CGROUP_MOUNT, is_root, pure_cgroup_v2, v1_controllers_mounted

REPO = Path(__file__).resolve().parent.parent
HOST_CPU = len(os.sched_getaffinity(0)) * 1000


# ---- pure ------------------------------------------------------------------------------------------


def test_memory_limits_parse_and_no_limit_is_unlimited() -> None:
    assert parse_memory_limit("17179869184\n") == 16 * 2**30
    assert parse_memory_limit("max\n") == UNLIMITED
    assert parse_memory_limit("9223372036854771712\n") == UNLIMITED  # v1's "no limit"
    assert parse_memory_limit("") == UNLIMITED
    assert parse_memory_limit("-1") == UNLIMITED


def test_cpu_quotas_parse_as_millicores() -> None:
    assert parse_v2_cpu("800000 100000\n") == 8000
    assert parse_v2_cpu("50000 100000") == 500
    assert parse_v2_cpu("max 100000\n") == UNLIMITED
    assert parse_v2_cpu("garbage") == UNLIMITED
    assert parse_v1_cpu(150000, 100000) == 1500
    assert parse_v1_cpu(-1, 100000) == UNLIMITED
    assert parse_v1_cpu(1, 1_000_000) == 1  # never 0: a tiny quota is still some CPU


def test_membership_and_ancestors() -> None:
    text = "12:memory:/docker/c1\n4:cpu,cpuacct:/docker/c1\n1:name=systemd:/x\n0::/kubepods/pod1\n"
    assert membership(text) == [(["memory"], "/docker/c1"), (["cpu", "cpuacct"], "/docker/c1"),
                                (["name=systemd"], "/x"), ([], "/kubepods/pod1")]
    root = Path("/sys/fs/cgroup")
    assert ancestors(root, "/a/b") == [root / "a" / "b", root / "a", root]
    assert ancestors(root, "/../..") == [root]  # a cgroup namespace's outside is never left for


# ---- file trees laid out like the mounts ---------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _proc(tmp_path: Path, cgroups: str, mem_total_kib: int = 64 * 2**20) -> Path:
    proc = tmp_path / "proc"
    _write(proc / "meminfo", f"MemTotal:       {mem_total_kib} kB\nMemFree:        1000 kB\n")
    _write(proc / "self" / "cgroup", cgroups)
    return proc


def test_the_tightest_v2_limits_up_the_tree(tmp_path: Path) -> None:
    mount = tmp_path / "cgroup"
    _write(mount / "kubepods" / "pod1" / "memory.max", f"{16 * 2**30}\n")
    _write(mount / "kubepods" / "pod1" / "cpu.max", "800000 100000\n")
    _write(mount / "kubepods" / "pod1" / "ctr" / "memory.max", "max\n")
    _write(mount / "kubepods" / "pod1" / "ctr" / "cpu.max", "max 100000\n")
    found = detect(mount, _proc(tmp_path, "0::/kubepods/pod1/ctr\n"))
    assert found == PodResources(cpu_millicores=min(8000, HOST_CPU), memory_bytes=16 * 2**30)


def test_v1_limits(tmp_path: Path) -> None:
    mount = tmp_path / "cgroup"
    _write(mount / "memory" / "docker" / "c1" / "memory.limit_in_bytes", f"{2 * 2**30}\n")
    _write(mount / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # unlimited
    _write(mount / "cpu" / "docker" / "c1" / "cpu.cfs_quota_us", "50000\n")
    _write(mount / "cpu" / "docker" / "c1" / "cpu.cfs_period_us", "100000\n")
    cgroups = "12:memory:/docker/c1\n4:cpu,cpuacct:/docker/c1\n1:name=systemd:/docker/c1\n0::/\n"
    assert detect(mount, _proc(tmp_path, cgroups)) == PodResources(cpu_millicores=min(500, HOST_CPU), memory_bytes=2 * 2**30)


def test_without_limits_the_host_is_the_pod(tmp_path: Path) -> None:
    found = detect(tmp_path / "none", _proc(tmp_path, "0::/\n", mem_total_kib=1024))
    assert found == PodResources(cpu_millicores=HOST_CPU, memory_bytes=1024 * 1024)


def test_the_configured_pod_memory_wins_over_the_detected() -> None:
    detected = detect()
    assert detected.cpu_millicores >= 1 and detected.memory_bytes >= 2**20
    assert pod_resources(config_module.from_dict({})) == detected
    configured = pod_resources(config_module.from_dict({"pod": {"memory": "12Gi"}}))
    assert configured == PodResources(detected.cpu_millicores, 12 * 2**30)


# ---- real cgroups with limits -------------------------------------------------------------------


def _own_v1_path(controller: str) -> str:
    for controllers, path in membership(Path("/proc/self/cgroup").read_text()):
        if controller in controllers:
            return path
    raise AssertionError(f"this process is in no {controller} cgroup")


@contextlib.contextmanager
def _limited_groups(memory: int, cpu_quota_us: int) -> Iterator[list[Path]]:
    """An outer group with the limits and an unlimited inner one below it, under this process's own
    groups (v2: one hierarchy; v1: memory and cpu); yields the inner groups to join, then removes
    them."""
    name = f"wsup-podlimits-{os.getpid()}"
    made: list[Path] = []
    try:
        if pure_cgroup_v2():
            outer = CGROUP_MOUNT / name  # at the root: our own group holds processes, so no children there
            outer.mkdir()
            made.append(outer)
            (outer / "memory.max").write_text(str(memory))
            (outer / "cpu.max").write_text(f"{cpu_quota_us} 100000")
            (outer / "cgroup.subtree_control").write_text("+memory +cpu")
            (outer / "inner").mkdir()
            made.append(outer / "inner")
            yield [outer / "inner"]
        else:
            inners = []
            for controller, settings in (("memory", {"memory.limit_in_bytes": str(memory)}),
                                         ("cpu", {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": str(cpu_quota_us)})):
                outer = CGROUP_MOUNT / controller / _own_v1_path(controller).strip("/") / name
                outer.mkdir()
                made.append(outer)
                for key, value in settings.items():
                    (outer / key).write_text(value)
                (outer / "inner").mkdir()
                made.append(outer / "inner")
                inners.append(outer / "inner")
            yield inners
    finally:
        for group in reversed(made):
            with contextlib.suppress(OSError):
                group.rmdir()


@pytest.mark.skipif(not (is_root() and (pure_cgroup_v2() or v1_controllers_mounted())),
                    reason="needs root and cgroup controllers (v1 cpu/memory, or pure v2) to make limited groups")
def test_a_process_in_a_limited_cgroup_finds_its_ancestors_limits() -> None:
    """A child process moved into an unlimited group below one limited to 300 MiB and half a CPU
    finds those limits - what a daemon in a 16Gi / 8-core pod finds - and so does its idle ladder."""
    here = detect()
    memory, quota = 300 * 2**20, 50_000
    with _limited_groups(memory, quota) as groups:
        def join() -> None:
            for group in groups:
                (group / "cgroup.procs").write_text(str(os.getpid()))

        script = ("from supervisor import config; from supervisor.podlimits import detect, pod_resources; "
                  "d = detect(); p = pod_resources(config.from_dict({})); "
                  "print(d.cpu_millicores, d.memory_bytes, p.memory_bytes)")
        out = subprocess.run([sys.executable, "-c", script], preexec_fn=join, capture_output=True, text=True, check=True,
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60).stdout
    cpu, found_memory, pressure_memory = map(int, out.split())
    assert cpu == min(500, here.cpu_millicores)
    assert found_memory == pressure_memory == min(memory, here.memory_bytes)
