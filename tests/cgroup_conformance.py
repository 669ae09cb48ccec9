"""The conformance suite every cgroup driver passes, run for real against the kernel.

Subclass :class:`CgroupDriverConformance` in a test module, provide a ``driver`` fixture (a
prepared driver whose subtree the fixture removes afterwards) and :meth:`assert_limits_applied`.
Set ``enforces_limits = False`` for a hierarchy without cpu/memory/pids controllers (the
resource tests then skip with that reason).

Workloads are small Python programs started with ``subprocess`` and a ``preexec_fn`` that writes
``0`` into every ``procs_files`` path before exec, as the launcher does. Nothing sleeps to
synchronise: waits poll with a deadline; the only timed windows are measurements (CPU share,
"no progress while frozen").
"""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import psutil
import pytest

from conftest import CGROUP_MOUNT, is_root

from supervisor.cgroups.base import CgroupDriver, Limits
from supervisor.errors import CgroupError

REPO = Path(__file__).resolve().parent.parent
UNIFIED = CGROUP_MOUNT / "unified"
needs_unified = pytest.mark.skipif(
    not (is_root() and (UNIFIED / "cgroup.procs").exists()),
    reason="needs root and a hybrid host's cgroup v2 hierarchy at /sys/fs/cgroup/unified",
)
# The VM tier emulates a CPU in software: everything is several times slower there.
SLOW = 5.0 if os.environ.get("WSUP_VM_TIER") else 1.0
DEADLINE = 20.0 * SLOW

GENEROUS = Limits(cpu_millicores=1000, memory_bytes=512 * 2**20, memory_high_bytes=None, pids=256)

# --- workloads (python -c) ---------------------------------------------------------------------

SLEEPER = "import time\nprint('ready', flush=True)\ntime.sleep(600)"
BUSY = "print('ready', flush=True)\nwhile True:\n    pass"
TICKER = "import os, time\nwhile True:\n    os.write(1, b'.')\n    time.sleep(0.001)"
# Chains of processes where each generation forks and exits at once: the pids keep changing, so
# a kill by a list of pids read a moment earlier misses some of them.
FORK_CHAINS = """
import os, sys
for _ in range(int(sys.argv[2]) - 1):
    if os.fork() == 0:
        break
while True:
    try:
        if os.fork():
            os._exit(0)
    except OSError:
        pass
"""
# A growing fork bomb (pids.max is its bound): every process forks at random moments, so some
# fork is nearly always in flight; a single pass over a list of pids leaves survivors about half
# the time.
FORK_BOMB = """
import os, random, time
while True:
    time.sleep(random.random() * 0.02)
    try:
        os.fork()
    except OSError:
        pass
"""
# Three children, each with a grandchild, forked before anything else happens.
FAMILY = """
import os, time
for _ in range(3):
    if os.fork() == 0:
        os.fork()
        time.sleep(600)
        os._exit(0)
print('ready', flush=True)
time.sleep(600)
"""
MEMORY_HOG = """
import sys, time
chunks = []
for _ in range(int(sys.argv[1])):
    chunks.append(b"x" * (1 << 20))
print("allocated", flush=True)
time.sleep(600)
"""
FORK_COUNT = """
import os, signal, sys
ok = failed = 0
for _ in range(int(sys.argv[1])):
    try:
        pid = os.fork()
    except OSError:
        failed += 1
        continue
    if pid == 0:
        signal.pause()
        os._exit(0)
    ok += 1
print(ok, failed, flush=True)
signal.pause()
"""

# --- helpers -----------------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll ``predicate`` until it holds; fail the test saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


def join_preexec(procs_files: list[str]) -> Callable[[], None]:
    """A preexec_fn that moves the child into every group before exec (as the launcher does)."""
    paths = [os.fsencode(p) for p in procs_files]

    def join() -> None:
        for path in paths:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

    return join


def read_line(proc: subprocess.Popen[bytes], timeout: float = DEADLINE) -> str:
    """The first line a child prints, within ``timeout``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"pid {proc.pid} printed no line within {timeout:g} s (got {data!r})")
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"pid {proc.pid} exited ({proc.wait()}) before printing a line (got {data!r})")
            data += chunk
    return data.split(b"\n", 1)[0].decode()


def drain(fd: int) -> int:
    """Read whatever is waiting on ``fd`` without blocking; the number of bytes read."""
    total = 0
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        total += len(chunk)
    return total


def alive_with_marker(marker: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line contains ``marker``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and marker in (proc.info["cmdline"] or []):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def cpu_share(driver: CgroupDriver, user: str, seconds: float) -> float:
    """The group's CPU use over a window of ``seconds`` wall time, as a share of one core."""
    used0, t0 = driver.usage(user).cpu_usage_us, time.monotonic()
    time.sleep(seconds)  # a measurement window, not synchronisation
    used1, t1 = driver.usage(user).cpu_usage_us, time.monotonic()
    return (used1 - used0) / ((t1 - t0) * 1e6)


def write_quietly(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError:
        pass


def force_remove_tree(root: Path, timeout: float = DEADLINE) -> None:
    """Test teardown independent of the drivers: thaw, kill and remove every cgroup under ``root``."""
    if not root.is_dir():
        return
    dirs = [Path(d) for d, _, _ in os.walk(root)]  # top-down: thaw parents first
    for d in dirs:
        write_quietly(d / "freezer.state", "THAWED")
        write_quietly(d / "cgroup.freeze", "0")
    for d in reversed(dirs):
        def gone() -> bool:
            try:
                pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
            except FileNotFoundError:
                return True
            if os.getpid() in pids:
                raise RuntimeError(f"the test process itself is in {d}; refusing to kill it")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.rmdir(d)
            except FileNotFoundError:
                return True
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    return False
                raise
            return True

        wait_for(gone, f"removal of {d}", timeout)


class Spawner:
    """Starts workloads inside a user's group and reaps them all at teardown."""

    def __init__(self, driver: CgroupDriver) -> None:
        self.driver = driver
        self.procs: list[subprocess.Popen[bytes]] = []

    def __call__(self, user: str, code: str, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            preexec_fn=join_preexec(self.driver.procs_files(user)),
            cwd=REPO,
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for user in self.driver.users():
            try:
                if self.driver.is_frozen(user):
                    self.driver.thaw(user)
                self.driver.kill(user)
            except CgroupError:
                pass  # force_remove_tree in the driver fixture finishes the job
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=DEADLINE)
            if proc.stdout is not None:
                proc.stdout.close()


# --- the suite ---------------------------------------------------------------------------------


class CgroupDriverConformance:
    """What every driver must do. Subclasses provide the ``driver`` fixture."""

    enforces_limits: ClassVar[bool] = True
    cpu_share_bounds: ClassVar[tuple[float, float]] = (0.10, 0.35)  # for a 200m quota

    def assert_limits_applied(self, driver: CgroupDriver, user: str, limits: Limits) -> None:
        raise NotImplementedError

    def require_limits(self) -> None:
        if not self.enforces_limits:
            pytest.skip("this hierarchy has no cpu/memory/pids controllers (core features only)")

    @pytest.fixture
    def spawn(self, driver: CgroupDriver) -> Iterator[Spawner]:
        spawner = Spawner(driver)
        try:
            yield spawner
        finally:
            spawner.close()

    @pytest.fixture
    def user(self) -> str:
        return unique("u")

    # -- lifecycle

    def test_create_is_idempotent_and_listed(self, driver: CgroupDriver, user: str) -> None:
        assert not driver.exists(user)
        driver.create(user, GENEROUS)
        driver.create(user, GENEROUS)
        assert driver.exists(user)
        assert user in driver.users()
        assert driver.pids(user) == []
        assert not driver.is_frozen(user)
        assert driver.usage(user).pids == 0
        assert isinstance(driver, CgroupDriver)
        assert driver.describe()

    def test_limits_are_written(self, driver: CgroupDriver, user: str) -> None:
        limits = Limits(cpu_millicores=300, memory_bytes=200 * 2**20, memory_high_bytes=150 * 2**20, pids=50)
        driver.create(user, limits)
        self.assert_limits_applied(driver, user, limits)

    def test_missing_group(self, driver: CgroupDriver, user: str) -> None:
        assert driver.pids(user) == []
        assert not driver.is_frozen(user)
        driver.kill(user)
        driver.remove(user)
        with pytest.raises(CgroupError):
            driver.usage(user)
        with pytest.raises(CgroupError):
            driver.set_limits(user, GENEROUS)

    def test_rejects_path_like_user_names(self, driver: CgroupDriver) -> None:
        for bad in ("..", "a/b", ""):
            with pytest.raises(CgroupError):
                driver.create(bad, GENEROUS)

    # -- membership

    def test_procs_files_join_the_group(self, driver: CgroupDriver, user: str, spawn: Spawner) -> None:
        driver.create(user, GENEROUS)
        files = driver.procs_files(user)
        assert files and all(os.path.isabs(f) and f.endswith("cgroup.procs") for f in files)
        proc = spawn(user, SLEEPER)
        assert read_line(proc) == "ready"
        assert driver.pids(user) == [proc.pid]
        for path in files:
            assert proc.pid in [int(p) for p in Path(path).read_text().split()], path
        assert driver.usage(user).pids >= 1

    def test_descendants_stay_in_group(self, driver: CgroupDriver, user: str, spawn: Spawner) -> None:
        driver.create(user, GENEROUS)
        proc = spawn(user, FAMILY)
        assert read_line(proc) == "ready"
        parent = psutil.Process(proc.pid)
        wait_for(lambda: len(parent.children(recursive=True)) == 6, "3 children and 3 grandchildren")
        family = {proc.pid} | {c.pid for c in parent.children(recursive=True)}
        assert set(driver.pids(user)) == family

    # -- freezer and kill

    def test_freeze_stops_progress_and_thaw_resumes(self, driver: CgroupDriver, user: str, spawn: Spawner) -> None:
        driver.create(user, GENEROUS)
        proc = spawn(user, TICKER)
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        wait_for(lambda: select.select([fd], [], [], 0)[0] != [], "the ticker's first tick")
        driver.freeze(user)
        assert driver.is_frozen(user)
        drain(fd)
        # A measurement window: a thawed ticker writes about every millisecond.
        assert select.select([fd], [], [], 0.3 * SLOW)[0] == [], "a frozen process made progress"
        driver.thaw(user)
        assert not driver.is_frozen(user)
        assert select.select([fd], [], [], DEADLINE)[0] != [], "the thawed process made no progress"

    def test_freeze_processes_pauses_only_those(self, driver: CgroupDriver, user: str, spawn: Spawner) -> None:
        """Language servers are frozen in a child group while the rest of the tree keeps running."""
        driver.create(user, GENEROUS)
        paused, running = spawn(user, TICKER), spawn(user, TICKER)
        assert paused.stdout is not None and running.stdout is not None
        fds = paused.stdout.fileno(), running.stdout.fileno()
        for fd in fds:
            wait_for(lambda fd=fd: select.select([fd], [], [], 0)[0] != [], "a first tick")
        exited = subprocess.Popen(["true"])
        exited.wait()  # a pid that no longer exists is skipped
        assert driver.freeze_processes(user, [paused.pid, exited.pid]) == [paused.pid]
        assert paused.pid in driver.pids(user)  # still the user's, still under its limits
        drain(fds[0])
        drain(fds[1])
        assert select.select([fds[1]], [], [], DEADLINE)[0] != [], "the rest of the tree was frozen too"
        drain(fds[0])
        assert select.select([fds[0]], [], [], 0.3 * SLOW)[0] == [], "a paused process made progress"
        # Freezing and thawing the whole user keeps the paused group paused.
        driver.freeze(user)
        driver.thaw(user)
        drain(fds[0])
        assert select.select([fds[0]], [], [], 0.3 * SLOW)[0] == [], "thawing the user resumed a paused process"
        driver.thaw_processes(user)
        assert select.select([fds[0]], [], [], DEADLINE)[0] != [], "the thawed process made no progress"
        driver.thaw_processes(user)  # idempotent

    def test_kill_and_remove_with_paused_processes(self, driver: CgroupDriver, user: str, spawn: Spawner) -> None:
        driver.create(user, GENEROUS)
        proc = spawn(user, SLEEPER)
        assert read_line(proc) == "ready"
        driver.freeze_processes(user, [proc.pid])
        driver.kill(user)
        assert proc.wait(timeout=DEADLINE) == -signal.SIGKILL
        driver.remove(user)
        assert not driver.exists(user)

    def test_reclaim_memory_answers(self, driver: CgroupDriver, user: str) -> None:
        driver.create(user, GENEROUS)
        assert driver.reclaim_memory(user) in (True, False)
        if driver.version == 1:
            assert driver.reclaim_memory(user) is False

    def test_kill_empties_group_with_forking_child(self, driver: CgroupDriver, user: str, spawn: Spawner) -> None:
        driver.create(user, GENEROUS)
        marker = unique("wsup-fork-chain")
        first = spawn(user, FORK_CHAINS, marker, "16")
        first.wait(timeout=DEADLINE)  # the first generation exits at once; its descendants go on
        wait_for(lambda: driver.pids(user) != [], "the fork chain to run in the group")
        driver.kill(user)
        wait_for(lambda: driver.pids(user) == [], "the group to be empty after kill()")
        wait_for(lambda: alive_with_marker(marker) == [], "no process of the chain alive anywhere")

    def test_kill_stops_a_growing_fork_bomb(self, driver: CgroupDriver, user: str, spawn: Spawner) -> None:
        self.require_limits()  # pids.max bounds the bomb
        driver.create(user, Limits(cpu_millicores=1000, memory_bytes=1024 * 2**20, memory_high_bytes=None, pids=128))
        for _round in range(3):
            marker = unique("wsup-fork-bomb")
            spawn(user, FORK_BOMB, marker)
            wait_for(lambda: len(driver.pids(user)) >= 32, "the fork bomb to grow to 32 processes")
            driver.kill(user)
            wait_for(lambda: driver.pids(user) == [], "the group to be empty after kill()")
            wait_for(lambda: alive_with_marker(marker) == [], "no process of the bomb alive anywhere")

    def test_kill_a_frozen_group(self, driver: CgroupDriver, user: str, spawn: Spawner) -> None:
        driver.create(user, GENEROUS)
        proc = spawn(user, SLEEPER)
        assert read_line(proc) == "ready"
        driver.freeze(user)
        driver.kill(user)
        if driver.is_frozen(user):
            driver.thaw(user)
        assert proc.wait(timeout=DEADLINE) == -signal.SIGKILL
        wait_for(lambda: driver.pids(user) == [], "the group to be empty")

    def test_kill_and_remove_leave_nothing(self, driver: CgroupDriver, user: str, spawn: Spawner) -> None:
        driver.create(user, GENEROUS)
        proc = spawn(user, FAMILY)
        assert read_line(proc) == "ready"
        files = driver.procs_files(user)
        driver.kill(user)
        driver.remove(user)  # waits while the kernel reaps the dying tasks
        assert proc.wait(timeout=DEADLINE) == -signal.SIGKILL
        assert not driver.exists(user)
        assert user not in driver.users()
        assert not any(Path(f).parent.exists() for f in files)
        driver.remove(user)  # a missing group is fine

    # -- limits and usage

    def test_set_limits_in_place(self, driver: CgroupDriver, user: str, spawn: Spawner) -> None:
        driver.create(user, GENEROUS)
        proc = spawn(user, SLEEPER)
        assert read_line(proc) == "ready"
        tighter = Limits(cpu_millicores=250, memory_bytes=300 * 2**20, memory_high_bytes=200 * 2**20, pids=40, cpu_period_us=50_000)
        driver.set_limits(user, tighter)
        self.assert_limits_applied(driver, user, tighter)
        driver.set_limits(user, GENEROUS)
        self.assert_limits_applied(driver, user, GENEROUS)
        assert driver.pids(user) == [proc.pid]
        assert proc.poll() is None

    def test_usage_counts_cpu(self, driver: CgroupDriver, user: str, spawn: Spawner) -> None:
        driver.create(user, GENEROUS)
        before = driver.usage(user).cpu_usage_us
        proc = spawn(user, BUSY)
        assert read_line(proc) == "ready"
        wait_for(lambda: driver.usage(user).cpu_usage_us > before + 50_000, "50 ms of CPU charged to the group")
        assert driver.usage(user).pids == 1

    def test_memory_limit_oom_kills(self, driver: CgroupDriver, user: str, spawn: Spawner) -> None:
        self.require_limits()
        driver.create(user, Limits(cpu_millicores=1000, memory_bytes=64 * 2**20, memory_high_bytes=None, pids=64))
        assert driver.usage(user).oom_kills == 0
        proc = spawn(user, MEMORY_HOG, "512")
        assert proc.wait(timeout=DEADLINE * 3) == -signal.SIGKILL
        wait_for(lambda: driver.usage(user).oom_kills >= 1, "an OOM kill reported in usage()")

    def test_cpu_quota_holds_busy_loop(self, driver: CgroupDriver, user: str, spawn: Spawner) -> None:
        self.require_limits()
        driver.create(user, Limits(cpu_millicores=200, memory_bytes=256 * 2**20, memory_high_bytes=None, pids=64))
        proc = spawn(user, BUSY)
        assert read_line(proc) == "ready"
        share = cpu_share(driver, user, 2.0)
        low, high = self.cpu_share_bounds
        print(f"busy loop under a 200m quota used {share:.1%} of a core")
        assert low <= share <= high, f"busy loop used {share:.1%} of a core under a 200m quota"

    def test_pids_max_stops_forks_of_one_user_only(self, driver: CgroupDriver, user: str, spawn: Spawner) -> None:
        self.require_limits()
        other = unique("u")
        driver.create(user, Limits(cpu_millicores=1000, memory_bytes=512 * 2**20, memory_high_bytes=None, pids=16))
        driver.create(other, Limits(cpu_millicores=1000, memory_bytes=512 * 2**20, memory_high_bytes=None, pids=64))
        bomb = spawn(user, FORK_COUNT, "40")
        ok, failed = map(int, read_line(bomb, DEADLINE * 3).split())
        assert failed > 0 and ok <= 15, (ok, failed)
        assert driver.usage(user).pids <= 16
        fine = spawn(other, FORK_COUNT, "10")
        assert read_line(fine, DEADLINE * 3).split() == ["10", "0"]
