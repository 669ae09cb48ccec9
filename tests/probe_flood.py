"""A hostile user holding connections to the probe port: ``python -m tests.probe_flood STYLE COUNT
HOST:PORT``. Keeps COUNT connections open from 127.0.0.2-251 (any loopback source address, as a
user may pick), opening a new one for each the server closes; prints ``holding COUNT`` once it
first holds them all, and runs until killed.

Styles: ``idle`` (sends nothing), ``slowloris`` (a request head one byte every 0.2 s), ``half``
(a request head without its final blank line), ``unread`` (a whole /metrics request, a tiny
receive buffer, and the answer never read).
"""

from __future__ import annotations

import resource
import select
import socket
import sys
import time

FIRST_BYTES = {
    "idle": b"",
    "slowloris": b"GET /healthz HTTP/1.1\r\nX-",
    "half": b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
    "unread": b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
}
CLOSED = select.POLLRDHUP | select.POLLHUP | select.POLLERR


def open_one(style: str, host: str, port: int, n: int) -> socket.socket | None:
    sock = socket.socket()
    try:
        if host.startswith("127."):
            sock.bind((f"127.0.0.{2 + n % 250}", 0))
        if style == "unread":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        sock.settimeout(1.0)
        sock.connect((host, port))
        sock.sendall(FIRST_BYTES[style])
        sock.setblocking(False)
        return sock
    except OSError:
        sock.close()
        return None


def main() -> None:
    style, count, address = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    host, _, port = address.rpartition(":")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held: dict[int, socket.socket] = {}
    poller = select.poll()
    announced = False
    opened = 0
    drip = time.monotonic()
    while True:
        while len(held) < count:
            sock = open_one(style, host, int(port), opened)
            opened += 1
            if sock is None:
                break
            held[sock.fileno()] = sock
            poller.register(sock, CLOSED)
        if not announced and len(held) >= count:
            print(f"holding {len(held)}", flush=True)
            announced = True
        for fd, _ in poller.poll(100):
            poller.unregister(fd)
            held.pop(fd).close()
        if style == "slowloris" and time.monotonic() - drip > 0.2:
            drip = time.monotonic()
            for sock in list(held.values()):
                try:
                    sock.send(b"a")
                except OSError:
                    pass  # closed: poll says so next round


if __name__ == "__main__":
    main()
