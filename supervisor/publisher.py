"""The registry publisher: this pod's heartbeat to the occupancy registry.

Every ``[registry] heartbeat`` (and at once when something important changes, e.g. a drain starts)
the publisher builds a :class:`~supervisor.registry.PodRecord` from the session manager - capacity,
users occupying a slot, sessions, free slots, CPU and memory headroom, draining, cgroup version,
daemon version - and publishes it with the running users' ids, which renews the pod's lease
(``[registry] lease``) and claims their reservations. Session writes reported by the front door
(:meth:`Publisher.session_opened` / :meth:`Publisher.session_closed`) are queued and written with
the next heartbeat.

**A registry outage never disturbs running users.** Registry calls run in a worker thread
(``trio.to_thread.run_sync``, one at a time, abandoned on cancellation); a failure is counted
(``workspace_supervisor_registry_heartbeat_failures_total{reason}``), logged once when it starts
and once when it ends, shown by :meth:`Publisher.status` (``/readyz`` details and
``workspacectl pod``), and retried on the next tick. The queued session writes stay queued, and the
first heartbeat that succeeds publishes the pod's state as it is then: the registry catches up.
The daemon starts even when the registry cannot be opened; opening is retried every tick.

On a clean exit (a drain) :meth:`Publisher.withdraw` removes the pod's record, sessions and
reservations; a detaching daemon leaves them for its successor, and a crashed one's lease expires.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import trio

from supervisor import __version__, metrics
from supervisor.config import Config
from supervisor.podlimits import PodResources, pod_resources
from supervisor.registry import PodRecord, Registry, RegistryError, SessionRecord, open_registry
from supervisor.registry.errors import RegistryClosed, RegistryCorrupt, RegistryUnavailable
from supervisor.sessions import LIVE, OCCUPYING

if TYPE_CHECKING:
    from supervisor.manager import SessionManager

log = logging.getLogger(__name__)

#: Dead pods (lease expired this long ago) are swept from the registry every SWEEP_EVERY heartbeats.
SWEEP_GRACE_LEASES = 4
SWEEP_EVERY = 12
#: Longest wait for one registry call (a backend that ignores its own timeout is abandoned).
CALL_TIMEOUT = 10.0


# ---- where routers send browsers -------------------------------------------------------------------


def advertised_address(configured: str, bound: list[tuple[str, int]], host_ip: Callable[[], str | None]) -> str:
    """What routers are told to reach the front door at: ``configured`` if set; else the front
    door's first bound address, a wildcard host (0.0.0.0, ::) replaced by ``host_ip()``; "" when
    that gives nothing (front door off, no usable address)."""
    if configured:
        return configured
    if not bound:
        return ""
    host, port = bound[0]
    if ipaddress.ip_address(host).is_unspecified:
        found = host_ip()
        if not found:
            return ""
        host = found
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host_ip() -> str | None:
    """This host's address as other machines see it: its name resolved (the pod IP in Kubernetes),
    else the source address of its default route; None if both are loopback or unavailable.
    Blocking (name resolution): call it in a worker thread."""
    try:
        ip = socket.gethostbyname(socket.gethostname())
        if not ipaddress.ip_address(ip).is_loopback:
            return ip
    except OSError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, the kernel only picks a route
            ip = probe.getsockname()[0]
            if not ipaddress.ip_address(ip).is_loopback:
                return str(ip)
    except OSError:
        pass
    return None


# ---- status ----------------------------------------------------------------------------------------


@dataclass
class RegistryStatus:
    """How the registry has been answering this pod (shown in /readyz and `workspacectl pod`)."""

    backend: str
    state: str = "connecting"  # connecting | ok | unreachable | withdrawn
    failures: int = 0  # failed heartbeats since the daemon started
    consecutive_failures: int = 0
    last_error: str = ""  # "reason: message" of the latest failure
    last_success_wall: float | None = None
    last_latency_s: float | None = None
    pending_session_writes: int = 0

    @property
    def ok(self) -> bool:
        return self.state in ("ok", "withdrawn")

    def to_dict(self, now_wall: float) -> dict[str, Any]:
        age = None if self.last_success_wall is None else round(now_wall - self.last_success_wall, 3)
        return {
            "state": self.state,
            "backend": self.backend,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
            "last_success_age_s": age,
            "last_latency_s": None if self.last_latency_s is None else round(self.last_latency_s, 6),
            "pending_session_writes": self.pending_session_writes,
        }


# ---- the publisher ---------------------------------------------------------------------------------


@dataclass
class _Snapshot:
    record: PodRecord
    users: list[str]
    sessions: dict[str, SessionRecord | None] = field(default_factory=dict)  # pending writes (None = delete)


class Publisher:
    """Publishes the pod's occupancy every heartbeat; one per daemon (see the module docstring).

    ``opener`` opens the configured backend (default :func:`supervisor.registry.open_registry`);
    ``resources`` are the pod's CPU and memory (default :func:`supervisor.podlimits.pod_resources`,
    read when :meth:`serve` starts).
    """

    def __init__(
        self,
        config: Config,
        manager: SessionManager,
        *,
        opener: Callable[[], Registry] | None = None,
        resources: PodResources | None = None,
    ) -> None:
        self.config = config
        self.manager = manager
        self.opener = opener or (lambda: open_registry(config.registry))
        self.resources = resources
        self.registry: Registry | None = None  # touched only from the worker thread (limiter of 1)
        self.status_ = RegistryStatus(backend=self._describe_backend())
        # A safety net above the backends' own timeouts (5 s), so that their precise errors surface.
        self.timeout = max(CALL_TIMEOUT, config.registry.lease)
        self._limiter = trio.CapacityLimiter(1)
        self._wake = trio.Event()
        self._sessions: dict[str, SessionRecord] = {}
        self._pending: dict[str, SessionRecord | None] = {}
        self._withdrawn = False
        self._beats = 0
        #: Hook: the number of open browser sessions. Defaults to the sessions reported through
        #: :meth:`session_opened`; the front door may replace it with its own count.
        self.sessions_count: Callable[[], int] = lambda: len(self._sessions)
        #: How routers reach this pod's front door (see :func:`advertised_address`).
        self.address = config.pod.address

    def _describe_backend(self) -> str:
        r = self.config.registry
        return f"fdb ({r.fdb_cluster_file})" if r.backend == "fdb" else f"sqlite ({r.path})"

    # -- what the rest of the daemon calls -------------------------------------------------------

    def wake(self) -> None:
        """Publish now rather than at the next tick (e.g. the pod started draining)."""
        self._wake.set()

    def session_opened(self, session: SessionRecord) -> None:
        """Record a browser session (written with the next heartbeat; kept until it succeeds)."""
        self._sessions[session.session_id] = session
        self._pending[session.session_id] = session

    def session_closed(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        self._pending[session_id] = None

    def status(self) -> dict[str, Any]:
        self.status_.pending_session_writes = len(self._pending)
        return self.status_.to_dict(time.time())

    @property
    def healthy(self) -> bool:
        return self.status_.ok

    # -- the record ------------------------------------------------------------------------------

    def snapshot(self) -> _Snapshot:
        """The pod record as of now (read in the event loop; published from a worker thread)."""
        m = self.manager
        pod = m.pod
        live = [rt for rt in m.runtimes.values() if rt.session.state in LIVE]
        resources = self.resources or PodResources(cpu_millicores=0, memory_bytes=0)
        cpu_used = sum(rt.cpu_millicores for rt in live)
        memory_used = sum(rt.memory_bytes for rt in live)
        record = PodRecord(
            pod_id=self.config.pod_id,
            capacity=pod.capacity,
            active_users=pod.occupied(),
            sessions=max(0, int(self.sessions_count())),
            free_slots=0 if pod.draining else pod.free_slots(),
            cpu_headroom_millicores=max(0, resources.cpu_millicores - cpu_used),
            memory_headroom_bytes=max(0, resources.memory_bytes - memory_used),
            draining=pod.draining,
            cgroup_version=m.driver.version,
            daemon_version=__version__,
            address=self.address,
        )
        users = sorted(user for user, s in pod.users.items() if s.state in OCCUPYING)
        return _Snapshot(record=record, users=users, sessions=dict(self._pending))

    # -- the service ----------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Heartbeat until cancelled or withdrawn. Starts at once; never waits for the registry."""
        if self.resources is None:
            self.resources = pod_resources(self.config)
        log.info(
            "registry: %s, heartbeat %gs, lease %gs; pod resources %dm CPU, %d MiB",
            self.status_.backend, self.config.registry.heartbeat, self.config.registry.lease,
            self.resources.cpu_millicores, self.resources.memory_bytes // 2**20,
        )
        task_status.started()
        try:
            while not self._withdrawn:
                self._wake = trio.Event()
                await self.heartbeat()
                with trio.move_on_after(self.config.registry.heartbeat):
                    await self._wake.wait()
        finally:
            with trio.CancelScope(shield=True):
                await self._close()

    async def heartbeat(self) -> bool:
        """Publish once; True on success. Failures are counted and reported, never raised."""
        snapshot = self.snapshot()
        started = time.monotonic()
        try:
            with trio.fail_after(self.timeout):
                await self._in_thread(self._publish_sync, snapshot)
        except RegistryError as exc:
            self._failed(exc.reason, str(exc), time.monotonic() - started)
            return False
        except trio.TooSlowError:
            self._failed("timeout", f"no answer within {self.timeout:g}s", time.monotonic() - started)
            return False
        latency = time.monotonic() - started
        for session_id, written in snapshot.sessions.items():
            if self._pending.get(session_id, False) is written:  # not changed again meanwhile
                del self._pending[session_id]
        self._succeeded(latency)
        return True

    async def withdraw(self, timeout: float = 10.0) -> bool:
        """Stop heartbeating and remove the pod's record, sessions and reservations (clean exit).
        True when removed (or not registered); a failure is logged - the lease then expires."""
        self._withdrawn = True
        self.wake()
        pod_id = self.config.pod_id
        try:
            with trio.fail_after(timeout):
                await self._in_thread(self._remove_sync, pod_id)
        except (RegistryError, trio.TooSlowError) as exc:
            log.warning("registry: cannot remove pod %s on exit (%s); its lease expires in %gs",
                        pod_id, exc or "timed out", self.config.registry.lease)
            return False
        self.status_.state = "withdrawn"
        log.info("registry: pod %s removed (record, sessions, reservations)", pod_id)
        return True

    async def list_pods(self) -> list[PodRecord]:
        """Every pod with a live lease (for `workspacectl pods`); raises :class:`RegistryError`."""
        try:
            with trio.fail_after(self.timeout):
                pods: list[PodRecord] = await self._in_thread(self._list_sync)
                return pods
        except trio.TooSlowError:
            raise RegistryUnavailable(f"the registry did not answer within {self.timeout:g}s") from None

    # -- worker-thread side ----------------------------------------------------------------------

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter, abandon_on_cancel=True)

    def _open_sync(self) -> Registry:
        if self.registry is None:
            self.registry = self.opener()
        return self.registry

    def _guarded(self, fn: Callable[[Registry], Any]) -> Any:
        registry = self._open_sync()
        try:
            return fn(registry)
        except (RegistryClosed, RegistryCorrupt):
            self.registry = None  # reopen next time: the file may have been replaced
            try:
                registry.close()
            except RegistryError:
                pass
            raise

    def _publish_sync(self, snapshot: _Snapshot) -> None:
        if self._withdrawn:
            return

        def publish(registry: Registry) -> None:
            for session_id, session in snapshot.sessions.items():
                if session is None:
                    registry.remove_session(session_id)
                else:
                    registry.put_session(session)
            registry.publish_pod(snapshot.record, users=snapshot.users)
            self._beats += 1
            if self._beats % SWEEP_EVERY == 0:
                swept = registry.remove_expired_pods(grace=SWEEP_GRACE_LEASES * registry.lease)
                if swept:
                    log.info("registry: swept dead pods %s", ", ".join(swept))

        self._guarded(publish)

    def _remove_sync(self, pod_id: str) -> None:
        self._guarded(lambda registry: registry.remove_pod(pod_id))

    def _list_sync(self) -> list[PodRecord]:
        pods: list[PodRecord] = self._guarded(lambda registry: registry.list_pods())
        return pods

    async def _close(self) -> None:
        """Close the registry; gives up after a few seconds (a call stuck in a backend must not
        hold the daemon's exit)."""
        with trio.move_on_after(3.0):
            async with self._limiter:  # after any call still running in the worker thread
                registry, self.registry = self.registry, None
                if registry is not None:
                    try:
                        await trio.to_thread.run_sync(registry.close, abandon_on_cancel=True)
                    except RegistryError:
                        pass

    # -- bookkeeping -----------------------------------------------------------------------------

    def _failed(self, reason: str, message: str, latency: float) -> None:
        status = self.status_
        if status.consecutive_failures == 0:
            log.warning("registry: heartbeat failed (%s): %s; users are not affected, retrying every %gs",
                        reason, message, self.config.registry.heartbeat)
        else:
            log.debug("registry: heartbeat failed again (%s): %s", reason, message)
        status.state = "unreachable"
        status.failures += 1
        status.consecutive_failures += 1
        status.last_error = f"{reason}: {message}"
        status.last_latency_s = latency
        metrics.REGISTRY_FAILURES.labels(reason=reason).inc()
        metrics.REGISTRY_HEARTBEAT.observe(latency)
        metrics.REGISTRY_UP.set(0)

    def _succeeded(self, latency: float) -> None:
        status = self.status_
        if status.consecutive_failures:
            log.info("registry: reachable again after %d failed heartbeat(s); pod %s republished",
                     status.consecutive_failures, self.config.pod_id)
        status.state = "ok"
        status.consecutive_failures = 0
        status.last_success_wall = time.time()
        status.last_latency_s = latency
        metrics.REGISTRY_HEARTBEAT.observe(latency)
        metrics.REGISTRY_UP.set(1)
        metrics.REGISTRY_LAST_SUCCESS.set(status.last_success_wall)
