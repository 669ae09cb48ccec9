"""The local control socket that `workspacectl` talks to.

Protocol: the client sends one JSON line ``{"verb": ..., "args": {...}}``; the server answers one
JSON line ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"reason", "message", "hint"}}``.
``tail`` with ``follow`` streams further ``{"data": ...}`` lines until the client hangs up; a
log's bytes are sent decoded with ``surrogateescape`` (undecodable bytes become lone surrogates,
which the client turns back into the same bytes).

The socket is root-owned with mode 0600 (0660 and group ``[control] allowed_gid`` when that is
set), and every connection's peer credentials (``SO_PEERCRED``) are checked as well: only uid 0,
the daemon's own uid and, if set, processes whose gid is ``allowed_gid`` are served - the file
mode alone is one chmod away from letting every user in.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import trio

from supervisor import logfiles
from supervisor.errors import SupervisorError
from supervisor.manager import SessionManager
from supervisor.reclaim import IdleService
from supervisor.units import parse_duration

if TYPE_CHECKING:
    from supervisor.drain import Drainer
    from supervisor.publisher import Publisher

log = logging.getLogger(__name__)
PROTOCOL_VERSION = 1
MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 10.0
REFUSED_LINGER = 1.0

Handler = Callable[[SessionManager, dict[str, Any]], Awaitable[Any]]


class BadRequest(SupervisorError):
    reason = "bad_request"
    hint = "upgrade workspacectl to the daemon's version"


class PeerRefused(SupervisorError):
    reason = "control_peer_refused"
    hint = "run workspacectl as root (or in the group [control] allowed_gid names)"


def peer_allowed(uid: int, gid: int, *, own_uid: int, allowed_gid: int) -> bool:
    """Whether a control client with these credentials is served (pure)."""
    return uid in (0, own_uid) or (allowed_gid >= 0 and gid == allowed_gid)


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected (``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _users(args: dict[str, Any]) -> list[str]:
    users = args.get("users", [])
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        raise BadRequest("'users' must be a list of user ids")
    return users


def _user(args: dict[str, Any]) -> str:
    user = args.get("user")
    if not isinstance(user, str):
        raise BadRequest("'user' must be a user id")
    return user


def _signal_number(name: object) -> int:
    if isinstance(name, int):
        return signal.Signals(name).value
    if isinstance(name, str):
        text = name.upper()
        if text.isdigit():
            return signal.Signals(int(text)).value
        return signal.Signals[text if text.startswith("SIG") else "SIG" + text].value
    raise ValueError(name)


async def _status(m: SessionManager, args: dict[str, Any]) -> Any:
    return {"users": m.status(_users(args) or None)}


async def _start(m: SessionManager, args: dict[str, Any]) -> Any:
    tier = args.get("tier")
    if tier is not None and not isinstance(tier, str):
        raise BadRequest("'tier' must be a string")
    return await m.start(_user(args), tier, wait=bool(args.get("wait", True)))


async def _stop(m: SessionManager, args: dict[str, Any]) -> Any:
    user = _user(args)
    if user == "all":
        await m.stop_all(m.config.daemon.shutdown_deadline)
        return {"users": m.status()}
    return await m.stop(user)


async def _restart(m: SessionManager, args: dict[str, Any]) -> Any:
    return await m.restart(_user(args))


async def _pause(m: SessionManager, args: dict[str, Any]) -> Any:
    return await m.pause(_user(args))


async def _resume(m: SessionManager, args: dict[str, Any]) -> Any:
    return await m.resume(_user(args))


async def _signal(m: SessionManager, args: dict[str, Any]) -> Any:
    try:
        signum = _signal_number(args.get("signal"))
    except (KeyError, ValueError):
        raise BadRequest(f"unknown signal {args.get('signal')!r}", hint="use a name like TERM, HUP, USR1 or a number") from None
    return m.send_signal(_user(args), signum)


async def _pod(m: SessionManager, args: dict[str, Any]) -> Any:
    return m.pod_info()


HANDLERS: dict[str, Handler] = {
    "status": _status,
    "start": _start,
    "stop": _stop,
    "restart": _restart,
    "pause": _pause,
    "resume": _resume,
    "signal": _signal,
    "pod": _pod,
}


def pod_verbs(drainer: Drainer, publisher: Publisher) -> dict[str, Handler]:
    """The verbs that need the daemon's drain and registry services: ``drain`` and ``pods``."""

    async def _drain(m: SessionManager, args: dict[str, Any]) -> Any:
        deadline = args.get("deadline")
        if deadline is None:
            seconds = m.config.daemon.drain_deadline
        else:
            try:
                seconds = parse_duration(deadline)
            except ValueError as exc:
                raise BadRequest(f"bad deadline {deadline!r}: {exc}", hint="e.g. --deadline 90s, 10m or 0") from None
        return drainer.request(seconds, by="workspacectl drain")

    async def _pods(m: SessionManager, args: dict[str, Any]) -> Any:
        pods = await publisher.list_pods()
        now = time.time()
        return {"pods": [{**asdict(p), "room": p.room, "heartbeat_age_s": round(now - p.heartbeat_at, 3)} for p in pods]}

    return {"drain": _drain, "pods": _pods}


def why_handler(idle: IdleService) -> Handler:
    """`why USER`: where the user stands on the idle ladder, and why."""

    async def why(m: SessionManager, args: dict[str, Any]) -> Any:
        return idle.why(_user(args))

    return why


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps({"version": PROTOCOL_VERSION, **message}).encode() + b"\n"


class ControlServer:
    """Serves the control protocol on a Unix socket for one :class:`SessionManager`."""

    def __init__(self, manager: SessionManager, path: Path, handlers: dict[str, Handler] | None = None) -> None:
        self.manager = manager
        self.path = path
        self.handlers = dict(HANDLERS if handlers is None else handlers)
        self.allowed_gid: int = manager.config.control.allowed_gid

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # The socket itself is root-only (0600); its directory may be shared with the users'
        # socket directories (run_dir), so it is only created, never tightened.
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        if self.allowed_gid >= 0:
            os.chown(self.path, -1, self.allowed_gid)
            os.chmod(self.path, 0o660)
        sock.listen(128)
        listener = trio.SocketListener(sock)
        log.info("control socket listening on %s", self.path)
        try:
            async with listener:
                task_status.started()
                await trio.serve_listeners(self._handle, [listener])
        finally:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                refusal = self._refusal(stream)
                if refusal is not None:  # checked first: nothing a refused client sends is parsed
                    await self._refuse(stream, refusal)
                    return
                request = await self._read_request(stream)
                verb = request.get("verb")
                args = request.get("args") or {}
                if not isinstance(args, dict):
                    raise BadRequest("'args' must be an object")
                if verb == "tail":
                    await self._tail(stream, args)
                    return
                handler = self.handlers.get(verb) if isinstance(verb, str) else None
                if handler is None:
                    raise BadRequest(f"unknown verb {verb!r}; known: {', '.join(sorted([*self.handlers, 'tail']))}")
                result = await handler(self.manager, args)
                await stream.send_all(encode({"ok": True, "result": result}))
            except SupervisorError as exc:
                await self._send_error(stream, exc.to_dict())
            except trio.BrokenResourceError:
                pass
            except Exception as exc:  # noqa: BLE001 - one bad request must not take the daemon down
                log.exception("control request failed")
                await self._send_error(stream, {"reason": "internal_error", "message": f"{type(exc).__name__}: {exc}", "hint": "see the daemon's log"})

    def _refusal(self, stream: trio.SocketStream) -> PeerRefused | None:
        """Why this client is not served (its ``SO_PEERCRED``), or None."""
        pid, uid, gid = peer_credentials(stream.socket)
        if peer_allowed(uid, gid, own_uid=os.geteuid(), allowed_gid=self.allowed_gid):
            return None
        log.warning("control socket: refused a client running as uid %d gid %d (pid %d)", uid, gid, pid)
        return PeerRefused(f"uid {uid} may not use the control socket: only root, the daemon's uid"
                           + (f" and group {self.allowed_gid}" if self.allowed_gid >= 0 else "") + " may")

    async def _refuse(self, stream: trio.SocketStream, refusal: PeerRefused) -> None:
        """Tell a refused client why before reading a byte of its request, then drop what it sends
        (up to ``MAX_REQUEST`` bytes or ``REFUSED_LINGER`` seconds): its send must not fail before
        it reads the answer, and it must not hold the connection for long."""
        await self._send_error(stream, refusal.to_dict())
        with trio.move_on_after(REFUSED_LINGER):
            received = 0
            while received <= MAX_REQUEST and (chunk := await stream.receive_some(4096)):
                received += len(chunk)

    @staticmethod
    async def _send_error(stream: trio.SocketStream, error: dict[str, str]) -> None:
        try:
            await stream.send_all(encode({"ok": False, "error": error}))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    @staticmethod
    async def _read_request(stream: trio.SocketStream) -> dict[str, Any]:
        buffer = b""
        with trio.move_on_after(REQUEST_TIMEOUT) as deadline:
            while b"\n" not in buffer:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                buffer += chunk
                if len(buffer) > MAX_REQUEST:
                    raise BadRequest("request too large")
        if deadline.cancelled_caught:
            raise BadRequest(f"no whole request line within {REQUEST_TIMEOUT:g} s")
        try:
            request = json.loads(buffer.split(b"\n", 1)[0] or b"null")
        except ValueError:
            raise BadRequest("request is not JSON") from None
        if not isinstance(request, dict):
            raise BadRequest("request must be a JSON object")
        return request

    async def _tail(self, stream: trio.SocketStream, args: dict[str, Any]) -> None:
        rt = self.manager.runtime(_user(args))
        lines = args.get("lines", 20)
        if not isinstance(lines, int) or lines < 0:
            raise BadRequest("'lines' must be a whole number")
        data, offset = logfiles.read_tail(rt.log_path, lines)
        await stream.send_all(encode({"ok": True, "result": {"log": str(rt.log_path), "data": data.decode(errors="surrogateescape")}}))
        if not args.get("follow"):
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_hangup, stream, nursery.cancel_scope)
            while True:
                await trio.sleep(0.25)
                data, offset = logfiles.read_from(rt.log_path, offset)
                if data:
                    await stream.send_all(encode({"data": data.decode(errors="surrogateescape")}))


async def _cancel_on_hangup(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    """Stop following a log as soon as the client goes away (it sends nothing more)."""
    try:
        while await stream.receive_some(1024):
            pass
    except trio.BrokenResourceError:
        pass
    scope.cancel()
