#!/usr/bin/env python3
"""What the front door's WebSocket activity sniffing costs per browser frame (a reproduction).

    .venv/bin/python integration/bench/wsactivity_cost.py [--limit-us 5]

Feeds ``supervisor.frontdoor.wsactivity.ClientFrames`` masked frames of 10, 100 and 1000 bytes
(as browsers send them) and prints the CPU time per frame, next to the cost of unmasking a frame
with a bytewise generator (what ``ClientFrames.feed`` does for frames <= SNIFF_LIMIT) and with one
``int.from_bytes`` XOR. Exits 1 if a 100 B frame costs more than ``--limit-us`` (default 5 us):
every small message a browser sends pays it, on top of the copy through Python (see
``integration/bench/README.md``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from supervisor.frontdoor.wsactivity import ClientFrames  # noqa: E402


def masked_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode, 0x80 | n]) if n < 126 else bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def unmask_generator(chunk: bytes, mask: bytes, start: int = 0) -> bytes:
    return bytes(b ^ mask[(start + i) % 4] for i, b in enumerate(chunk))


def unmask_int(chunk: bytes, mask: bytes, start: int = 0) -> bytes:
    n = len(chunk)
    key = (mask[start % 4:] + mask[: start % 4]) * (n // 4 + 1)
    return (int.from_bytes(chunk, "little") ^ int.from_bytes(key[:n], "little")).to_bytes(n, "little")


def per_call_us(fn, rounds: int) -> float:  # type: ignore[no-untyped-def]
    began = time.process_time()
    for _ in range(rounds):
        fn()
    return (time.process_time() - began) / rounds * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit-us", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=20000)
    args = parser.parse_args()
    worst = 0.0
    for size in (10, 100, 1000):
        frame = masked_frame(os.urandom(size))
        frames = ClientFrames(lambda n: None)
        feed = per_call_us(lambda: frames.feed(frame), args.rounds)
        chunk, mask = os.urandom(size), os.urandom(4)
        assert unmask_int(chunk, mask, 3) == unmask_generator(chunk, mask, 3)
        gen = per_call_us(lambda: unmask_generator(chunk, mask), args.rounds)
        fast = per_call_us(lambda: unmask_int(chunk, mask), args.rounds)
        print(f"{size:>5} B frame: ClientFrames.feed {feed:6.1f} us   (unmask: generator {gen:6.1f} us, int.from_bytes {fast:5.1f} us)")
        if size == 100:
            worst = feed
    if worst > args.limit_us:
        print(f"FAIL: a 100 B browser frame costs {worst:.1f} us of CPU in ClientFrames.feed (limit {args.limit_us:g} us)")
        return 1
    print(f"ok: a 100 B browser frame costs {worst:.1f} us (limit {args.limit_us:g} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
