"""The trio adapter around :mod:`supervisor.sessions`: carries out actions against the kernel.

One :class:`SessionManager` per daemon. Every event for a user (operator verb, process exit,
readiness, retry timer) is handled under that user's lock: the pure state machine decides, then
the actions run in order. Exits are noticed through a pidfd per main process (and SIGCHLD, which
also reaps orphans when the daemon is PID 1); nothing polls for them. Signals for the main process
go through that pidfd too, never by pid number (a reaped pid may be another user's process).

Containment: whatever a user does to what they own can make an effect fail. Every per-user effect
- the actions, re-adoption, exit handling, readiness, retries, a tier change, sampling, log
rotation, saving state - runs through one boundary (:meth:`SessionManager._handle` for actions,
:meth:`SessionManager._contained` for the tasks and steps around them) that turns any error but
cancellation into that user's state (``UserSession.on_effect_failed``: BACKOFF, then FATAL, with
the reason), logs it once and never lets it reach the daemon's nursery.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

from supervisor import idesocket, launch, logfiles, metrics
from supervisor.cgroups import CgroupDriver, Limits, SpareGroups
from supervisor.cgroups.base import Usage
from supervisor.config import Config, TierConfig
from supervisor.errors import CgroupError, InvalidTransition, SupervisorError, UnknownUser, UnsafePath
from supervisor.launchpool import LauncherPool, PrepareNetwork
from supervisor.sandbox import Account, Mechanisms, Sandbox
from supervisor.paths import UserPaths, ensure_user_dirs, resolve_uid, user_paths, validate_user_id
from supervisor.sessions import (
    LIVE,
    Action,
    CancelRetry,
    Cleanup,
    ExitInfo,
    Freeze,
    KillTree,
    Pod,
    RestartPolicy,
    ScheduleRetry,
    Spawn,
    State,
    Terminate,
    Thaw,
    UserSession,
)
from supervisor.statefile import StateStore, UserRecord

log = logging.getLogger(__name__)
#: How each action is named in a failure's reason (and the effect label of the failures metric).
EFFECTS: dict[type, str] = {
    Spawn: "start", Terminate: "stop (SIGTERM)", KillTree: "kill the tree", Cleanup: "clean up",
    ScheduleRetry: "schedule a retry", CancelRetry: "cancel the retry", Freeze: "freeze", Thaw: "thaw",
}


class Reaper:
    """Collects exit statuses of the daemon's children (and, as PID 1, reaps every orphan).

    ``managed(pid)`` tells whether a pid is a user's main process, whose status is kept until
    :meth:`pop`; any other child (an orphan re-parented to PID 1) is reaped and counted.
    """

    def __init__(self, managed: Callable[[int], bool]) -> None:
        self.managed = managed
        self.statuses: dict[int, int] = {}
        self.orphans_reaped = 0

    def collect(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.managed(pid):
                self.statuses[pid] = status
            else:
                self.orphans_reaped += 1

    def pop(self, pid: int) -> int | None:
        """The exit status of ``pid`` (a managed child), or None if it was not our child."""
        self.collect()
        return self.statuses.pop(pid, None)


def limits_for(tier: TierConfig, *, starting: bool = False) -> Limits:
    """The cgroup limits of a tier; while STARTING the CPU may be boosted to ``start_cpu``."""
    cpu = max(tier.cpu, tier.start_cpu) if starting else tier.cpu
    return Limits(
        cpu_millicores=cpu,
        memory_bytes=tier.memory,
        memory_high_bytes=int(tier.memory * tier.memory_high) if tier.memory_high < 1 else None,
        pids=tier.pids,
    )


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def exit_info(status: int | None, oom: bool) -> ExitInfo:
    if status is None:
        return ExitInfo(oom=oom)
    if os.WIFSIGNALED(status):
        return ExitInfo(signal=os.WTERMSIG(status), oom=oom)
    return ExitInfo(code=os.waitstatus_to_exitcode(status), oom=oom)


async def probe_http(socket_path: Path, timeout: float = 5.0) -> bool:
    """True once something answers ``GET /`` with an HTTP status line on ``socket_path``."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        with trio.move_on_after(timeout):
            try:
                await sock.connect(str(socket_path))
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
                    return False
                raise
            await sock.send(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = await sock.recv(16)
            return data.startswith(b"HTTP/1.")
        return False
    except OSError:
        return False
    finally:
        sock.close()


@dataclass
class UserRuntime:
    """Effects-side facts about one user (the decisions live in ``session``)."""

    session: UserSession
    uid: int
    gid: int
    paths: UserPaths
    socket_path: Path  # the daemon's (supervisor.idesocket), in a directory only root can enter
    log_path: Path
    lock: trio.Lock = field(default_factory=trio.Lock)
    pid_start: int | None = None
    oom_baseline: int = 0
    oom_kills: int = 0
    memory_bytes: int = 0
    cpu_usage_us: int = 0
    cpu_sampled_at: float | None = None  # when cpu_usage_us was read (None: no baseline yet)
    cpu_millicores: int = 0  # CPU rate between the last two samples
    restarts_counted: int = 0  # session.restarts already counted in the restarts metric
    started_wall: float | None = None
    running_since_wall: float | None = None
    retry_scope: trio.CancelScope | None = None
    #: The main process's pidfd while it is ``session.pid`` (owned and closed by its exit watcher).
    pidfd: int | None = None

    def signal(self, signum: int) -> bool:
        """Send ``signum`` to the main process through its pidfd; False when there is none (any
        more). Never by pid number: once reaped, that pid may be another user's process."""
        if self.pidfd is None or self.session.pid is None:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            return False
        return True


class SessionManager:
    """Runs every user's IDE; the single owner of users' processes and cgroups."""

    def __init__(
        self, config: Config, driver: CgroupDriver, *, clock: Callable[[], float] = time.monotonic,
        sandbox: Sandbox | None = None, prepare_network: PrepareNetwork | None = None,
    ) -> None:
        self.config = config
        self.driver = driver
        self.clock = clock
        #: Each user's own view of the machine (supervisor.sandbox); mechanisms all off: the pod's.
        self.sandbox = sandbox or Sandbox(Mechanisms())
        self.pod = Pod(capacity=config.pod.capacity)
        self.runtimes: dict[str, UserRuntime] = {}
        self.reaper = Reaper(self._is_managed)
        #: Launchers already inside spare cgroups (v1 only: see supervisor.launchpool); None when off.
        #: With a sandbox every start goes through a launcher (a fresh one when none is ready).
        self.pool: LauncherPool | None = None
        spares = driver if config.ide.launcher_pool > 0 and isinstance(driver, SpareGroups) else None
        if spares is not None or self.sandbox.mechanisms.any:
            self.pool = LauncherPool(
                spares, config.ide.launcher_pool, reap=self.reaper.pop,
                clone_flags=self.sandbox.mechanisms.clone_flags(), prepare_network=prepare_network,
            )
        self.store = StateStore(config.daemon.state_dir)
        self.policy = RestartPolicy(
            healthy_after=config.restart.healthy_after,
            backoff_initial=config.restart.backoff_initial,
            backoff_max=config.restart.backoff_max,
            max_failures=config.restart.max_failures,
        )
        self.started_wall = time.time()
        self.oom_kills_total = 0
        self.cgroup_error: str | None = None  # the latest cgroup failure (readiness), until one succeeds
        #: Extra sections of pod_info(), e.g. "registry" and "probes" (set by the daemon).
        self.info_providers: dict[str, Callable[[], Any]] = {}
        #: Extra per-user fields of describe(), e.g. the idle ladder's (set by the daemon).
        self.user_info_providers: list[Callable[[str], dict[str, Any]]] = []
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    # ---- service ---------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[SessionManager] = trio.TASK_STATUS_IGNORED) -> None:
        """Prepare cgroups, re-adopt surviving users, then run until cancelled."""
        root = self.config.workspace.root
        if not root.is_dir():
            raise UnsafePath(
                f"workspace root {root} does not exist or is not a directory",
                hint="mount the shared workspace volume there (or create it), or set [workspace] root",
            )
        self.store.open()
        self.driver.prepare()
        log.info("cgroups: %s", self.driver.describe())
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._sigchld_loop)
            if self.pool is not None:
                await nursery.start(self.pool.serve)
            idesocket.remove_legacy(self.config.daemon.run_dir)
            await self._adopt_all()
            await self._restart_unreachable()
            nursery.start_soon(self._sample_loop)
            task_status.started(self)

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None, "SessionManager.serve() is not running"
        return self._nursery

    async def _sigchld_loop(self) -> None:
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            self.reaper.collect()
            async for _ in signals:
                self.reaper.collect()

    def _is_managed(self, pid: int) -> bool:
        if self.pool is not None and self.pool.owns(pid):
            return True
        return any(rt.session.pid == pid for rt in self.runtimes.values())

    async def _sample_loop(self) -> None:
        while True:
            await trio.sleep(self.config.daemon.usage_interval)
            self.sample_usage()

    def sample_usage(self) -> None:
        """Refresh usage of every live user; notice OOM kills of non-main processes; rotate logs."""
        read = failed = 0
        for rt in list(self.runtimes.values()):
            if rt.session.user in self.store.failing:
                self._contain_now(rt, "save its state", self._save, rt)  # the retry of a failed save
            if rt.session.state not in LIVE:
                continue
            try:
                usage = self.driver.usage(rt.session.user)
            except CgroupError as exc:
                log.warning("user=%s cannot read cgroup usage: %s", rt.session.user, exc)
                self.cgroup_error, failed = str(exc), failed + 1
                continue
            read += 1
            self._contain_now(rt, "account usage", self._account, rt, usage)
            self._contain_now(rt, "rotate its log", logfiles.rotate_if_needed, rt.log_path,
                              self.config.daemon.log_max_bytes, self.config.daemon.log_backups)
        if read and not failed:
            self.cgroup_error = None

    def _account(self, rt: UserRuntime, usage: Usage) -> None:
        rt.memory_bytes = usage.memory_bytes
        self._account_cpu(rt, usage.cpu_usage_us)
        self._count_ooms(rt, usage.oom_kills)

    def _count_ooms(self, rt: UserRuntime, cgroup_oom_kills: int) -> None:
        """Count the OOM kills of the tree not counted yet (the sampler and exit handling share it)."""
        new = cgroup_oom_kills - rt.oom_baseline - rt.oom_kills
        if new <= 0:
            return
        rt.oom_kills += new
        self.oom_kills_total += new
        metrics.OOM_KILLS.labels(tier=rt.session.tier).inc(new)
        log.warning(
            "user=%s OOM: the kernel killed %d process(es) in the tree at the %s memory limit",
            rt.session.user, new, rt.session.tier,
        )

    def _account_cpu(self, rt: UserRuntime, cpu_usage_us: int) -> None:
        """Add the CPU used since the last sample to the per-tier counter; update the user's rate.
        A counter below the last one means a new cgroup: all of it is new use."""
        now = self.clock()
        if rt.cpu_sampled_at is not None:
            used = cpu_usage_us - rt.cpu_usage_us if cpu_usage_us >= rt.cpu_usage_us else cpu_usage_us
            metrics.CGROUP_CPU.labels(tier=rt.session.tier).inc(used / 1e6)
            elapsed = now - rt.cpu_sampled_at
            rt.cpu_millicores = round(used / 1000 / elapsed) if elapsed > 0 else 0
        rt.cpu_usage_us, rt.cpu_sampled_at = cpu_usage_us, now

    # ---- operator verbs --------------------------------------------------------------------

    def runtime(self, user: str) -> UserRuntime:
        validate_user_id(user)
        try:
            return self.runtimes[user]
        except KeyError:
            raise UnknownUser(f"unknown user {user!r}: this daemon has never started it") from None

    async def start(self, user: str, tier: str | None = None, *, wait: bool = True) -> dict[str, Any]:
        """Start ``user`` (or change its tier in place); with ``wait``, return once it is RUNNING
        or has failed. Raises CapacityExceeded/Draining/UnknownTier before touching anything."""
        validate_user_id(user)
        rt = self.runtimes.get(user)
        tier_name = tier or (rt.session.tier if rt else "free")
        tier_config = self.config.tier(tier_name)
        self.pod.check_admission(user)
        if rt is None:
            rt = self._new_runtime(user, tier_name)
        async with rt.lock:
            if tier_name != rt.session.tier:
                await self._contained_locked(rt, "change its tier", self._change_tier, rt, tier_name, tier_config)
            actions = rt.session.on_start(self.clock())
            if any(isinstance(a, Spawn) for a in actions):
                metrics.COLD_STARTS.labels(tier=tier_name).inc()
            await self._handle(rt, actions)
        if wait:
            await self.wait_for(user, lambda s: s.state is not State.STARTING, self.config.ide.ready_timeout + 5)
        return self.describe(rt)

    async def stop(self, user: str, *, wait: bool = True) -> dict[str, Any]:
        rt = self.runtime(user)
        async with rt.lock:
            await self._handle(rt, rt.session.on_stop(self.clock(), self.config.ide.stop_grace))
        if wait:
            await self.wait_for(user, lambda s: s.state not in LIVE, self.config.ide.stop_grace + 30)
        return self.describe(rt)

    async def restart(self, user: str) -> dict[str, Any]:
        await self.stop(user)
        return await self.start(user)

    async def pause(self, user: str) -> dict[str, Any]:
        rt = self.runtime(user)
        async with rt.lock:
            await self._handle(rt, rt.session.on_pause(self.clock()))
        return self.describe(rt)

    async def resume(self, user: str) -> dict[str, Any]:
        rt = self.runtime(user)
        async with rt.lock:
            await self._handle(rt, rt.session.on_resume(self.clock()))
        return self.describe(rt)

    def send_signal(self, user: str, signum: int) -> dict[str, Any]:
        rt = self.runtime(user)
        pid = rt.session.pid
        if pid is None or rt.session.state not in LIVE or not rt.signal(signum):
            raise InvalidTransition(f"user {user} has no running process (state {rt.session.state.value})")
        log.info("user=%s sent signal %s to pid %d", user, signal.Signals(signum).name, pid)
        return self.describe(rt)

    async def stop_all(self, deadline: float) -> None:
        """Stop every live user gracefully at once; kill what is left when ``deadline`` passes."""
        live = [rt for rt in self.runtimes.values() if rt.session.state not in (State.STOPPED, State.EXITED, State.FATAL)]
        grace = min(self.config.ide.stop_grace, max(0.0, deadline - 1.0))
        with trio.move_on_after(deadline):
            async with trio.open_nursery() as nursery:
                for rt in live:
                    nursery.start_soon(self._contained, rt, "stop", self._stop_one, rt, grace)
        for rt in live:
            if rt.session.state in LIVE:
                log.error("user=%s did not stop within the shutdown deadline; killing its tree", rt.session.user)
                await self._contained(rt, "kill the tree", self._kill_now, rt)

    async def _stop_one(self, rt: UserRuntime, grace: float) -> None:
        async with rt.lock:
            await self._handle(rt, rt.session.on_stop(self.clock(), grace))
        await self.wait_for(rt.session.user, lambda s: s.state not in LIVE, grace + 30)

    async def wait_for(self, user: str, predicate: Callable[[UserSession], bool], timeout: float) -> None:
        rt = self.runtimes[user]
        with trio.move_on_after(timeout):
            while not predicate(rt.session):
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ---- runtime construction and adoption -------------------------------------------------

    def _new_runtime(self, user: str, tier: str) -> UserRuntime:
        ws = self.config.workspace
        paths = user_paths(ws.root, ws.shards, user)
        uid = resolve_uid(ws.root, ws.shards, user, self.config.users.uid_min, self.config.users.uid_max)
        rt = UserRuntime(
            session=UserSession(user=user, tier=tier, policy=self.policy),
            uid=uid,
            gid=uid,
            paths=paths,
            socket_path=idesocket.socket_path(self.config.daemon.run_dir, user),
            log_path=self.config.daemon.log_dir / f"{user}.log",
        )
        self.runtimes[user] = rt
        self.pod.users[user] = rt.session
        return rt

    def _change_tier(self, rt: UserRuntime, tier_name: str, tier: TierConfig) -> None:
        old = rt.session.tier
        rt.session.tier = tier_name
        if rt.session.state in LIVE and self.driver.exists(rt.session.user):
            self.driver.set_limits(rt.session.user, limits_for(tier, starting=rt.session.state is State.STARTING))
        log.info("user=%s tier %s -> %s (limits rewritten in place)", rt.session.user, old, tier_name)
        self._save(rt)

    async def _adopt_all(self) -> None:
        """Take over users a previous daemon left running; kill cgroups nobody accounts for."""
        now, wall = self.clock(), time.time()
        for record in self.store.load_all():
            if record.tier not in self.config.tiers:
                log.warning("user=%s state file names unknown tier %r; using 'free'", record.user, record.tier)
            rt = self._new_runtime_from(record)
            self._contain_now(rt, "re-adopt", self._adopt, rt, record, now, wall)
        for user in self.driver.users():
            if user not in self.runtimes or self.runtimes[user].session.state not in LIVE:
                log.warning("user=%s cgroup with no live process on record: killing the orphaned tree", user)
                try:  # nobody's state to put it in: logged
                    await self._off_loop(self._kill_tree, user)
                except (CgroupError, OSError) as exc:
                    log.error("user=%s cannot kill the orphaned tree: %s", user, exc)
                await self._wait_empty(user)
                await self._remove_cgroup(user)

    def _adopt(self, rt: UserRuntime, record: UserRecord, now: float, wall: float) -> None:
        session = rt.session
        session.state = State(record.state)
        session.since = now
        if record.running_since_wall is not None:
            session.running_since = now - (wall - record.running_since_wall)
            rt.running_since_wall = record.running_since_wall
        rt.started_wall = record.started_wall
        if session.state not in LIVE:
            if session.state is State.BACKOFF:
                self._task(rt, "retry", self._handle_locked, rt, session.on_retry_due)
            return
        # The pidfd first, then the start time: if they match, the pidfd is the recorded process
        # (one that took its pid number since would have started later).
        pid = record.pid
        pidfd = _pidfd_open(pid) if pid is not None else None
        if pid is None or pidfd is None or launch.process_start_time(pid) != record.pid_start or not self.driver.exists(record.user):
            if pidfd is not None:
                os.close(pidfd)
            log.warning("user=%s was %s but its process is gone", record.user, record.state)
            session.state = State.STARTING if session.state is State.STARTING else State.RUNNING
            self._task(rt, "handle its exit", self._handle_locked, rt, lambda now: rt.session.on_exit(now, ExitInfo()))
            return
        session.pid, rt.pidfd = pid, pidfd
        self._task(rt, "watch its exit", self._watch_exit, rt, record.pid, pidfd)
        rt.pid_start = record.pid_start
        rt.oom_baseline = self.driver.usage(record.user).oom_kills
        if self.driver.is_frozen(record.user):
            session.state = State.PAUSED
        if session.state is State.STARTING:
            self._task(rt, "wait for readiness", self._await_ready, rt, record.pid)
        elif session.state is State.STOPPING:
            session.state = State.RUNNING  # stop it again from the top: SIGTERM, grace, kill
            self._task(rt, "stop", self._stop_one, rt, self.config.ide.stop_grace)
        log.info("user=%s re-adopted pid %d in state %s", record.user, record.pid, session.state.value)

    async def _restart_unreachable(self) -> None:
        """Restart (kill; the exit handling starts it again) every adopted IDE that does not hold
        the daemon's socket - started by an older daemon, whose IDEs bound their own sockets in
        directories their users could change (``idesocket.remove_legacy`` removed those)."""
        for rt in list(self.runtimes.values()):
            if rt.session.state in LIVE and rt.session.pid is not None and not idesocket.is_socket(rt.socket_path):
                log.warning("user=%s adopted IDE has no socket at %s: restarting it", rt.session.user, rt.socket_path)
                await self._kill_now(rt)

    async def _handle_locked(self, rt: UserRuntime, event: Callable[[float], list[Action]]) -> None:
        async with rt.lock:
            await self._handle(rt, event(self.clock()))

    def _new_runtime_from(self, record: UserRecord) -> UserRuntime:
        ws = self.config.workspace
        tier = record.tier if record.tier in self.config.tiers else "free"
        rt = UserRuntime(
            session=UserSession(user=record.user, tier=tier, policy=self.policy, restarts=record.restarts, reason=record.reason),
            uid=record.uid,
            gid=record.gid,
            restarts_counted=record.restarts,
            paths=user_paths(ws.root, ws.shards, record.user),
            socket_path=idesocket.socket_path(self.config.daemon.run_dir, record.user),
            log_path=self.config.daemon.log_dir / f"{record.user}.log",
        )
        self.runtimes[record.user] = rt
        self.pod.users[record.user] = rt.session
        return rt

    # ---- carrying out actions --------------------------------------------------------------

    async def _handle(self, rt: UserRuntime, actions: list[Action]) -> None:
        """Carry out ``actions`` (caller holds ``rt.lock``), then persist and notify waiters. The
        first action that raises ends the list and becomes the user's state (:meth:`_fail`)."""
        for action in actions:
            try:
                await self._execute(rt, action)
            except Exception as exc:  # noqa: BLE001 - the containment boundary
                await self._fail(rt, EFFECTS[type(action)], exc)
                return
        self._settle(rt)

    def _settle(self, rt: UserRuntime) -> None:
        self._count_restarts(rt)
        self._save(rt)
        self._notify()

    # ---- the containment boundary ------------------------------------------------------------

    async def _fail(self, rt: UserRuntime, what: str, exc: Exception) -> None:
        """The one place where an effect that failed for a user becomes its state (caller holds
        ``rt.lock``): logged once, counted, then ``on_effect_failed``'s actions, each tried once -
        a failure while handling a failure is logged, never handled again (no loop)."""
        user = rt.session.user
        expected = isinstance(exc, (OSError, SupervisorError))
        reason = f"{what} failed: {exc if expected else f'{type(exc).__name__}: {exc}'}"
        log.error("user=%s %s", user, reason, exc_info=None if expected else exc)
        metrics.EFFECT_FAILURES.labels(effect=what).inc()
        if isinstance(exc, CgroupError):
            self.cgroup_error = str(exc)
        for action in rt.session.on_effect_failed(self.clock(), reason):
            try:
                await self._execute(rt, action)
            except Exception as again:  # noqa: BLE001
                log.error("user=%s %s failed too, handling that failure: %s", user, EFFECTS[type(action)], again)
        self._settle(rt)

    def _task(self, rt: UserRuntime, what: str, effect: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run a per-user task in the manager's nursery, its errors contained (:meth:`_contained`)."""
        self.nursery.start_soon(self._contained, rt, what, effect, *args)

    async def _contained(self, rt: UserRuntime, what: str, effect: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await effect(*args)
        except Exception as exc:  # noqa: BLE001 - the containment boundary
            await self._fail_locked(rt, what, exc)

    async def _contained_locked(self, rt: UserRuntime, what: str, effect: Callable[..., None], *args: Any) -> None:
        """Run a synchronous per-user step while holding ``rt.lock``, its errors contained."""
        try:
            effect(*args)
        except Exception as exc:  # noqa: BLE001 - the containment boundary
            await self._fail(rt, what, exc)

    def _contain_now(self, rt: UserRuntime, what: str, effect: Callable[..., object], *args: Any) -> None:
        """Run a synchronous per-user step outside the lock; a failure is handled in a task."""
        try:
            effect(*args)
        except Exception as exc:  # noqa: BLE001 - the containment boundary
            self.nursery.start_soon(self._fail_locked, rt, what, exc)

    async def _fail_locked(self, rt: UserRuntime, what: str, exc: Exception) -> None:
        try:
            async with rt.lock:
                await self._fail(rt, what, exc)
        except Exception:  # noqa: BLE001 - the last guard: nothing reaches the daemon's nursery
            log.exception("user=%s handling a failure of %s failed", rt.session.user, what)

    @staticmethod
    def _count_restarts(rt: UserRuntime) -> None:
        """Count automatic restarts the state machine decided since the last call (by how the
        process ended); an operator's start resets the session's count and the baseline."""
        s = rt.session
        if s.restarts > rt.restarts_counted:
            last = s.last_exit
            reason = (
                "unknown" if last is None else "oom" if last.oom else "signal" if last.signal is not None
                else "exit" if last.code is not None else "unknown"
            )
            metrics.RESTARTS.labels(tier=s.tier, reason=reason).inc(s.restarts - rt.restarts_counted)
        rt.restarts_counted = s.restarts

    async def _execute(self, rt: UserRuntime, action: Action) -> None:
        user = rt.session.user
        if isinstance(action, Spawn):
            await self._spawn(rt)
        elif isinstance(action, Terminate):
            if self.driver.exists(user) and self.driver.is_frozen(user):
                await self._off_loop(self.driver.thaw, user)  # frozen by the idle ladder: SIGTERM must reach it
            if rt.session.pid is not None:
                rt.signal(signal.SIGTERM)
                self._task(rt, "kill after the grace", self._kill_after_grace, rt, rt.session.pid, action.grace)
        elif isinstance(action, KillTree):
            if self.driver.exists(user):
                await self._off_loop(self.driver.kill, user)
                await self._wait_empty(user)
        elif isinstance(action, Cleanup):
            await self._remove_cgroup(user)
            self._remove_socket(rt)
        elif isinstance(action, ScheduleRetry):
            rt.retry_scope = trio.CancelScope()
            self._task(rt, "retry", self._retry_after, rt, action.delay, rt.retry_scope)
        elif isinstance(action, CancelRetry):
            if rt.retry_scope is not None:
                rt.retry_scope.cancel()
                rt.retry_scope = None
        elif isinstance(action, Freeze):
            await self._off_loop(self.driver.freeze, user)
            log.info("user=%s frozen", user)
        elif isinstance(action, Thaw):
            if self.driver.exists(user):
                await self._off_loop(self.driver.thaw, user)
                log.info("user=%s thawed", user)

    @staticmethod
    async def _off_loop(wait_for_kernel: Callable[[str], None], user: str) -> None:
        """A driver call that waits for the kernel, in a worker thread: freezing, thawing, killing
        a tree and removing its groups poll until the kernel is done, which takes up to the
        driver's ``wait_timeout`` (v1 kill: rounds of it) when a task of ``user`` is in
        uninterruptible sleep (e.g. on NFS) - every other user's work must go on meanwhile."""
        await trio.to_thread.run_sync(wait_for_kernel, user)

    async def _spawn(self, rt: UserRuntime) -> None:
        """Start the tree (a failure is the boundary's: :meth:`_handle`)."""
        session = rt.session
        user = session.user
        tier = self.config.tier(session.tier)
        ensure_user_dirs(rt.paths, self.config.workspace.root, rt.uid, rt.gid)
        listener = idesocket.listen(self.config.daemon.run_dir, user)  # a fresh one every spawn
        try:
            limits = limits_for(tier, starting=True)
            account = Account(user=user, uid=rt.uid, gid=rt.gid, home=rt.paths.home, shell=self.config.ide.shell)
            spec = launch.build_spec(
                user=user, uid=rt.uid, gid=rt.gid,
                command=self.config.ide.command, extra_env=self.config.ide.env, shell=self.config.ide.shell,
                workspace=rt.paths.workspace, home=rt.paths.home,
                procs_files=self.driver.procs_files(user), log_path=rt.log_path,
                view=self.sandbox.view_for(account, self.config.workspace.root, tier.tmp_size),
            )
            # A ready launcher whose spare group becomes the user's; else join the group before exec
            # (a user with a view of their own: through a launcher started in the group now).
            pid = await self.pool.launch(spec, limits, listener.fileno()) if self.pool is not None else None
            if pid is None:
                self.driver.create(user, limits)
                if spec.view is not None and self.pool is not None:
                    pid = await self.pool.launch_fresh(spec, listener.fileno())
                else:
                    pid = launch.spawn(spec, listener.fileno())
        finally:
            listener.close()  # the IDE has its own copy now
        self.cgroup_error = None
        pidfd = os.pidfd_open(pid)  # our unreaped child: it cannot be gone yet
        session.on_spawned(pid)
        rt.pidfd = pidfd
        self._task(rt, "watch its exit", self._watch_exit, rt, pid, pidfd)
        try:  # a fresh group, or one emptied by KillTree: the new tree has had no time to OOM
            usage = self.driver.usage(user)
            rt.oom_baseline, rt.oom_kills = usage.oom_kills, 0
            rt.cpu_usage_us, rt.cpu_sampled_at = usage.cpu_usage_us, self.clock()
        except CgroupError as exc:
            log.warning("user=%s cannot read cgroup usage after the spawn: %s", user, exc)
        rt.pid_start = launch.process_start_time(pid)
        rt.started_wall = time.time()
        rt.running_since_wall = None
        log.info("user=%s spawned pid %d (tier %s, uid %d): %s", user, pid, session.tier, rt.uid, session.reason)
        self._task(rt, "wait for readiness", self._await_ready, rt, pid)

    async def _watch_exit(self, rt: UserRuntime, pid: int, pidfd: int) -> None:
        """Wait for the main process to end; then no signal can reach it (or its pid's next owner)."""
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            if rt.pidfd == pidfd:
                rt.pidfd = None
            os.close(pidfd)
        status = self.reaper.pop(pid)
        # Killed by SIGKILL (or status unknown) while the kernel counted an OOM kill in this
        # tree since it was spawned: the OOM killer took the main process.
        killed = status is None or (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL)
        try:
            if self.driver.exists(rt.session.user):
                self._count_ooms(rt, self.driver.usage(rt.session.user).oom_kills)
        except CgroupError:
            pass
        oom = killed and rt.oom_kills > 0
        info = exit_info(status, oom)
        async with rt.lock:
            if rt.session.pid != pid:
                return
            level = logging.INFO if rt.session.state is State.STOPPING else logging.WARNING
            log.log(level, "user=%s pid %d %s (state %s)", rt.session.user, pid, info.describe(), rt.session.state.value)
            await self._handle(rt, rt.session.on_exit(self.clock(), info))

    async def _await_ready(self, rt: UserRuntime, pid: int) -> None:
        try:
            if await self._probe_until_ready(rt, pid):
                await self._on_ready(rt, pid)
        finally:
            if self.pool is not None:
                self.pool.settled(pid)

    async def _on_ready(self, rt: UserRuntime, pid: int) -> None:
        async with rt.lock:
            if rt.session.pid != pid:
                return
            rt.running_since_wall = time.time()
            if rt.session.started_at is not None:
                metrics.SPAWN_DURATION.labels(tier=rt.session.tier).observe(self.clock() - rt.session.started_at)
            await self._handle(rt, rt.session.on_ready(self.clock()))
        log.info("user=%s RUNNING (pid %d)", rt.session.user, pid)
        # The STARTING CPU boost ends - one turn of the event loop later, so that the answer to
        # whoever waited for RUNNING goes out first (trio runs the woken waiter in the next batch,
        # in either order with this task; the lock below is the second checkpoint).
        if self.config.tier(rt.session.tier).start_cpu > self.config.tier(rt.session.tier).cpu:
            await trio.lowlevel.checkpoint()
            async with rt.lock:
                if rt.session.pid == pid and rt.session.state in LIVE:
                    await self._contained_locked(rt, "end the start-up CPU boost", self.driver.set_limits,
                                                 rt.session.user, limits_for(self.config.tier(rt.session.tier)))

    async def _probe_until_ready(self, rt: UserRuntime, pid: int) -> bool:
        """Probe ``GET /`` until it answers (True), or until this attempt is over or timed out (False).

        The daemon listened on the socket before the IDE ran, so the probe's connection waits in
        the queue and is answered the moment the IDE accepts it: no polling, no wake-up delay. A
        probe that fails (refused, or closed unanswered) is repeated after a short back-off; the
        attempt ending (exit, stop) cancels the wait."""
        timeout = self.config.ide.ready_timeout
        answered = False
        with trio.move_on_after(timeout) as timer:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._cancel_when_over, rt, pid, nursery.cancel_scope)
                delay = 0.001
                while not await probe_http(rt.socket_path, timeout):
                    await trio.sleep(delay)
                    delay = min(delay * 2, 0.05)
                answered = True
                nursery.cancel_scope.cancel()
        if timer.cancelled_caught:
            async with rt.lock:
                if rt.session.pid == pid and rt.session.state is State.STARTING:
                    log.error("user=%s not ready within %gs; killing this attempt", rt.session.user, timeout)
                    await self._handle(rt, rt.session.on_ready_timeout(self.clock(), timeout))
        return answered

    async def _cancel_when_over(self, rt: UserRuntime, pid: int, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` once the start attempt of ``pid`` is over (it exited, or was stopped)."""
        await self.wait_for(rt.session.user, lambda s: s.pid != pid or s.state is not State.STARTING, math.inf)
        scope.cancel()

    async def _kill_after_grace(self, rt: UserRuntime, pid: int, grace: float) -> None:
        await trio.sleep(grace)
        if rt.session.pid == pid and rt.session.state is State.STOPPING:
            log.warning("user=%s did not exit %gs after SIGTERM; killing the tree", rt.session.user, grace)
            await self._kill_now(rt)

    async def _retry_after(self, rt: UserRuntime, delay: float, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(delay)
            async with rt.lock:
                if rt.retry_scope is scope:
                    rt.retry_scope = None
                    await self._handle(rt, rt.session.on_retry_due(self.clock()))

    async def _wait_empty(self, user: str, timeout: float = 10.0) -> None:
        delay = 0.001
        with trio.move_on_after(timeout):
            while self.driver.pids(user):
                await trio.sleep(delay)
                delay = min(delay * 2, 0.05)
            return
        log.error("user=%s processes still in the cgroup %gs after kill: %s", user, timeout, self.driver.pids(user))

    async def _kill_now(self, rt: UserRuntime) -> None:
        await self._off_loop(self._kill_tree, rt.session.user)

    def _kill_tree(self, user: str) -> None:
        if self.driver.exists(user):
            if self.driver.is_frozen(user):
                self.driver.thaw(user)
            self.driver.kill(user)

    async def _remove_cgroup(self, user: str) -> None:
        try:
            await self._off_loop(self.driver.remove, user)
        except (CgroupError, OSError) as exc:
            log.error("user=%s cannot remove its cgroup: %s", user, exc)

    def _remove_socket(self, rt: UserRuntime) -> None:
        try:
            idesocket.remove(self.config.daemon.run_dir, rt.session.user)
        except OSError as exc:
            log.warning("user=%s cannot remove %s: %s", rt.session.user, rt.socket_path, exc)

    def _save(self, rt: UserRuntime) -> None:
        s = rt.session
        if s.state is State.STOPPED:
            saved = self.store.delete(s.user)
        else:
            saved = self.store.save(UserRecord(
                user=s.user, tier=s.tier, uid=rt.uid, gid=rt.gid, state=s.state.value, pid=s.pid,
                pid_start=rt.pid_start if s.pid else None, restarts=s.restarts,
                running_since_wall=rt.running_since_wall, started_wall=rt.started_wall, reason=s.reason,
            ))
        if not saved:  # kept in memory; retried on the next save and by the sampler
            metrics.STATE_SAVE_FAILURES.inc()

    # ---- reading -------------------------------------------------------------------------------

    def describe(self, rt: UserRuntime) -> dict[str, Any]:
        """One user's status as `workspacectl status --json` shows it."""
        s = rt.session
        tier = self.config.tiers.get(s.tier)
        uptime = self.clock() - s.running_since if s.running_since is not None and s.state in (State.RUNNING, State.PAUSED) else 0.0
        return {
            "user": s.user,
            "state": s.state.value,
            "pid": s.pid,
            "tier": s.tier,
            "shard": rt.paths.shard,
            "workspace": str(rt.paths.workspace),
            "uid": rt.uid,
            "memory_bytes": rt.memory_bytes,
            "memory_limit_bytes": tier.memory if tier else None,
            "cpu_limit_millicores": tier.cpu if tier else None,
            "restarts": s.restarts,
            "uptime_s": round(uptime, 3),
            "reason": s.reason,
            "last_exit": s.last_exit.describe() if s.last_exit else None,
            "oom_kills": rt.oom_kills,
            "log": str(rt.log_path),
            "state_file_error": self.store.failing.get(s.user),
            **{k: v for provider in self.user_info_providers for k, v in provider(s.user).items()},
        }

    def status(self, users: list[str] | None = None) -> list[dict[str, Any]]:
        """Every user (or the ones named); memory is as of the last sample (``usage_interval``)."""
        if users:
            return [self.describe(self.runtime(u)) for u in users]
        return [self.describe(rt) for rt in sorted(self.runtimes.values(), key=lambda rt: rt.session.user)]

    def pod_info(self) -> dict[str, Any]:
        return {
            "pod": self.config.pod_id,
            "capacity": self.pod.capacity,
            "occupied": self.pod.occupied(),
            "free_slots": self.pod.free_slots(),
            "draining": self.pod.draining,
            "users_by_state": self.pod.counts_by_state(),
            "cgroup_version": self.driver.version,
            "cgroup_driver": self.driver.describe(),
            "oom_kills": self.oom_kills_total,
            "orphans_reaped": self.reaper.orphans_reaped,
            "launcher_pool": self.pool.info() if self.pool is not None else None,
            "isolation": self.sandbox.describe(),
            "state_files_unsaved": dict(sorted(self.store.failing.items())),
            "uptime_s": round(time.time() - self.started_wall, 3),
            "pid": os.getpid(),
            **{name: provide() for name, provide in self.info_providers.items()},
        }
