#!/usr/bin/env python3
"""Minimal TCP relays: the floor of what a pure-Python proxy costs per message, per runtime.

    python3 relay_proto.py --runtime trio|asyncio --mode copy|splice --port N --upstream HOST:PORT

Accepts TCP on 127.0.0.1:N and, for each connection, connects to the upstream and moves bytes both
ways until EOF - no HTTP parsing, no authentication, nothing else. ``frontdoor.py --prototypes``
puts these beside the real front door (same echo upstream, same clients): the difference between
the front door and ``trio-copy``/``trio-splice`` is what the front door's own code costs; the
difference between the runtimes is what trio costs; ``splice`` moves the bytes with ``os.splice``
through a pipe (never into Python), trying the splice first and waiting for readiness only on
EAGAIN (the front door waits first, then splices).

- trio: one task per direction, ``receive_some``/``send_all`` (copy) or ``os.splice`` with
  ``trio.lowlevel.wait_readable``/``wait_writable`` (splice);
- asyncio: readiness callbacks (``loop.add_reader``/``add_writer``) on non-blocking sockets, no
  coroutine per message: ``recv_into`` a buffer and ``send`` (copy), or ``os.splice`` (splice).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import socket
import sys

BUF = 256 * 1024
PIPE = 1 << 20
F_SETPIPE_SZ = 1031
FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


def pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE)
    except OSError:
        pass
    return r, w


# ---- trio ------------------------------------------------------------------------------------------


def run_trio(port: int, upstream: tuple[str, int], mode: str) -> None:
    import trio

    async def copy(src: trio.SocketStream, dst: trio.SocketStream) -> None:
        while True:
            data = await src.receive_some(BUF)
            if not data:
                break
            await dst.send_all(data)
        await dst.send_eof()

    async def splice(src: trio.SocketStream, dst: trio.SocketStream) -> None:
        r, w = pipe()
        s, d = src.socket, dst.socket
        sfd, dfd = s.fileno(), d.fileno()
        try:
            while True:
                try:
                    n = os.splice(sfd, w, PIPE, flags=FLAGS)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(s)
                    continue
                if n == 0:
                    break
                while n:
                    try:
                        n -= os.splice(r, dfd, n, flags=FLAGS)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(d)
            await dst.send_eof()
        finally:
            os.close(r)
            os.close(w)

    pump = splice if mode == "splice" else copy

    async def handle(client: trio.SocketStream) -> None:
        up = await trio.open_tcp_stream(*upstream)
        for s in (client, up):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, up)
                nursery.start_soon(pump, up, client)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await up.aclose()
            await client.aclose()

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        print(f"relay listening on 127.0.0.1:{port}", flush=True)
        await trio.serve_listeners(handle, listeners)

    trio.run(main)


# ---- asyncio (readiness callbacks) -------------------------------------------------------------


def run_asyncio(port: int, upstream: tuple[str, int], mode: str) -> None:
    import asyncio

    loop = asyncio.new_event_loop()

    class Direction:
        """Moves bytes src -> dst from readiness callbacks; EOF is passed on as a half-close."""

        def __init__(self, src: socket.socket, dst: socket.socket, conn: Connection) -> None:
            self.src, self.dst, self.conn = src, dst, conn
            self.buf = bytearray(BUF)
            self.view = memoryview(self.buf)
            self.pending = b""  # copy: bytes read but not yet sent
            self.in_pipe = 0  # splice: bytes in the pipe not yet sent
            self.done = False
            if mode == "splice":
                self.r, self.w = pipe()
            loop.add_reader(src.fileno(), self.readable)

        def readable(self) -> None:
            try:
                while True:
                    if mode == "splice":
                        n = os.splice(self.src.fileno(), self.w, PIPE, flags=FLAGS)
                        if n == 0:
                            return self.eof()
                        self.in_pipe += n
                        if not self.flush():
                            return
                    else:
                        n = self.src.recv_into(self.buf)
                        if n == 0:
                            return self.eof()
                        self.pending = bytes(self.view[:n])
                        if not self.flush():
                            return
            except BlockingIOError:
                return
            except OSError:
                self.conn.close()

        def flush(self) -> bool:
            """Send what is held; False (and wait for writability) if the destination is full."""
            try:
                if mode == "splice":
                    while self.in_pipe:
                        self.in_pipe -= os.splice(self.r, self.dst.fileno(), self.in_pipe, flags=FLAGS)
                else:
                    while self.pending:
                        sent = self.dst.send(self.pending)
                        self.pending = self.pending[sent:]
            except BlockingIOError:
                loop.remove_reader(self.src.fileno())
                loop.add_writer(self.dst.fileno(), self.writable)
                return False
            except OSError:
                self.conn.close()
                return False
            return True

        def writable(self) -> None:
            if self.flush():
                loop.remove_writer(self.dst.fileno())
                loop.add_reader(self.src.fileno(), self.readable)

        def eof(self) -> None:
            loop.remove_reader(self.src.fileno())
            self.done = True
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.conn.maybe_close()

        def release(self) -> None:
            if mode == "splice":
                os.close(self.r)
                os.close(self.w)

    class Connection:
        def __init__(self, client: socket.socket) -> None:
            self.client = client
            self.up = socket.create_connection(upstream)
            self.closed = False
            for s in (client, self.up):
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.ways = [Direction(client, self.up, self), Direction(self.up, client, self)]

        def maybe_close(self) -> None:
            if all(w.done for w in self.ways):
                self.close()

        def close(self) -> None:
            if self.closed:
                return
            self.closed = True
            for s in (self.client, self.up):
                for remove in (loop.remove_reader, loop.remove_writer):
                    remove(s.fileno())
                s.close()
            for w in self.ways:
                w.release()

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(512)
    server.setblocking(False)

    def accept() -> None:
        while True:
            try:
                client, _ = server.accept()
            except BlockingIOError:
                return
            try:
                Connection(client)
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ECONNRESET):
                    raise
                client.close()

    loop.add_reader(server.fileno(), accept)
    print(f"relay listening on 127.0.0.1:{port}", flush=True)
    loop.run_forever()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime", choices=("trio", "asyncio"), required=True)
    p.add_argument("--mode", choices=("copy", "splice"), required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="HOST:PORT")
    a = p.parse_args()
    host, _, port = a.upstream.rpartition(":")
    (run_trio if a.runtime == "trio" else run_asyncio)(a.port, (host, int(port)), a.mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
