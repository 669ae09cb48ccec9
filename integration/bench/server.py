"""The trivial socket server both contenders manage in the core benchmark.

Run as ``python3 -I -S server.py``: serves HTTP on the listening socket handed over as fd 3
(``LISTEN_FDS=1``, as our daemon runs an IDE), else binds the Unix socket named by
``$BENCH_SOCKET`` (or the first argument: supervisord, the baseline). ``GET /`` (any request, in fact) answers ``pid=<pid>`` so that a client can
tell a restarted server from the one before it. Ignores SIGUSR2, as the Theia GC preload handles it.
Stdlib ``socket`` only, no output, ~9 MiB RSS: the point is to measure the supervisor, not the server.
"""

import _signal
import os
import socket
import sys

# The idle ladder's memory-reclaim rung sends SIGUSR2 (Theia's GC preload collects garbage on it).
_signal.signal(_signal.SIGUSR2, _signal.SIG_IGN)

if os.environ.get("LISTEN_FDS") == "1":
    server = socket.socket(fileno=3)
else:
    path = os.environ.get("BENCH_SOCKET") or sys.argv[1]
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
server.listen(64)
body = b"pid=%d\n" % os.getpid()
answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)

while True:
    conn, _ = server.accept()
    try:
        conn.settimeout(5)
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(4096)
            if not chunk:
                break
            request += chunk
        conn.sendall(answer)
    except OSError:
        pass
    finally:
        conn.close()
