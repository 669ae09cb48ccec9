"""cgroup drivers: a :class:`CgroupDriver` protocol, ``v2`` (unified) and ``v1`` (cgroupspy)."""

from supervisor.cgroups.base import CgroupDriver, Limits, Usage

__all__ = ["CgroupDriver", "Limits", "Usage"]
