"""HTTP and WebSocket pass-through on trio, h11 on both sides, bodies streamed chunk by chunk.

- :class:`HttpStream`: a trio stream plus an ``h11.Connection`` (the browser side is an h11
  server, the IDE side an h11 client); every read and write can carry an idle timeout.
- :func:`forward_http`: one request/response exchange. The request body and the response body
  are streamed concurrently in ``buffer_size`` pieces, never held whole (Theia's 12 MB bundles,
  uploads), with backpressure both ways; 1xx answers are passed on.
  A large ``Content-Length`` body (Theia's bundles, uploads) is moved with ``os.splice`` instead
  (:func:`splice_exactly`: socket -> pipe -> socket) once h11 has parsed the head.
- :func:`forward_upgrade`: a WebSocket (any ``Upgrade:``) handshake goes to the IDE; if it answers
  101 the browser gets that 101 (with the IDE's headers and cookies) and from then on the
  :class:`~supervisor.frontdoor.relay.Relay` thread carries the bytes both ways; any other answer
  is passed on as a normal response.
- Header filtering (pure): hop-by-hop headers are dropped, ``Host`` and every other end-to-end
  header is kept; the front door's own session cookie and the Bearer token it consumed are
  removed from what the IDE sees, and an IDE cannot set or clear the front door's cookie.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import select
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import h11
import trio

from supervisor.frontdoor.relay import Relay
from supervisor.metrics import PROXY_BYTES

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authorization", b"proxy-authenticate",
})
#: Response headers an IDE never passes to the browser: widening a service worker's scope, wiping
#: the origin's data (the front door's own sign-in sends that).
IDE_MAY_NOT_SEND = frozenset({b"service-worker-allowed", b"clear-site-data"})
Headers = list[tuple[bytes, bytes]]
HeaderSeq = Sequence[tuple[bytes, bytes]]
Event = Union[h11.Request, h11.InformationalResponse, h11.Response, h11.Data, h11.EndOfMessage, h11.ConnectionClosed]
Counter = Callable[[int], None]
Rewrite = Callable[[Headers], Headers]  # what the browser gets of an answer's headers (after filtering)

TO_IDE = PROXY_BYTES.labels(direction="client_to_ide")
TO_CLIENT = PROXY_BYTES.labels(direction="ide_to_client")


class PeerMismatch(Exception):
    """The IDE socket's peer credentials name another uid than the user's: nothing is sent."""

    reason = "peer_uid"

    def __init__(self, expected_uid: int, uid: int, pid: int) -> None:
        super().__init__(
            f"the socket is served by uid {uid} (pid {pid}), not the user's uid {expected_uid}"
            + (" - an IDE must call listen() on the socket it receives as fd 3" if uid == 0 else "")
        )


class UpstreamFailed(Exception):
    """The IDE closed or broke the exchange before answering (a 502 if the browser got nothing yet)."""


class ClientGone(Exception):
    """The browser went away or stalled mid-exchange: nothing more can be sent to it."""


# ---- h11 over a trio stream ----------------------------------------------------------------------


class HttpStream:
    """A trio stream with its h11 state machine."""

    def __init__(self, stream: trio.abc.Stream, role: type[h11.CLIENT] | type[h11.SERVER], *,
                 buffer_size: int, max_head: int) -> None:
        self.stream = stream
        self.role = role
        self.max_head = max_head
        self.conn = h11.Connection(role, max_incomplete_event_size=max_head)
        self.buffer_size = buffer_size

    def restart(self) -> None:
        """A fresh h11 machine, for a connection at a message boundary its machine did not see."""
        self.conn = h11.Connection(self.role, max_incomplete_event_size=self.max_head)

    async def receive(self, timeout: float = math.inf) -> bytes:
        """Read once and feed h11 (``b""`` on EOF or a broken stream); TooSlowError after ``timeout``."""
        with trio.fail_after(timeout):
            try:
                data = bytes(await self.stream.receive_some(self.buffer_size))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
        self.conn.receive_data(data)
        return data

    async def next_event(self, timeout: float = math.inf) -> Event | type[h11.PAUSED]:
        """The next h11 event, reading as needed; each read may wait ``timeout``."""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                await self.receive(timeout)
                continue
            return event  # type: ignore[return-value]

    async def send(self, event: Event | h11.InformationalResponse, timeout: float = math.inf) -> None:
        data = self.conn.send(event)
        if data:
            with trio.fail_after(timeout):
                await self.stream.send_all(data)

    def idle_and_open(self) -> bool:
        """True if another request may be sent: both sides IDLE and the peer has not closed."""
        if self.conn.our_state is not h11.IDLE or self.conn.their_state is not h11.IDLE:
            return False
        sock = getattr(self.stream, "socket", None)
        if sock is None:
            return True
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        return not poller.poll(0)  # readable now = EOF or bytes nobody asked for: do not reuse


# ---- headers (pure) ----------------------------------------------------------------------------------


def connection_tokens(headers: HeaderSeq) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def strip_cookie(value: bytes, name: str) -> bytes:
    """A Cookie header value without the cookie ``name`` (other cookies keep their bytes)."""
    wanted = name.encode()
    kept = [pair.strip() for pair in value.split(b";") if pair.strip() and pair.strip().partition(b"=")[0].strip() != wanted]
    return b"; ".join(kept)


def upstream_request_headers(headers: HeaderSeq, *, cookie_name: str, drop_bearer: bool, upgrade: bytes | None) -> Headers:
    """What the IDE receives: end-to-end headers (Host included), minus our cookie and our token."""
    listed = connection_tokens(headers) - {b"upgrade", b"keep-alive", b"close"}
    chunked = any(n == b"transfer-encoding" for n, _ in headers)
    out: Headers = []
    for name, value in headers:
        if name == b"transfer-encoding":
            out.append((name, value))  # h11 re-frames the body it relays; keep the framing kind
            continue
        if name in HOP_BY_HOP or name in listed or (chunked and name == b"content-length"):
            continue
        if name == b"cookie":
            value = strip_cookie(value, cookie_name)
            if not value:
                continue
        elif name == b"authorization" and drop_bearer and value.strip()[:7].lower() == b"bearer ":
            continue
        out.append((name, value))
    if upgrade is not None:
        out += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
    return out


def client_response_headers(headers: HeaderSeq, *, cookie_name: str, switching: bool = False) -> Headers:
    """What the browser receives from the IDE: end-to-end headers and its cookies, not ours."""
    listed = connection_tokens(headers) - {b"upgrade", b"keep-alive", b"close"}
    prefix = cookie_name.encode() + b"="
    out: Headers = []
    upgrade: bytes | None = None
    for name, value in headers:
        if name == b"upgrade":
            upgrade = value
        if name in (b"transfer-encoding", b"content-length") and not switching:
            out.append((name, value))
            continue
        if name in HOP_BY_HOP or name in listed:
            continue
        if name == b"set-cookie" and value.lstrip().startswith(prefix):
            continue  # an IDE never sets or clears the front door's cookie
        if name in IDE_MAY_NOT_SEND:
            continue
        out.append((name, value))
    if switching:
        out += [(b"connection", b"upgrade"), (b"upgrade", upgrade or b"websocket")]
    return out


def upgrade_of(request: h11.Request) -> bytes | None:
    """The Upgrade header of a request that asks for a protocol switch, else None."""
    if b"upgrade" not in connection_tokens(request.headers):
        return None
    for name, value in request.headers:
        if name == b"upgrade":
            return value
    return None


def has_body(request: h11.Request) -> bool:
    for name, value in request.headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


async def connect_unix(path: Path, timeout: float) -> trio.SocketStream:
    """Connect to a Unix stream socket, waiting while its listen backlog is full.

    A non-blocking ``connect`` on a Unix socket whose backlog is full fails with EAGAIN and does
    *not* continue in the background (unlike TCP's EINPROGRESS), so it is retried here with a
    short back-off; ``trio.open_unix_socket`` would take it for a connection in progress and hand
    back an unconnected socket. Raises OSError (no socket, refused) or TooSlowError."""
    delay = 0.0005
    with trio.fail_after(timeout):
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            try:
                sock.connect(str(path))
            except BlockingIOError:
                sock.close()
                await trio.sleep(delay)
                delay = min(delay * 2, 0.05)
                continue
            except BaseException:
                sock.close()
                raise
            return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


# ---- the IDE side -------------------------------------------------------------------------------


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass
class Upstream:
    """A connection to one user's IDE socket (or to a port in the user's own network namespace),
    reusable for the next request of the same user to the same place."""

    user: str
    destination: Path | str  # the IDE's socket path, or :func:`Upstream.over`'s name for the place
    http: HttpStream
    kind: str = "http"  # what it carries, for the proxy metrics: http, or port
    exchanges: int = 0
    closed: bool = field(default=False)

    @classmethod
    async def connect(
        cls, user: str, socket_path: Path, uid: int, *, buffer_size: int, max_head: int, timeout: float,
    ) -> Upstream:
        """A connection to ``socket_path``, whose listener must be ``uid`` (``SO_PEERCRED``: whoever
        last called listen() on it). Raises OSError (no socket, refused), TooSlowError (backlog full
        for ``timeout``) or PeerMismatch (then closed, nothing sent)."""
        stream = await connect_unix(socket_path, timeout)
        pid, found, _gid = _UCRED.unpack(stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if found != uid:
            stream.socket.close()
            raise PeerMismatch(uid, found, pid)
        return cls(user, socket_path, HttpStream(stream, h11.CLIENT, buffer_size=buffer_size, max_head=max_head))

    @classmethod
    def over(cls, user: str, stream: trio.SocketStream, destination: str, *, kind: str, buffer_size: int, max_head: int) -> Upstream:
        """An upstream over a stream the caller connected and vouches for (a port in ``user``'s
        own network namespace, named ``destination`` - never equal to an IDE socket's path)."""
        return cls(user, destination, HttpStream(stream, h11.CLIENT, buffer_size=buffer_size, max_head=max_head), kind)

    def reusable_for(self, user: str, destination: Path | str) -> bool:
        return not self.closed and self.user == user and self.destination == destination and self.http.idle_and_open()

    async def aclose(self) -> None:
        self.closed = True
        await trio.aclose_forcefully(self.http.stream)


# ---- one exchange ------------------------------------------------------------------------------------


@dataclass
class Exchange:
    """How one forwarded exchange went."""

    status: int = 0
    answered: bool = False  # the browser got a status line: no error page can follow
    reusable: bool = False  # the browser's connection may carry another request
    ide_reusable: bool = False  # ... and so may the connection to the IDE (else open a new one)
    spliced: bool = False  # the response body went through the kernel, not h11
    ide_keeps_alive: bool = False  # (spliced) the IDE's answer did not end its connection
    ended: str = ""  # (WebSocket) why the relayed connection ended


async def forward_http(
    client: HttpStream, upstream: Upstream, request: h11.Request, *, target: bytes, headers: Headers,
    cookie_name: str, idle: float, on_input: Counter, kernel_splice: bool = False, answer_headers: Rewrite | None = None,
) -> Exchange:
    """Forward one request to the IDE and its answer to the browser, streaming both bodies
    (large Content-Length bodies, either way, with ``os.splice`` if ``kernel_splice``).

    Raises UpstreamFailed if the IDE broke off before the browser was answered (the caller may
    answer 502); a failure after that, or on the browser's side, raises ClientGone."""
    result = Exchange()
    ide = upstream.http
    upstream.exchanges += 1
    request_done = False
    request_spliced = False

    async def pump_request_body() -> None:
        nonlocal request_done, request_spliced
        if client.conn.their_state is h11.DONE:  # already relayed once (a retried GET): just end it
            await ide.send(h11.EndOfMessage(), idle)
            request_done = True
            return
        length = content_length(request.headers) if kernel_splice else None
        how = "pump" if length is None else await _splice_request_body(client, ide, length, idle, on_input)
        if how != "pump":
            request_done = True
            request_spliced = how == "spliced"
            return
        while True:
            event = await client.next_event(idle)
            if isinstance(event, h11.Data):
                TO_IDE.inc(len(event.data))
                on_input(len(event.data))
                await ide.send(h11.Data(data=event.data), idle)
            elif isinstance(event, h11.EndOfMessage):
                await ide.send(h11.EndOfMessage(), idle)
                request_done = True
                return
            else:
                raise ClientGone("the browser closed the connection inside a request body")

    try:
        await ide.send(h11.Request(method=request.method, target=target, headers=headers), idle)
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError, trio.TooSlowError) as exc:
        raise UpstreamFailed(f"cannot send the request to the IDE: {type(exc).__name__}") from None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_guard_client, pump_request_body)
            response = await _response_head(client, ide, idle)
            await _relay_response(client, ide, response, result, cookie_name=cookie_name, idle=idle,
                                  method=request.method, kernel_splice=kernel_splice, answer_headers=answer_headers)
            if not request_done:
                nursery.cancel_scope.cancel()  # the IDE answered without reading the whole body
    except BaseExceptionGroup as group:
        raise first_leaf(group) from None
    # An IDE that ends its own connection (its answer said Connection: close, a hop-by-hop header
    # the browser never sees) costs a new IDE connection next time, not the browser's connection.
    result.reusable = request_done and client.conn.our_state is h11.DONE
    if request_spliced and result.reusable:
        client.restart()  # its machine never saw the body; the connection is at a message boundary
    if result.spliced:
        # The IDE's h11 never saw the spliced body; the connection is at a message boundary.
        result.ide_reusable = result.reusable and result.ide_keeps_alive and ide.conn.our_state is h11.DONE
        if result.ide_reusable:
            ide.restart()
        return result
    result.ide_reusable = result.reusable and ide.conn.our_state is h11.DONE and ide.conn.their_state is h11.DONE
    if result.ide_reusable:
        ide.conn.start_next_cycle()
    return result


async def _relay_response(
    client: HttpStream, ide: HttpStream, response: h11.Response, result: Exchange, *, cookie_name: str, idle: float,
    method: bytes, kernel_splice: bool = False, answer_headers: Rewrite | None = None,
) -> None:
    """Pass the IDE's answer (head, then streamed body) on to the browser; record it in ``result``."""
    result.status = response.status_code
    headers = client_response_headers(response.headers, cookie_name=cookie_name)
    try:
        await client.send(h11.Response(
            status_code=response.status_code, reason=response.reason,
            headers=answer_headers(headers) if answer_headers is not None else headers,
        ), idle)
        result.answered = True
        length = body_length(method, response) if kernel_splice else None
        how = "pump" if length is None else await _splice_response_body(client, ide, length, idle)
        if how == "pump":
            await _pump_response_body(client, ide, idle)
        elif how == "spliced":
            result.spliced = True
            result.ide_keeps_alive = response.http_version == b"1.1" and b"close" not in connection_tokens(response.headers)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, h11.ProtocolError) as exc:
        raise ClientGone(f"response to the browser broke off: {type(exc).__name__}") from None


def content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The body size a message's headers announce with Content-Length (None: none, or chunked)."""
    length = None
    for name, value in headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            length = int(value)  # h11 has validated it
    return length


async def _splice_request_body(client: HttpStream, ide: HttpStream, length: int, idle: float, on_input: Counter) -> str:
    """The browser -> IDE twin of :func:`_splice_response_body` (an upload): ``"spliced"``,
    ``"relayed"`` (h11 already had all of it) or ``"pump"`` (the caller relays the rest). Here
    the IDE's machine is told of the spliced bytes, and the browser's cannot be:
    :func:`forward_http` gives it a fresh one once the answer is out."""
    if not (isinstance(client.stream, trio.SocketStream) and isinstance(ide.stream, trio.SocketStream)):
        return "pump"
    seen = 0
    while True:
        event = client.conn.next_event()  # only what is already buffered: no read
        if isinstance(event, h11.Data):
            TO_IDE.inc(len(event.data))
            on_input(len(event.data))
            await ide.send(h11.Data(data=event.data), idle)
            seen += len(event.data)
        elif event is h11.NEED_DATA:
            break
        elif isinstance(event, h11.EndOfMessage):
            await ide.send(h11.EndOfMessage(), idle)
            return "relayed"
        else:
            raise ClientGone("the browser closed the connection inside a request body")
    left = length - seen
    if left < SPLICE_MIN or not await splice_exactly(client.stream, ide.stream, left, idle=idle, count=TO_IDE.inc):
        return "pump"
    on_input(left)
    _count_spliced(ide.conn, left)
    await ide.send(h11.EndOfMessage(), idle)
    return "spliced"


def body_length(method: bytes, response: h11.Response) -> int | None:
    """The body size a response announces with Content-Length (None: none, or chunked)."""
    if method == b"HEAD" or response.status_code in (204, 304) or response.status_code < 200:
        return None
    return content_length(response.headers)


async def _splice_response_body(client: HttpStream, ide: HttpStream, length: int, idle: float) -> str:
    """Move a Content-Length body with :func:`splice_exactly` once h11 has parsed the head:
    ``"spliced"``; ``"relayed"`` if h11 already had all of it (passed on as usual); ``"pump"``
    (nothing of the body done yet, or only what h11 had) where the kernel cannot splice or too
    little is left to be worth it - the caller relays the rest through h11.

    What h11 already read of the body is passed on first. The browser's h11 machine is then told
    of the spliced bytes (their length only), so its connection goes on as if h11 had sent them;
    the IDE's machine cannot be told, and :func:`forward_http` gives it a fresh one afterwards."""
    if not (isinstance(client.stream, trio.SocketStream) and isinstance(ide.stream, trio.SocketStream)):
        return "pump"
    buffered: list[bytes] = []
    seen = 0
    while True:
        event = ide.conn.next_event()  # only what is already buffered: no read
        if isinstance(event, h11.Data):
            buffered.append(bytes(event.data))
            seen += len(event.data)
        elif event is h11.NEED_DATA:
            break
        else:  # the whole body was buffered (EndOfMessage), or the IDE is gone
            await _pass_on(client, buffered, idle)
            if not isinstance(event, h11.EndOfMessage):
                raise trio.BrokenResourceError("the IDE closed inside a response body")
            await client.send(h11.EndOfMessage(), idle)
            return "relayed"
    await _pass_on(client, buffered, idle)
    left = length - seen
    if left < SPLICE_MIN or not await splice_exactly(ide.stream, client.stream, left, idle=idle, count=TO_CLIENT.inc):
        return "pump"
    _count_spliced(client.conn, left)
    await client.send(h11.EndOfMessage(), idle)
    return "spliced"


def _count_spliced(conn: h11.Connection, length: int) -> None:
    """Tell an h11 connection that ``length`` body bytes went out by splice (nothing is copied or
    written: h11 only counts them against Content-Length)."""
    while length:
        step = min(length, len(_ZEROS))
        conn.send_with_data_passthrough(h11.Data(data=_ZEROS[:step]))  # type: ignore[arg-type] # only len() is used
        length -= step


async def _pass_on(client: HttpStream, pieces: list[bytes], idle: float) -> None:
    for data in pieces:
        TO_CLIENT.inc(len(data))
        await client.send(h11.Data(data=data), idle)


async def _guard_client(pump: Callable[[], object]) -> None:
    try:
        await pump()  # type: ignore[misc]
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, h11.ProtocolError) as exc:
        raise ClientGone(f"request body broke off: {type(exc).__name__}") from None


async def _response_head(client: HttpStream, ide: HttpStream, idle: float) -> h11.Response:
    while True:
        try:
            event = await ide.next_event(idle)
        except (h11.RemoteProtocolError, trio.TooSlowError) as exc:
            raise UpstreamFailed(f"the IDE did not answer: {type(exc).__name__}") from None
        if isinstance(event, h11.Response):
            return event
        if isinstance(event, h11.InformationalResponse) and event.status_code != 101:
            with contextlib.suppress(h11.LocalProtocolError):
                await client.send(h11.InformationalResponse(status_code=event.status_code, headers=[], reason=event.reason), idle)
            continue
        raise UpstreamFailed(f"the IDE answered with {type(event).__name__}")


async def _pump_response_body(client: HttpStream, ide: HttpStream, idle: float) -> None:
    while True:
        try:
            event = await ide.next_event(idle)
        except h11.RemoteProtocolError:
            raise trio.BrokenResourceError("the IDE broke off the response body") from None
        if isinstance(event, h11.Data):
            TO_CLIENT.inc(len(event.data))
            await client.send(h11.Data(data=event.data), idle)
        elif isinstance(event, h11.EndOfMessage):
            await client.send(h11.EndOfMessage(), idle)
            return
        else:
            raise trio.BrokenResourceError("the IDE closed inside a response body")


def first_leaf(group: BaseExceptionGroup) -> BaseException:
    """The first exception inside a (nested) exception group: a task's failure, unwrapped."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


# ---- protocol switches (WebSocket) ---------------------------------------------------------------


async def forward_upgrade(
    client: HttpStream, upstream: Upstream, request: h11.Request, *, target: bytes, headers: Headers,
    cookie_name: str, idle: float, on_input: Counter, relay: Relay, expires: float = math.inf,
    on_switched: Callable[[], None] | None = None, keepalive_markers: tuple[bytes, ...] = (), answer_headers: Rewrite | None = None,
) -> Exchange:
    """Forward an upgrade handshake; on 101, hand both connections to ``relay`` until they end.

    The relay reads the browser's direction frame by frame (:class:`ClientFrames`) so that
    ``on_input`` hears only of messages a person caused, not keep-alives (at most once per
    :attr:`Relay.report_every`); at ``expires`` (monotonic: the credentials ran out) it closes
    the WebSocket with a Close frame. Sets :attr:`Exchange.ended` to why the connection ended."""
    ide = upstream.http
    result = Exchange()
    try:
        await ide.send(h11.Request(method=request.method, target=target, headers=headers), idle)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
        raise UpstreamFailed(f"cannot send the handshake to the IDE: {type(exc).__name__}") from None
    # Relay any request body (a WebSocket handshake has none), then the IDE's answer.
    while True:
        event = await client.next_event(idle)
        if isinstance(event, h11.Data):
            on_input(len(event.data))
            await ide.send(h11.Data(data=event.data), idle)
        elif isinstance(event, h11.EndOfMessage):
            await ide.send(h11.EndOfMessage(), idle)
            break
        else:
            raise ClientGone("the browser closed the connection during the handshake")
    while True:
        try:
            answer = await ide.next_event(idle)
        except (h11.RemoteProtocolError, trio.TooSlowError) as exc:
            raise UpstreamFailed(f"the IDE did not answer the handshake: {type(exc).__name__}") from None
        if isinstance(answer, h11.InformationalResponse) and answer.status_code != 101:
            continue
        break
    if isinstance(answer, h11.Response):
        # Refused (Theia refuses an upgrade without its connection cookie): pass the answer on.
        await _relay_response(client, ide, answer, result, cookie_name=cookie_name, idle=idle, method=request.method,
                              answer_headers=answer_headers)
        return result
    if not isinstance(answer, h11.InformationalResponse):
        raise UpstreamFailed(f"the IDE answered the handshake with {type(answer).__name__}")
    result.status = 101
    try:
        await client.send(h11.InformationalResponse(
            status_code=101, reason=answer.reason,
            headers=client_response_headers(answer.headers, cookie_name=cookie_name, switching=True),
        ), idle)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
        raise ClientGone(f"the browser went away during the handshake: {type(exc).__name__}") from None
    result.answered = True
    if on_switched is not None:
        on_switched()
    client_pending, _ = client.conn.trailing_data
    ide_pending, _ = ide.conn.trailing_data
    client_fd, ide_fd = _fileno_of(client.stream), _fileno_of(ide.stream)
    if client_fd is None or ide_fd is None:
        raise UpstreamFailed("a WebSocket needs two socket streams to relay")
    result.ended = await relay.carry(
        client_fd, ide_fd, on_input=lambda: on_input(0), to_ide=TO_IDE.inc, to_client=TO_CLIENT.inc,
        markers=keepalive_markers, pending=(bytes(client_pending), bytes(ide_pending)), expires=expires, linger=idle,
    )
    return result


def _fileno_of(stream: trio.abc.Stream) -> int | None:
    return stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None


# ---- Content-Length bodies through the kernel ---------------------------------------------------

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1 << 20
_ZEROS = memoryview(bytes(_PIPE_SIZE))
#: Response bodies with at least this many bytes still to come after the head are spliced.
SPLICE_MIN = 64 * 2**10
_CANNOT_SPLICE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


async def splice_exactly(src: trio.SocketStream, dst: trio.SocketStream, length: int, *, idle: float, count: Counter) -> bool:
    """Move exactly ``length`` bytes src -> pipe -> dst with ``os.splice`` (they never enter
    Python); False if the kernel cannot splice these sockets (nothing was moved then: the caller
    copies instead). Each wait for the other side may last ``idle`` (TooSlowError). Raises
    BrokenResourceError if either side breaks or ``src`` ends early."""
    if not hasattr(os, "splice"):
        return False
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        try:
            capacity = fcntl.fcntl(write_end, _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            capacity = 65536
        src_sock, dst_sock = src.socket, dst.socket
        src_fd, dst_fd = src_sock.fileno(), dst_sock.fileno()
        left = length  # still to be read from src
        piped = 0  # in the pipe, not yet written to dst
        while left or piped:
            moved = False
            if left and piped < capacity:
                try:
                    n = os.splice(src_fd, write_end, min(left, capacity - piped), flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    n = -1
                except OSError as exc:
                    if exc.errno in _CANNOT_SPLICE and left == length:
                        return False
                    raise trio.BrokenResourceError(f"splice from the sending socket: {exc.strerror}") from None
                if n == 0:
                    raise trio.BrokenResourceError(f"the sender closed with {left} bytes of the body still to come")
                if n > 0:
                    left -= n
                    piped += n
                    moved = True
            if piped:
                try:
                    n = os.splice(read_end, dst_fd, piped, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    raise trio.BrokenResourceError(f"splice to the receiving socket: {exc.strerror}") from None
                if n:
                    piped -= n
                    count(n)
                    moved = True
            if not moved:
                with trio.fail_after(idle):
                    if piped:
                        await trio.lowlevel.wait_writable(dst_sock)
                    else:
                        await trio.lowlevel.wait_readable(src_sock)
        await trio.lowlevel.checkpoint()
        return True
    finally:
        os.close(read_end)
        os.close(write_end)
