"""Sockets in another process's network namespace (a user's private loopback, from the daemon).

A socket belongs to the network namespace its creator was in when it called ``socket()``, for
good: it can be connected, read and written from anywhere afterwards. So the daemon enters a
user's namespace only to create the socket, in a short-lived thread of its own (``setns`` changes
the calling thread only), and connects it from the event loop as any other.

The namespace is named by a pidfd of a process inside it (``setns(pidfd, CLONE_NEWNET)``, Linux
5.8): no path, no pid number that could be reused by the time it is entered.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_setns = _libc.setns
_setns.argtypes = [ctypes.c_int, ctypes.c_int]


def setns(fd: int, nstype: int) -> None:
    """Move the calling thread into the namespace of ``fd`` (a pidfd or a /proc/PID/ns file)."""
    if _setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def socket_in(pidfd: int, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A new non-blocking socket in the network namespace of the process behind ``pidfd``.

    Blocks the caller for the life of one thread (~0.1 ms); run it from a worker thread or accept
    that. Raises OSError when the process is gone or the namespace cannot be entered.
    """
    result: list[socket.socket | BaseException] = []

    def make() -> None:
        # This thread dies right after: it never has to find its way back to the daemon's namespace.
        try:
            setns(pidfd, CLONE_NEWNET)
            result.append(socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result.append(exc)

    thread = threading.Thread(target=make, name="netns-socket", daemon=True)
    thread.start()
    thread.join()
    outcome = result[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
