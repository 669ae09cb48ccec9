"""The WebSocket relay thread on real sockets: a TCP pair for the browser, a Unix pair for the IDE.

Each test plays both ends with plain blocking sockets (in worker threads) and drives
:meth:`Relay.carry` from trio, as the front door does after a 101.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import time
from functools import partial
from typing import Any, AsyncIterator, Callable, Iterator, TypeVar

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, Ping, TextMessage

from supervisor.frontdoor import fastrelay
from supervisor.frontdoor.relay import CLOSE_GOING_AWAY, CLOSE_POLICY, TIGHT_READ, FrameBoundaries, Relay, _Direction, close_frame
from supervisor.metrics import FRONTDOOR_LIMITS

T = TypeVar("T")


def client_frames(*events: Any) -> bytes:
    """Masked frames as a browser sends them."""
    conn = Connection(ConnectionType.CLIENT)
    return b"".join(conn.send(event) for event in events)


def server_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outside = socket.create_connection(listener.getsockname())
        inside, _ = listener.accept()
    return outside, inside


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = sock.recv(n - len(data))
        if not piece:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        data += piece
    return data


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while piece := sock.recv(65536):
        data += piece
    return data


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


class Ends:
    """The browser's and the IDE's ends of one relayed connection, and what the relay reported."""

    def __init__(self) -> None:
        self.browser, client = tcp_pair()
        ide_inside, self.ide = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for sock in (self.browser, self.ide):
            sock.settimeout(10)
        self.fds = (client, ide_inside)  # what the front door holds (it closes them after carry)
        self.inputs = 0
        self.up = 0
        self.down = 0

    def on_input(self) -> None:
        self.inputs += 1

    def count_up(self, n: int) -> None:
        self.up += n

    def count_down(self, n: int) -> None:
        self.down += n

    def carry_in(self, nursery: trio.Nursery, relay: Relay, **kwargs: Any) -> list[str]:
        """:meth:`carry` as a task of ``nursery``; the list gets why the connection ended."""
        result: list[str] = []

        async def run() -> None:
            result.append(await self.carry(relay, **kwargs))

        nursery.start_soon(run)
        return result

    async def exchange(self, relay: Relay, to_ide: list[bytes], to_browser: list[bytes], **kwargs: Any) -> tuple[bytes, bytes, str]:
        """Carry the connection while the browser sends the pieces ``to_ide`` and the IDE the
        pieces ``to_browser``, both at once, each then closing its side; what the IDE and the
        browser received, and why the connection ended."""
        got: dict[str, bytes] = {}

        def send(sock: socket.socket, pieces: list[bytes]) -> None:
            for piece in pieces:
                sock.sendall(piece)
            sock.shutdown(socket.SHUT_WR)

        async def side(name: str, sock: socket.socket, peer: socket.socket, pieces: list[bytes]) -> None:
            async with trio.open_nursery() as inner:
                inner.start_soon(in_thread, partial(send, sock, pieces))
                got[name] = await in_thread(partial(read_to_eof, peer))

        async with trio.open_nursery() as nursery:
            result = self.carry_in(nursery, relay, **kwargs)
            nursery.start_soon(side, "ide", self.browser, self.ide, to_ide)
            nursery.start_soon(side, "browser", self.ide, self.browser, to_browser)
        return got["ide"], got["browser"], result[0]

    async def carry(self, relay: Relay, **kwargs: Any) -> str:
        try:
            return await relay.carry(self.fds[0].fileno(), self.fds[1].fileno(), on_input=self.on_input,
                                     to_ide=self.count_up, to_client=self.count_down, **kwargs)
        finally:
            for sock in self.fds:
                sock.close()  # as the front door does: the relay's duplicates keep the connection

    def close(self) -> None:
        for sock in (self.browser, self.ide, *self.fds):
            sock.close()


def fast_path_built() -> bool:
    """Whether the C fast path is there; a machine with a C compiler must have built it."""
    if fastrelay.library_path() is not None:
        return True
    if shutil.which("cc") or shutil.which("gcc"):
        pytest.fail("supervisor/frontdoor/_fastrelay*.so is missing although a C compiler is installed: "
                    "reinstall the project (pip install -e .) and read its build output")
    return False


@pytest.fixture(params=["fast", "python"])
async def relay(request: pytest.FixtureRequest) -> AsyncIterator[Relay]:
    """The relay with its C fast path, and with the pure-Python loop only."""
    fast = request.param == "fast"
    if fast and not fast_path_built():
        pytest.skip("no C compiler: the relay's C fast path was not built")
    r = Relay(buffer_size=64 * 1024, report_every=0.2, fast_path=fast)
    assert r.mode.startswith("C fast path") == fast, r.mode
    r.start()
    yield r
    r.stop()


@pytest.fixture
def ends() -> Iterator[Ends]:
    e = Ends()
    yield e
    e.close()


async def test_bytes_flow_both_ways_and_half_closes_end_it(relay: Relay, ends: Ends) -> None:
    async with trio.open_nursery() as nursery:
        result = ends.carry_in(nursery, relay, pending=(client_frames(TextMessage("early")), b""))
        big = os.urandom(3 * 2**20)
        early = await in_thread(lambda: read_exactly(ends.ide, len(client_frames(TextMessage("early")))))
        assert early[:2] == b"\x81\x85"
        frames = client_frames(BytesMessage(big))
        await in_thread(lambda: ends.browser.sendall(frames))
        assert await in_thread(lambda: read_exactly(ends.ide, len(frames))) == frames
        answer = server_frame(big)

        def ide_answers() -> None:
            ends.ide.sendall(answer)
            ends.ide.shutdown(socket.SHUT_WR)

        nursery.start_soon(in_thread, ide_answers)
        assert await in_thread(lambda: read_to_eof(ends.browser)) == answer  # the IDE's EOF was passed on
        ends.browser.shutdown(socket.SHUT_WR)
        assert await in_thread(lambda: read_to_eof(ends.ide)) == b""
    assert result == ["closed"]
    assert ends.up == len(frames) + len(early) and ends.down == len(answer)
    assert relay.connections == 0


async def test_input_reaches_trio_at_once_then_at_most_once_per_interval_and_keepalives_never(relay: Relay, ends: Ends) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ends.carry, relay)
        keepalives = client_frames(TextMessage("3"), Ping(b"x"), TextMessage("2"))
        await in_thread(lambda: ends.browser.sendall(keepalives))
        await in_thread(lambda: read_exactly(ends.ide, len(keepalives)))
        await trio.sleep(0.3)
        assert ends.inputs == 0
        typed = client_frames(TextMessage('42/services,["keystroke","a"]'))
        await in_thread(lambda: ends.browser.sendall(typed))
        await in_thread(lambda: read_exactly(ends.ide, len(typed)))
        with trio.fail_after(0.15):  # the first input after a quiet spell is not held back
            while ends.inputs == 0:
                await trio.sleep(0.005)
        burst = typed * 200
        for _ in range(5):
            await in_thread(lambda: ends.browser.sendall(burst))
            await in_thread(lambda: read_exactly(ends.ide, len(burst)))
        await trio.sleep(0.3)  # the last of the burst is reported at the end of its interval
        assert 2 <= ends.inputs <= 4, ends.inputs
        ends.browser.close()
        ends.ide.close()


async def test_expiry_sends_close_frames_between_the_ides_frames(relay: Relay, ends: Ends) -> None:
    async with trio.open_nursery() as nursery:
        result = ends.carry_in(nursery, relay, expires=time.monotonic() + 0.4)
        message = server_frame(b"m" * 1000)
        await in_thread(lambda: ends.ide.sendall(message[:500]))  # the IDE is inside a frame at expiry
        assert await in_thread(lambda: read_exactly(ends.browser, 500)) == message[:500]
        await trio.sleep(0.6)
        assert result == []
        await in_thread(lambda: ends.ide.sendall(message[500:]))
        got = await in_thread(lambda: read_to_eof(ends.browser))
        close = close_frame(CLOSE_POLICY, "session expired: sign in again", masked=False)
        assert got == message[500:] + close
        code, = struct.unpack("!H", close[2:4])
        assert code == 1008
        to_ide = await in_thread(lambda: read_to_eof(ends.ide))
        assert to_ide[0] == 0x88 and to_ide[1] & 0x80  # a masked Close frame, then EOF
        mask, payload = to_ide[2:6], to_ide[6:]
        assert struct.unpack("!H", bytes(b ^ mask[i % 4] for i, b in enumerate(payload))[:2]) == (CLOSE_GOING_AWAY,)
        await in_thread(lambda: ends.browser.sendall(client_frames(TextMessage("late"))))  # dropped
        ends.browser.shutdown(socket.SHUT_WR)
    assert result == ["expired"]


async def test_already_expired_credentials_close_at_once(relay: Relay, ends: Ends) -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(ends.carry, relay, expires=0.0))
            got = await in_thread(lambda: read_to_eof(ends.browser))
            assert got[:2] == b"\x88" + bytes((len(got) - 2,)) and got[2:4] == struct.pack("!H", CLOSE_POLICY)
            ends.browser.close()


async def test_cancelling_the_carrier_cuts_the_connection(relay: Relay, ends: Ends) -> None:
    with trio.move_on_after(0.2):
        await ends.carry(relay)
    assert await in_thread(lambda: read_to_eof(ends.browser)) == b""
    assert await in_thread(lambda: read_to_eof(ends.ide)) == b""


async def test_a_broken_side_ends_both(relay: Relay, ends: Ends) -> None:
    async with trio.open_nursery() as nursery:
        result = ends.carry_in(nursery, relay)
        ends.browser.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ends.browser.close()  # a reset
        assert await in_thread(lambda: read_to_eof(ends.ide)) == b""
    assert result in (["broken"], ["closed"], ["linger"]) and relay.connections == 0


async def test_stopping_the_relay_ends_its_connections() -> None:
    relay = Relay()
    relay.start()
    ends = Ends()
    try:
        async with trio.open_nursery() as nursery:
            result = ends.carry_in(nursery, relay)
            while relay.connections == 0:
                await trio.sleep(0.01)
            relay.stop()
        assert result == ["stopped"]
        assert await in_thread(lambda: read_to_eof(ends.browser)) == b""
    finally:
        ends.close()


@pytest.mark.parametrize("chunk", [1, 2, 5, 13, 4096])
def test_frame_boundaries_in_any_chunking(chunk: int) -> None:
    data = server_frame(b"a" * 5) + server_frame(b"b" * 300) + server_frame(b"c" * 70_000) + server_frame(b"", 0x9)
    ends_at = set()
    total = 0
    for frame in (server_frame(b"a" * 5), server_frame(b"b" * 300), server_frame(b"c" * 70_000), server_frame(b"", 0x9)):
        total += len(frame)
        ends_at.add(total)
    tracker = FrameBoundaries()
    for i in range(0, len(data), chunk):
        piece = data[i : i + chunk]
        tracker.feed(memoryview(piece))
        end = i + len(piece)
        assert tracker.at_boundary == (end in ends_at), end


async def test_byte_counts_reach_the_metrics_while_the_connection_is_open(relay: Relay, ends: Ends) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ends.carry, relay)
        frame = client_frames(TextMessage("x" * 500))
        await in_thread(lambda: ends.browser.sendall(frame))
        await in_thread(lambda: read_exactly(ends.ide, len(frame)))
        with trio.fail_after(3):  # counted about once a second, not only at the end
            while ends.up != len(frame):
                await trio.sleep(0.05)
        ends.browser.close()
        ends.ide.close()


async def test_a_hung_up_socket_waiting_for_the_other_side_does_not_spin(relay: Relay, ends: Ends) -> None:
    """The browser sent its last bytes and closed, the IDE closed its side and is slow to read:
    the relay waits (no busy loop on the hang-up) and delivers everything once the IDE reads."""
    async with trio.open_nursery() as nursery:
        result = ends.carry_in(nursery, relay, linger=30)
        ends.ide.shutdown(socket.SHUT_WR)  # the IDE's EOF: the relay half-closes the browser's side
        assert await in_thread(lambda: read_to_eof(ends.browser)) == b""
        # More than the IDE's socket holds (the relay keeps the rest), little enough that the
        # browser's FIN reaches the relay's socket behind it: a hang-up while the relay cannot read.
        data = os.urandom(300 * 1024)

        def browser_sends() -> None:
            ends.browser.sendall(data)
            ends.browser.shutdown(socket.SHUT_WR)

        await in_thread(browser_sends)
        await trio.sleep(0.2)
        assert relay._thread is not None
        clock = time.pthread_getcpuclockid(relay._thread.ident)  # type: ignore[arg-type]
        before = time.clock_gettime(clock)
        await trio.sleep(0.5)
        assert time.clock_gettime(clock) - before < 0.1, "the relay thread spins on a hung-up socket"
        assert await in_thread(lambda: read_to_eof(ends.ide)) == data
    assert result == ["closed"]


async def test_the_fast_path_carries_plain_frames_and_hands_python_the_rest(ends: Ends, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the browser's input of this interval is reported, round trips of small frames pass
    through C alone; a frame split over two reads, and the browser's input at the next
    interval, come back to Python and arrive intact and counted."""
    if not fast_path_built():
        pytest.skip("no C compiler: the relay's C fast path was not built")
    seen_by_python: list[int] = []
    pass_on, forward = Relay._pass_on, _Direction.forward

    def counted_pass_on(direction: Any) -> bool:
        seen_by_python.append(1)
        return pass_on(direction)

    def counted_forward(direction: Any, n: int) -> bool:
        seen_by_python.append(1)
        return forward(direction, n)

    monkeypatch.setattr(Relay, "_pass_on", staticmethod(counted_pass_on))
    monkeypatch.setattr(_Direction, "forward", counted_forward)
    relay = Relay(buffer_size=64 * 1024, report_every=0.5, fast_path=True)
    relay.start()
    try:
        async with trio.open_nursery() as nursery:
            result = ends.carry_in(nursery, relay)
            typed = client_frames(TextMessage('42/services,["keystroke","a"]'))
            answer = server_frame(b'43/services,["ok"]', 0x1)

            def round_trips(n: int) -> None:
                for _ in range(n):
                    ends.browser.sendall(typed)
                    assert read_exactly(ends.ide, len(typed)) == typed
                    ends.ide.sendall(answer)
                    assert read_exactly(ends.browser, len(answer)) == answer

            await in_thread(lambda: round_trips(2))  # input reported, then held back: judging stops
            before = len(seen_by_python)
            await in_thread(lambda: round_trips(200))
            assert len(seen_by_python) - before <= 2, "plain frames should not have entered Python"
            assert ends.inputs == 1

            big = server_frame(os.urandom(40_000))

            def split_frame() -> None:
                ends.ide.sendall(big[:1000])
                assert read_exactly(ends.browser, 1000) == big[:1000]
                ends.ide.sendall(big[1000:])
                assert read_exactly(ends.browser, len(big) - 1000) == big[1000:]

            before = len(seen_by_python)
            await in_thread(split_frame)
            assert len(seen_by_python) > before  # not whole frames: Python passed them on
            await in_thread(lambda: round_trips(5))  # and its reader is at a boundary again
            with trio.fail_after(3):  # the held-back input is reported at the end of its interval
                while ends.inputs < 2:
                    await trio.sleep(0.02)
            ends.browser.close()
            ends.ide.close()
        assert result == ["closed"]
        assert ends.up == 207 * len(typed)
        assert ends.down == 207 * len(answer) + len(big)
    finally:
        relay.stop()


def raw_frame(payload: bytes, *, opcode: int, masked: bool, rsv: int = 0) -> bytes:
    """One frame as it may come over the wire, well-formed or not (reserved bits, odd opcodes)."""
    n = len(payload)
    first = 0x80 | rsv << 4 | opcode
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((first, mask_bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    return head + (b"\x01\x02\x03\x04" if masked else b"") + payload


#: Frames as (payload or the size of a large one, opcode, masked, reserved bits): small to print.
frames_strategy = st.lists(
    st.tuples(
        st.one_of(st.binary(max_size=130), st.integers(65_530, 70_000)),
        st.sampled_from([0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB]),
        st.booleans(),
        st.sampled_from([0, 0, 0, 4]),
    ),
    min_size=1, max_size=12,
)


def wire(frames: list[tuple[bytes | int, int, bool, int]]) -> bytes:
    return b"".join(raw_frame(p if isinstance(p, bytes) else b"p" * p, opcode=op, masked=m, rsv=rsv) for p, op, m, rsv in frames)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "python"])
@settings(database=None, deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(up=frames_strategy, down=frames_strategy, cuts=st.lists(st.integers(1, 80_000), max_size=8),
       report_every=st.sampled_from([0.0, 0.05, 10.0]))
def test_any_frames_in_any_chunking_arrive_byte_for_byte(fast: bool, up: list[tuple[bytes | int, int, bool, int]],
                                                         down: list[tuple[bytes | int, int, bool, int]], cuts: list[int],
                                                         report_every: float) -> None:
    """Whatever the browser and the IDE send - frames of every size class, control frames,
    reserved bits, unknown opcodes, masked or not - cut anywhere, both loops pass it on unchanged
    and count it, and the connection ends when both sides have closed."""
    if fast and not fast_path_built():
        pytest.skip("no C compiler: the relay's C fast path was not built")
    browser_bytes, ide_bytes = wire(up), wire(down)

    def pieces(blob: bytes) -> list[bytes]:
        at = sorted({c % max(1, len(blob)) for c in cuts} | {0, len(blob)})
        return [blob[a:b] for a, b in zip(at, at[1:])]

    async def scenario() -> None:
        relay = Relay(buffer_size=64 * 1024, report_every=report_every, fast_path=fast)
        relay.start()
        ends = Ends()
        try:
            got = await ends.exchange(relay, pieces(browser_bytes), pieces(ide_bytes))
            assert got == (browser_bytes, ide_bytes, "closed")
            assert (ends.up, ends.down) == (len(browser_bytes), len(ide_bytes))
        finally:
            ends.close()
            relay.stop()

    trio.run(scenario)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "python"])
@settings(database=None, deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])
@given(waves=st.lists(st.lists(st.tuples(frames_strategy, frames_strategy, st.integers(0, 200), st.integers(0, 200)),
                              min_size=1, max_size=4), min_size=2, max_size=3),
       shifts=st.lists(st.integers(0, 5), min_size=3, max_size=3))
def test_many_connections_at_once_and_one_after_another_never_mix_their_bytes(
    fast: bool, waves: list[list[tuple[list[tuple[bytes | int, int, bool, int]], list[tuple[bytes | int, int, bool, int]], int, int]]],
    shifts: list[int],
) -> None:
    """Waves of connections through one relay, each wave's connections at once, each starting with
    bytes the front door had already read (cut anywhere, so often mid-frame): every IDE gets exactly
    its own browser's bytes and every browser its own IDE's - also when a connection's file
    descriptors are reused by the next wave's (the fast path keys its table by descriptor)."""
    if fast and not fast_path_built():
        pytest.skip("no C compiler: the relay's C fast path was not built")

    async def one(relay: Relay, up: bytes, down: bytes, read_up: int, read_down: int) -> None:
        ends = Ends()
        try:
            got = await ends.exchange(relay, [up[read_up:]], [down[read_down:]], pending=(up[:read_up], down[:read_down]))
            assert got == (up, down, "closed")
        finally:
            ends.close()

    async def scenario() -> None:
        relay = Relay(buffer_size=64 * 1024, report_every=0.05, fast_path=fast)
        relay.start()
        try:
            for wave, shift in zip(waves, shifts):
                # Descriptors held across the wave: the next connections get other numbers, and a
                # number a closed connection had may now be any socket of any connection.
                held = [os.open(os.devnull, os.O_RDONLY) for _ in range(shift)]
                try:
                    async with trio.open_nursery() as nursery:
                        for up, down, read_up, read_down in wave:
                            nursery.start_soon(one, relay, wire(up), wire(down), read_up, read_down)
                finally:
                    for fd in held:
                        os.close(fd)
            assert relay.connections == 0
        finally:
            relay.stop()

    trio.run(scenario)


async def test_a_peer_that_never_reads_holds_back_the_sender_not_the_daemons_memory(relay: Relay, ends: Ends) -> None:
    """The IDE never reads while the browser sends 16 MiB: the relay keeps at most one read
    (``buffer_size``) per direction, and the browser's sending stalls (backpressure); then the
    IDE reads and gets every byte."""
    frames = client_frames(BytesMessage(os.urandom(16 * 2**20)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ends.carry, relay)
        sent = await in_thread(lambda: send_until_stalled(ends.browser, frames))
        assert sent < len(frames), "the browser could send everything although the IDE never read"
        assert 0 < relay.pending_bytes <= relay.buffer_size
        nursery.start_soon(in_thread, lambda: ends.browser.sendall(frames[sent:]))
        assert await in_thread(lambda: read_exactly(ends.ide, len(frames))) == frames
        assert relay.pending_bytes == 0
        nursery.cancel_scope.cancel()


def send_until_stalled(sock: socket.socket, data: bytes, quiet: float = 0.5) -> int:
    """Send ``data`` until the peer takes nothing more for ``quiet`` seconds; how much it took."""
    sock.setblocking(False)
    sent = 0
    idle_since = time.monotonic()
    try:
        while time.monotonic() - idle_since < quiet and sent < len(data):
            try:
                sent += sock.send(data[sent:sent + 65536])
            except BlockingIOError:
                time.sleep(0.01)
                continue
            idle_since = time.monotonic()
    finally:
        sock.setblocking(True)
    return sent


def fast_directions(relay: Relay) -> int:
    """How many directions the C fast path passes on now (a snapshot of the relay thread's state)."""
    return sum(direction.fast >= 0 for link in list(relay._links) for direction in (link.up, link.down))


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "python"])
async def test_over_its_memory_budget_the_relay_reads_little_and_every_connection_still_flows(fast: bool) -> None:
    """IDEs that never read while their browsers send: each stalled direction holds one read.
    Past ``memory`` bytes over all connections the relay reads 4 KiB at a time (C included):
    every further stalled direction holds at most that; another connection's round trips still
    arrive intact; once the IDEs read, every byte arrives and the relay reads whole buffers again."""
    if fast and not fast_path_built():
        pytest.skip("no C compiler: the relay's C fast path was not built")
    relay = Relay(buffer_size=64 * 1024, fast_path=fast, memory=16 * 1024)
    relay.start()
    stalled: list[tuple[Ends, int]] = []
    before = FRONTDOOR_LIMITS.labels(limit="relay_memory")._value.get()
    frames = client_frames(BytesMessage(os.urandom(8 * 2**20)))
    try:
        async with trio.open_nursery() as nursery:
            async def stall() -> None:
                ends = Ends()
                nursery.start_soon(ends.carry, relay)
                stalled.append((ends, await in_thread(lambda: send_until_stalled(ends.browser, frames, 0.2))))

            while not relay.tight:
                assert len(stalled) < 20, f"never over the budget: {relay.pending_bytes} bytes held"
                await stall()
            assert FRONTDOOR_LIMITS.labels(limit="relay_memory")._value.get() - before == 1
            held = relay.pending_bytes
            assert held <= 16 * 1024 + 64 * 1024
            for _ in range(6):
                await stall()
            assert relay.tight and relay.pending_bytes - held <= 6 * TIGHT_READ
            assert not fast_directions(relay), "the C fast path (whole-buffer reads) is still on while over the budget"
            # Another connection still flows, both ways, intact.
            other = Ends()
            stalled.append((other, 0))
            message = client_frames(BytesMessage(os.urandom(2**20)))
            answer = server_frame(os.urandom(2**20))
            nursery.start_soon(other.carry, relay)
            nursery.start_soon(in_thread, lambda: other.browser.sendall(message))
            nursery.start_soon(in_thread, lambda: other.ide.sendall(answer))
            assert await in_thread(lambda: read_exactly(other.ide, len(message))) == message
            assert await in_thread(lambda: read_exactly(other.browser, len(answer))) == answer
            # The IDEs read: everything arrives, nothing is held, reads are whole again.
            for ends, sent in stalled:
                assert await in_thread(lambda: read_exactly(ends.ide, sent)) == frames[:sent]
            with trio.fail_after(5):
                while relay.pending_bytes or relay.tight:
                    await trio.sleep(0.01)
            if fast:  # C carries the idle connections again (relay thread state: polled)
                with trio.fail_after(5):
                    while not fast_directions(relay):
                        await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        relay.stop()
        for ends, _ in stalled:
            ends.close()
