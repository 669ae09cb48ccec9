"""The daemon's real code paths (driver + launcher) on a pure cgroup v2 kernel.

These run inside the throwaway VM (`integration/vm/run`); on the CI host they skip. The same
scenarios run on the host's v1 hierarchies in test_daemon.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from tests import test_daemon as scenarios
from tests.harness import Daemon, http_get, poll

pytestmark = pytest.mark.cgroupv2

# Each scenario starts its own daemon; in the emulated VM that costs seconds, so the tier runs
# the ones only a v2 kernel can prove (memory.events, cpu.max, pids.max, cgroup.freeze/kill and
# the leaf move below) and leaves the rest to the host run of test_daemon.py.
test_v2_oom_reported_from_memory_events = scenarios.test_oom_kill_is_reported_as_oom
test_v2_cpu_max_holds_a_busy_loop = scenarios.test_busy_loop_is_held_near_its_cpu_quota
test_v2_readopt_after_sigkill = scenarios.test_daemon_killed_with_sigkill_readopts_running_user
daemon = scenarios.daemon  # the fixture the scenario above uses


def test_v2_daemon_moves_into_its_own_leaf_and_delegates_controllers() -> None:
    """Started inside a fresh cgroup (as under systemd with Delegate=yes, or in a container), the
    daemon moves itself into a leaf, enables cpu/memory/pids below, then starts users."""
    root = Path("/sys/fs/cgroup")
    base = root / f"wsup-base-{uuid.uuid4().hex[:8]}"
    for controller in ("cpu", "memory", "pids"):
        (root / "cgroup.subtree_control").write_text(f"+{controller}")
    base.mkdir()
    d = Daemon()
    try:
        # Join the fresh cgroup before exec, exactly as a service manager would start us.
        d.start(wrapper=["sh", "-c", f'echo $$ > {base}/cgroup.procs && exec "$@"', "sh"])
        assert d.proc is not None
        assert str(d.proc.pid) in (base / "daemon" / "cgroup.procs").read_text().split()
        assert (base / "cgroup.procs").read_text().split() == []  # no internal processes
        assert set((base / "cgroup.subtree_control").read_text().split()) >= {"cpu", "memory", "pids"}
        users = base / d.name
        assert set((users / "cgroup.subtree_control").read_text().split()) >= {"cpu", "memory", "pids"}
        # Start-up boost: cpu.max is lifted while STARTING (the slow- stub waits 1 s) ...
        assert d.ctl("start", "slow-alice", "--no-wait").returncode == 0
        alice = users / "slow-alice"
        assert (alice / "cpu.max").read_text().split() == ["100000", "100000"]
        poll(lambda: d.user("slow-alice")["state"] == "RUNNING", 20, "RUNNING")
        # ... and the tier's limits apply once RUNNING.
        info = d.user("slow-alice")
        assert str(info["pid"]) in (alice / "cgroup.procs").read_text().split()
        assert f"uid={info['uid']} gid={info['uid']} groups=[] nnp=1" in http_get(d.ide_socket("slow-alice"))
        assert (alice / "memory.max").read_text().strip() == str(512 * 2**20)
        assert (alice / "cpu.max").read_text().split() == ["20000", "100000"]
        assert int((alice / "memory.high").read_text()) < 512 * 2**20
        # A tier change rewrites the limits in place.
        assert d.ctl("start", "slow-alice", "--tier", "pro").returncode == 0
        assert d.user("slow-alice")["pid"] == info["pid"]
        assert (alice / "memory.max").read_text().strip() == str(2 * 2**30)
        assert (alice / "cpu.max").read_text().split() == ["100000", "100000"]
        # Pause and resume through cgroup.freeze.
        assert d.ctl("pause", "slow-alice").returncode == 0
        assert "frozen 1" in (alice / "cgroup.events").read_text()
        assert d.ctl("resume", "slow-alice").returncode == 0
        assert "frozen 0" in (alice / "cgroup.events").read_text()
        # Stop: cgroup.kill of the whole tree, nothing left behind.
        assert d.ctl("stop", "slow-alice").returncode == 0
        assert not alice.exists()
        assert not d.ide_socket("slow-alice").exists()
    finally:
        d.stop()
        d.cleanup()
        for group in (base / d.name, base / "daemon", base):
            poll(lambda: _rmdir(group), 10, f"rmdir {group}")


def _rmdir(group: Path) -> bool:
    try:
        for pid in (group / "cgroup.procs").read_text().split():
            os.kill(int(pid), signal.SIGKILL)
        group.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def test_v2_fork_bomb_stops_at_pids_max_and_spares_other_users() -> None:
    d = Daemon(**{"tiers.free__pids": 32})
    d.start()
    bomb: subprocess.Popen[bytes] | None = None
    try:
        assert d.ctl("start", "bomber").returncode == 0
        assert d.ctl("start", "bystander").returncode == 0
        bomber = d.cgroup_dirs("bomber")[0]
        # A fork bomb inside the bomber's cgroup (joined before exec, like the launcher does).
        bomb = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {bomber}/cgroup.procs && exec sh -c "f() {{ f & f & wait; }}; f" 2>/dev/null'],
        )
        poll(lambda: int((bomber / "pids.current").read_text()) >= 32, 30, "the bomb to hit pids.max")
        # "max N" in pids.events counts forks the kernel refused at the limit.
        poll(lambda: int((bomber / "pids.events").read_text().split()[1]) > 0, 30, "a fork refused at pids.max")
        assert int((bomber / "pids.current").read_text()) <= 32
        # The other user still starts processes and answers.
        assert d.ctl("restart", "bystander").returncode == 0
        assert d.user("bystander")["state"] == "RUNNING"
        assert d.ctl("stop", "bomber").returncode == 0
        bomb.wait(30)
        assert d.cgroup_dirs("bomber") == []
    finally:
        if bomb is not None and bomb.poll() is None:
            bomb.kill()
            bomb.wait(30)
        d.cleanup()
