"""The container init: its decisions (pure) and, as PID 1 of a real PID namespace with the real
daemon under it, what a pod sees - a daemon's crash or upgrade leaves users running, orphans are
reaped, SIGTERM drains and exits 0, a daemon that cannot start is retried with backoff."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from supervisor.init import Backoff, Exit, Forward, Machine, Say, Start
from tests.conftest import is_root, pure_cgroup_v2, v1_controllers_mounted
from tests.harness import Daemon, isolation_available, poll

# ---- decisions ----------------------------------------------------------------------------------------


def running(now: float = 0.0) -> Machine:
    machine = Machine(Backoff(initial=0.5, maximum=4.0, reset_after=60.0))
    assert isinstance(machine.begin()[0], Start)
    machine.started(now)
    return machine


def test_a_crash_restarts_with_doubling_backoff_capped_and_reset_after_a_long_run() -> None:
    machine, now, delays = running(), 0.0, []
    for _ in range(5):
        now += 1.0
        [say] = machine.exited(-signal.SIGKILL, now)
        assert isinstance(say, Say) and "killed by SIGKILL" in say.why and "users keep running" in say.why
        timeout = machine.timeout(now)
        assert timeout is not None
        delays.append(timeout)
        assert machine.tick(now + timeout - 0.01) == []
        [start] = machine.tick(now + timeout)
        assert isinstance(start, Start)
        now += timeout
        machine.started(now)
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0]
    # A daemon that ran 60 s was healthy: the next crash starts the ladder again.
    machine.exited(1, now + 60.0)
    assert machine.timeout(now + 60.0) == 0.5


def test_sigterm_is_forwarded_and_the_exit_code_says_whether_the_drain_was_clean() -> None:
    machine = running()
    assert machine.signalled(signal.SIGTERM) == [Forward(signal.SIGTERM, "the pod is going away: the daemon drains")]
    [again] = machine.signalled(signal.SIGTERM)
    assert isinstance(again, Forward) and "ends the drain" in again.why
    assert [type(a) for a in machine.signalled(signal.SIGUSR2)] == [Say]  # no upgrade while stopping
    [done] = machine.exited(0, 5.0)
    assert isinstance(done, Exit) and done.code == 0
    for returncode, code in ((1, 1), (-signal.SIGKILL, 137)):
        machine = running()
        machine.signalled(signal.SIGINT)
        [failed] = machine.exited(returncode, 5.0)
        assert isinstance(failed, Exit) and failed.code == code and "not clean" in failed.why


def test_sigterm_while_the_daemon_is_down_exits_non_zero_at_once() -> None:
    machine = running()
    machine.exited(2, 0.1)
    [exit_] = machine.signalled(signal.SIGTERM)
    assert isinstance(exit_, Exit) and exit_.code == 1


def test_sigusr2_upgrades_at_once_without_backoff() -> None:
    machine = running()
    machine.exited(1, 0.1)  # one crash: the ladder has moved on
    machine.tick(10.0)
    machine.started(10.0)
    [forward] = machine.signalled(signal.SIGUSR2)
    assert forward == Forward(signal.SIGUSR2, forward.why) and "detaches" in forward.why
    [start] = machine.exited(0, 10.5)
    assert isinstance(start, Start) and machine.timeout(10.5) is None
    machine.started(10.5)
    machine.exited(1, 11.0)  # the ladder was reset by the upgrade
    assert machine.timeout(11.0) == 0.5
    # SIGUSR2 while waiting out a backoff starts the daemon now.
    [now] = machine.signalled(signal.SIGUSR2)
    assert isinstance(now, Start) and machine.timeout(11.0) is None


def test_sigterm_during_an_upgrade_is_not_a_clean_drain() -> None:
    machine = running()
    machine.signalled(signal.SIGUSR2)
    machine.signalled(signal.SIGTERM)
    [exit_] = machine.exited(0, 1.0)
    assert isinstance(exit_, Exit) and exit_.code == 1 and "detaching" in exit_.why


def test_sighup_is_passed_on_and_sigusr1_ignored() -> None:
    machine = running()
    assert [type(a) for a in machine.signalled(signal.SIGHUP)] == [Forward]
    [say] = machine.signalled(signal.SIGUSR1)
    assert isinstance(say, Say) and "not supported" in say.why
    assert machine.running and machine.stopping is None


# ---- as PID 1 of a real PID namespace -----------------------------------------------------------------

needs_kernel = pytest.mark.skipif(
    not (is_root() and (v1_controllers_mounted() or pure_cgroup_v2()) and shutil.which("unshare") and shutil.which("nsenter")),
    reason="needs root, cgroup controllers (v1 cpu/memory/pids/freezer, or pure v2), unshare and nsenter",
)
# A new PID namespace (and mount namespace, for its own /proc) with the init as its PID 1; if the
# test runner dies, unshare takes the namespace with it.
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]


class Pod:
    """A started daemon under the init, as PID 1 of its own PID namespace."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        assert daemon.proc is not None
        self.unshare = daemon.proc
        self.init: int = poll(lambda: psutil.Process(self.unshare.pid).children(), 10, "the init")[0].pid

    def daemon_pid(self) -> int | None:
        """The daemon's pid as the host sees it, None while there is none."""
        for child in psutil.Process(self.init).children():
            try:
                if child.cmdline()[1:4] == ["-m", "supervisor.daemon", "run"]:
                    return int(child.pid)
            except psutil.NoSuchProcess:
                pass
        return None

    def signal(self, signum: int) -> None:
        psutil.Process(self.init).send_signal(signum)

    def wait(self) -> int:
        """The init's exit code (unshare passes it on)."""
        return self.unshare.wait(30)

    def init_log(self) -> list[str]:
        return [line for line in self.d.log_text().splitlines() if line.startswith("init: ")]


@contextlib.contextmanager
def started_pod(**overrides: object) -> Iterator[Pod]:
    d = Daemon(**overrides)
    pod = None
    try:
        d.start(wrapper=UNSHARE, command="init")
        pod = Pod(d)
        yield pod
    finally:
        if pod is not None and pod.unshare.poll() is None:
            pod.signal(signal.SIGTERM)
            pod.wait()
        d.cleanup()


@pytest.fixture
def pod() -> Iterator[Pod]:
    with started_pod() as p:
        yield p


def _ready_again(pod: Pod, old: int) -> int:
    """Wait for a daemon other than ``old`` that answers; return its pid."""
    new: int = poll(lambda: (p := pod.daemon_pid()) not in (None, old) and p, 20, "a new daemon")
    poll(lambda: pod.d.ctl("pod").returncode == 0, 20, "the new daemon's control socket")
    return new


@needs_kernel
@pytest.mark.parametrize("isolated", [False, True], ids=["shared", "isolated"])
def test_daemon_killed_users_keep_running_and_are_readopted(isolated: bool) -> None:
    overrides, missing = isolation_available()
    if isolated and missing:
        pytest.skip(f"[isolation] mechanisms missing: {missing}")
    with started_pod(**(overrides if isolated else {})) as pod:
        daemon_killed_user_readopted(pod)


def daemon_killed_user_readopted(pod: Pod) -> None:
    assert pod.d.ctl("start", "alice").returncode == 0
    before = pod.d.user("alice")
    daemon = pod.daemon_pid()
    assert daemon is not None
    # The user's tree is in a session of its own, not the daemon's process group.
    alice = [p for p in psutil.Process(daemon).children(recursive=True) if "ide_stub.py" in " ".join(p.cmdline())]
    assert alice and all(os.getpgid(p.pid) != os.getpgid(daemon) for p in alice)
    psutil.Process(daemon).kill()  # from outside the namespace
    new = _ready_again(pod, daemon)
    after = pod.d.user("alice")
    assert (after["state"], after["pid"], after["restarts"]) == ("RUNNING", before["pid"], 0)
    assert all(p.is_running() for p in alice)
    assert "re-adopted" in pod.d.log_text()
    assert any("killed by SIGKILL" in line and "restarting it in 0.5s" in line for line in pod.init_log())
    assert pod.unshare.poll() is None and new != daemon


# Run through nsenter inside the pod's namespace: forks ORPHANS children and exits, so they are
# re-parented to the namespace's init; each exits once the file argv[1] exists.
ORPHANER = """
import os, sys, time
for _ in range(int(sys.argv[2])):
    if os.fork() == 0:
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.01)
        os._exit(0)
"""


@needs_kernel
def test_orphans_are_reaped_none_left_as_zombies(pod: Pod, tmp_path: Path) -> None:
    release = tmp_path / "release"
    subprocess.run(["nsenter", f"--target={pod.init}", "--pid", "--mount", "--", sys.executable, "-I", "-S", "-c", ORPHANER, str(release), "5"],
                   check=True, timeout=30)

    def orphans() -> list[int]:
        return [p.pid for p in psutil.Process(pod.init).children() if str(release) in " ".join(p.cmdline())]

    adopted = poll(lambda: len(found := orphans()) == 5 and found, 10, "the orphans re-parented to the init")
    release.touch()

    def reaped() -> bool:
        return not any(psutil.pid_exists(pid) for pid in adopted)

    poll(reaped, 10, "the orphans reaped (not left as zombies)")
    zombies = [p.pid for p in psutil.Process(pod.init).children(recursive=True) if p.status() == psutil.STATUS_ZOMBIE]
    assert zombies == []
    assert pod.d.ctl("pod").returncode == 0  # the daemon did not mistake them for its own


@needs_kernel
def test_sigterm_drains_stops_users_gracefully_and_exits_0() -> None:
    # Under the init SIGTERM means the pod goes away: it drains even where the config says detach.
    with started_pod(daemon__sigterm="detach") as pod:
        assert pod.d.ctl("start", "saver-1").returncode == 0
        saver = pod.d.user("saver-1")
        pod.signal(signal.SIGTERM)
        assert pod.wait() == 0
        # The IDE got SIGTERM from the drain (a namespace torn down with it still in would SIGKILL it).
        assert (Path(saver["workspace"]) / "flushed-on-sigterm.txt").read_text() == "flushed by saver-1 on SIGTERM\n"
        assert pod.init_log()[-1] == "init: daemon exited with status 0 after SIGTERM: drained, exiting 0"


@needs_kernel
def test_sigusr2_replaces_the_daemon_at_once_users_untouched(pod: Pod) -> None:
    assert pod.d.ctl("start", "bob").returncode == 0
    before = pod.d.user("bob")
    old = pod.daemon_pid()
    assert old is not None
    pod.signal(signal.SIGUSR2)
    new = _ready_again(pod, old)
    after = pod.d.user("bob")
    assert (after["state"], after["pid"], after["restarts"]) == ("RUNNING", before["pid"], 0)
    log = pod.init_log()
    assert any("upgrade" in line for line in log)
    assert any("for the upgrade: starting the new daemon now" in line for line in log)
    assert not any("restarting it in" in line for line in log)  # no backoff
    assert new != old and not psutil.pid_exists(old)


@needs_kernel
def test_a_daemon_that_cannot_start_is_retried_with_backoff() -> None:
    d = Daemon(pod__capacity="lots")  # check-config would refuse it: the daemon exits 2 at once
    try:
        with open(d.log, "ab") as log:
            unshare = subprocess.Popen([*UNSHARE, sys.executable, "-m", "supervisor.daemon", "init", "--", "--config", str(d.config)],
                                       stdout=log, stderr=log)
        began = time.monotonic()

        def starts() -> int:
            return d.log_text().count("init: daemon started")

        poll(lambda: starts() >= 4, 30, "four starts")
        elapsed = time.monotonic() - began
        delays = re.findall(r"exited with status 2 after [0-9.]+s: restarting it in ([0-9.]+)s", d.log_text())
        assert delays[:3] == ["0.5", "1", "2"]
        # 0.5 + 1 + 2 s of backoff before the fourth start; a tight loop would start dozens.
        assert elapsed >= 3.5 and starts() <= 5
        init = psutil.Process(unshare.pid).children()[0]
        init.send_signal(signal.SIGTERM)
        assert unshare.wait(30) != 0  # nothing was drained
    finally:
        d.cleanup()
