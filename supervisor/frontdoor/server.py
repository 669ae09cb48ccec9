"""The front door: where browsers enter the pod (``[http] listen``, default ``0.0.0.0:8080``).

For every request on every connection (h11 parses them; bodies are streamed by :mod:`.proxy`):

1. **Who** (:mod:`.auth`): ``Authorization: Bearer``, else a ``token`` query parameter, else the
   session cookie. No valid identity: 401 with a JSON ``reason``. A valid token for a tier this
   pod does not know: 403 ``unknown_tier``.
2. **How many** (:mod:`.admission`): a new browser session (``sid``) beyond the tier's
   ``sessions`` live ones: 409 ``too_many_sessions``.
3. **First page load** (``GET``/``HEAD`` with ``?token=``, a top-level navigation): 303 to the same
   path without the token, setting the session cookie, so the token leaves the address bar and the
   history - or, in a browser holding another user's session, a page asking first
   (:mod:`.signin`: who may sign in, from which origins the cookie is accepted, for which host).
4. **Where**: the authenticated user's own IDE - never anything named by the URL. If it is not
   running, a cold start: ``manager.start`` and the request is held until RUNNING (at most
   ``start_timeout``; then a self-reloading "starting" page, 503). More cold starts in flight than
   ``max_cold_starts``: 429. Pod full or draining: 503 with Retry-After. A FATAL IDE: 502 with an
   error page (a page load tries it again; background requests do not).
5. **Through**: the request goes to the IDE's Unix socket with ``Host`` and the browser's other
   cookies intact and the front door's cookie and token removed. After a WebSocket upgrade the
   connection is carried by the relay thread (:mod:`.relay`) until either side closes it, or
   until the credentials that admitted it expire (``exp`` + ``[auth] leeway``): then it is
   closed with a WebSocket Close frame 1008, as new requests with them are refused.

Under ``/port/<N>/`` (:mod:`.ports`) the signed-in user's own port N is served instead of the IDE:
``localhost:N`` in the user's own network namespace (only with ``[isolation] network``; 404
otherwise), N within ``[http] port_range`` (403 otherwise), the prefix stripped, ``Host:
localhost:N``, a ``Location`` back under the prefix; HTTP and WebSocket as for the IDE. Nothing
listening: 502. A ``token`` query parameter there is the user's server's own (Jupyter's, Vite's),
never read as credentials. It never starts the IDE (nothing could listen in a new one).

A user an operator paused (``workspacectl pause``, state PAUSED) is answered 503 ``paused`` with
Retry-After at once; requests do not resume it (an idle-frozen IDE is RUNNING and is woken by them).

A connection whose request head does not arrive within ``header_timeout`` (slowloris), is larger
than ``max_header_bytes`` (431) or is not HTTP (400) is answered and closed; each connection runs
in its own task and every failure stays inside it. Tokens never reach the log: targets are
logged after the ``token`` parameter is removed, and headers are never logged.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol

import h11
import trio

from supervisor.config import Config
from supervisor.errors import CapacityExceeded, Draining, InvalidTransition, SupervisorError, UnknownTier
from supervisor.frontdoor.admission import ColdStarts, SessionTable
from supervisor.frontdoor import ports
from supervisor.frontdoor.answers import Answer, html_page, json_answer, redirect, retry_after_header, retry_later, starting_page, unauthorized, wants_html
from supervisor.frontdoor.auth import AuthError, Authenticator, Credentials, Identity, credentials
from supervisor.frontdoor.limits import RejectionLimiter, Slots, Waiting, client_key
from supervisor.frontdoor.proxy import (
    ClientGone,
    Exchange,
    HttpStream,
    PeerMismatch,
    Rewrite,
    Upstream,
    UpstreamFailed,
    forward_http,
    forward_upgrade,
    has_body,
    upgrade_of,
    upstream_request_headers,
)
from supervisor.frontdoor.relay import Relay
from supervisor.frontdoor.signin import (
    CLEAR_SITE_DATA,
    MAX_FORM_BYTES,
    SIGN_IN_PATH,
    BrowserPolicy,
    confirm_page,
    read_form,
    refused_before_auth,
    sign_in_step,
    token_not_navigation,
    token_use,
)
from supervisor.manager import SessionManager
from supervisor.metrics import AUTH_REJECTIONS, FRONTDOOR_LIMITS, PROXY_ACTIVE, PROXY_CONNECTIONS, UPSTREAM_REJECTIONS
from supervisor.paths import user_paths
from supervisor.publisher import Publisher, advertised_address, host_ip
from supervisor.registry.records import SessionRecord
from supervisor.sessions import State

log = logging.getLogger(__name__)

#: The state in which the IDE is there to be proxied to. (An idle-frozen IDE is RUNNING and woken
#: by its input; PAUSED is an operator's `workspacectl pause` and is answered 503 at once.)
SERVING = frozenset({State.RUNNING})
#: States in which a start is already under way: wait for it rather than start again.
UNDER_WAY = frozenset({State.STARTING, State.BACKOFF})
OTHER_REFUSALS = ("unknown_tier", "too_many_sessions", "too_many_cold_starts", "pod_full", "draining", "method_not_allowed", "paused",
                  "too_many_connections", "too_many_rejections")
for _reason in OTHER_REFUSALS:
    AUTH_REJECTIONS.labels(reason=_reason)
MAX_LOGGED_TARGET = 200


# ---- the IDEs behind the door ------------------------------------------------------------------


@dataclass(frozen=True)
class IdeInfo:
    """What the front door needs to know about one user's IDE."""

    state: State
    tier: str
    socket_path: Path
    uid: int  # the user's: the only uid whose listening socket the front door forwards to
    reason: str = ""
    netns: bool = False  # the IDE runs in a network namespace of its own: /port/<N>/ is served


class Ides(Protocol):
    """The session manager as the front door sees it (a fake in unit tests)."""

    def lookup(self, user: str) -> IdeInfo | None:
        """The user's IDE, or None if this daemon has never started it."""

    async def start(self, user: str, tier: str) -> None:
        """Begin starting (or change the tier of) ``user`` without waiting for RUNNING.

        Raises CapacityExceeded, Draining or UnknownTier before touching anything."""

    async def wait_settled(self, user: str, timeout: float) -> IdeInfo | None:
        """Wait (at most ``timeout``) until the IDE is no longer STARTING or in BACKOFF."""

    async def open_port(self, user: str, port: int) -> trio.SocketStream | None:
        """A connection to ``localhost:port`` in the user's own network namespace (127.0.0.1,
        else ::1); None if the user has no running IDE with a network namespace of its own.
        Raises ConnectionRefusedError when nothing listens there, OSError or TooSlowError."""


class ManagerIdes:
    """:class:`Ides` over the daemon's :class:`~supervisor.manager.SessionManager`."""

    def __init__(self, manager: SessionManager, *, netns: bool = False) -> None:
        self.manager = manager
        self.netns = netns  # every IDE has a network namespace of its own ([isolation] network in force)

    def lookup(self, user: str) -> IdeInfo | None:
        rt = self.manager.runtimes.get(user)
        if rt is None:
            return None
        s = rt.session
        return IdeInfo(state=s.state, tier=s.tier, socket_path=rt.socket_path, uid=rt.uid, reason=s.reason, netns=self.netns)

    async def open_port(self, user: str, port: int) -> trio.SocketStream | None:
        rt = self.manager.runtimes.get(user)
        if not self.netns or rt is None or rt.session.state is not State.RUNNING or rt.pidfd is None:
            return None
        # Duplicated now, with no checkpoint since it was read: the exit watcher closes rt.pidfd at
        # its own checkpoints, and the number may then name another user's process.
        pidfd = os.dup(rt.pidfd)
        try:
            return await ports.connect_loopback(pidfd, port, self.manager.config.http.header_timeout)
        finally:
            os.close(pidfd)

    async def start(self, user: str, tier: str) -> None:
        try:
            await self.manager.start(user, tier, wait=False)
        except InvalidTransition:
            # Stopping right now (e.g. idle stop as the user came back): start once it is down.
            await self.manager.wait_for(user, lambda s: s.state is not State.STOPPING, self.manager.config.ide.stop_grace + 5)
            await self.manager.start(user, tier, wait=False)

    async def wait_settled(self, user: str, timeout: float) -> IdeInfo | None:
        if user in self.manager.runtimes:
            await self.manager.wait_for(user, lambda s: s.state not in UNDER_WAY, timeout)
        return self.lookup(user)


# ---- the server --------------------------------------------------------------------------------------


@dataclass
class _ColdStart:
    done: trio.Event = field(default_factory=trio.Event)
    answer: Answer | None = None


def split_listen(listen: str) -> tuple[str | None, int]:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    return (host or None), int(port)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def head_size(request: h11.Request) -> int:
    """About the size of a request head as it was sent."""
    return len(request.method) + len(request.target) + 12 + sum(len(n) + len(v) + 4 for n, v in request.headers)


def loggable(target: bytes) -> str:
    """A request target for the log (already without its token), shortened."""
    text = target.decode("latin-1")
    return text if len(text) <= MAX_LOGGED_TARGET else text[:MAX_LOGGED_TARGET] + "..."


class FrontDoor:
    """The listening front door (see the module docstring). One per daemon."""

    def __init__(
        self, config: Config, ides: Ides, auth: Authenticator, *,
        clock: Callable[[], float] = time.monotonic,
        on_input: Callable[[str], None] | None = None,
        wake: Callable[[str], Awaitable[None]] | None = None,
        on_session: Callable[[str, str, bool], None] | None = None,
    ) -> None:
        self.config = config
        self.http = config.http
        self.ides = ides
        self.auth = auth
        self.clock = clock
        self.on_input = on_input or (lambda user: None)
        self.keepalive_markers = tuple(marker.encode() for marker in config.idle.keepalive_markers)
        self.wake = wake
        self.on_session = on_session or (lambda user, sid, opened: None)
        self.sessions = SessionTable(linger=config.http.session_linger)
        self.cold = ColdStarts(limit=config.http.max_cold_starts)
        self.connections = 0
        self.addresses: list[tuple[str, int]] = []
        self._starting: dict[str, _ColdStart] = {}
        self.relay: Relay | None = None  # while serving
        self.browsers = BrowserPolicy.from_config(config.http, config.auth)
        # What one client can hold (see .limits): connections not yet authenticated, per client
        # address (and which of them may be closed to make room); rejected tokens, per client
        # address; connections, WebSockets and requests, per user.
        self.unauthenticated = Slots()
        self.waiting: Waiting[_Connection] = Waiting()
        self.user_connections = Slots()
        self.rejections = RejectionLimiter(
            burst=config.http.rejected_tokens, rate=1.0 / max(config.http.rejected_tokens_interval, 1e-3)
        )
        self.websockets = Slots()
        self.requests = Slots()
        self.port_bounds = config.http.port_bounds

    @property
    def cookie_name(self) -> str:
        return self.auth.cookies.name

    def status(self) -> dict[str, Any]:
        """The ``frontdoor`` section of `workspacectl pod`."""
        return {
            "enabled": True,
            "listen": [_format_address(*address) for address in self.addresses],
            "connections": self.connections,
            "websockets": self.relay.connections if self.relay else 0,
            "websocket_relay": self.relay.mode if self.relay else None,
            "browser_sessions": self.sessions.total(self.clock()),
            "cold_starts_in_flight": len(self.cold.in_flight),
            "unauthenticated_connections": self.unauthenticated.total(),
            "requests_in_flight": self.requests.total(),
            "relay_pending_bytes": self.relay.pending_bytes if self.relay else 0,
            "algorithms": sorted(self.auth.tokens.keys.accepted),
        }

    def user_status(self, user: str) -> dict[str, Any]:
        """Extra fields of `workspacectl status USER`."""
        return {"browser_sessions": len(self.sessions.live(user, self.clock()))}

    async def serve(self, *, task_status: trio.TaskStatus[FrontDoor] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; ``started`` once listening (see :attr:`addresses`)."""
        host, port = split_listen(self.http.listen)
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.addresses = [tuple(listener.socket.getsockname()[:2]) for listener in listeners]
        for address in self.addresses:
            log.info("front door listening on %s", _format_address(*address))
        self.relay = Relay(buffer_size=self.http.buffer_size, fast_path=self.http.relay_fast_path, memory=self.http.relay_memory)
        self.relay.start()
        log.info("front door WebSockets: %s", self.relay.mode)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._prune_loop)
                await nursery.start(trio.serve_listeners, self.handle_connection, listeners)
                task_status.started(self)
        finally:
            self.relay.stop()

    async def _prune_loop(self) -> None:
        while True:
            await trio.sleep(min(10.0, max(1.0, self.http.session_linger)))
            for user, sid in self.sessions.prune(self.clock()):
                self._session_event(user, sid, False)

    def _session_event(self, user: str, sid: str, opened: bool) -> None:
        log.info("user=%s sid=%s browser session %s", user, sid[:16], "opened" if opened else "ended")
        try:
            self.on_session(user, sid, opened)
        except Exception as exc:  # noqa: BLE001 - a listener's failure is not the browser's
            log.warning("user=%s session listener failed: %s", user, exc)

    def open_session(self, identity: Identity) -> None:
        if self.sessions.open(identity.user, identity.sid, self.clock()):
            self._session_event(identity.user, identity.sid, True)

    def close_session(self, identity: Identity) -> None:
        self.sessions.close(identity.user, identity.sid, self.clock())

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        """Serve one client connection; nothing that happens on it escapes it."""
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
            local = str(stream.socket.getsockname()[0])
        except (OSError, TypeError, ValueError):
            host = peer = "?"
            local = ""
        key = client_key(host, local)
        if self.connections >= self.http.max_connections and not self._make_room(key):
            log.warning("front door: %d connections open (max_connections); refusing %s", self.connections, peer)
            await _refuse_connection(stream, b"503 Service Unavailable", b"")
            return
        if not self.unauthenticated.take(key, self.http.max_unauthenticated) and not self._make_room(key):
            # Not logged one by one (a flood would flood the log): counted.
            FRONTDOOR_LIMITS.labels(limit="unauthenticated").inc()
            answer = json_answer(429, "too_many_connections", "too many connections from this address without credentials",
                                 "sign in, or close idle connections")
            await _refuse_connection(stream, b"429 Too Many Requests", answer.body)
            return
        self.connections += 1
        connection = _Connection(self, stream, peer, key)
        try:
            await connection.run()
        except (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            log.debug("front door: connection from %s ended: %s", peer, exc or type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - one connection's failure must never reach the daemon
            if isinstance(exc, BaseExceptionGroup) and not exc.subgroup(lambda e: not isinstance(
                    e, (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError))):
                log.debug("front door: connection from %s ended: %s", peer, exc)
            else:
                log.warning("front door: connection from %s failed: %s: %s", peer, type(exc).__name__, str(exc)[:200], exc_info=log.isEnabledFor(logging.DEBUG))
        finally:
            self.connections -= 1
            connection.give_back()
            await connection.close()

    def _make_room(self, key: str) -> bool:
        """All ``max_connections`` are open: for a newcomer from client ``key``, close a connection
        that has presented no credentials and is waiting for a request, the oldest of the client
        holding the most - unless that is ``key`` itself (closing its own connections for its new
        ones would only make a flood churn, at more cost than refusing them). A browser opens a
        new connection when its idle one is closed. False if there is none to close."""
        victim = self.waiting.victim(unless=key)
        if victim is None:
            return False
        FRONTDOOR_LIMITS.labels(limit="evicted").inc()
        victim.evict()
        return True

    # ---- cold start ------------------------------------------------------------------------------

    async def ide_for(self, identity: Identity, navigating: bool) -> IdeInfo | Answer:
        """The user's serving IDE, starting it if needed, or the answer to give instead."""
        user = identity.user
        info = self.ides.lookup(user)
        if info is not None and info.state is State.PAUSED:
            return self._paused(user, navigating)
        if info is not None and info.state in SERVING:
            if info.tier != identity.tier:
                await self._change_tier(identity)
            return info
        if info is not None and info.state is State.FATAL and not navigating:
            return self._failed(info, navigating)
        pending = self._starting.get(user)
        if pending is None:
            decision = self.cold.begin(user)
            if decision == "refuse":
                return retry_later(
                    429, "too_many_cold_starts",
                    f"{len(self.cold.in_flight)} workspaces are starting on this pod right now",
                    "retry shortly", self.http.retry_after,
                )
            pending = self._starting[user] = _ColdStart()
            try:
                pending.answer = await self._cold_start(identity, info)
            finally:
                self.cold.end(user)
                del self._starting[user]
                pending.done.set()
        else:
            with trio.move_on_after(self.http.start_timeout):
                await pending.done.wait()
        if pending.answer is not None:
            return pending.answer
        return self._outcome(self.ides.lookup(user), navigating)

    async def _cold_start(self, identity: Identity, info: IdeInfo | None) -> Answer | None:
        user, tier = identity.user, identity.tier
        began = self.clock()
        if info is None or info.state not in UNDER_WAY:
            try:
                await self.ides.start(user, tier)
            except CapacityExceeded as exc:
                return self._refusal(retry_later(503, "pod_full", exc.message, exc.hint, self.http.retry_after))
            except Draining as exc:
                return self._refusal(retry_later(503, "draining", exc.message, exc.hint, self.http.retry_after))
            except UnknownTier as exc:
                return self._refusal(json_answer(403, "unknown_tier", exc.message, exc.hint))
            except SupervisorError as exc:
                log.error("user=%s cold start failed: %s", user, exc)
                return json_answer(500, exc.reason, exc.message, exc.hint)
            log.info("user=%s cold start (tier %s, sid %s)", user, tier, identity.sid[:16])
        settled = await self.ides.wait_settled(user, self.http.start_timeout)
        state = settled.state.value if settled else "unknown"
        log.info("user=%s %s %.3fs after the request arrived", user, state, self.clock() - began)
        return None

    async def _change_tier(self, identity: Identity) -> None:
        try:
            await self.ides.start(identity.user, identity.tier)
        except SupervisorError as exc:
            log.warning("user=%s cannot change tier to %s: %s", identity.user, identity.tier, exc)

    def _outcome(self, info: IdeInfo | None, navigating: bool) -> IdeInfo | Answer:
        if info is not None and info.state in SERVING:
            return info
        if info is not None and info.state is State.FATAL:
            return self._failed(info, navigating)
        if info is not None and info.state in UNDER_WAY:
            if navigating:
                return starting_page(self.http.retry_after)
            return retry_later(503, "starting", "the workspace is still starting", "retry shortly", min(self.http.retry_after, 2.0))
        return retry_later(503, "not_running", "the workspace stopped while this request waited", "retry", 1.0)

    def _paused(self, user: str, navigating: bool) -> Answer:
        """An operator paused the user (`workspacectl pause`): requests do not resume it."""
        message = f"An operator paused the workspace of {user}; it answers again once it is resumed"
        hint = f"ask an operator to run 'workspacectl resume {user}'"
        retry = (retry_after_header(self.http.retry_after),)
        if navigating:
            return self._refusal(html_page(503, "paused", "Your workspace is paused", message + " (" + hint + ").", headers=retry))
        return self._refusal(retry_later(503, "paused", message, hint, self.http.retry_after))

    def _failed(self, info: IdeInfo, navigating: bool) -> Answer:
        message = f"Your workspace failed to start: {info.reason or 'unknown reason'}"
        if navigating:
            return html_page(502, "ide_failed", "Your workspace could not start", message + ". Reload this page to try again.")
        return json_answer(502, "ide_failed", message, "reload the page to try again")

    def _refusal(self, answer: Answer) -> Answer:
        AUTH_REJECTIONS.labels(reason=answer.reason).inc()
        return answer


@dataclass(frozen=True)
class _Destination:
    """Where a request is carried: the user's IDE, or one of the user's own ports."""

    name: Path | str  # an upstream connected to the same name may be reused
    what: str  # for the log
    connect: Callable[[], Awaitable[Upstream | Answer]]  # a new connection, or the answer to give instead
    failed: Answer  # the answer when it breaks off before answering
    answer_headers: Rewrite | None = None  # what the browser gets of its answers' headers


#: How long a client over its rejected-token budget waits for its 429 (whose Retry-After is at
#: least 1 s) - a tarpit: answered at once and closed, a flooding client reconnects and asks again
#: at once, and that churn (accept, parse, answer) costs the front door's loop more than the
#: signature checks it was spared, and every other user's round trip with it. Held, each of its
#: connections asks at most once a second, at the cost of an idle task.
HOLD_BACK = 1.0


class _Connection:
    """One browser connection: a loop of request/response exchanges (or one WebSocket)."""

    def __init__(self, front: FrontDoor, stream: trio.SocketStream, peer: str, key: str) -> None:
        self.front = front
        self.http = front.http
        self.peer = peer
        self.key = key  # the client as .limits counts it
        self.unauthenticated = True  # holds a place in front.unauthenticated until a request presents valid credentials
        self.owner: str | None = None  # the user holding a place in front.user_connections for it
        self.waiting: trio.CancelScope | None = None  # while in front.waiting: cancelled to close it
        self.evicted = False
        self.client = HttpStream(stream, h11.SERVER, buffer_size=self.http.buffer_size, max_head=self.http.max_header_bytes)
        self.upstream: Upstream | None = None

    async def close(self) -> None:
        await self._drop_upstream()
        await trio.aclose_forcefully(self.client.stream)

    async def _drop_upstream(self) -> None:
        if self.upstream is not None:
            upstream, self.upstream = self.upstream, None
            await upstream.aclose()
            PROXY_ACTIVE.labels(kind=upstream.kind).dec()

    async def run(self) -> None:
        first = True
        while True:
            request = await self._request_head(first)
            if request is None:
                return
            first = False
            if not await self._exchange(request):
                return
            conn = self.client.conn
            if conn.our_state is h11.IDLE and conn.their_state is h11.IDLE:
                continue  # a fresh machine (the request body was spliced past the old one)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _request_head(self, first: bool) -> h11.Request | None:
        """The next request's head, or None (closed, timed out, or malformed and answered)."""
        conn = self.client.conn
        started = first
        between = self.http.keepalive_timeout
        if self.unauthenticated:
            between = min(between, self.http.unauthenticated_timeout)
        deadline = trio.current_time() + (self.http.header_timeout if first else between)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._protocol_error(exc)
                return None
            if isinstance(event, h11.Request):
                if head_size(event) > self.http.max_header_bytes:
                    # h11 only limits heads that arrive in pieces; one that arrived whole is measured here.
                    log.info("front door: %s sent a request head of %d bytes: cut off", self.peer, head_size(event))
                    await self._send_canned(431, "headers_too_large", "the request head is too large")
                    return None
                return event
            if event is not h11.NEED_DATA:
                return None  # ConnectionClosed
            evictable = self.unauthenticated and not conn.trailing_data[0]  # nothing of a request here yet
            with trio.move_on_at(deadline) as scope:
                if evictable:
                    self.waiting = scope
                    self.front.waiting.add(self.key, self)
                try:
                    data = bytes(await self.client.stream.receive_some(self.client.buffer_size))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                finally:
                    if evictable:
                        self.waiting = None
                        self.front.waiting.discard(self.key, self)
            if scope.cancelled_caught:
                if self.evicted:
                    return None  # evicted (FrontDoor._make_room): closed without an answer, as an idle keep-alive connection is
                if started:
                    log.info("front door: %s sent no complete request head within %gs: cut off", self.peer, self.http.header_timeout)
                    await self._send_canned(408, "request_timeout", "the request head did not arrive in time")
                elif self.unauthenticated:
                    FRONTDOOR_LIMITS.labels(limit="unauthenticated_idle").inc()
                return None
            if data and not started:
                started = True
                deadline = trio.current_time() + self.http.header_timeout
            conn.receive_data(data)

    async def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint
        reason = "headers_too_large" if status == 431 else "bad_request"
        log.info("front door: %s sent a malformed request (%s): %d", self.peer, str(exc)[:100], status)
        await self._send_canned(status, reason, "the request could not be parsed" if status != 431 else "the request head is too large")

    async def _send_canned(self, status: int, reason: str, message: str) -> None:
        conn = self.client.conn
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        answer = json_answer(status, reason, message)
        with trio.move_on_after(1):
            try:
                await self.client.send(h11.Response(status_code=status, headers=[*answer.head(), (b"connection", b"close")]))
                await self.client.send(h11.Data(data=answer.body))
                await self.client.send(h11.EndOfMessage())
                await self._lingering_close()
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
                pass

    async def _lingering_close(self, limit: int = 2**20) -> None:
        """Half-close, then read and drop what the client is still sending (briefly), so that closing
        with unread input does not reset the connection before the client has read the answer."""
        stream = self.client.stream
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        dropped = 0
        with trio.move_on_after(0.5):
            while dropped < limit:
                data = await stream.receive_some(65536)
                if not data:
                    return
                dropped += len(data)

    # ---- one exchange ----------------------------------------------------------------------------

    async def _exchange(self, request: h11.Request) -> bool:
        """Handle one request; True if the connection may carry another."""
        front = self.front
        if (handled := await self._sign_in_endpoints(request)) is not None:
            return handled
        creds = credentials(request.headers, request.target, front.cookie_name)
        if ports.is_port_path(request.target):
            creds = ports.port_credentials(creds)
        tokens = _tokens(creds)
        if (limited := self._token_limit(tokens)) is not None:
            await trio.sleep(HOLD_BACK)
            await self._refuse(request, creds.target, limited)
            return False  # and closed: a flood pays for a new connection (under max_unauthenticated)
        try:
            identity, source = front.auth.authenticate(creds)
        except AuthError as exc:
            if tokens:
                front.rejections.rejected(self.key, front.clock())
            return await self._refuse(request, creds.target, unauthorized(exc.reason, exc.message, exc.hint))
        if (over := self._claim(identity)) is not None:
            await self._refuse(request, creds.target, over, identity)
            return False
        refusal = self._browser_refusal(request, identity, source) or self._admission_refusal(identity)
        if refusal is not None:
            return await self._refuse(request, creds.target, refusal, identity)
        if source == "query":
            use = token_use(request.method, request.headers, upgrade_of(request) is not None)
            if use == "refuse":
                return await self._refuse(request, creds.target, token_not_navigation(), identity)
            if use == "sign_in":
                # A page load: move the token out of the address bar. (A WebSocket cannot follow a
                # redirect, so a non-browser's upgrade with ?token= is served with the token removed.)
                held = front.auth.cookie_users(creds)
                step = sign_in_step(identity.user, held)
                if step == "confirm":
                    log.info("user=%s sign-in link opened in a browser holding another user's session: asked to confirm", identity.user)
                    page = confirm_page(", ".join(sorted(held - {identity.user})), identity.user, creds.query_tokens[0], creds.target)
                    return await self._answer(request, page)
                return await self._signed_in(request, identity, creds.target, clear=step == "fresh")
        front.open_session(identity)
        try:
            return await self._route_within_limits(request, identity, source, creds.target)
        finally:
            front.close_session(identity)

    # ---- limits (see .limits) --------------------------------------------------------------------

    def _claim(self, identity: Identity) -> Answer | None:
        """A request on this connection presented valid credentials: the connection no longer
        counts against its client's ``max_unauthenticated`` but against the user's tier's
        ``max_connections`` (moved if it served another user before); 429 (to be closed) if the
        user already holds them all."""
        front = self.front
        tier = front.config.tiers.get(identity.tier)
        if self.owner != identity.user and tier is not None:  # (an unknown tier: 403 follows)
            if not front.user_connections.take(identity.user, tier.max_connections):
                FRONTDOOR_LIMITS.labels(limit="connections").inc()
                return json_answer(
                    429, "too_many_connections",
                    f"user {identity.user} already has {tier.max_connections} connections open, the most the {identity.tier} tier allows",
                    "close other tabs or connections of this workspace, then retry",
                    headers=(retry_after_header(self.http.retry_after), (b"connection", b"close")),
                )
            self._give_back_owner()
            self.owner = identity.user
        self._leave_unauthenticated()
        return None

    def _give_back_owner(self) -> None:
        if self.owner is not None:
            self.front.user_connections.give_back(self.owner)
            self.owner = None

    def _leave_unauthenticated(self) -> None:
        if self.unauthenticated:
            self.unauthenticated = False
            self.front.unauthenticated.give_back(self.key)

    def give_back(self) -> None:
        """The connection is closing: give back the place it holds (its client's or its user's)."""
        self._give_back_owner()
        self._leave_unauthenticated()

    def evict(self) -> None:
        """Close this connection (waiting for a request without credentials) to make room; its
        place is given back now."""
        if self.waiting is not None:
            self.evicted = True
            self.waiting.cancel()
            self.give_back()

    def _token_limit(self, tokens: list[str]) -> Answer | None:
        """429 if a token here would need its signature checked and this client has had too
        many rejected lately; None otherwise (tokens verified before always pass)."""
        front = self.front
        if not tokens or all(front.auth.tokens.known(token) for token in tokens):
            return None
        wait = front.rejections.retry_after(self.key, front.clock())
        if wait <= 0:
            return None
        FRONTDOOR_LIMITS.labels(limit="rejected_tokens").inc()
        return json_answer(429, "too_many_rejections", "too many invalid tokens came from this address",
                           "wait, then sign in again with a fresh token",
                           headers=(retry_after_header(wait), (b"connection", b"close")))

    async def _route_within_limits(self, request: h11.Request, identity: Identity, source: str, target: bytes) -> bool:
        """:meth:`_route` while the user holds fewer than its tier's ``max_websockets`` WebSockets
        (an upgrade) or ``max_requests`` requests in flight (any other); else 429."""
        front = self.front
        tier = front.config.tiers[identity.tier]  # known: _admission_refusal
        websocket = upgrade_of(request) is not None
        slots, limit = (front.websockets, tier.max_websockets) if websocket else (front.requests, tier.max_requests)
        if not slots.take(identity.user, limit):
            what = "WebSockets open" if websocket else "requests in flight"
            FRONTDOOR_LIMITS.labels(limit="websockets" if websocket else "requests").inc()
            return await self._refuse(request, target, retry_later(
                429, "too_many_connections", f"user {identity.user} already has {limit} {what}, the most the {identity.tier} tier allows",
                "close other tabs or connections of this workspace, then retry", self.http.retry_after,
            ), identity)
        try:
            return await self._route(request, identity, source, target)
        finally:
            slots.give_back(identity.user)

    # ---- sign-in (see .signin) ------------------------------------------------------------------

    def _browser_refusal(self, request: h11.Request, identity: Identity, source: str) -> Answer | None:
        """``[http] user_host`` for every request; the origin of every cookie-authenticated one."""
        browsers = self.front.browsers
        refusal = browsers.host_refusal(request.headers, identity.user)
        if refusal is None and source == "cookie":
            refusal = browsers.cookie_refusal(request.headers, upgrade_of(request) is not None)
        return refusal

    def _admission_refusal(self, identity: Identity) -> Answer | None:
        """403 for a tier this pod does not offer, 409 for a browser session beyond the tier's."""
        front = self.front
        tier = front.config.tiers.get(identity.tier)
        if tier is None:
            return json_answer(
                403, "unknown_tier", f"tier {identity.tier[:64]!r} is not offered on this pod",
                "ask for a token with one of the tiers in the pod's configuration",
            )
        if not front.sessions.admits(identity.user, identity.sid, tier.sessions, front.clock()):
            return json_answer(
                409, "too_many_sessions",
                f"user {identity.user} already has {tier.sessions} open session(s), the most the {identity.tier} tier allows",
                f"close the workspace in another browser window (a closed one is released after {front.http.session_linger:g}s)",
            )
        return None

    async def _signed_in(self, request: h11.Request, identity: Identity, target: bytes, *, clear: bool) -> bool:
        """303 to ``target`` setting the session cookie (and clearing the origin's cache and storage)."""
        front = self.front
        if front.sessions.touch(identity.user, identity.sid, front.clock()):
            front._session_event(identity.user, identity.sid, True)
        log.info("user=%s sid=%s signed in from %s: session cookie set%s", identity.user, identity.sid[:16], self.peer,
                 ", site data cleared" if clear else "")
        headers = (CLEAR_SITE_DATA,) if clear else ()
        return await self._answer(request, redirect(target, front.auth.cookies.set_cookie(identity), headers=headers))

    async def _sign_in_endpoints(self, request: h11.Request) -> bool | None:
        """Answer a service worker's script fetch (refused) and a posted sign-in confirmation;
        None for every other request."""
        path = request.target.partition(b"?")[0]
        refusal = refused_before_auth(request.headers)
        if refusal is not None:
            return await self._refuse(request, path, refusal)
        if request.method != b"POST" or path != SIGN_IN_PATH:
            return None
        body = await self._small_body(MAX_FORM_BYTES)  # read first: the connection stays usable after a refusal
        refusal = self.front.browsers.confirm_refusal(request.headers)
        if refusal is not None:
            return await self._refuse(request, path, refusal)
        form = read_form(body) if body is not None else None
        if form is None:
            return await self._refuse(request, path, json_answer(400, "bad_sign_in", "the sign-in form is malformed", "open the sign-in link again"))
        token, after = form
        if (limited := self._token_limit([token])) is not None:
            await self._refuse(request, path, limited)
            return False
        try:
            identity = self.front.auth.tokens.verify(token)
        except AuthError as exc:
            self.front.rejections.rejected(self.key, self.front.clock())
            return await self._refuse(request, path, unauthorized(exc.reason, exc.message, exc.hint))
        if (over := self._claim(identity)) is not None:
            await self._refuse(request, path, over, identity)
            return False
        refusal = self.front.browsers.host_refusal(request.headers, identity.user) or self._admission_refusal(identity)
        if refusal is not None:
            return await self._refuse(request, path, refusal, identity)
        log.info("user=%s: the switch from another user's session was confirmed in the browser", identity.user)
        return await self._signed_in(request, identity, after, clear=True)

    async def _small_body(self, limit: int) -> bytes | None:
        """The request's whole body if it is at most ``limit`` bytes and arrives within
        ``header_timeout``; None otherwise."""
        body = bytearray()
        with trio.move_on_after(self.http.header_timeout):
            while True:
                try:
                    event = await self.client.next_event()
                except h11.RemoteProtocolError:
                    return None
                if isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > limit:
                        return None
                elif isinstance(event, h11.EndOfMessage):
                    return bytes(body)
                else:
                    return None
        return None

    async def _route(self, request: h11.Request, identity: Identity, source: str, target: bytes) -> bool:
        front = self.front
        user = identity.user
        if request.method == b"CONNECT":
            return await self._refuse(request, target, json_answer(405, "method_not_allowed", "CONNECT is not served here"), identity)
        if ports.is_port_path(target):
            return await self._port(request, identity, source, target)
        ide = await front.ide_for(identity, wants_html(request.method, request.headers))
        if isinstance(ide, Answer):
            log.info("user=%s %s %s: %d %s", user, request.method.decode(), loggable(target), ide.status, ide.reason)
            return await self._answer(request, ide)
        if front.wake is not None:
            await front.wake(user)  # thaw an idle IDE before its request reaches it
        front.on_input(user)

        async def connect() -> Upstream | Answer:
            return await self._connect_upstream(user, ide) or self._unavailable(user)

        to = _Destination(ide.socket_path, "the IDE", connect, self._unavailable(user))
        return await self._forward(request, identity, target, self._headers(request, source), to)

    async def _port(self, request: h11.Request, identity: Identity, source: str, target: bytes) -> bool:
        """``/port/<N>/...``: the user's own port N (see the module docstring)."""
        front = self.front
        user = identity.user
        navigating = wants_html(request.method, request.headers)
        path = ports.parse_port_path(request.target)  # (``target`` is for the log: without its token parameter)
        refusal = self._port_refusal(path, user, navigating)
        if refusal is not None:
            log.info("user=%s %s %s: %d %s", user, request.method.decode(), loggable(target), refusal.status, refusal.reason)
            return await self._answer(request, refusal)
        assert path is not None  # (a malformed one was refused)
        if front.wake is not None:
            await front.wake(user)  # an idle-frozen IDE's tree (the server with it) is thawed first
        front.on_input(user)
        port = path.port

        async def connect() -> Upstream | Answer:
            return await self._connect_port(user, port, navigating)

        to = _Destination(f"port {port}", f"port {port}", connect, ports.server_failed(port),
                          lambda headers: ports.port_response_headers(headers, port))
        headers = ports.port_request_headers(self._headers(request, source), port)
        return await self._forward(request, identity, path.target, headers, to, shown=target)

    def _port_refusal(self, path: ports.PortPath | None, user: str, navigating: bool) -> Answer | None:
        """What to answer instead of carrying a request to the user's port, if anything."""
        front = self.front
        info = front.ides.lookup(user)
        if path is None:
            return ports.malformed()
        if path.redirect is not None:
            return ports.slash_redirect(path.redirect)
        if not ports.in_range(path.port, front.port_bounds):
            return ports.outside_range(path.port, front.port_bounds)
        if info is not None and not info.netns:
            return ports.no_namespace(path.port)
        if info is not None and info.state is State.PAUSED:
            return front._paused(user, navigating)
        if info is None or info.state not in SERVING:
            return ports.not_running(path.port, navigating)
        return None

    def _headers(self, request: h11.Request, source: str) -> list[tuple[bytes, bytes]]:
        return upstream_request_headers(request.headers, cookie_name=self.front.cookie_name, drop_bearer=source == "bearer",
                                        upgrade=upgrade_of(request))

    async def _forward(self, request: h11.Request, identity: Identity, target: bytes, headers: list[tuple[bytes, bytes]],
                       to: _Destination, shown: bytes | None = None) -> bool:
        """Carry one request (or a WebSocket) to ``to`` as ``target``; True if the connection may
        carry another. ``shown``: the request in the log, if not ``target`` (which may hold a token)."""
        front = self.front
        user = identity.user
        logged = loggable(target if shown is None else shown)

        def on_input(n: int) -> None:
            front.on_input(user)

        if upgrade_of(request) is not None:
            return await self._websocket(request, identity, target, headers, on_input, to, logged)
        retry = True
        while True:
            reused = await self._upstream_for(user, to)
            if isinstance(reused, Answer):
                return await self._answer(request, reused)
            assert self.upstream is not None
            try:
                exchange = await forward_http(
                    self.client, self.upstream, request, target=target, headers=headers,
                    cookie_name=front.cookie_name, idle=self.http.idle_timeout, on_input=on_input,
                    kernel_splice=self.http.kernel_splice, answer_headers=to.answer_headers,
                )
            except UpstreamFailed as exc:
                await self._drop_upstream()
                if reused and retry and request.method in (b"GET", b"HEAD") and not has_body(request):
                    retry = False  # the IDE closed an idle kept-alive connection as we sent: once more
                    continue
                log.warning("user=%s %s %s: %s failed: %s", user, request.method.decode(), logged, to.what, exc)
                return await self._answer(request, to.failed)
            except BaseException:
                await self._drop_upstream()
                raise
            break
        log.debug("user=%s %s %s -> %d", user, request.method.decode(), logged, exchange.status)
        if not exchange.ide_reusable:
            await self._drop_upstream()
        return exchange.reusable

    async def _upstream_for(self, user: str, to: _Destination) -> bool | Answer:
        """Make :attr:`upstream` a connection to ``to``; True if an old one is reused, or the
        answer to give if it cannot be reached."""
        if self.upstream is not None and self.upstream.reusable_for(user, to.name):
            return True
        await self._drop_upstream()
        upstream = await to.connect()
        if isinstance(upstream, Answer):
            return upstream
        self.upstream = upstream
        PROXY_CONNECTIONS.labels(kind=upstream.kind).inc()
        PROXY_ACTIVE.labels(kind=upstream.kind).inc()
        return False

    async def _websocket(self, request: h11.Request, identity: Identity, target: bytes,
                         headers: list[tuple[bytes, bytes]], on_input: Callable[[int], None], to: _Destination, logged: str) -> bool:
        await self._drop_upstream()
        user = identity.user
        upstream = await to.connect()
        if isinstance(upstream, Answer):
            return await self._answer(request, upstream)
        kind = "websocket" if upstream.kind == "http" else upstream.kind
        PROXY_CONNECTIONS.labels(kind=kind).inc()
        gauge = PROXY_ACTIVE.labels(kind=kind)
        switched = False

        def on_switched() -> None:
            nonlocal switched
            switched = True
            gauge.inc()

        exchange = Exchange()
        try:
            exchange = await forward_upgrade(
                self.client, upstream, request, target=target, headers=headers, cookie_name=self.front.cookie_name,
                idle=self.http.idle_timeout, on_input=on_input, on_switched=on_switched, relay=self._relay(),
                expires=self._expiry(identity), keepalive_markers=self.front.keepalive_markers, answer_headers=to.answer_headers,
            )
        except UpstreamFailed as exc:
            log.warning("user=%s upgrade %s: %s failed: %s", user, logged, to.what, exc)
            return await self._answer(request, to.failed)
        finally:
            if switched:
                gauge.dec()
            await upstream.aclose()
        if exchange.ended == "expired":
            log.info("user=%s sid=%s WebSocket %s closed: its credentials expired", user, identity.sid[:16], logged)
        log.debug("user=%s upgrade %s -> %d (%s)", user, logged, exchange.status, exchange.ended or "answered")
        return False

    async def _connect_port(self, user: str, port: int, navigating: bool) -> Upstream | Answer:
        """A new connection to ``localhost:port`` in the user's own network namespace, or the
        answer to give (nothing listens: 502, the page a person can act on)."""
        try:
            stream = await self.front.ides.open_port(user, port)
        except ConnectionRefusedError:
            return ports.nothing_listens(port, navigating)
        except (OSError, trio.TooSlowError) as exc:
            log.warning("user=%s cannot reach port %d in the workspace: %s", user, port, exc or type(exc).__name__)
            return ports.nothing_listens(port, navigating)
        if stream is None:
            return ports.not_running(port, navigating)
        return Upstream.over(user, stream, f"port {port}", kind="port", buffer_size=self.http.buffer_size,
                             max_head=max(self.http.max_header_bytes, 64 * 1024))

    async def _connect_upstream(self, user: str, ide: IdeInfo) -> Upstream | None:
        """A new connection to the user's IDE, served by the user's uid (checked before a byte is
        sent); None (logged; counted when the uid is wrong) if there is none."""
        try:
            return await Upstream.connect(
                user, ide.socket_path, ide.uid, buffer_size=self.http.buffer_size,
                max_head=max(self.http.max_header_bytes, 64 * 1024), timeout=self.http.header_timeout,
            )
        except PeerMismatch as exc:
            UPSTREAM_REJECTIONS.labels(reason=exc.reason).inc()
            log.error("user=%s refused to forward to %s: %s", user, ide.socket_path, exc)
        except (OSError, trio.TooSlowError) as exc:
            log.warning("user=%s cannot reach the IDE at %s: %s", user, ide.socket_path, exc)
        return None

    def _relay(self) -> Relay:
        relay = self.front.relay
        if relay is None:
            raise RuntimeError("the front door is not serving")
        return relay

    def _expiry(self, identity: Identity) -> float:
        """When (``time.monotonic``) the credentials that admitted a WebSocket run out: the token's
        (or cookie's) ``exp`` plus the configured clock leeway, as new requests are refused."""
        left = identity.expires + self.front.config.auth.leeway - time.time()
        return time.monotonic() + left

    def _unavailable(self, user: str) -> Answer:
        return retry_later(502, "ide_unavailable", f"the workspace of {user} did not answer", "retry shortly", 1.0)

    # ---- answering -------------------------------------------------------------------------------

    async def _refuse(self, request: h11.Request, target: bytes, answer: Answer, identity: Identity | None = None) -> bool:
        AUTH_REJECTIONS.labels(reason=answer.reason).inc()
        who = f"user={identity.user}" if identity else f"from {self.peer}"
        log.info("%s %s %s refused: %d %s", who, request.method.decode(), loggable(target), answer.status, answer.reason)
        return await self._answer(request, answer)

    async def _answer(self, request: h11.Request, answer: Answer) -> bool:
        """Send one of the front door's own answers; True if the connection may carry another request.

        What has arrived of the request's body is discarded first; if the rest has not arrived,
        the answer says ``Connection: close`` (the connection cannot carry another request, and a
        keep-alive client must not send one on it)."""
        timeout = self.http.idle_timeout
        complete = self._discard_request_body()
        head = answer.head() if complete else [*answer.head(), (b"connection", b"close")]
        try:
            if self.client.conn.our_state is not h11.SEND_RESPONSE:
                return False  # something was already sent (e.g. a 100 Continue then a failure)
            await self.client.send(h11.Response(status_code=answer.status, headers=head), timeout)
            if request.method != b"HEAD" and answer.body:
                await self.client.send(h11.Data(data=answer.body), timeout)
            await self.client.send(h11.EndOfMessage(), timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, h11.LocalProtocolError):
            return False
        return complete and self.client.conn.our_state is h11.DONE

    def _discard_request_body(self) -> bool:
        """Discard what is left of the request if it is already here; False if more would have to be read."""
        conn = self.client.conn
        while conn.their_state is h11.SEND_BODY:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return False
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return False
        return conn.their_state is h11.DONE


def _tokens(creds: Credentials) -> list[str]:
    """The tokens a request presents (whose signature authenticating it may check)."""
    return [creds.bearer] if creds.bearer is not None else list(creds.query_tokens)


async def _refuse_connection(stream: trio.SocketStream, status: bytes, body: bytes) -> None:
    """Answer a connection the front door does not take (``Retry-After: 1``), then close it."""
    head = b"HTTP/1.1 %s\r\nretry-after: 1\r\ncontent-length: %d\r\n" % (status, len(body))
    if body:
        head += b"content-type: application/json\r\n"
    with trio.move_on_after(1):
        try:
            await stream.send_all(head + b"connection: close\r\n\r\n" + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)


# ---- the daemon's service ----------------------------------------------------------------------


@dataclass
class FrontDoorHandle:
    """What :func:`run_frontdoor` gives the daemon: the running front door (None if disabled)."""

    scope: trio.CancelScope
    front: FrontDoor | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self.front.addresses if self.front else []

    def cancel(self) -> None:
        """Stop accepting and drop every connection (before users are stopped at shutdown)."""
        self.scope.cancel()


async def run_frontdoor(
    config: Config, manager: SessionManager, *, publisher: Publisher | None = None,
    on_input: Callable[[str], None] | None = None, wake: Callable[[str], Awaitable[None]] | None = None,
    netns: bool = False, task_status: trio.TaskStatus[FrontDoorHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The daemon's front-door service: ``started`` with a :class:`FrontDoorHandle` once listening.

    ``publisher`` is told of every browser session that opens and ends (and counts them from the
    front door's table); ``on_input(user)`` is called for every request and every piece of a body
    or WebSocket the browser sends; ``await wake(user)`` before each request is passed to the IDE
    (the idle ladder's hooks). ``netns``: every IDE runs in a network namespace of its own
    (``[isolation] network`` in force), so ``/port/<N>/`` is served. Raises ConfigError (keys or
    cookie secret unusable) before listening."""
    with trio.CancelScope() as scope:
        handle = FrontDoorHandle(scope)
        why_off = config.frontdoor_off
        if why_off is not None:
            log.warning("front door disabled: %s", why_off)
            manager.info_providers["frontdoor"] = lambda: {"enabled": False, "why": why_off}
            task_status.started(handle)
            return
        auth = Authenticator.from_config(config.auth, config.daemon.state_dir)
        on_session = _publish_sessions(config, publisher) if publisher is not None else None
        front = FrontDoor(config, ManagerIdes(manager, netns=netns), auth, on_input=on_input, wake=wake, on_session=on_session)
        if publisher is not None:
            publisher.sessions_count = lambda: front.sessions.total(front.clock())
        handle.front = front
        async with trio.open_nursery() as nursery:
            await nursery.start(front.serve)
            if publisher is not None and not publisher.address:
                nursery.start_soon(_advertise, publisher, [(str(host), int(port)) for host, port in front.addresses])
            manager.info_providers["frontdoor"] = front.status
            manager.user_info_providers.append(front.user_status)
            task_status.started(handle)


async def _advertise(publisher: Publisher, bound: list[tuple[str, int]]) -> None:
    """Tell routers where the front door is. In the background and a worker thread: a wildcard
    listen address means resolving this host's name, which a slow resolver must not hold up the
    daemon's start for (the registry gets the address with the next heartbeat)."""
    address = await trio.to_thread.run_sync(advertised_address, "", bound, host_ip, abandon_on_cancel=True)
    if address:
        publisher.address = address
        publisher.wake()
        log.info("registry: routers reach this pod's front door at %s ([pod] address overrides)", address)
    else:
        log.warning("registry: no address found for routers to reach this pod's front door: set [pod] address")


def _publish_sessions(config: Config, publisher: Publisher) -> Callable[[str, str, bool], None]:
    """Report browser sessions to the registry (the sid from the token is the session id)."""

    def report(user: str, sid: str, opened: bool) -> None:
        if opened:
            workspace = user_paths(config.workspace.root, config.workspace.shards, user).workspace
            publisher.session_opened(SessionRecord(
                session_id=sid, user=user, pod_id=config.pod_id, workspace=str(workspace), since=time.time(),
            ))
        else:
            publisher.session_closed(sid)

    return report


__all__ = ["FrontDoor", "FrontDoorHandle", "IdeInfo", "Ides", "ManagerIdes", "run_frontdoor"]
