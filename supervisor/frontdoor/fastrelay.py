"""The relay thread's fast path in C (``fastrelay.c``, built as ``_fastrelay*.so`` by
``pip install``), loaded with ctypes.

:class:`FastPath` waits on the relay's epoll set and passes a readable socket's bytes on by itself
while the relay says that nothing about that direction needs Python (:meth:`FastPath.enable`); it
returns everything else - with the bytes it read, if any, still in the relay's buffer. A round
trip of a small message then costs no Python at all, and does not wait for the GIL while trio's
thread is busy. Without the library (no C compiler at install time) the relay runs its pure-Python
loop; :func:`load` says why.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path
from typing import NamedTuple

#: Flags of a direction (fastrelay.c).
UP = 1  # browser -> IDE
JUDGING = 2  # the browser's data frames are being judged as input: only control frames pass
#: What an event hands to Python (fastrelay.c).
EVENT, READ, PARTIAL, SEND_ERROR, RECV_ERROR = range(5)
_BATCH = 256


class _Event(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int32), ("events", ctypes.c_uint32), ("status", ctypes.c_int32),
                ("nread", ctypes.c_int32), ("nsent", ctypes.c_int32), ("error", ctypes.c_int32)]


class Event(NamedTuple):
    """One event for Python: ``status`` says whether ``nread`` bytes were read into the buffer
    (``READ``: nothing else done; ``PARTIAL``: whole frames, of which ``nsent`` were sent;
    ``SEND_ERROR``: sending them failed with ``error``) or reading failed (``RECV_ERROR``)."""

    fd: int
    mask: int
    status: int
    nread: int
    nsent: int
    error: int


def library_path() -> Path | None:
    """The built library next to this module, if there is one."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_fastrelay{suffix}"
        if candidate.exists():
            return candidate
    return None


_library: ctypes.CDLL | None = None


def _load_library(path: Path) -> ctypes.CDLL:
    global _library
    if _library is None:
        lib = ctypes.CDLL(str(path))
        lib.fr_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        lib.fr_new.restype = ctypes.c_void_p
        lib.fr_free.argtypes = [ctypes.c_void_p]
        lib.fr_free.restype = None
        lib.fr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.fr_set.restype = ctypes.c_int
        lib.fr_clear.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.fr_clear.restype = None
        lib.fr_take_moved.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.fr_take_moved.restype = ctypes.c_uint64
        lib.fr_wait.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Event), ctypes.c_int]
        lib.fr_wait.restype = ctypes.c_int
        _library = lib
    return _library


class FastPath:
    """The C fast path over one epoll set and one read buffer (used by one thread only)."""

    def __init__(self, lib: ctypes.CDLL, epoll_fd: int, buffer: bytearray) -> None:
        self._lib = lib
        self._buffer = (ctypes.c_char * len(buffer)).from_buffer(buffer)  # keeps `buffer` exported
        handle = lib.fr_new(epoll_fd, ctypes.addressof(self._buffer), len(buffer))
        if not handle:
            raise MemoryError("fastrelay: fr_new failed")
        self._handle: int | None = handle
        self._events = (_Event * _BATCH)()

    def enable(self, src: int, dst: int, flags: int) -> None:
        """Pass what ``src`` has on to ``dst`` without Python (``UP``/``JUDGING`` flags)."""
        assert self._handle is not None
        rc = self._lib.fr_set(self._handle, src, dst, flags)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))

    def disable(self, src: int) -> None:
        """Every event of ``src`` goes to Python again."""
        assert self._handle is not None
        self._lib.fr_clear(self._handle, src)

    def take_moved(self, src: int) -> int:
        """Bytes passed on from ``src`` since the last call."""
        assert self._handle is not None
        return int(self._lib.fr_take_moved(self._handle, src))

    def wait(self, timeout: float) -> list[Event]:
        """The next events for Python, at most ``timeout`` seconds from now (negative: no limit);
        empty when the time ran out. An event with bytes in the buffer comes alone."""
        assert self._handle is not None
        ms = -1 if timeout < 0 else int(timeout * 1000 + 0.999)  # rounded up, as select.epoll does
        n = self._lib.fr_wait(self._handle, ms, self._events, _BATCH)
        if n < 0:
            raise OSError(-n, f"fastrelay: epoll_wait: {os.strerror(-n)}")
        return [Event(e.fd, e.events, e.status, e.nread, e.nsent, e.error) for e in self._events[:n]]

    def close(self) -> None:
        if self._handle is not None:
            self._lib.fr_free(self._handle)
            self._handle = None
            del self._buffer  # release the buffer's export


def load(epoll_fd: int, buffer: bytearray) -> tuple[FastPath | None, str]:
    """The fast path over ``epoll_fd`` and ``buffer``, or None and why not."""
    if len(buffer) >= 2**31:
        return None, "[http] buffer_size of 2 GiB or more: small WebSocket messages go through Python"
    path = library_path()
    if path is None:
        return None, ("fastrelay library not built (pip install needs a C compiler: "
                      "apt-get install gcc, then reinstall); small WebSocket messages go through Python")
    try:
        lib = _load_library(path)
    except (OSError, AttributeError) as exc:
        return None, f"fastrelay library {path} unusable ({exc}); small WebSocket messages go through Python"
    return FastPath(lib, epoll_fd, buffer), f"C fast path {path.name}"
