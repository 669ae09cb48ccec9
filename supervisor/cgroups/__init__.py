"""cgroup drivers: a :class:`CgroupDriver` protocol, ``v2`` (unified) and ``v1`` (cgroupspy).

:func:`detect` picks the driver for this host from the ``[cgroups]`` config.
"""

from supervisor.cgroups.base import SPARE_PREFIX, CgroupDriver, Limits, SpareGroups, Usage
from supervisor.cgroups.detect import detect
from supervisor.cgroups.v1 import V1Driver
from supervisor.cgroups.v2 import V2Driver

__all__ = ["SPARE_PREFIX", "CgroupDriver", "Limits", "SpareGroups", "Usage", "V1Driver", "V2Driver", "detect"]
