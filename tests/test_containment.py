"""Nothing a user does to what they own raises out of the daemon (issue #11): each case ends with
that user in a clear state (BACKOFF/FATAL or RUNNING with the problem shown), the other user
RUNNING and answering with the same process, and the daemon alive. Real daemon, real kernel.

The misbehaving IDEs are ``tests/fixtures/ide_misbehave.py`` (by user-id prefix), which then
becomes the ordinary stand-in; users without a known prefix are ordinary stand-ins.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from supervisor.manager import UserRuntime
from supervisor.sessions import UserSession
from tests.conftest import is_root, pure_cgroup_v2, v1_controllers_mounted
from tests.harness import Daemon, http_get, poll

pytestmark = pytest.mark.skipif(
    not (is_root() and (v1_controllers_mounted() or pure_cgroup_v2())),
    reason="needs root and cgroup controllers (v1 cpu/memory/pids/freezer, or pure v2)",
)

MISBEHAVE = Path(__file__).parent / "fixtures" / "ide_misbehave.py"


def misbehaving(**overrides: Any) -> Daemon:
    """A daemon whose IDE command is ide_misbehave.py (which execs the stand-in next to it)."""
    d = Daemon(**overrides)
    shutil.copy(MISBEHAVE, d.stub_dir / MISBEHAVE.name)
    os.chmod(d.stub_dir / MISBEHAVE.name, 0o644)
    d.config.write_text(d.config.read_text().replace(str(d.stub_dir / "ide_stub.py"), str(d.stub_dir / MISBEHAVE.name)))
    return d


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    d = misbehaving()
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


def socket_of(d: Daemon, user: str) -> Path:
    return d.ide_socket(user)


def start(d: Daemon, user: str) -> dict[str, Any]:
    result = d.ctl("start", user)
    assert result.returncode == 0, result.stderr + d.log_text()
    info = d.user(user)
    assert info["state"] == "RUNNING", info
    return info


def state_of(d: Daemon, user: str, *states: str) -> dict[str, Any]:
    info: dict[str, Any] = poll(lambda: (i := d.user(user))["state"] in states and i, 30, f"{user} in {states}")
    return info


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie left for whoever reaps orphans here."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_untouched(d: Daemon, bystander: dict[str, Any]) -> None:
    """The other user runs the same process and answers; the daemon is alive."""
    assert d.proc is not None and d.proc.poll() is None, d.log_text()
    now = d.user(bystander["user"])
    assert (now["state"], now["pid"]) == ("RUNNING", bystander["pid"]), now
    assert f"uid={bystander['uid']}" in http_get(socket_of(d, bystander["user"]))


def test_socket_path_replaced_by_a_directory_ends_the_user_fatal_not_the_daemon(daemon: Daemon) -> None:
    bob, alice = start(daemon, "bob"), start(daemon, "alice")
    sock = socket_of(daemon, "alice")
    # Her terminal could do this while the socket lived in her own directory (finding 2); now only
    # root can, but the boundary must hold whoever breaks the path: a directory, and her IDE dies.
    sock.unlink()
    sock.mkdir()
    os.kill(alice["pid"], signal.SIGKILL)
    info = state_of(daemon, "alice", "FATAL")
    assert "start failed" in info["reason"] and "Is a directory" in info["reason"], info
    assert info["pid"] is None
    assert_untouched(daemon, bob)
    log = daemon.log_text()
    failures = [line for line in log.splitlines() if "user=alice start failed:" in line and "Is a directory" in line]
    assert len(failures) >= 2 and "Traceback" not in log, log
    # FATAL's clean-up trips over the same directory: logged once, no loop
    assert log.count("user=alice cannot remove") == 1, log
    assert "Is a directory" in daemon.ctl("status", "alice").stdout
    assert "Is a directory" in daemon.ctl("why", "alice").stdout
    sock.rmdir()  # once the path is sane again, a start works
    start(daemon, "alice")


def test_a_log_path_that_is_a_directory_fails_that_user_only(daemon: Daemon) -> None:
    bob = start(daemon, "bob")
    (daemon.base / "log" / "alice.log").mkdir(parents=True)
    daemon.ctl("start", "alice")
    info = state_of(daemon, "alice", "FATAL")
    assert "start failed" in info["reason"] and "alice.log" in info["reason"], info
    assert_untouched(daemon, bob)


def test_state_file_that_cannot_be_written_keeps_the_user_and_is_retried(daemon: Daemon) -> None:
    bob = start(daemon, "bob")
    users = daemon.base / "state" / "users"
    (users / "alice.json").mkdir()  # the rename onto it fails
    os.mkfifo(users / ".alice.json.tmp")  # an open for writing would block
    alice = start(daemon, "alice")
    assert "Is a directory" in alice["state_file_error"], alice
    assert "cannot save" in daemon.ctl("status", "alice").stdout
    assert "alice" in daemon.ctl_json("pod")["pod"]["state_files_unsaved"]
    assert_untouched(daemon, bob)
    (users / "alice.json").rmdir()
    poll(lambda: daemon.user("alice")["state_file_error"] is None, 10, "the sampler's retry of the save")
    assert '"state": "RUNNING"' in (users / "alice.json").read_text()
    assert daemon.ctl_json("pod")["pod"]["state_files_unsaved"] == {}


def test_odd_state_files_at_readoption_are_skipped_without_blocking(daemon: Daemon) -> None:
    alice, bob = start(daemon, "alice"), start(daemon, "bob")
    daemon.kill(signal.SIGKILL)  # users keep running; the next daemon re-adopts them
    users = daemon.base / "state" / "users"
    (users / "bob.json").unlink()
    os.mkfifo(users / "bob.json")
    (users / "carol.json").write_bytes(b" " * 2**20)
    (users / "dave.json").symlink_to(users / "alice.json")
    daemon.start()
    assert_untouched(daemon, alice)
    log = daemon.log_text()
    assert "ignoring unreadable state file" in log and "carol.json" in log and "dave.json" in log
    poll(lambda: gone(bob["pid"]), 10, "bob's tree, on no record, killed as an orphan")


@pytest.fixture
def full_disks() -> Iterator[Daemon]:
    """A daemon whose state_dir and log_dir are tiny tmpfs mounts (256 KiB each)."""
    d = misbehaving(daemon__log_max_bytes="64Ki", daemon__log_backups=1)
    mounts = [d.base / "state", d.base / "log"]
    try:
        for mount in mounts:
            mount.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(mount)], check=True)
        d.start()
        yield d
    finally:
        d.stop()
        for mount in mounts:
            subprocess.run(["umount", "-l", str(mount)], check=False)
        d.cleanup()


def fill(path: Path) -> None:
    """Append to ``path`` until the disk is full."""
    with open(path, "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"x" * 4096)
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC


def test_full_disks_for_state_and_logs(full_disks: Daemon) -> None:
    d = full_disks
    bob = start(d, "bob")
    filler = d.base / "state" / "filler"
    fill(filler)
    alice = start(d, "alice")
    assert "No space left" in alice["state_file_error"], alice
    assert_untouched(d, bob)
    filler.unlink()
    poll(lambda: d.user("alice")["state_file_error"] is None, 10, "the retried save")
    assert (d.base / "state" / "users" / "alice.json").is_file()
    # alice's log fills the log disk (as an IDE printing without end would): rotation cannot keep
    # a backup, truncates anyway, and the space is back for everyone.
    log = d.base / "log" / "alice.log"
    fill(log)
    poll(lambda: log.stat().st_size < 64 * 1024, 10, "the log truncated by rotation")
    assert not (d.base / "log" / "alice.log.1").exists() or (d.base / "log" / "alice.log.1").stat().st_size <= 64 * 1024
    assert shutil.disk_usage(d.base / "log").free > 128 * 1024
    assert d.user("alice")["state"] == "RUNNING"
    assert_untouched(d, bob)


def test_an_ide_ignoring_sigterm_is_killed_after_the_grace(daemon: Daemon) -> None:
    bob = start(daemon, "bob")
    deaf = start(daemon, "deaf-alice")
    began = time.monotonic()
    result = daemon.ctl("stop", "deaf-alice")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - began >= 2.5  # stop_grace is 3s
    assert daemon.user("deaf-alice")["state"] == "STOPPED"
    assert gone(deaf["pid"]) and not daemon.cgroup_dirs("deaf-alice")
    assert "did not exit 3s after SIGTERM" in daemon.log_text()
    assert_untouched(daemon, bob)


def test_a_thousand_zombies_and_setsid_descendants_go_with_the_tree(daemon: Daemon) -> None:
    bob = start(daemon, "bob")
    info = start(daemon, "zombies-alice")
    main = psutil.Process(info["pid"])
    children = main.children()
    zombies = [c for c in children if c.status() == psutil.STATUS_ZOMBIE]
    assert len(zombies) >= 900, len(zombies)
    in_group = {int(pid) for pid in (daemon.cgroup_dirs("zombies-alice")[0] / "cgroup.procs").read_text().split()}
    setsid = [psutil.Process(pid) for pid in in_group - {info["pid"]} if not gone(pid)]
    assert len(setsid) == 2 and all(os.getsid(p.pid) != os.getsid(info["pid"]) for p in setsid)
    assert daemon.ctl("stop", "zombies-alice").returncode == 0
    assert daemon.user("zombies-alice")["state"] == "STOPPED"
    assert all(gone(p.pid) for p in setsid) and not daemon.cgroup_dirs("zombies-alice")
    assert_untouched(daemon, bob)


def test_a_user_who_exhausts_pids_max_is_restarted_and_stopped_cleanly() -> None:
    d = misbehaving(**{"tiers.free__pids": 64})
    try:
        d.start()
        bob = start(d, "bob")
        info = start(d, "pids-alice")
        assert "forked" in d.ctl("tail", "pids-alice").stdout
        os.kill(info["pid"], signal.SIGKILL)  # its tree stays at pids.max while the daemon restarts it
        again = poll(lambda: (i := d.user("pids-alice"))["pid"] not in (None, info["pid"]) and i["state"] == "RUNNING" and i, 30, "restart")
        assert again["restarts"] >= 1
        assert d.ctl("stop", "pids-alice").returncode == 0
        assert d.user("pids-alice")["state"] == "STOPPED" and not d.cgroup_dirs("pids-alice")
        assert_untouched(d, bob)
    finally:
        d.cleanup()


KEYRING_WRAPPER = """
import ctypes, os, resource, sys
libc = ctypes.CDLL(None, use_errno=True)
keyring = libc.syscall(ctypes.c_long({nr}), ctypes.c_long(1), ctypes.c_void_p(None))  # a session keyring of its own
assert keyring > 0, ctypes.get_errno()
open(sys.argv[1], "w").write(str(keyring))
resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
os.execv(sys.argv[2], sys.argv[2:])
"""


def limits_table(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("Max "):
            name, values = line[:26].strip(), line[26:].split()
            rows[name] = " ".join(values[:2])
    return rows


@pytest.mark.parametrize("pool", [0, 2])
def test_the_ide_gets_its_own_keyring_and_limits_not_the_daemons(pool: int) -> None:
    if os.uname().machine not in ("x86_64", "aarch64"):
        pytest.skip("the test's keyctl numbers are for x86_64 and aarch64")
    nr = {"x86_64": 250, "aarch64": 219}[os.uname().machine]
    d = misbehaving(ide__launcher_pool=pool)
    try:
        keyring_file = d.base / "daemon-keyring"
        d.start(wrapper=[sys.executable, "-c", KEYRING_WRAPPER.format(nr=nr), str(keyring_file)])
        if pool:
            poll(lambda: d.ctl_json("pod")["pod"]["launcher_pool"]["ready"] >= 1, 20, "a ready launcher")
        start(d, "hygiene-alice")
        if pool:
            assert d.ctl_json("pod")["pod"]["launcher_pool"]["launched"] == 1
        out = (d.base / "log" / "hygiene-alice.log").read_text()
        ide_keyring = int(out.split("hygiene: keyring=", 1)[1].split()[0])
        assert ide_keyring > 0 and ide_keyring != int(keyring_file.read_text())
        assert d.proc is not None
        daemon_limits = limits_table(Path(f"/proc/{d.proc.pid}/limits").read_text())
        ide_limits = limits_table(out)
        assert daemon_limits["Max core file size"] == "unlimited unlimited"
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # raising it would need CAP_SYS_RESOURCE
        # the wrapper started it at 4096; the daemon raises its soft limit to the hard one (probe port)
        assert daemon_limits["Max open files"].split()[0] == str(hard)
        nofile = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
        assert ide_limits["Max core file size"] == "0 0"
        assert ide_limits["Max open files"] == f"{nofile} {nofile}"
        for name in ("Max stack size", "Max processes", "Max locked memory", "Max pending signals"):
            assert ide_limits[name] == daemon_limits[name], name
    finally:
        d.cleanup()


def test_signals_go_through_the_pidfd_never_to_a_reused_pid() -> None:
    """The main process's pidfd reaches it; once it is gone, a new process given the same pid number
    (forced with ns_last_pid) gets nothing."""
    rt = UserRuntime(session=UserSession(user="alice", tier="free"), uid=0, gid=0, paths=None,  # type: ignore[arg-type]
                     socket_path=Path("/nonexistent"), log_path=Path("/nonexistent"))
    first = subprocess.Popen(["sleep", "60"])
    rt.session.pid, rt.pidfd = first.pid, os.pidfd_open(first.pid)
    try:
        assert rt.signal(signal.SIGTERM)
        assert first.wait(5) == -signal.SIGTERM
        for _attempt in range(20):  # another process may take the pid first: try again
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(first.pid - 1))
            reused = subprocess.Popen(["sleep", "60"])
            if reused.pid == first.pid:
                break
            reused.kill()
            reused.wait()
        else:
            pytest.skip("could not get the same pid number again")
        try:
            assert not rt.signal(signal.SIGTERM)
            assert reused.poll() is None  # still alive: the signal did not reach it
        finally:
            reused.kill()
            reused.wait()
    finally:
        os.close(rt.pidfd)
