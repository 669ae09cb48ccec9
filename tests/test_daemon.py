"""The real daemon, real kernel, real processes: driven through the real `workspacectl`.

Needs root and a cgroup hierarchy with cpu/memory/pids/freezer (v1 on the CI host, v2 in the VM).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import is_root, pure_cgroup_v2, v1_controllers_mounted
from tests.harness import Daemon, cgroup_of, descendants, http_get, poll, started

pytestmark = pytest.mark.skipif(
    not (is_root() and (v1_controllers_mounted() or pure_cgroup_v2())),
    reason="needs root and cgroup controllers (v1 cpu/memory/pids/freezer, or pure v2)",
)


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    yield from started()


def socket_of(d: Daemon, user: str) -> Path:
    return d.ide_socket(user)


def test_start_runs_confined_process_as_the_users_uid(daemon: Daemon) -> None:
    result = daemon.ctl("start", "alice")
    assert result.returncode == 0, result.stderr + daemon.log_text()
    info = daemon.user("alice")
    for key in ("user", "state", "pid", "tier", "shard", "workspace", "uid", "memory_bytes",
                "memory_limit_bytes", "cpu_limit_millicores", "restarts", "uptime_s"):
        assert key in info
    assert info["state"] == "RUNNING"
    assert info["tier"] == "free" and info["cpu_limit_millicores"] == 200 and info["memory_limit_bytes"] == 512 * 2**20
    uid = info["uid"]
    assert uid >= 200_000
    answer = http_get(socket_of(daemon, "alice"))
    assert f"uid={uid} gid={uid} groups=[] nnp=1" in answer
    assert f"cwd={info['workspace']}" in answer
    workspace = Path(info["workspace"])
    assert workspace == daemon.base / "workspace" / f"shard-{info['shard']}" / "alice"
    st = workspace.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (uid, uid, 0o700)
    environ = Path(f"/proc/{info['pid']}/environ").read_bytes().split(b"\0")
    assert not any(e.startswith(b"DAEMON_TEST_SECRET") for e in environ), "daemon environment leaked"
    assert b"STUB_MARK=alice" in environ
    socket_dir = socket_of(daemon, "alice").parent  # the daemon's: the user cannot change what is in it
    assert (socket_dir.stat().st_uid, socket_dir.stat().st_mode & 0o777) == (0, 0o700)
    assert stat.S_ISSOCK(os.stat(f"/proc/{info['pid']}/fd/3").st_mode)
    assert b"LISTEN_FDS=1" in environ and b"LISTEN_FDNAMES=ide" in environ
    assert daemon.cgroup_dirs("alice"), "no cgroup for alice"
    assert daemon.name in cgroup_of(info["pid"])


def test_every_descendant_of_a_forking_ide_is_in_the_users_cgroup(daemon: Daemon) -> None:
    assert daemon.ctl("start", "forker-1").returncode == 0
    pid = daemon.user("forker-1")["pid"]
    children = poll(lambda: descendants(pid) if len(descendants(pid)) >= 2 else None, 5, "two grandchildren")
    for child in [pid, *children]:
        membership = cgroup_of(child)
        for line in membership.splitlines():
            controllers = line.split(":")[1]
            if any(c in controllers.split(",") for c in ("cpu", "memory", "pids", "freezer")) or line.startswith("0::"):
                if line.startswith("0::") and not pure_cgroup_v2():
                    continue
                assert f"/{daemon.name}/forker-1" in line, f"pid {child} escaped: {membership}"


def test_stop_leaves_no_process_cgroup_or_socket(daemon: Daemon) -> None:
    assert daemon.ctl("start", "forker-2").returncode == 0
    pid = daemon.user("forker-2")["pid"]
    tree = [pid, *poll(lambda: descendants(pid) if len(descendants(pid)) >= 2 else None, 5, "grandchildren")]
    result = daemon.ctl("stop", "forker-2")
    assert result.returncode == 0, result.stderr
    assert daemon.user("forker-2")["state"] == "STOPPED"
    for p in tree:
        assert not Path(f"/proc/{p}").exists() or Path(f"/proc/{p}/stat").read_text().split()[2] == "Z"
    assert daemon.cgroup_dirs("forker-2") == []
    assert not socket_of(daemon, "forker-2").exists()


def test_pause_freezes_and_resume_thaws(daemon: Daemon) -> None:
    assert daemon.ctl("start", "bob").returncode == 0
    assert daemon.ctl("pause", "bob").returncode == 0
    assert daemon.user("bob")["state"] == "PAUSED"
    with pytest.raises(OSError):
        http_get(socket_of(daemon, "bob"), timeout=0.5)
    assert daemon.ctl("resume", "bob").returncode == 0
    assert daemon.user("bob")["state"] == "RUNNING"
    assert "uid=" in http_get(socket_of(daemon, "bob"))


def test_crash_loop_backs_off_then_goes_fatal(daemon: Daemon) -> None:
    result = daemon.ctl("start", "crash-1")
    assert result.returncode == 1
    assert "did not reach RUNNING" in result.stderr
    info = poll(lambda: (u := daemon.user("crash-1"))["state"] == "FATAL" and u, 10, "FATAL")
    assert "fast failures" in info["reason"]
    assert "exited with status 1" in info["last_exit"]
    assert daemon.cgroup_dirs("crash-1") == []
    tail = daemon.ctl("tail", "crash-1")
    assert "crashing on purpose" in tail.stdout


def test_kill_9_of_a_healthy_ide_restarts_it_at_once(daemon: Daemon) -> None:
    assert daemon.ctl("start", "carol").returncode == 0
    old = daemon.user("carol")
    poll(lambda: daemon.user("carol")["uptime_s"] >= 2.0, 10, "healthy_after")
    os.kill(old["pid"], signal.SIGKILL)
    info = poll(lambda: (u := daemon.user("carol"))["state"] == "RUNNING" and u["pid"] != old["pid"] and u, 10, "restart")
    assert info["restarts"] == 1
    assert "uid=" in http_get(socket_of(daemon, "carol"))


def test_oom_kill_is_reported_as_oom() -> None:
    d = Daemon(**{"tiers.free__memory": "64Mi"})
    d.start()
    try:
        assert d.ctl("start", "hog-1").returncode == 0
        try:
            answer = http_get(socket_of(d, "hog-1"), "/alloc?mb=256", timeout=10)
        except OSError:
            answer = ""
        assert "200 OK" not in answer, "allocated 256Mi under a 64Mi limit"
        info = poll(lambda: (u := d.user("hog-1"))["last_exit"] and u, 10, "exit noticed")
        assert "OOM" in info["last_exit"], info
        assert "OOM" in d.log_text()
    finally:
        d.cleanup()


def test_busy_loop_is_held_near_its_cpu_quota() -> None:
    d = Daemon(**{"tiers.free__cpu": "200m"})
    d.start()
    try:
        assert d.ctl("start", "spin-1").returncode == 0
        pid = d.user("spin-1")["pid"]
        poll(lambda: descendants(pid), 5, "spinner")
        spinner = descendants(pid)[0]

        def cpu_seconds() -> float:
            fields = Path(f"/proc/{spinner}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        start_cpu, start = cpu_seconds(), time.monotonic()
        time.sleep(2.0)  # measuring a rate over a window, not synchronising
        share = (cpu_seconds() - start_cpu) / (time.monotonic() - start)
        assert 0.10 <= share <= 0.30, f"busy loop got {share:.0%} of a core under a 200m quota"
    finally:
        d.cleanup()


def test_tier_change_rewrites_limits_in_place(daemon: Daemon) -> None:
    assert daemon.ctl("start", "dave").returncode == 0
    before = daemon.user("dave")
    result = daemon.ctl("start", "dave", "--tier", "pro", "--json")
    assert result.returncode == 0, result.stderr
    after = daemon.user("dave")
    assert after["pid"] == before["pid"]
    assert (after["tier"], after["cpu_limit_millicores"], after["memory_limit_bytes"]) == ("pro", 1000, 2 * 2**30)
    limits = [p / "memory.limit_in_bytes" for p in daemon.cgroup_dirs("dave")] + [p / "memory.max" for p in daemon.cgroup_dirs("dave")]
    values = [int(p.read_text()) for p in limits if p.exists()]
    assert values == [2 * 2**30]


def test_daemon_killed_with_sigkill_readopts_running_user(daemon: Daemon) -> None:
    assert daemon.ctl("start", "erin").returncode == 0
    before = daemon.user("erin")
    daemon.kill(signal.SIGKILL)
    assert daemon.ctl("status").returncode == 4  # unreachable while it is down
    assert "uid=" in http_get(socket_of(daemon, "erin")), "user stopped with the daemon"
    daemon.start()
    after = daemon.user("erin")
    assert (after["state"], after["pid"], after["uid"], after["tier"]) == ("RUNNING", before["pid"], before["uid"], "free")
    assert after["restarts"] == 0
    assert "re-adopted" in daemon.log_text()
    # The adopted process is still supervised: kill it and it comes back.
    os.kill(after["pid"], signal.SIGKILL)
    poll(lambda: (u := daemon.user("erin"))["state"] == "RUNNING" and u["pid"] != after["pid"], 10, "restart after adoption")


def test_capacity_is_enforced() -> None:
    d = Daemon(**{"pod__capacity": 1})
    d.start()
    try:
        assert d.ctl("start", "one").returncode == 0
        result = d.ctl("start", "two")
        assert result.returncode == 1
        assert "capacity" in result.stderr and "hint:" in result.stderr
        pod = d.ctl_json("pod")["pod"]
        assert (pod["capacity"], pod["occupied"], pod["free_slots"]) == (1, 1, 0)
        assert pod["cgroup_version"] in (1, 2)
    finally:
        d.cleanup()


def test_cli_exit_codes(daemon: Daemon) -> None:
    assert daemon.ctl("status", "nobody").returncode == 3
    assert daemon.ctl("stop", "Not_Valid").returncode == 2
    assert daemon.ctl("frobnicate").returncode == 2
    assert daemon.ctl("start", "frank", "--tier", "platinum").returncode == 1
    unreachable = subprocess.run([sys.executable, "-m", "supervisor.cli", "--socket", "/nonexistent/x.sock", "status"],
                                 capture_output=True, text=True)
    assert unreachable.returncode == 4 and "hint:" in unreachable.stderr


def test_sigterm_stops_every_user_gracefully(daemon: Daemon) -> None:
    for user in ("g1", "g2"):
        assert daemon.ctl("start", user).returncode == 0
    pids = [daemon.user(u)["pid"] for u in ("g1", "g2")]
    daemon.kill(signal.SIGTERM)
    assert daemon.proc is not None and daemon.proc.returncode == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    assert daemon.cgroup_dirs("g1") == [] and daemon.cgroup_dirs("g2") == []
    assert not (daemon.base / "state" / "users" / "g1.json").exists()


def test_bad_config_exits_before_touching_anything(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[pod]\ncapacity = "lots"\n')
    result = subprocess.run([sys.executable, "-m", "supervisor.daemon", "run", "--config", str(config)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "pod.capacity" in result.stderr and "'lots'" in result.stderr


def test_as_pid_1_reaps_orphans_and_stops_users_on_sigterm() -> None:
    import psutil

    d = Daemon()
    d.start(wrapper=["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"])
    try:
        assert d.proc is not None
        daemon_pid = poll(lambda: psutil.Process(d.proc.pid).children(), 5, "daemon under unshare")[0].pid
        assert d.ctl_json("pod")["pod"]["pid"] == 1
        assert d.ctl("start", "forker-9").returncode == 0
        group = [p for p in d.cgroup_dirs("forker-9") if "pids" in p.parts][0]
        poll(lambda: len((group / "cgroup.procs").read_text().split()) == 3, 5, "main and two grandchildren")
        # Killing the main process orphans its two grandchildren onto PID 1 (the daemon); the
        # daemon kills the leftover tree and must reap them, or they stay zombies forever.
        assert d.ctl("signal", "KILL", "forker-9").returncode == 0
        poll(lambda: d.ctl_json("pod")["pod"]["orphans_reaped"] >= 2, 10, "orphans reaped")
        poll(lambda: d.user("forker-9")["state"] == "RUNNING", 10, "restart")
        zombies = [p for p in psutil.Process(daemon_pid).children() if p.status() == psutil.STATUS_ZOMBIE]
        assert zombies == []
        user_pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
        os.kill(daemon_pid, signal.SIGTERM)
        assert d.proc.wait(30) == 0
        for pid in user_pids:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert d.cgroup_dirs("forker-9") == []
        assert "stopped" in d.log_text()
    finally:
        d.cleanup()


def test_tail_follow_streams_new_lines(daemon: Daemon) -> None:
    assert daemon.ctl("start", "tailed").returncode == 0
    follower = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "--socket", str(daemon.socket), "tail", "-f", "tailed"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert follower.stdout is not None
        assert "serving tailed" in follower.stdout.readline()
        log = daemon.base / "log" / "tailed.log"
        with open(log, "a") as f:
            f.write("a line written later\n")
        assert follower.stdout.readline() == "a line written later\n"
    finally:
        follower.terminate()
        follower.wait(10)
        if follower.stdout is not None:
            follower.stdout.close()


def test_cpu_is_boosted_while_starting_and_tier_quota_applies_once_running() -> None:
    d = Daemon(**{"tiers.free__start_cpu": "1500m"})
    d.start()
    try:
        assert d.ctl("start", "slow-1", "--no-wait").returncode == 0
        quota_files = [p / "cpu.cfs_quota_us" for p in d.cgroup_dirs("slow-1") if (p / "cpu.cfs_quota_us").exists()]
        quota_files += [p / "cpu.max" for p in d.cgroup_dirs("slow-1") if (p / "cpu.max").exists()]
        assert len(quota_files) == 1
        assert quota_files[0].read_text().split()[0] == "150000"  # the stub waits 1 s before listening
        poll(lambda: d.user("slow-1")["state"] == "RUNNING", 10, "RUNNING")
        assert quota_files[0].read_text().split()[0] == "20000"
    finally:
        d.cleanup()


def test_tail_json(daemon: Daemon) -> None:
    assert daemon.ctl("start", "tj").returncode == 0
    result = daemon.ctl("tail", "tj", "--json")
    assert result.returncode == 0
    data = json.loads(result.stdout)
    assert data["version"] == 1 and data["user"] == "tj" and "serving tj" in data["data"]
