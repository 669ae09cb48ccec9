"""The launcher pool (cgroup v1): spare groups renamed to users' groups, on the real kernel.

Driver level: a process that joined a spare group is in the user's group in every hierarchy after
:meth:`V1Driver.assign_spare`, without migrating. Daemon level, through the real `workspacectl`:
a start taken by a ready launcher keeps every guarantee of the ordinary start (group, limits,
uid/gid, no supplementary groups, no_new_privs, environment, cwd, log), and the spare groups and
launchers never outlive the daemon.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from cgroup_conformance import GENEROUS, force_remove_tree, unique
from conftest import CGROUP_MOUNT, needs_v1

from supervisor.cgroups.base import SPARE_PREFIX
from supervisor.cgroups.v1 import V1Driver
from supervisor.errors import CgroupError
from tests.harness import Daemon, cgroup_of, http_get, poll, started

pytestmark = needs_v1
CONTROLLERS = ("cpu", "memory", "pids", "freezer")
JOINER = (
    "import sys, time\n"
    "for p in sys.argv[1:]:\n"
    "    open(p, 'w').write('0')\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.fixture
def driver() -> Iterator[V1Driver]:
    d = V1Driver(CGROUP_MOUNT, unique("wsup-test"))
    d.prepare()
    try:
        yield d
    finally:
        for hierarchy in {p for p in CGROUP_MOUNT.iterdir() if (p / d.name).is_dir()}:
            force_remove_tree(hierarchy / d.name)


def join(procs_files: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", JOINER, *procs_files], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def end(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def groups_of(pid: int, name: str) -> set[str]:
    """The group of ``pid`` under ``name`` in each of the driver's v1 controllers."""
    found = set()
    for line in cgroup_of(pid).splitlines():
        _, controllers, path = line.split(":", 2)
        if any(c in controllers.split(",") for c in CONTROLLERS):
            found.add(path.rpartition(f"/{name}/")[2] if f"/{name}/" in path else path)
    return found


# --- driver ----------------------------------------------------------------------------------


def test_a_renamed_spare_group_carries_its_process_into_the_users_group(driver: V1Driver) -> None:
    proc = join(driver.create_spare("s1"))
    try:
        assert driver.spares() == ["s1"]
        assert driver.users() == [], "spare groups are not users"
        assert groups_of(proc.pid, driver.name) == {f"{SPARE_PREFIX}s1"}
        driver.assign_spare("s1", "alice")
        assert (driver.spares(), driver.users()) == ([], ["alice"])
        assert groups_of(proc.pid, driver.name) == {"alice"}, "not in alice's group in every hierarchy"
        assert driver.pids("alice") == [proc.pid]
        driver.create("alice", GENEROUS)  # the limits of the renamed group, in place
        assert driver.usage("alice").pids == 1
        driver.kill("alice")
        driver.remove("alice")
        assert not driver.exists("alice")
    finally:
        end(proc)


def test_an_empty_leftover_user_group_is_replaced_a_populated_one_refuses(driver: V1Driver) -> None:
    driver.create("bob", GENEROUS)  # empty: what KillTree leaves before a restart
    spare = join(driver.create_spare("s2"))
    driver.create("carol", GENEROUS)
    occupant = join(driver.procs_files("carol"))
    try:
        driver.assign_spare("s2", "bob")
        assert groups_of(spare.pid, driver.name) == {"bob"}
        other = join(driver.create_spare("s3"))
        try:
            with pytest.raises(CgroupError, match="carol"):
                driver.assign_spare("s3", "carol")
            assert groups_of(other.pid, driver.name) == {f"{SPARE_PREFIX}s3"}, "a failed assignment moved the spare"
            assert groups_of(occupant.pid, driver.name) == {"carol"}
            driver.remove_spare("s3")
            assert other.wait(5) == -signal.SIGKILL
            assert driver.spares() == []
        finally:
            end(other)
    finally:
        end(spare)
        end(occupant)


def test_spare_ids_cannot_name_other_groups(driver: V1Driver) -> None:
    for bad in ("", "../x", "a/b", "-x"):
        with pytest.raises(CgroupError):
            driver.create_spare(bad)


# --- the launcher program --------------------------------------------------------------------


@contextlib.contextmanager
def launcher() -> Iterator[tuple[socket.socket, subprocess.Popen[bytes]]]:
    """A launcher program started as the pool starts one (no cgroup to join), once it said ready:
    the daemon's end of its socket and the process."""
    from supervisor.launchpool import CHILD

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(CHILD), str(theirs.fileno()), "0"], pass_fds=(theirs.fileno(),),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    theirs.close()
    try:
        assert ours.recv(16) == b"R"
        yield ours, proc
    finally:
        ours.close()
        proc.kill()
        proc.wait()


def test_the_launcher_execs_as_the_user_with_only_stdio_open(tmp_path: Path) -> None:
    from supervisor.launch import build_spec
    from supervisor.launchpool import LauncherPool

    with launcher() as (ours, proc):
        (tmp_path / "ws").mkdir()
        os.chown(tmp_path / "ws", 65534, 65534)
        spec = build_spec(
            user="nobody", uid=65534, gid=65534,
            command=["sh", "-c", "ls /proc/self/fd; echo listen=$LISTEN_FDS/$LISTEN_FDNAMES/$LISTEN_PID/$$; id; pwd; umask; grep NoNewPrivs /proc/self/status"],
            extra_env={}, shell="/bin/sh", workspace=tmp_path / "ws", home=tmp_path, procs_files=[], log_path=tmp_path / "log",
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(tmp_path / "ide.sock"))
            listener.listen()
            LauncherPool._send(type("L", (), {"sock": ours, "pid": proc.pid})(), spec, listener.fileno())  # type: ignore[arg-type]
        assert (answer := ours.recv(4096)) == b"", f"no end-of-file: the exec did not happen: {answer!r}"
        assert proc.wait(5) == 0
        lines = (tmp_path / "log").read_text().split()
        # 3: the listening socket (LISTEN_FDS); 4: the directory ls reads.
        assert lines[:5] == ["0", "1", "2", "3", "4"] and lines[5] != "5", f"a descriptor leaked: {lines}"
        assert lines[5] == f"listen=1/ide/{proc.pid}/{proc.pid}", lines
        text = (tmp_path / "log").read_text()
        assert "uid=65534" in text and "gid=65534" in text and "groups=65534" in text.replace("groups=65534(nogroup)", "groups=65534")
        assert str(tmp_path / "ws") in text and "0077" in text and "NoNewPrivs:\t1" in text


def test_the_launcher_reports_an_exec_failure(tmp_path: Path) -> None:
    from supervisor.launch import build_spec
    from supervisor.launchpool import LauncherPool

    with launcher() as (ours, proc):
        spec = build_spec(
            user="nobody", uid=65534, gid=65534, command=["/nonexistent/ide"], extra_env={}, shell="/bin/sh",
            workspace=Path("/"), home=tmp_path, procs_files=[], log_path=tmp_path / "log",
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            LauncherPool._send(type("L", (), {"sock": ours, "pid": proc.pid})(), spec, listener.fileno())  # type: ignore[arg-type]
        answer = ours.recv(4096)
        assert answer.startswith(b"E") and b"/nonexistent/ide" in answer and b"No such file" in answer
        assert proc.wait(5) == 127


# --- daemon ----------------------------------------------------------------------------------


def pool_info(d: Daemon) -> dict[str, Any]:
    info: dict[str, Any] = d.ctl_json("pod")["pod"]["launcher_pool"]
    return info


def wait_pool_full(d: Daemon, size: int = 2) -> dict[str, Any]:
    return poll(lambda: i if (i := pool_info(d))["ready"] == size else None, 20, "the launcher pool to fill")  # type: ignore[no-any-return]


def spare_dirs(d: Daemon) -> list[Path]:
    return [p for group in d.cgroup_dirs() for p in group.iterdir() if p.is_dir() and p.name.startswith(SPARE_PREFIX)]


def launcher_pids(d: Daemon) -> set[int]:
    return {int(pid) for p in spare_dirs(d) for pid in (p / "cgroup.procs").read_text().split()}


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    yield from started()


def test_a_start_from_the_pool_keeps_every_guarantee(daemon: Daemon) -> None:
    wait_pool_full(daemon)
    assert daemon.ctl("start", "alice").returncode == 0, daemon.log_text()
    info = daemon.user("alice")
    pool = pool_info(daemon)
    assert (pool["launched"], pool["fallbacks"]) == (1, 0), pool
    pid, uid = info["pid"], info["uid"]
    assert groups_of(pid, daemon.name) == {"alice"}
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    assert status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split() == [str(uid)] * 4
    assert status["Groups"].strip() == "" and status["NoNewPrivs"].strip() == "1"
    assert status["Umask"].strip() == "0077"
    assert f"uid={uid} gid={uid} groups=[] nnp=1" in http_get(daemon.ide_socket("alice"))
    assert os.readlink(f"/proc/{pid}/cwd") == info["workspace"]
    environ = sorted(e.split(b"=", 1)[0].decode() for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if e)
    assert environ == sorted(["HOME", "USER", "LOGNAME", "SHELL", "PATH", "LANG", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID", "STUB_MARK"])
    assert "listen=ide/True" in http_get(daemon.ide_socket("alice")), "LISTEN_PID is not the IDE's pid"
    assert stat.S_ISSOCK(os.stat(f"/proc/{pid}/fd/3").st_mode)
    assert os.readlink(f"/proc/{pid}/fd/1") == os.readlink(f"/proc/{pid}/fd/2") == info["log"]
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    memory = next(p for p in daemon.cgroup_dirs("alice") if (p / "memory.limit_in_bytes").exists())
    assert int((memory / "memory.limit_in_bytes").read_text()) == 512 * 2**20
    # The pool refills; a stop leaves only the spares.
    wait_pool_full(daemon)
    assert daemon.ctl("stop", "alice").returncode == 0
    assert daemon.cgroup_dirs("alice") == []
    assert len(launcher_pids(daemon)) == 2


def test_a_kill_9_restart_goes_through_the_pool(daemon: Daemon) -> None:
    wait_pool_full(daemon)
    assert daemon.ctl("start", "dora").returncode == 0
    first = daemon.user("dora")["pid"]
    wait_pool_full(daemon)
    os.kill(first, signal.SIGKILL)
    poll(lambda: (u := daemon.user("dora"))["state"] == "RUNNING" and u["pid"] != first, 10, "restart")
    assert pool_info(daemon)["launched"] == 2
    assert groups_of(daemon.user("dora")["pid"], daemon.name) == {"dora"}


def test_shutdown_and_sigkill_leave_no_launcher_or_spare_behind(daemon: Daemon) -> None:
    wait_pool_full(daemon)
    assert daemon.ctl("start", "erin").returncode == 0
    erin = daemon.user("erin")["pid"]
    old = launcher_pids(daemon)
    assert len(old) == 2
    daemon.kill(signal.SIGKILL)
    poll(lambda: not any(alive(p) for p in old), 10, "orphaned launchers to exit")
    assert alive(erin), "the user's IDE died with the daemon"
    daemon.start()
    wait_pool_full(daemon)
    assert not launcher_pids(daemon) & old
    assert len({p.name for p in spare_dirs(daemon)}) == 2, "leftover spare groups were not removed"
    assert daemon.user("erin")["pid"] == erin and "re-adopted" in daemon.log_text()
    current = launcher_pids(daemon)
    daemon.stop()
    assert spare_dirs(daemon) == [] and daemon.cgroup_dirs("erin") == []
    assert not any(alive(p) for p in current)


def test_an_exec_failure_through_the_pool_is_a_failed_start() -> None:
    d = Daemon(ide__command=["/nonexistent/ide", "{user}"])
    d.start()
    try:
        wait_pool_full(d)
        d.ctl("start", "frank")
        user = poll(lambda: u if (u := d.user("frank"))["state"] == "FATAL" else None, 20, "FATAL")
        assert "No such file" in user["reason"], user
        assert pool_info(d)["fallbacks"] == 0
        assert d.cgroup_dirs("frank") == []
    finally:
        d.cleanup()


def test_concurrent_starts_beyond_the_pool_fall_back_and_stay_confined() -> None:
    d = Daemon(ide__launcher_pool=1)
    d.start()
    try:
        wait_pool_full(d, 1)
        starts = [subprocess.Popen([sys.executable, "-m", "supervisor.cli", "--socket", str(d.socket), "start", user],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for user in ("hana", "ivan", "jill")]
        for proc in starts:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
        pool = pool_info(d)
        assert pool["launched"] >= 1 and pool["launched"] + pool["fallbacks"] == 3, pool
        for user in ("hana", "ivan", "jill"):
            info = d.user(user)
            assert info["state"] == "RUNNING"
            assert groups_of(info["pid"], d.name) == {user}
            assert f"uid={info['uid']} gid={info['uid']} groups=[] nnp=1" in http_get(d.ide_socket(user))
    finally:
        d.cleanup()


def test_pool_off_starts_the_ordinary_way() -> None:
    d = Daemon(ide__launcher_pool=0)
    d.start()
    try:
        assert d.ctl("start", "gina").returncode == 0
        assert pool_info(d) is None
        assert spare_dirs(d) == []
        assert groups_of(d.user("gina")["pid"], d.name) == {"gina"}
        # Popen's path hands the socket over at fd 3 too (LISTEN_PID left out: unknown before exec).
        assert stat.S_ISSOCK(os.stat(f"/proc/{d.user('gina')['pid']}/fd/3").st_mode)
        assert "listen=ide/none" in http_get(d.ide_socket("gina"))
    finally:
        d.cleanup()
