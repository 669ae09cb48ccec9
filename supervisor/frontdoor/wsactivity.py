"""Which browser-to-IDE WebSocket traffic is a person, and which is a keep-alive. Pure, no I/O.

An open Theia tab nobody touches still sends messages: engine.io answers the server's ping
(``3``) and Theia's connection-status service calls the backend every 5 s. Counting those as
input would keep every open tab ACTIVE forever, so the front door reads the browser's frames
(they are small; the IDE's direction is still spliced untouched) and reports as input only
messages that are neither control frames, engine.io ping/pong, socket.io binary-event headers
(their attachments are judged instead), nor a short frame containing one of the configured
keep-alive markers.
"""

from __future__ import annotations

import re
from typing import Callable

ENGINE_IO_KEEPALIVES = frozenset({b"2", b"3", b"2probe", b"3probe"})
_MAX_HEADER = 14  # 2 + 8 (extended length) + 4 (mask)
SNIFF_LIMIT = 1024  # frames up to this size are inspected; larger ones are always input
_CONTROL_OPCODES = frozenset({0x8, 0x9, 0xA})  # close, ping, pong
_OPCODES = frozenset({0x0, 0x1, 0x2}) | _CONTROL_OPCODES
_BINARY_EVENT_HEADER = re.compile(rb"45\d+-")  # engine.io message + socket.io BINARY_EVENT, N attachments


class ClientFrames:
    """Fed the raw browser-to-IDE bytes after a WebSocket upgrade, in any chunking; calls
    ``on_input(size)`` for each frame a person caused. If the bytes stop looking like WebSocket
    frames it gives up and counts everything as input (never the other way round)."""

    def __init__(self, on_input: Callable[[int], None], markers: tuple[bytes, ...] = ()) -> None:
        self.on_input = on_input
        self.markers = markers
        self._buffer = b""  # header bytes not yet complete
        self._remaining = 0  # payload bytes of the current frame still to come
        self._opcode = 0
        self._length = 0
        self._mask = b""
        self._sample = bytearray()
        self._in_payload = False
        self._gave_up = False
        #: False: only follow the frames (their boundaries), judge none - for a caller that
        #: already knows there was input and has not passed that on yet (the relay thread).
        self.judging = True
        self._judged = True  # whether the current frame is judged (judging when it began)

    @property
    def at_boundary(self) -> bool:
        """True between two frames (nothing of a next frame seen yet)."""
        return not self._in_payload and not self._buffer

    @property
    def understood(self) -> bool:
        """False once the bytes stopped looking like WebSocket frames (all counts as input then)."""
        return not self._gave_up

    def feed(self, data: bytes | memoryview) -> None:
        """Judge the next bytes (only read during the call: the caller may reuse its buffer)."""
        if self._gave_up:
            self.on_input(len(data))
            return
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if not self._in_payload and not self._buffer and end - pos >= 6:
                # Fast path: a small masked frame that is here whole (nearly every browser frame).
                first, second = view[pos], view[pos + 1]
                length = second & 0x7F
                opcode = first & 0x0F
                if second & 0x80 and length < 126 and not first & 0x70 and opcode in _OPCODES and end - pos >= 6 + length:
                    begin = pos + 6
                    pos = begin + length
                    if opcode in _CONTROL_OPCODES or not self.judging:
                        continue
                    mask = bytes(view[begin - 4 : begin])
                    unmask = int.from_bytes((mask * (length // 4 + 1))[:length], "little")
                    sample = (int.from_bytes(view[begin:pos], "little") ^ unmask).to_bytes(length, "little")
                    if not self._is_keepalive_sample(opcode, sample):
                        self.on_input(length)
                    continue
            if not self._in_payload:
                old = self._buffer
                head = old + bytes(view[pos : pos + _MAX_HEADER])
                consumed = self._parse_header(head)
                if consumed is None:
                    self._buffer = head  # all that is left (a header is at most _MAX_HEADER bytes)
                    return
                self._buffer = b""
                if self._gave_up:
                    self.on_input(end - pos)
                    return
                pos += consumed - len(old)
                if self._remaining == 0:
                    self._finish_frame()
                continue
            take = min(self._remaining, end - pos)
            if self._length <= SNIFF_LIMIT and self._judged:
                start = self._length - self._remaining
                chunk = bytes(view[pos : pos + take])
                if self._mask:
                    key = (self._mask[start % 4 :] + self._mask[: start % 4]) * (take // 4 + 1)
                    unmasked = int.from_bytes(chunk, "little") ^ int.from_bytes(key[:take], "little")
                    chunk = unmasked.to_bytes(take, "little")
                self._sample.extend(chunk)
            self._remaining -= take
            pos += take
            if self._remaining == 0:
                self._finish_frame()

    def _parse_header(self, buf: bytes) -> int | None:
        """Parse a frame header at the start of ``buf``; its length, or None if incomplete."""
        if len(buf) < 2:
            return None
        first, second = buf[0], buf[1]
        opcode = first & 0x0F
        if first & 0x70 or opcode not in _OPCODES:
            self._gave_up = True  # reserved bits or opcodes: not a frame we understand
            return 0
        masked = bool(second & 0x80)
        length = second & 0x7F
        size = 2
        if length == 126:
            size += 2
        elif length == 127:
            size += 8
        header_end = size + (4 if masked else 0)
        if len(buf) < header_end:
            return None
        if length == 126:
            length = int.from_bytes(buf[2:4], "big")
        elif length == 127:
            length = int.from_bytes(buf[2:10], "big")
        self._opcode, self._length, self._remaining = opcode, length, length
        self._mask = bytes(buf[size:header_end]) if masked else b""
        self._sample = bytearray()
        self._in_payload = True
        self._judged = self.judging
        return header_end

    def _finish_frame(self) -> None:
        self._in_payload = False
        if not self._judged or self._is_keepalive():
            return
        self.on_input(self._length)

    def _is_keepalive(self) -> bool:
        if self._opcode in _CONTROL_OPCODES:
            return True
        if self._length > SNIFF_LIMIT:
            return False
        return self._is_keepalive_sample(self._opcode, bytes(self._sample))

    def _is_keepalive_sample(self, opcode: int, sample: bytes) -> bool:
        """Whether a data frame (of at most SNIFF_LIMIT bytes, unmasked) is a keep-alive."""
        if sample in ENGINE_IO_KEEPALIVES:
            return True
        for marker in self.markers:
            if marker in sample:
                return True
        # A socket.io binary event is a text header ("451-/services,[...{"_placeholder":true...}]")
        # followed by binary frames with the content: the header says nothing of who sent it; the
        # attachments are judged on their own.
        return opcode == 0x1 and _BINARY_EVENT_HEADER.match(sample) is not None and b'"_placeholder":true' in sample
