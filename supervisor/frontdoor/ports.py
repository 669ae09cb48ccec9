"""A user's own ports in their browser: ``/port/<N>/...`` goes to ``localhost:N`` in the user's
network namespace (their private loopback), like Coder's, Gitpod's or jupyter-server-proxy's.

Pure parts (the path, the ``Location`` of an answer, the headers sent on, the answers) and one
effect, :func:`connect_loopback`: a TCP connection to port N on the loopback of the network
namespace of a process, named by its pidfd (:func:`supervisor.netns.socket_in`).
"""

from __future__ import annotations

import dataclasses
import errno
import socket
from dataclasses import dataclass

import trio

from supervisor import netns
from supervisor.frontdoor.answers import Answer, html_page, json_answer, retry_later, same_origin_path
from supervisor.frontdoor.auth import Credentials

PREFIX = b"/port/"
Headers = list[tuple[bytes, bytes]]
#: The hosts a dev server may name itself by in an absolute Location (all of them its own loopback).
LOOPBACK_HOSTS = (b"localhost", b"127.0.0.1", b"[::1]")


@dataclass(frozen=True)
class PortPath:
    """A request for ``/port/<port>/...``: ``target`` is what the user's server is asked for."""

    port: int
    target: bytes  # the rest of the path (starting with /) and the query
    redirect: bytes | None = None  # ``/port/<N>`` (no slash): where to send the browser instead


def is_port_path(target: bytes) -> bool:
    """True for every target the front door serves from a user's port (``/port`` and below)."""
    path = target.partition(b"?")[0]
    return path == PREFIX[:-1] or path.startswith(PREFIX)


def parse_port_path(target: bytes) -> PortPath | None:
    """The port and upstream target of ``/port/<N>[/rest][?query]``; None if malformed (N not a
    plain decimal 1-65535 without leading zeros). ``/port/<N>`` alone gets a redirect to
    ``/port/<N>/`` (so that the page's relative links resolve under the prefix)."""
    path, sep, query = target.partition(b"?")
    if not path.startswith(PREFIX):
        return None
    number, slash, rest = path[len(PREFIX):].partition(b"/")
    if not (number.isdigit() and len(number) <= 5 and not number.startswith(b"0")) or int(number) > 65535:
        return None
    port = int(number)
    if not slash:
        return PortPath(port, b"/", redirect=PREFIX + number + b"/" + sep + query)
    return PortPath(port, b"/" + rest + sep + query)


def port_credentials(creds: Credentials) -> Credentials:
    """What identifies the user on a ``/port/`` request: the session cookie, else a Bearer token.
    A ``token`` parameter is the user's server's own (Jupyter's, Vite's HMR), and so is an
    ``Authorization`` header sent with the cookie (an app's own API token): both go on to it."""
    return dataclasses.replace(creds, query_tokens=(), bearer=None if creds.cookies else creds.bearer)


def upstream_host(port: int) -> bytes:
    """The Host a user's server is asked with: its own name for itself (Vite, webpack-dev-server
    and others refuse a Host they do not know)."""
    return b"localhost:%d" % port


def port_request_headers(headers: Headers, port: int) -> Headers:
    """``headers`` (already filtered for the IDE: no front-door cookie or token) with ``Host``
    replaced by :func:`upstream_host`, and an ``Origin`` by ``http://`` + that: to the server the
    page is its own (webpack-dev-server refuses a WebSocket from another origin). The front door
    has checked the browser's Origin already where it matters (a cookie request: ``.signin``)."""
    host = upstream_host(port)
    out = [(b"host", host)]
    for name, value in headers:
        if name == b"origin":
            out.append((name, b"http://" + host))
        elif name != b"host":
            out.append((name, value))
    return out


def rewrite_location(value: bytes, port: int) -> bytes:
    """A ``Location`` from the user's server, as the browser must follow it: an absolute path, or
    an absolute URL naming the server itself (``http://localhost:N/...``, ``//127.0.0.1:N/...``),
    goes back under ``/port/<N>/``; a relative reference resolves under the prefix already, and
    any other origin (or scheme) is left alone."""
    value = value.strip()
    if value.startswith(b"//"):
        rest = value[2:]
    else:
        scheme, sep, rest = value.partition(b"://")
        if not (sep and scheme.isalpha()):
            return PREFIX + b"%d" % port + value if value.startswith(b"/") else value
        if scheme.lower() != b"http":
            return value
    end = min((i for i in (rest.find(b"/"), rest.find(b"?"), rest.find(b"#")) if i >= 0), default=len(rest))
    authority, tail = rest[:end].lower(), rest[end:]
    if authority not in own_authorities(port):
        return value
    return PREFIX + b"%d" % port + (tail if tail.startswith(b"/") else b"/" + tail)


def own_authorities(port: int) -> set[bytes]:
    """How a server on ``port`` may name itself in a URL (every name of its own loopback)."""
    named = {host + b":%d" % port for host in LOOPBACK_HOSTS}
    return named | set(LOOPBACK_HOSTS) if port == 80 else named


def port_response_headers(headers: Headers, port: int) -> Headers:
    """The answer's headers with every ``Location`` rewritten by :func:`rewrite_location`."""
    return [(n, rewrite_location(v, port) if n == b"location" else v) for n, v in headers]


def in_range(port: int, bounds: tuple[int, int]) -> bool:
    return bounds[0] <= port <= bounds[1]


# ---- answers -------------------------------------------------------------------------------------


def slash_redirect(location: bytes) -> Answer:
    """307 from ``/port/<N>`` to ``/port/<N>/`` (same method and body; not cached for good)."""
    return Answer(307, b"", b"text/plain; charset=utf-8", ((b"location", same_origin_path(location)),), "port_redirect")


def malformed() -> Answer:
    return json_answer(404, "bad_port_path", "not a port: the address must be /port/<N>/ with N a port number from 1 to 65535",
                       "open /port/3000/ for a server listening on port 3000 in your workspace")


def outside_range(port: int, bounds: tuple[int, int]) -> Answer:
    return json_answer(403, "port_not_allowed", f"port {port} is outside the ports this pod serves ({bounds[0]}-{bounds[1]})",
                       f"start your server on a port from {bounds[0]} to {bounds[1]}")


def no_namespace(port: int) -> Answer:
    return json_answer(404, "ports_not_served",
                       "ports are not served here: workspaces on this pod share the pod's network, so port "
                       f"{port} would be the pod's own, not your workspace's", "ask an operator to enable [isolation] network")


def not_running(port: int, navigating: bool) -> Answer:
    message = f"Your workspace is not running, so nothing listens on port {port} in it"
    hint = "open your IDE (the workspace starts), start your server there, then reload this page"
    if navigating:
        return html_page(502, "workspace_not_running", "Your workspace is not running", f"{message}. To preview it: {hint}.")
    return json_answer(502, "workspace_not_running", message, hint)


def nothing_listens(port: int, navigating: bool) -> Answer:
    message = f"Nothing listens on port {port} in your workspace"
    hint = (f"start your server in the IDE's terminal on port {port} (on localhost, 127.0.0.1 or ::1, e.g. "
            f"'python3 -m http.server {port}' or 'npm run dev -- --port {port}'), then reload this page")
    if navigating:
        return html_page(502, "nothing_listens", f"Nothing listens on port {port}", f"{message}. To preview a server here, {hint}.")
    return json_answer(502, "nothing_listens", message, hint)


def server_failed(port: int) -> Answer:
    return retry_later(502, "port_failed", f"the server on port {port} in your workspace closed the connection without answering",
                       "look at the server's output in your terminal, then retry", 1.0)


# ---- the one effect --------------------------------------------------------------------------------


#: What makes a loopback address "not there" in a namespace: nothing listens, or no IPv6 in it.
_ABSENT = frozenset({errno.ECONNREFUSED, errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.ENETUNREACH})
#: Worker threads entering namespaces at once (each ~0.1 ms): a flood of port requests waits here,
#: not in trio's default limiter, which the daemon's other blocking work (cgroup waits) shares.
NAMESPACE_THREADS = 4
_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("namespace_threads")


def _threads() -> trio.CapacityLimiter:
    try:
        return _LIMITER.get()
    except LookupError:  # one per trio run, as trio's own default limiter
        limiter = trio.CapacityLimiter(NAMESPACE_THREADS)
        _LIMITER.set(limiter)
        return limiter


async def connect_loopback(pidfd: int, port: int, timeout: float) -> trio.SocketStream:
    """A TCP connection to ``127.0.0.1:port``, else ``[::1]:port`` (Node >= 17 binds
    ``localhost`` as ::1 only), in the network namespace of the process behind ``pidfd``.

    ``pidfd`` must stay open until this returns and must be the caller's own (a dup: a worker
    thread enters the namespace by it). Raises ConnectionRefusedError when neither address has a
    listener, another OSError when the namespace cannot be entered, TooSlowError after ``timeout``."""
    with trio.fail_after(timeout):
        for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            try:
                made = await trio.to_thread.run_sync(netns.socket_in, pidfd, family, limiter=_threads())
            except OSError as exc:
                if exc.errno not in _ABSENT:  # (EAFNOSUPPORT: no IPv6 in there)
                    raise
                continue
            sock = trio.socket.from_stdlib_socket(made)
            try:
                await sock.connect((address, port))
            except OSError as exc:
                sock.close()
                if exc.errno not in _ABSENT:
                    raise
                continue
            except BaseException:
                sock.close()
                raise
            return trio.SocketStream(sock)
    raise ConnectionRefusedError(errno.ECONNREFUSED, f"nothing listens on port {port} (127.0.0.1 or ::1)")
