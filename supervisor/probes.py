"""The probe port (``[probes] listen``, default ``0.0.0.0:9100``): Prometheus metrics and the
Kubernetes probes, on a tiny HTTP/1.1 server (h11 on trio).

- ``GET /healthz`` (liveness): 200 ``ok`` whenever the event loop answers. Cheap: no I/O.
- ``GET /startupz`` (startup): 200 once re-adoption has finished and every service is up, else 503.
- ``GET /readyz`` (readiness = the pod serves the users it has): 200 or 503 with a JSON body. Not
  ready only while the daemon cannot serve: still starting, or its cgroup driver failing. A full or
  draining pod stays ready, so that a readinessProbe keeps its users in the Service; whether it
  admits new users is the body's ``admitting`` (with ``not_admitting`` reasons). A registry outage
  does not make the pod unready (it keeps serving and admitting the users routed to it); it is
  listed under ``degraded`` with the heartbeat failures.
- ``GET /admitting`` (for routers): the same body, 200 when the pod admits new users, else 503:
  starting, draining, full or cgroups failing.
- ``GET /metrics``: every metric of :mod:`supervisor.metrics` (the pod's gauges are refreshed
  from the live state first).

One request per connection (``Connection: close``); the request head is bounded
(``MAX_HEAD_BYTES``, else 431), must arrive within ``HEAD_TIMEOUT`` seconds and be answered
within ``REQUEST_TIMEOUT``. Users share the pod's network namespace and can hold connections to
this port, so every new connection is served: when its peer already holds ``MAX_PER_PEER``
connections, or all ``MAX_CONNECTIONS`` are taken, an older one is closed to make room
(:func:`choose_victim`) - from the peer's own group, else from the group holding the most;
preferably one still waiting for its request. Every connection a user in the pod can make counts
as one peer ("local": from or to a loopback address, from any of the pod's addresses): a user can
pick any 127.x source address and any of the pod's, but not the kubelet's.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import math
import socket
from collections import Counter as Tally
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from supervisor import metrics
from supervisor.errors import CgroupError, SupervisorError
from supervisor.sessions import LIVE, State

if TYPE_CHECKING:
    from supervisor.drain import Drainer
    from supervisor.manager import SessionManager
    from supervisor.publisher import Publisher

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 8 * 1024
HEAD_TIMEOUT = 2.0
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
MAX_PER_PEER = 16
ACCEPT_BATCH = 4  # well under MAX_PER_PEER / 2
METRICS_MAX_AGE = 1.0
JSON_VERSION = 2  # 2: "ready" no longer means admitting; "admitting" and "not_admitting" added


# ---- readiness: a pure decision -----------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    reason: str  # machine-readable, stable
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message}


@dataclass(frozen=True)
class Readiness:
    """Whether the pod serves its users (``ready``; ``reasons`` say why not) and whether it admits
    new ones (``admitting``; ``not_admitting`` says why not); ``degraded``: what else is wrong."""

    ready: bool
    reasons: tuple[Finding, ...] = ()
    degraded: tuple[Finding, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)
    not_admitting: tuple[Finding, ...] = ()

    @property
    def admitting(self) -> bool:
        return not self.not_admitting

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": JSON_VERSION,
            "ready": self.ready,
            "reasons": [f.to_dict() for f in self.reasons],
            "admitting": self.admitting,
            "not_admitting": [f.to_dict() for f in self.not_admitting],
            "degraded": [f.to_dict() for f in self.degraded],
            **self.details,
        }


def evaluate(
    *,
    started: bool,
    draining: bool,
    occupied: int,
    capacity: int,
    cgroup_error: str | None,
    registry_ok: bool,
    registry_error: str = "",
    details: dict[str, Any] | None = None,
) -> Readiness:
    """Readiness and admission from the facts (pure). What makes the pod unready also stops it
    admitting; a full or draining pod is ready (it serves its users) but admits no one."""
    reasons = []
    if not started:
        reasons.append(Finding("starting", "the daemon is still re-adopting users and starting its services"))
    if cgroup_error:
        reasons.append(Finding("cgroups_failing", cgroup_error))
    refusals = []
    if draining:
        refusals.append(Finding("draining", "the pod is draining: it admits no new users"))
    if occupied >= capacity:
        refusals.append(Finding("full", f"{occupied} of {capacity} slots are taken"))
    degraded = []
    if not registry_ok:
        degraded.append(Finding("registry_unreachable", registry_error or "no successful registry heartbeat yet"))
    return Readiness(not reasons, tuple(reasons), tuple(degraded), dict(details or {}), (*reasons, *refusals))


# ---- what the server asks ------------------------------------------------------------------------


class ProbeSource(Protocol):
    """What the probe server reads; :class:`PodProbes` for the daemon, fakes in tests."""

    def is_started(self) -> bool:
        ...

    def readiness(self) -> Readiness:
        ...

    def metrics(self) -> bytes:
        ...


class PodProbes:
    """Answers the probes from the daemon's live state. ``started`` is set by the daemon once
    re-adoption has finished and every service is up."""

    def __init__(self, manager: SessionManager, publisher: Publisher, drainer: Drainer | None = None) -> None:
        self.manager = manager
        self.publisher = publisher
        self.drainer = drainer
        self.started = False

    def is_started(self) -> bool:
        return self.started

    def cgroup_error(self) -> str | None:
        """The manager's last cgroup failure, or a failure to list the users' groups now."""
        if self.manager.cgroup_error:
            return self.manager.cgroup_error
        try:
            self.manager.driver.users()
        except (CgroupError, OSError) as exc:
            return f"cannot list the users' cgroups: {exc}"
        return None

    def readiness(self) -> Readiness:
        pod = self.manager.pod
        registry = self.publisher.status()
        details: dict[str, Any] = {
            "pod": {
                "id": self.manager.config.pod_id,
                "capacity": pod.capacity,
                "occupied": pod.occupied(),
                "free_slots": pod.free_slots(),
                "draining": pod.draining,
                "cgroup_driver": self.manager.driver.describe(),
            },
            "registry": registry,
        }
        if self.drainer is not None:
            details["drain"] = self.drainer.status()
        return evaluate(
            started=self.started,
            draining=pod.draining,
            occupied=pod.occupied(),
            capacity=pod.capacity,
            cgroup_error=self.cgroup_error(),
            registry_ok=self.publisher.healthy,
            registry_error=registry["last_error"],
            details=details,
        )

    def refresh_metrics(self) -> None:
        """Set the pod's gauges from the live state (called before every scrape)."""
        m = self.manager
        pod = m.pod
        tiers = set(m.config.tiers)
        by_state: Tally[tuple[str, str]] = Tally()
        memory: Tally[str] = Tally()
        for rt in m.runtimes.values():
            s = rt.session
            tiers.add(s.tier)
            by_state[(s.state.value, s.tier)] += 1
            if s.state in LIVE:
                memory[s.tier] += rt.memory_bytes
        for tier in tiers:
            for state in State:
                metrics.USERS.labels(state=state.value, tier=tier).set(by_state[(state.value, tier)])
            metrics.CGROUP_MEMORY.labels(tier=tier).set(memory[tier])
        metrics.ACTIVE_USERS.set(pod.occupied())
        metrics.CAPACITY.set(pod.capacity)
        metrics.FREE_SLOTS.set(0 if pod.draining else pod.free_slots())
        metrics.DRAINING.set(1 if pod.draining else 0)
        metrics.SESSIONS.set(self.publisher.sessions_count())

    def metrics(self) -> bytes:
        self.refresh_metrics()
        return generate_latest(metrics.REGISTRY)


# ---- the HTTP server -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def route(source: ProbeSource, method: str, target: str) -> Response:
    """The answer to one request (pure apart from reading ``source``)."""
    path = target.split("?", 1)[0]
    if path not in ("/healthz", "/readyz", "/admitting", "/startupz", "/metrics"):
        return Response(404, b"not found: try /metrics, /healthz, /readyz, /admitting or /startupz\n")
    if method not in ("GET", "HEAD"):
        return Response(405, b"method not allowed\n", headers=(("Allow", "GET, HEAD"),))
    if path == "/healthz":
        return Response(200, b"ok\n")
    if path == "/startupz":
        return Response(200, b"started\n") if source.is_started() else Response(503, b"starting\n")
    if path in ("/readyz", "/admitting"):
        readiness = source.readiness()
        body = json.dumps(readiness.to_dict(), sort_keys=True).encode() + b"\n"
        ok = readiness.ready if path == "/readyz" else readiness.admitting
        return Response(200 if ok else 503, body, "application/json")
    return Response(200, source.metrics(), CONTENT_TYPE_LATEST)


def parse_listen(listen: str) -> tuple[str, int]:
    """``"0.0.0.0:9100"`` / ``"[::]:9100"`` -> (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


# ---- who gets a connection: a pure decision ----------------------------------------------------------


@dataclass(eq=False)
class Slot:
    """One open connection: its peer group, and whether its request has arrived (it is being
    answered)."""

    peer: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    answering: bool = False


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def peer_group(peer_ip: str, local_ip: str, is_own_address: Callable[[str], bool] = lambda _: False) -> str:
    """``"local"`` for a connection a user in the pod can make - from a loopback address, to a
    loopback address (only the pod reaches those), from the connection's own local address or
    from another address of the pod (``is_own_address``) - else the peer's address."""
    ip = _address(peer_ip)
    if ip.is_loopback or _address(local_ip).is_loopback or peer_ip == local_ip or is_own_address(str(ip)):
        return "local"
    return str(ip)


class OwnAddresses:
    """Whether an address is one of the pod's own (it can be bound), remembered (at most
    ``limit`` addresses, then forgotten all at once: users cannot make many)."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self.known: dict[str, bool] = {}

    def __call__(self, ip: str) -> bool:
        own = self.known.get(ip)
        if own is None:
            if len(self.known) >= self.limit:
                self.known.clear()
            own = self.known[ip] = self._bindable(ip)
        return own

    @staticmethod
    def _bindable(ip: str) -> bool:
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((ip, 0))
            except OSError:
                return False
        return True


def choose_victim(open_: Sequence[Slot], peer: str, *, max_connections: int, max_per_peer: int) -> Slot | None:
    """The connection to close so that a new one from ``peer`` can be served (``open_`` oldest
    first), or None when there is room. Taken from ``peer``'s own group when it holds
    ``max_per_peer``, else (all ``max_connections`` taken) from the group holding the most. Within
    the group: the oldest still waiting for its request, else the oldest - but never a waiting one
    among the newest half, whose request is likely in flight (a probe sends it with the connect)."""
    same = [slot for slot in open_ if slot.peer == peer]
    if len(same) >= max_per_peer:
        group = same
    elif len(open_) >= max_connections:
        sizes = Tally(slot.peer for slot in open_)
        largest = max(sizes, key=lambda p: sizes[p])
        group = [slot for slot in open_ if slot.peer == largest]
    else:
        return None
    older_half = group[: (len(group) + 1) // 2]
    return next((slot for slot in older_half if not slot.answering), group[0])


class ProbeServer:
    """Serves :func:`route` on ``listen``; :attr:`address` is the bound ``host:port`` (port 0
    picks a free one)."""

    def __init__(
        self,
        listen: str,
        source: ProbeSource,
        *,
        head_timeout: float = HEAD_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        max_head_bytes: int = MAX_HEAD_BYTES,
        max_connections: int = MAX_CONNECTIONS,
        max_per_peer: int = MAX_PER_PEER,
    ) -> None:
        self.listen = listen
        self.source = source
        self.head_timeout = head_timeout
        self.request_timeout = request_timeout
        self.max_head_bytes = max_head_bytes
        self.max_connections = max_connections
        self.max_per_peer = max_per_peer
        self.address = ""
        self.open: list[Slot] = []  # oldest first
        self._evicted_at = -math.inf
        self._metrics: tuple[float, Response | None] = (-math.inf, None)
        self._own_addresses = OwnAddresses()

    @property
    def connections(self) -> int:
        return len(self.open)

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        host, port = parse_listen(self.listen)
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise SupervisorError(
                f"cannot listen on {self.listen} for the probes: {exc.strerror or exc}",
                reason="probes_listen_failed",
                hint="another process holds that address; free it or set [probes] listen",
            ) from None
        bound = listeners[0].socket.getsockname()
        self.address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        log.info("probes listening on %s (/metrics /healthz /readyz /admitting /startupz)", self.address)
        task_status.started(self.address)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept, listener, nursery)

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept up to ``ACCEPT_BATCH`` connections at a time, then let their tasks run: a flood
        queued ahead of the kubelet's connection is drained quickly, and a probe's request, which
        arrives with its connection, is read before enough newer connections come to push it out."""
        async with listener:
            with socket.fromfd(listener.socket.fileno(), listener.socket.family, listener.socket.type) as sock:
                sock.setblocking(False)
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    for _ in range(ACCEPT_BATCH):
                        try:
                            conn, _ = sock.accept()
                        except BlockingIOError:
                            break
                        except OSError as exc:
                            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                                log.error("probes: cannot accept a connection (%s); retrying in 0.1 s", exc.strerror)
                                await trio.sleep(0.1)
                                break
                            continue  # e.g. ECONNABORTED: that peer is gone
                        self._admit(conn, nursery)

    def _admit(self, conn: socket.socket, nursery: trio.Nursery) -> None:
        """Read what the peer already sent, make room (:func:`choose_victim`), start its task."""
        conn.setblocking(False)
        try:
            peer = peer_group(conn.getpeername()[0], conn.getsockname()[0], self._own_addresses)
            first = conn.recv(self.max_head_bytes + 1)
            if not first:  # the peer is gone already
                conn.close()
                return
        except BlockingIOError:
            first = b""
        except OSError:
            conn.close()
            return
        slot = Slot(peer, answering=b"\r\n\r\n" in first)  # a whole head: not pushed out before its task runs
        victim = choose_victim(self.open, slot.peer, max_connections=self.max_connections,
                               max_per_peer=self.max_per_peer)
        if victim is not None:
            self.open.remove(victim)
            victim.scope.cancel()
            self._evicted_at = trio.current_time()
            metrics.PROBE_CONNECTIONS_CLOSED.labels(reason="evicted").inc()
        self.open.append(slot)
        nursery.start_soon(self._handle, trio.SocketStream(trio.socket.from_stdlib_socket(conn)), slot, first)

    async def _handle(self, stream: trio.SocketStream, slot: Slot, first: bytes) -> None:
        async with stream:
            try:
                with slot.scope, trio.move_on_after(self.request_timeout) as deadline:
                    await self._exchange(stream, slot, first)
                if deadline.cancelled_caught:
                    metrics.PROBE_CONNECTIONS_CLOSED.labels(reason="timeout").inc()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                if slot in self.open:
                    self.open.remove(slot)

    def _answer(self, method: str, target: str) -> Response:
        """:func:`route`'s answer; but while connections are being evicted (a flood), /metrics is
        made at most once per ``METRICS_MAX_AGE``: a user asking for it in a loop must not keep
        the event loop from answering the kubelet."""
        now = trio.current_time()
        made, cached = self._metrics
        is_metrics = target.split("?", 1)[0] == "/metrics"
        if is_metrics and cached and now - self._evicted_at < METRICS_MAX_AGE and now - made < METRICS_MAX_AGE:
            return cached
        response = route(self.source, method, target)
        if is_metrics and response.status == 200:
            self._metrics = now, response
        return response

    async def _exchange(self, stream: trio.SocketStream, slot: Slot, first: bytes) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head_bytes)
        if first:
            conn.receive_data(first)
        try:
            with trio.move_on_after(self.head_timeout) as head_deadline:
                request = await _read_request(stream, conn)
            if head_deadline.cancelled_caught:
                metrics.PROBE_CONNECTIONS_CLOSED.labels(reason="timeout").inc()
                return
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            await stream.send_all(
                b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                % (status, HTTPStatus(status).phrase.encode())
            )
            await _linger(stream)  # closing with unread input would reset the connection and lose the answer
            return
        if request is None:
            return
        slot.answering = True
        method = request.method.decode("ascii", "replace")
        try:
            response = self._answer(method, request.target.decode("ascii", "replace"))
        except Exception:  # noqa: BLE001 - a probe must answer, never take the daemon down
            log.exception("probe %s %r failed", method, request.target)
            response = Response(500, b"internal error: see the daemon's log\n")
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
            *response.headers,
        ]
        data = conn.send(h11.Response(status_code=response.status, headers=headers,
                                      reason=HTTPStatus(response.status).phrase.encode())) or b""
        if method != "HEAD":
            data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)


async def _linger(stream: trio.SocketStream, limit: int = 64 * 1024) -> None:
    """Half-close, then read and drop what the client still sends (up to ``limit`` bytes or one
    second), so that the close does not turn into a reset that destroys the answer in flight."""
    try:
        await stream.send_eof()
        with trio.move_on_after(1.0):
            while limit > 0 and (chunk := await stream.receive_some(4096)):
                limit -= len(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    """The request head (its body, if any, is ignored); None when the client hung up first."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(4096))
            continue
        if isinstance(event, h11.Request):
            return event
        return None  # ConnectionClosed
