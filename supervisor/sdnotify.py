"""systemd's notification protocol (``sd_notify``) without a dependency: datagrams to ``$NOTIFY_SOCKET``.

A message is newline-separated ``KEY=VALUE`` lines (``READY=1``, ``STOPPING=1``, ``RELOADING=1``,
``STATUS=...``, ``WATCHDOG=1``) sent to the Unix datagram socket ``$NOTIFY_SOCKET`` names (a path,
or ``@name`` for an abstract one). Without it every send is a no-op.

systemd accepts a message from the unit's main process only (``NotifyAccess=main``), judged by the
sender's credentials. On a host the main process is ``workspace-supervisor init`` and the daemon
its child: the init passes its pid as ``$MAINPID`` and the daemon (root: CAP_SYS_ADMIN lets it name
another pid in ``SCM_CREDENTIALS``) sends on the init's behalf - what ``sd_pid_notify`` does.

The watchdog is on when ``$WATCHDOG_USEC`` is set and ``$WATCHDOG_PID`` (when set) names the pid we
send for; pings are due every half of it. :func:`from_environ` takes these variables out of the
environment so that nothing the daemon starts inherits them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import MutableMapping

log = logging.getLogger(__name__)

VARIABLES = ("NOTIFY_SOCKET", "MAINPID", "WATCHDOG_USEC", "WATCHDOG_PID")


@dataclass(frozen=True)
class Notifier:
    """Where notifications go. ``address`` None: nowhere (every send is a no-op)."""

    address: str | bytes | None = None
    #: Send on behalf of this pid (the unit's main process), None: as ourselves.
    on_behalf_of: int | None = None
    #: Seconds between ``WATCHDOG=1`` pings, None: the watchdog is off.
    watchdog_interval: float | None = None

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str]) -> Notifier:
        """Read (and remove) the protocol's variables; malformed ones turn the part they drive off."""
        values = {name: environ.pop(name, "") for name in VARIABLES}
        raw = values["NOTIFY_SOCKET"]
        address: str | bytes | None = None
        if raw.startswith("@") and len(raw) > 1:
            address = b"\0" + raw[1:].encode()
        elif raw.startswith("/"):
            address = raw
        own = os.getpid()
        main = _positive(values["MAINPID"])
        on_behalf_of = main if main not in (None, own) else None
        interval = None
        usec, watchdog_pid = _positive(values["WATCHDOG_USEC"]), _positive(values["WATCHDOG_PID"])
        if address is not None and usec and watchdog_pid in (None, own, on_behalf_of):
            interval = usec / 2e6
        return cls(address, on_behalf_of, interval)

    def send(self, *lines: str) -> bool:
        """Send one message of ``lines``; False when there is no socket or it could not be sent
        (logged: systemd's state is advisory, never a reason for the daemon to fail)."""
        if self.address is None or not lines:
            return False
        ancillary = []
        if self.on_behalf_of is not None:
            credentials = struct.pack("3i", self.on_behalf_of, os.getuid(), os.getgid())
            ancillary.append((socket.SOL_SOCKET, socket.SCM_CREDENTIALS, credentials))
        data = "\n".join(lines).encode()
        try:
            with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)) as sock:
                sock.sendmsg([data], ancillary, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self.address)
        except OSError as exc:
            log.warning("sd_notify %s to %r: %s", lines[0], self.address, exc)
            return False
        return True


def _positive(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) > 0 else None
