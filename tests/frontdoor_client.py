"""Small real clients for front-door tests (and for the e2e test and benchmark to reuse).

- :func:`mint`: a JWT with the claims the front door needs (PyJWT), any key and algorithm;
- :class:`Client`: HTTP/1.1 over one TCP connection (``http.client``), keep-alive, bodies read
  in pieces so a 20 MB answer is never held;
- :func:`ws_connect` / :func:`ws_send` / :func:`ws_recv`: a WebSocket over a raw socket
  (handshake by hand, masked client frames), to see the front door's 101 and the bytes after it;
- :func:`outside_address`: where to connect from to be a client from outside the pod.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import socket
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt

ISSUER = "https://auth.test"
AUDIENCE = "workspace"


def outside_address() -> str:
    """A non-loopback IPv4 address of this host ("" if there is none). Connecting from it to the
    front door on 127.0.0.1 is a client of its own, as a browser outside the pod is: every
    loopback address (and the pod's address to itself) is the one client "local" that users'
    terminals share (supervisor/frontdoor/limits.py)."""
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return str(address.address)
    return ""


def mint(key: Any, user: str = "alice", *, alg: str = "HS256", tier: str = "free", ttl: float = 3600,
         headers: dict[str, Any] | None = None, **claims: Any) -> str:
    """A signed token; a claim given as None is left out, ``sid`` defaults to a fresh one."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "sub": user, "tier": tier, "sid": uuid.uuid4().hex, "iss": ISSUER, "aud": AUDIENCE,
        "iat": now, "exp": now + int(ttl),
    }
    payload.update(claims)
    for name in [k for k, v in payload.items() if v is None]:
        del payload[name]
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    length: int = 0
    sha256: str = ""

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        import json

        return json.loads(self.body)


@dataclass
class Client:
    """One keep-alive HTTP/1.1 connection to the front door; remembers cookies like a browser."""

    host: str
    port: int
    timeout: float = 30.0
    host_header: str | None = None
    cookies: dict[str, str] = field(default_factory=dict)
    conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(self, method: str, target: str, *, headers: dict[str, str] | None = None, body: bytes | None = None,
                keep_body: bool = True, use_cookies: bool = True) -> Response:
        all_headers = dict(headers or {})
        if self.host_header:
            all_headers.setdefault("Host", self.host_header)
        if use_cookies and self.cookies and "Cookie" not in all_headers:
            all_headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        conn = self._connection()
        conn.request(method, target, body=body, headers=all_headers)
        resp = conn.getresponse()
        digest = hashlib.sha256()
        kept = bytearray()
        length = 0
        while True:
            piece = resp.read(65536)
            if not piece:
                break
            length += len(piece)
            digest.update(piece)
            if keep_body:
                kept += piece
        result = Response(resp.status, list(resp.getheaders()), bytes(kept), length, digest.hexdigest())
        for value in result.all("set-cookie"):
            name, _, rest = value.partition("=")
            self.cookies[name.strip()] = rest.split(";", 1)[0]
        if resp.will_close:
            self.close()
        return result

    def get(self, target: str, **kwargs: Any) -> Response:
        return self.request("GET", target, **kwargs)


# ---- WebSocket ---------------------------------------------------------------------------------


@dataclass
class WebSocket:
    sock: socket.socket
    status: int
    head: bytes
    pending: bytearray

    def header(self, name: str) -> str | None:
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    def close(self) -> None:
        self.sock.close()


def ws_connect(host: str, port: int, target: str = "/ws", headers: dict[str, str] | None = None,
               timeout: float = 10.0) -> WebSocket:
    """Send a WebSocket handshake; return the answer's status and head (and the open socket on 101).

    Like a browser's, it carries ``Origin`` - the page's own, ``http://`` and the Host - unless
    ``headers`` name one (an empty value: none at all)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    headers = dict(headers or {})
    named = {k.lower(): v for k, v in headers.items()}
    host_header = named.get("host", f"{host}:{port}")
    lines = [f"GET {target} HTTP/1.1", f"Host: {host_header}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if "origin" not in named:
        headers["Origin"] = f"http://{host_header}"
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() != "host" and (v or k.lower() != "origin")]
    data = bytearray()
    try:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    except BaseException:
        sock.close()
        raise
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    ws = WebSocket(sock, status, head, bytearray(rest))
    if status == 101:
        expected = base64.b64encode(hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
        assert ws.header("sec-websocket-accept") == expected, ws.head
    return ws


def ws_send(ws: WebSocket, payload: bytes, opcode: int = 0x2) -> None:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if n < 4096 else _mask_fast(payload, mask)
    ws.sock.sendall(head + mask + masked)


def _mask_fast(payload: bytes, mask: bytes) -> bytes:
    repeated = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


def _read(ws: WebSocket, n: int) -> bytes:
    while len(ws.pending) < n:
        piece = ws.sock.recv(65536)
        if not piece:
            raise EOFError("the WebSocket closed")
        ws.pending += piece
    data = bytes(ws.pending[:n])
    del ws.pending[:n]
    return data


def ws_recv(ws: WebSocket) -> tuple[int, bytes]:
    """The next frame from the server: (opcode, payload)."""
    b0, b1 = _read(ws, 2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", _read(ws, 2))[0]
    elif n == 127:
        n = struct.unpack("!Q", _read(ws, 8))[0]
    return b0 & 0x0F, _read(ws, n)
