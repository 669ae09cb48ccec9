"""Upgraded connections (WebSockets) relayed by one plain epoll thread, outside the trio loop.

Why a thread: after the 101 the front door only moves bytes, and trio's cost per wake-up (a task
switch, checkpoints around every ``receive_some``/``send_all``) was most of the front door's CPU
per small message: 36-55 us per round trip, against ~9 us for this loop (``integration/bench/
README.md``). :class:`Relay` is one thread with one level-triggered ``select.epoll`` for every
upgraded connection of the daemon: ``recv_into`` one preallocated buffer (shared by all
connections: what a destination does not take at once is kept apart) and ``send``. Splicing was
measured too and lost: moving large frame payloads socket -> pipe -> socket halved the 1 MiB echo
throughput, and small messages cost two syscalls per direction either way.

The GIL: the relay holds it only while it handles ready sockets in Python, and the trio thread has
nothing to do for a relayed connection. While trio is busy with Python work (many HTTP requests at
once) the Python loop waits for the GIL at each of its syscalls, and round trips grow from tens of
microseconds to milliseconds; the C fast path (below) waits and passes frames on without the GIL
(both measured in ``integration/bench/README.md``).

Per connection (:class:`Link`), both directions are read frame by frame, cheaply:

- browser -> IDE through :class:`~supervisor.frontdoor.wsactivity.ClientFrames`, so that only
  input a person caused counts as activity. Activity reaches trio at most once per
  ``report_every`` per connection (the first input after a quiet spell at once - a frozen IDE is
  woken by its first byte - and the latest one after the interval), not once per message;
- IDE -> browser through :class:`FrameBoundaries`, which only skips frame headers, so that the
  front door can end a connection with a Close frame of its own between two of the IDE's frames.

A connection ends when both directions reached EOF (each EOF is passed on as a half-close; after
the first the other direction has ``linger`` seconds), when either socket breaks, when the trio
side cuts it (:meth:`Relay.cut`: shutdown, cancellation), or at ``expires`` - the credentials that
admitted it ran out: then the browser gets a Close frame 1008 and the IDE a Close frame 1001, both
at frame boundaries, and the connection is closed a moment later. The trio side learns the end
through a callback run in the trio thread (``TrioToken.run_sync_soon``).

The fast path (``fastrelay.c`` through :mod:`~supervisor.frontdoor.fastrelay`): while nothing about a
direction needs a decision - nothing pending, no EOF, its frame reader between two frames, and for
the browser's direction no input being judged - the relay lets C wait, read and pass on whole
frames without entering Python (and without the GIL); anything else comes back to this loop with
the bytes read. Without the built library the loop does everything itself.

The relay owns duplicates of the two sockets (``socket.dup``): the trio side may close its own
objects whenever it likes, the connection lasts until the relay closes its copies.

Memory (:class:`Memory`): a direction is not read while its destination has not taken all of the
last read, so a peer that never reads holds back its sender (in the kernel's socket buffers), and
the relay holds at most one read per direction. Over all connections, past ``memory`` bytes held,
every read is cut to :data:`TIGHT_READ` bytes (the fast path, which reads whole buffers, is off)
until the relay holds half of that again: connections keep flowing, each direction that stalls
then holds at most that much more.
"""

from __future__ import annotations

import heapq
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import trio

from supervisor.frontdoor import fastrelay
from supervisor.frontdoor.wsactivity import ClientFrames
from supervisor.metrics import FRONTDOOR_LIMITS

log = logging.getLogger(__name__)

Counter = Callable[[int], None]
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_NEVER = float("inf")
_MAX_EVENTS = 256  # per epoll wait
_MAX_HEADER = 14  # 2 + 8 (length) + 4 (mask)
#: After the credentials expired: how long the IDE's current frame may take to end before the
#: connection is cut without a Close frame, and how long the browser then has to close its side.
CLOSE_GRACE = 2.0
#: WebSocket close codes (RFC 6455 7.4.1): the browser sees 1008, the IDE 1001 (going away).
CLOSE_POLICY = 1008
CLOSE_GOING_AWAY = 1001
#: Bytes per read while the relay holds more than its memory budget (see :class:`Memory`).
TIGHT_READ = 4096


def close_frame(code: int, reason: str, *, masked: bool) -> bytes:
    """A WebSocket Close frame (masked as a client sends it, or not as a server does)."""
    payload = struct.pack("!H", code) + reason.encode()[:123]
    if not masked:
        return bytes((0x88, len(payload))) + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((0x88, 0x80 | len(payload))) + key + body


class FrameBoundaries:
    """Fed the IDE's bytes in any chunking; knows whether they end between two frames. Only
    headers are looked at (payloads are skipped by their length); bytes that are not frames
    simply never come back to a boundary."""

    __slots__ = ("_head", "_remaining")

    def __init__(self) -> None:
        self._head = b""  # an incomplete header
        self._remaining = 0  # payload bytes of the current frame still to come

    @property
    def at_boundary(self) -> bool:
        return not self._head and self._remaining == 0

    def feed(self, data: memoryview | bytes) -> None:
        n = len(data)
        remaining = self._remaining
        if remaining >= n:
            self._remaining = remaining - n
            return
        pos = remaining
        while pos < n:
            old = self._head
            head = old + bytes(data[pos : pos + _MAX_HEADER]) if old else data[pos : pos + _MAX_HEADER]
            if len(head) < 2:
                self._head = bytes(head)
                self._remaining = 0
                return
            second = head[1]
            length = second & 0x7F
            size = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if second & 0x80 else 0)
            if len(head) < size:
                self._head = bytes(head)
                self._remaining = 0
                return
            if length == 126:
                length = int.from_bytes(head[2:4], "big")
            elif length == 127:
                length = int.from_bytes(head[2:10], "big")
            self._head = b""
            pos += size - len(old) + length
        self._remaining = pos - n


@dataclass(eq=False)
class Memory:
    """The relay's read buffer, and the bytes it holds read and not yet passed on (``held``,
    over every connection) against ``budget``: over it, reads are cut to :data:`TIGHT_READ`
    bytes (``tight``) until ``held`` is at most half the budget."""

    budget: int
    full: memoryview  # the read buffer (shared by every connection)
    held: int = 0
    tight: bool = False

    @property
    def view(self) -> memoryview:
        """Where the next read goes (its size is how much may be read)."""
        return self.full[:TIGHT_READ] if self.tight else self.full

    def add(self, n: int) -> None:
        self.held += n
        if self.tight:
            self.tight = self.held > self.budget // 2
        elif self.held > self.budget:
            self.tight = True
            FRONTDOOR_LIMITS.labels(limit="relay_memory").inc()


@dataclass(eq=False)
class _Direction:
    """Bytes from ``src`` to ``dst``: read into the relay's buffer, and what of a read ``dst``
    has not taken yet (``pending``, counted in :class:`Memory`)."""

    src: socket.socket
    dst: socket.socket
    inspect: Callable[[memoryview], None]
    memory: Memory
    _pending: bytes = b""  # read (or queued by the relay) but not yet sent
    eof: bool = False  # src ended (or is no longer read): pass EOF on once pending is sent
    done: bool = False  # EOF passed on
    discard: bool = False  # read src but drop what arrives (the connection is closing)
    moved: int = 0  # bytes passed on and not yet counted in the metrics
    error: OSError | None = None  # a socket broke (seen by Relay._pass_on)
    fast: int = -1  # the fast path's flags for src while it passes src on (-1: it does not)

    @property
    def pending(self) -> bytes:
        return self._pending

    @pending.setter
    def pending(self, data: bytes) -> None:
        self.memory.add(len(data) - len(self._pending))
        self._pending = data

    @property
    def reading(self) -> bool:
        return not self.eof and not self.pending

    def send_pending(self) -> None:
        """Send what ``dst`` takes now; raises OSError if it broke."""
        if self.pending:
            try:
                sent = self.dst.send(self.pending)
            except BlockingIOError:
                return
            self.pending = self.pending[sent:]
        if not self.pending and self.eof and not self.done:
            self.done = True
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def queue(self, data: bytes) -> None:
        self.pending += data
        self.send_pending()

    def pump(self) -> bool:
        """``src`` is readable: read once and pass it on; True if all of it went and nothing else
        changed (the common case: no bookkeeping to do). Raises OSError if a socket broke."""
        if self.eof or self.pending:
            return False  # (a hang-up is reported even when not asked for: read once dst took the rest)
        try:
            n = self.src.recv_into(self.memory.view)
        except BlockingIOError:
            return True
        if n == 0:
            self.eof = True
            self.send_pending()
            return False
        if self.discard:
            return True
        passed = self.forward(n)
        if self.error is not None:
            raise self.error
        return passed

    def forward(self, n: int) -> bool:
        """Pass on the ``n`` bytes just read into the buffer: True if ``dst`` took them all; what
        it did not take becomes ``pending``; a broken socket goes to ``error`` (False)."""
        chunk = self.memory.full[:n]
        self.inspect(chunk)
        self.moved += n
        try:
            sent = self.dst.send(chunk)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.error = exc
            return False
        if sent < n:
            self.pending = bytes(chunk[sent:])
            return False
        return True


@dataclass(eq=False)
class Link:
    """One relayed connection, as the relay thread sees it."""

    client: socket.socket
    ide: socket.socket
    up: _Direction  # browser -> IDE
    down: _Direction  # IDE -> browser
    frames: ClientFrames
    boundaries: FrameBoundaries
    expires: float  # monotonic time at which the credentials ran out (inf: never)
    linger: float
    on_end: Callable[[str], None]  # run in the trio thread with why it ended
    on_input: Callable[[], None]  # run in the trio thread: a person sent something
    to_ide: Counter
    to_client: Counter
    pending: tuple[bytes, bytes] = (b"", b"")  # already read from (client, IDE) before the relay
    client_fd: int = -1
    reported_at: float = -1e18
    unreported: bool = False  # input since the last report, to be reported at reported_at + report_every
    deadline: float = _NEVER  # linger after a half-close, or the end of closing
    expiring: bool = False  # expired while the IDE was inside a frame: close at its end
    closing: bool = False  # the front door's Close frame is out (expired)
    ended: bool = False
    events: dict[int, int] = field(default_factory=dict)  # fd -> registered epoll mask (0: not in the set)


class Relay:
    """The relay thread (see the module docstring). :meth:`start` once, :meth:`stop` at the end;
    :meth:`carry` from trio tasks."""

    def __init__(self, *, buffer_size: int = 256 * 2**10, report_every: float = 0.05, fast_path: bool = True,
                 memory: int = 128 * 2**20) -> None:
        self.buffer_size = buffer_size
        self.report_every = report_every
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, _IN)
        self._commands: queue.SimpleQueue[tuple[str, Link | None]] = queue.SimpleQueue()
        self._by_fd: dict[int, Link] = {}
        self._links: set[Link] = set()
        # A heap of (when, sequence, link); stale entries (ended links) are skipped. A None link
        # is the next time byte counts go to the metrics (once a second while links exist).
        self._timers: list[tuple[float, int, Link | None]] = []
        self._seq = 0
        self._counting = False  # a None entry is in the heap
        # One read buffer for every connection: a read is passed on before the next one, and
        # what a destination does not take at once is kept apart (pending).
        buffer = bytearray(buffer_size)
        self._buffer = memoryview(buffer)
        self._memory = Memory(memory, self._buffer)
        self._fast_tight = False  # the fast path was turned off for every connection: memory.tight
        self._fast: fastrelay.FastPath | None = None
        #: Which loop carries the bytes, for the log.
        self.mode = "pure-Python relay (fast path off in the configuration)"
        if fast_path:
            self._fast, self.mode = fastrelay.load(self._epoll.fileno(), buffer)
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    @property
    def connections(self) -> int:
        return len(self._links)

    @property
    def pending_bytes(self) -> int:
        """Bytes read and not yet passed on, over every connection (see :class:`Memory`)."""
        return self._memory.held

    @property
    def tight(self) -> bool:
        """Whether reads are cut short: more than the memory budget was held (:class:`Memory`)."""
        return self._memory.tight

    # ---- the trio side ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread (call from the trio thread: callbacks are run in this trio run)."""
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._run, name="frontdoor-relay", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End every connection and the thread; returns once it is gone."""
        if self._thread is not None:
            self._command("stop", None)
            self._thread.join()
            self._thread = None
        if self._fast is not None:
            self._fast.close()
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    async def carry(
        self, client: int, ide: int, *, on_input: Callable[[], None], to_ide: Counter,
        to_client: Counter, markers: tuple[bytes, ...] = (), pending: tuple[bytes, bytes] = (b"", b""),
        expires: float = _NEVER, linger: float = 60.0,
    ) -> str:
        """Relay the sockets ``client`` <-> ``ide`` (file descriptors; the relay works on
        duplicates, so the caller may close its own objects at any time) until the connection ends; why it ended (``closed``,
        ``broken``, ``expired`` - at ``expires``, monotonic -, ``linger``, ``stopped``, ``cut``).
        ``pending`` was already read from (client, IDE) and goes first. ``on_input`` runs in the
        trio thread when the browser sent input (see the module docstring). Cancelling cuts the
        connection."""
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the front door's relay thread is not running (see the log for why)")
        ended = trio.Event()
        why = ["cancelled"]

        def on_end(reason: str) -> None:
            why[0] = reason
            ended.set()

        c = socket.socket(fileno=os.dup(client))
        i = socket.socket(fileno=os.dup(ide))
        c.setblocking(False)
        i.setblocking(False)
        boundaries = FrameBoundaries()
        frames = ClientFrames(lambda size: None, markers)
        link = Link(
            client=c, ide=i, frames=frames, boundaries=boundaries, expires=expires, linger=linger,
            up=_Direction(c, i, frames.feed, self._memory),
            down=_Direction(i, c, boundaries.feed, self._memory),
            on_end=on_end, on_input=on_input, to_ide=to_ide, to_client=to_client, pending=pending, client_fd=c.fileno(),
        )
        frames.on_input = lambda size: self._input(link)
        self._command("add", link)
        try:
            await ended.wait()
        except BaseException:
            self.cut(link)
            raise
        return why[0]

    def cut(self, link: Link) -> None:
        """End ``link`` now (from any thread)."""
        self._command("cut", link)

    def _command(self, what: str, link: Link | None) -> None:
        self._commands.put((what, link))
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # already woken

    def _to_trio(self, fn: Callable[[], None]) -> None:
        assert self._token is not None

        def guarded() -> None:
            try:
                fn()
            except Exception:  # noqa: BLE001 - a callback's failure must not end the trio run
                log.exception("front door relay: a callback failed")

        try:
            self._token.run_sync_soon(guarded)
        except trio.RunFinishedError:
            pass

    # ---- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._fast is not None:
                self._loop_fast(self._fast)
            else:
                self._loop()
        except BaseException:
            log.exception("front door: the WebSocket relay thread failed; open WebSockets are closed and new ones refused")
            raise
        finally:
            for link in list(self._links):
                self._end(link, "stopped")

    def _loop(self) -> None:
        poll = self._epoll.poll
        by_fd = self._by_fd
        wake = self._wake_r
        while True:
            for fd, mask in poll(self._due(), _MAX_EVENTS):
                link = by_fd.get(fd)
                if link is None:
                    if fd == wake and not self._drain_commands():
                        return
                elif mask != _IN or link.expiring or not self._pass_on(link.up if fd == link.client_fd else link.down):
                    self._ready(link, fd, mask)

    def _loop_fast(self, fast: fastrelay.FastPath) -> None:
        """:meth:`_loop` with C passing on what needs no decision; here the rest, then what C may
        pass on from now (:meth:`_fast_sync`)."""
        by_fd = self._by_fd
        wake = self._wake_r
        view = self._buffer
        while True:
            for fd, mask, status, nread, nsent, error in fast.wait(self._due()):
                link = by_fd.get(fd)
                if link is None:
                    if fd == wake and not self._drain_commands():
                        return
                    continue
                direction = link.up if fd == link.client_fd else link.down
                if status == fastrelay.EVENT:
                    done = mask == _IN and not link.expiring and self._pass_on(direction)
                elif status == fastrelay.READ:  # not whole plain frames: judged and passed on here
                    done = direction.forward(nread)
                elif status == fastrelay.PARTIAL:  # whole frames, counted; dst took nsent bytes
                    direction.pending = bytes(view[nsent:nread])
                    done = False
                else:  # SEND_ERROR, RECV_ERROR
                    direction.error = OSError(error, os.strerror(error))
                    done = False
                if not done:
                    self._ready(link, fd, mask)
                self._fast_sync(link)
            if self._memory.tight != self._fast_tight:  # before C reads whole buffers again (or so that it does)
                self._fast_tight = self._memory.tight
                for link in self._links:
                    self._fast_sync(link)

    def _fast_sync(self, link: Link) -> None:
        """Let the fast path pass on each direction of ``link`` that needs no decision now."""
        fast = self._fast
        if fast is None or link.ended:
            return
        plain = not (link.expiring or link.closing or self._memory.tight)
        frames = link.frames
        up_flags = fastrelay.UP | (fastrelay.JUDGING if frames.judging else 0)
        for direction, flags, at_boundary in ((link.up, up_flags, frames.at_boundary and frames.understood),
                                              (link.down, 0, link.boundaries.at_boundary)):
            wanted = flags if plain and at_boundary and direction.reading and not direction.discard else -1
            if wanted != direction.fast:
                if wanted < 0:
                    fast.disable(direction.src.fileno())
                else:
                    fast.enable(direction.src.fileno(), direction.dst.fileno(), wanted)
                direction.fast = wanted

    def _due(self) -> float:
        """Fire the timers that are due; seconds until the next one (-1: none)."""
        if not self._timers:
            return -1.0
        now = time.monotonic()
        if self._timers[0][0] <= now:
            self._fire(now)
        return self._timeout(now)

    @staticmethod
    def _pass_on(direction: _Direction) -> bool:
        """The common case, kept short: ``src`` is readable and ``dst`` takes all of what it had.
        False (nothing done) when anything else may be the case: :meth:`_ready` then looks."""
        if direction.eof or direction.pending or direction.discard:
            return False
        try:
            n = direction.src.recv_into(direction.memory.view)
        except BlockingIOError:
            return True
        except OSError as exc:
            direction.error = exc
            return False
        if not n:
            return False  # EOF (which the next read reports again)
        return direction.forward(n)

    def _at(self, when: float, link: Link | None) -> None:
        """Look at ``link`` again at ``when`` (its deadline, expiry or next activity report), or
        count bytes then (None)."""
        if when != _NEVER:
            self._seq += 1
            heapq.heappush(self._timers, (when, self._seq, link))

    def _timeout(self, now: float) -> float:
        timers = self._timers
        while timers and (link := timers[0][2]) is not None and link.ended:
            heapq.heappop(timers)
        if not timers:
            return -1.0
        return max(0.0, timers[0][0] - now)

    def _fire(self, now: float) -> None:
        timers = self._timers
        due: list[Link] = []
        while timers and timers[0][0] <= now:
            link = heapq.heappop(timers)[2]
            if link is None:
                self._count_all(now)
            elif not link.ended and link not in due:
                due.append(link)
        for link in due:
            if link.unreported and now - link.reported_at >= self.report_every:
                self._report(link, now)
            if link.deadline <= now:
                self._end(link, "expired" if link.closing or link.expires <= now else "linger")
            elif link.expires <= now and not link.closing:
                self._expire(link, now)
            self._fast_sync(link)

    def _count_all(self, now: float) -> None:
        """Pass the byte counts on to the metrics (once a second while there are links)."""
        for link in self._links:
            self._count(link)
        self._counting = bool(self._links)
        if self._counting:
            self._at(now + 1.0, None)

    def _count(self, link: Link) -> None:
        if self._fast is not None and not link.ended:
            link.up.moved += self._fast.take_moved(link.client.fileno())
            link.down.moved += self._fast.take_moved(link.ide.fileno())
        if link.up.moved:
            link.to_ide(link.up.moved)
            link.up.moved = 0
        if link.down.moved:
            link.to_client(link.down.moved)
            link.down.moved = 0

    def _drain_commands(self) -> bool:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                what, link = self._commands.get_nowait()
            except queue.Empty:
                return True
            if what == "stop":
                return False
            assert link is not None
            if what == "add":
                self._add(link)
            elif what == "cut" and link in self._links:
                self._end(link, "cut")

    def _add(self, link: Link) -> None:
        self._links.add(link)
        if not self._counting:
            self._counting = True
            self._at(time.monotonic() + 1.0, None)
        for sock in (link.client, link.ide):
            self._by_fd[sock.fileno()] = link
            link.events[sock.fileno()] = _IN
            self._epoll.register(sock.fileno(), _IN)
        try:
            for direction, data in zip((link.up, link.down), link.pending):
                if data:
                    direction.inspect(memoryview(data))
                    direction.moved += len(data)
                    direction.queue(data)
        except OSError:
            self._end(link, "broken")
            return
        now = time.monotonic()
        if link.expires <= now:
            self._expire(link, now)
        else:
            self._at(link.expires, link)
            self._interest(link)
        self._fast_sync(link)

    def _input(self, link: Link) -> None:
        """The browser sent input: tell trio now, or at the end of this report interval."""
        now = time.monotonic()
        if now - link.reported_at >= self.report_every:
            self._report(link, now)
        elif not link.unreported:
            link.unreported = True
            link.frames.judging = False  # more input would change nothing until it is reported
            self._at(link.reported_at + self.report_every, link)

    def _report(self, link: Link, now: float) -> None:
        link.reported_at = now
        link.unreported = False
        link.frames.judging = True
        self._to_trio(link.on_input)

    def _ready(self, link: Link, fd: int, mask: int) -> None:
        client_side = fd == link.client_fd
        reading = link.up if client_side else link.down
        writing = link.down if client_side else link.up
        try:
            error = reading.error or writing.error
            if error is not None:
                raise error
            if mask & _OUT:
                writing.send_pending()
            if mask & ~_OUT:  # readable, hung up or failed: a read tells which
                reading.pump()
        except OSError as exc:
            self._end(link, "broken")
            log.debug("front door relay: a connection broke: %s", exc)
            return
        if link.closing:
            if link.up.eof and link.down.done:
                self._end(link, "expired")  # the browser closed its side after our Close frame
                return
        elif link.up.done and link.down.done:
            self._end(link, "closed")
            return
        elif link.expiring and not client_side:
            self._expire(link, time.monotonic())  # it waited for the IDE's frame to end
            return
        elif (link.up.done or link.down.done) and link.deadline == _NEVER:
            link.deadline = time.monotonic() + link.linger
            self._at(link.deadline, link)
        self._interest(link)

    def _interest(self, link: Link) -> None:
        """Watch each socket for what its two directions wait for. A socket with nothing to wait
        for is taken out of the epoll set: a hang-up is reported whatever the mask, and would be
        reported again and again while, say, its bytes wait for the other side to take the last."""
        for sock, reading, writing in ((link.client, link.up, link.down), (link.ide, link.down, link.up)):
            fd = sock.fileno()
            if fd not in link.events:
                continue  # no longer watched (the IDE's side of a closing connection)
            mask = (_IN if reading.reading else 0) | (_OUT if writing.pending else 0)
            was = link.events[fd]
            if mask == was:
                continue
            link.events[fd] = mask
            if not mask:
                self._epoll.unregister(fd)
            elif not was:
                self._epoll.register(fd, mask)
            else:
                self._epoll.modify(fd, mask)

    def _expire(self, link: Link, now: float) -> None:
        """The credentials ran out: Close frames at frame boundaries, then close. While the IDE is
        inside a frame, wait (at most :data:`CLOSE_GRACE`) for it to end."""
        if not (link.boundaries.at_boundary and not link.down.pending):
            if not link.expiring:
                link.expiring = True
                link.deadline = min(link.deadline, now + CLOSE_GRACE)
                self._at(link.deadline, link)
            return
        link.expiring = False
        link.closing = True
        link.deadline = now + CLOSE_GRACE
        self._at(link.deadline, link)
        try:
            if not link.down.done:
                link.down.eof = True
                link.down.queue(close_frame(CLOSE_POLICY, "session expired: sign in again", masked=False))
        except OSError:
            self._end(link, "expired")
            return
        # The IDE: a Close frame if it takes one now (between two of the browser's frames), then
        # it is done with. The browser: read (and dropped) until it closes - closing with its
        # Close frame unread would reset the connection and could lose ours.
        ide = link.ide.fileno()
        try:
            if not link.up.done and not link.up.pending and link.frames.at_boundary:
                link.ide.send(close_frame(CLOSE_GOING_AWAY, "session expired", masked=True))
            link.ide.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        link.events.pop(ide, None)
        self._by_fd.pop(ide, None)
        try:
            self._epoll.unregister(ide)
        except OSError:
            pass
        link.up.pending, link.up.eof, link.up.done, link.up.discard = b"", False, True, True
        self._interest(link)

    def _end(self, link: Link, reason: str) -> None:
        self._count(link)
        link.ended = True
        self._links.discard(link)
        link.up.pending = link.down.pending = b""  # no longer held
        for direction, sock in ((link.up, link.client), (link.down, link.ide)):
            fd = sock.fileno()
            if fd >= 0:
                if direction.fast >= 0 and self._fast is not None:
                    self._fast.disable(fd)  # before the fd number can be reused
                    direction.fast = -1
                self._by_fd.pop(fd, None)
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass
            sock.close()
        if link.unreported:
            self._to_trio(link.on_input)
        self._to_trio(lambda: link.on_end(reason))
