"""The pod's own limits: the CPU and memory this daemon and its users may use in all.

In a pod (or any container, or a systemd slice with limits) that is the tightest CPU quota and
memory limit on the daemon's own cgroup and its ancestors - cgroup v2 ``cpu.max`` /
``memory.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` / ``memory.limit_in_bytes`` -
and otherwise the host's CPUs (this process's affinity) and RAM (``MemTotal``). ``[pod] memory``,
when set, replaces the memory found. Everything the daemon derives from "the machine" comes from
here: the idle ladder's memory pressure and the headroom the publisher reports.

The parsing and the choice are pure (:func:`parse_memory_limit`, :func:`parse_v2_cpu`,
:func:`parse_v1_cpu`, :func:`membership`, :func:`ancestors`); :func:`detect` reads the files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from supervisor.config import Config

UNLIMITED = 2**63 - 1
#: v1 reports "no limit" as the largest page-aligned long; anything this large is no limit.
_V1_NO_LIMIT = 2**62


@dataclass(frozen=True)
class PodResources:
    """CPU and memory this pod may use in all: the tightest of the host and the daemon's cgroups."""

    cpu_millicores: int
    memory_bytes: int


# ---- pure: parse and pick ------------------------------------------------------------------------


def parse_memory_limit(text: str) -> int:
    """A ``memory.max`` / ``memory.limit_in_bytes`` value in bytes; ``max`` or v1's huge number
    (no limit) or anything unreadable is :data:`UNLIMITED`."""
    text = text.strip()
    if not text.isdigit() or int(text) >= _V1_NO_LIMIT:
        return UNLIMITED
    return int(text)


def parse_v2_cpu(text: str) -> int:
    """``cpu.max`` (``QUOTA PERIOD`` or ``max PERIOD``) as millicores; :data:`UNLIMITED` for none."""
    try:
        quota, period = text.split()
        return UNLIMITED if quota == "max" else parse_v1_cpu(int(quota), int(period))
    except ValueError:
        return UNLIMITED


def parse_v1_cpu(quota_us: int, period_us: int) -> int:
    """``cfs_quota_us`` / ``cfs_period_us`` as millicores; a quota of -1 (or nonsense) is no limit."""
    return UNLIMITED if quota_us <= 0 or period_us <= 0 else max(1, quota_us * 1000 // period_us)


def membership(text: str) -> list[tuple[list[str], str]]:
    """``/proc/<pid>/cgroup`` as (controllers, path) pairs; v2's line has no controllers."""
    found = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            found.append(([c for c in parts[1].split(",") if c], parts[2]))
    return found


def ancestors(root: Path, path: str) -> list[Path]:
    """``root/path`` and each parent up to ``root`` (cgroup namespaces make ``path`` relative)."""
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


# ---- effects: read the files ---------------------------------------------------------------------


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _meminfo_total(meminfo: Path) -> int:
    for line in _read(meminfo).splitlines():
        if line.startswith("MemTotal:"):
            try:
                return int(line.split()[1]) * 1024
            except (ValueError, IndexError):
                break
    return UNLIMITED


def _v1_cpu(group: Path) -> int:
    try:
        return parse_v1_cpu(int(_read(group / "cpu.cfs_quota_us")), int(_read(group / "cpu.cfs_period_us")))
    except ValueError:
        return UNLIMITED


def detect(cgroup_mount: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc"), pid: str = "self") -> PodResources:
    """The host's CPUs (affinity) and memory (MemTotal), lowered by every CPU quota and memory
    limit on the cgroups of ``pid`` (default: this process) and their ancestors."""
    cpu = len(os.sched_getaffinity(0)) * 1000
    memory = _meminfo_total(proc / "meminfo")
    for controllers, path in membership(_read(proc / pid / "cgroup")):
        if not controllers:  # v2 (or the hybrid unified hierarchy, where these files are absent)
            for group in ancestors(cgroup_mount, path):
                cpu = min(cpu, parse_v2_cpu(_read(group / "cpu.max")))
                memory = min(memory, parse_memory_limit(_read(group / "memory.max")))
        if "memory" in controllers:
            for group in ancestors(cgroup_mount / "memory", path):
                memory = min(memory, parse_memory_limit(_read(group / "memory.limit_in_bytes")))
        if "cpu" in controllers:
            for group in ancestors(cgroup_mount / "cpu", path):
                cpu = min(cpu, _v1_cpu(group))
    return PodResources(cpu_millicores=max(0, cpu), memory_bytes=max(0, memory))


def pod_resources(config: Config) -> PodResources:
    """:func:`detect` under ``[cgroups] mount``, its memory replaced by ``[pod] memory`` when set."""
    found = detect(config.cgroups.mount)
    return PodResources(found.cpu_millicores, config.pod.memory or found.memory_bytes)
