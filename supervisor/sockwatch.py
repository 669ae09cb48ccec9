"""Wake the readiness probe the moment an IDE creates its socket: one inotify instance per daemon.

The daemon probes ``GET /`` on a starting IDE's Unix socket with a short back-off; between probes
it would notice the socket a few milliseconds late. :class:`SocketDirWatcher` watches each starting
user's socket directory for new entries (``IN_CREATE``, ``IN_MOVED_TO``; ``bind(2)`` creates the
socket file) so the prober can probe at once. It is an optimisation only: without inotify (or out
of watches) :meth:`~SocketDirWatcher.add` returns None and the probe's own back-off runs as before.

One instance for the whole daemon, watches added and removed per start: closing an inotify
instance waits for an SRCU grace period in the kernel (milliseconds, on the event loop), removing
a watch does not.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import trio

log = logging.getLogger(__name__)

IN_CREATE = 0x100
IN_MOVED_TO = 0x80
IN_IGNORED = 0x8000  # the watch is gone (directory removed, or rm_watch)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
CLOCK_MONOTONIC = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


async def nap(seconds: float) -> None:
    """Sleep ``seconds`` (< 1 s) with microsecond precision, the event loop free meanwhile.

    trio's own timers go through epoll's millisecond timeout and round up to 1 ms; a timerfd
    becomes readable on time. Falls back to ``trio.sleep`` when no timerfd can be made.
    """
    fd = _libc.timerfd_create(CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        await trio.sleep(seconds)
        return
    try:
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(0, max(1, int(seconds * 1e9))))
        if _libc.timerfd_settime(fd, 0, ctypes.byref(spec), None) != 0:
            await trio.sleep(seconds)
            return
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


@dataclass
class _Watch:
    refs: int = 1
    fired: bool = False
    event: trio.Event = field(default_factory=trio.Event)


class SocketDirWatcher:
    """One inotify descriptor; ``add(dir)`` -> watch id, ``await wait(id)``, ``remove(id)``."""

    def __init__(self) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            log.warning("inotify_init1: %s; readiness probes fall back to polling", os.strerror(ctypes.get_errno()))
        self._watches: dict[int, _Watch] = {}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read events until cancelled; the descriptor is closed on the way out."""
        task_status.started()
        if self.fd < 0:
            return
        try:
            while True:
                await trio.lowlevel.wait_readable(self.fd)
                self._read_events()
        finally:
            fd, self.fd = self.fd, -1
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    def add(self, directory: Path) -> int | None:
        """Watch ``directory`` for new entries; None when that is not possible (then poll)."""
        if self.fd < 0:
            return None
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(directory), IN_CREATE | IN_MOVED_TO)
        if wd < 0:
            log.debug("inotify_add_watch %s: %s; polling", directory, os.strerror(ctypes.get_errno()))
            return None
        watch = self._watches.get(wd)
        if watch is None:
            self._watches[wd] = _Watch()
        else:
            watch.refs += 1  # the same directory watched twice (an overlapping restart)
        return int(wd)

    async def wait(self, wd: int) -> None:
        """Return once something was created in the directory since the last wait (at once if so)."""
        watch = self._watches.get(wd)
        if watch is None:
            await trio.sleep_forever()  # the watch is gone (directory removed): only a timeout ends it
            return
        while not watch.fired:
            await watch.event.wait()
        watch.fired = False

    def remove(self, wd: int) -> None:
        watch = self._watches.get(wd)
        if watch is None:
            return
        watch.refs -= 1
        if watch.refs > 0:
            return
        del self._watches[wd]
        if self.fd >= 0:
            _libc.inotify_rm_watch(self.fd, wd)  # EINVAL when the kernel dropped it already: fine

    def _read_events(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                watch = self._watches.get(wd)
                if watch is None:
                    continue
                if mask & IN_IGNORED:
                    del self._watches[wd]
                watch.fired = True
                watch.event.set()
                watch.event = trio.Event()
