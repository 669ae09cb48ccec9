"""The isolation suite (tests/test_isolation.py) again in the pure cgroup v2 VM tier
(integration/vm/run): there every start goes through a launcher started in the user's group."""

from __future__ import annotations

import pytest

from tests.test_isolation import *  # noqa: F403 - the same tests, collected here with the marker
from tests.test_isolation import pytestmark as _isolation_marks

pytestmark = [pytest.mark.cgroupv2, _isolation_marks]
