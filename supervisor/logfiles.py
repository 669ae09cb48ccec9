"""Per-user IDE log files: opening, size-based rotation and tailing.

The IDE writes straight into its log (an ``O_APPEND`` descriptor it inherited), so it keeps
logging while the daemon restarts. Rotation is therefore copy-then-truncate: the last
``max_bytes`` of the current file are copied to ``.1`` (older ones shifted up to ``.N``) and the
file is truncated in place. Every open here refuses symlinks and anything but a regular file and
never blocks (a FIFO at the path would otherwise hang the daemon).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)


def open_regular(path: Path, flags: int, mode: int = 0o640) -> int:
    """``os.open`` of a regular file with O_NOFOLLOW and without blocking; OSError for a symlink
    (ELOOP), a directory (EISDIR) or any other kind of file (EINVAL). The descriptor is blocking."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def rotate_if_needed(path: Path, max_bytes: int, backups: int) -> bool:
    """Rotate ``path`` when it is larger than ``max_bytes``; return whether it rotated.

    The backup holds at most the last ``max_bytes`` (a tree that wrote gigabytes between two checks
    costs no more to rotate). When the backup cannot be written (disk full, something odd at its
    path), the log is truncated anyway - rotation is what bounds the disk the logs take."""
    try:
        fd = open_regular(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        if size <= max_bytes:
            return False
        if backups > 0:
            try:
                for index in range(backups - 1, 0, -1):
                    older = path.with_name(f"{path.name}.{index}")
                    if older.exists():
                        os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
                _copy_tail(fd, size, max_bytes, path.with_name(f"{path.name}.1"))
            except OSError as exc:
                log.warning("log %s: no backup kept (%s); truncating it anyway", path, exc)
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    return True


def _copy_tail(fd: int, size: int, max_bytes: int, backup: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        backup.unlink()
    out = open_regular(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        offset = max(0, size - max_bytes)
        while offset < size:
            sent = os.sendfile(out, fd, offset, size - offset)
            if sent == 0:
                break  # truncated under us
            offset += sent
    except BaseException:
        with contextlib.suppress(OSError):  # a partial copy must not hold the space of a full disk
            backup.unlink()
        raise
    finally:
        os.close(out)


def read_tail(path: Path, lines: int, chunk: int = 64 * 1024) -> tuple[bytes, int]:
    """The last ``lines`` lines of ``path`` and the offset where the file ended."""
    try:
        with open(open_regular(path, os.O_RDONLY), "rb") as f:
            end = f.seek(0, os.SEEK_END)
            start = max(0, end - chunk)
            f.seek(start)
            data = f.read(end - start)
    except FileNotFoundError:
        return b"", 0
    if lines <= 0:
        return b"", end
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:]), end


def read_from(path: Path, offset: int, limit: int = 256 * 1024) -> tuple[bytes, int]:
    """Bytes appended since ``offset`` (from 0 again if the file was truncated by rotation)."""
    try:
        with open(open_regular(path, os.O_RDONLY), "rb") as f:
            end = f.seek(0, os.SEEK_END)
            if end < offset:
                offset = 0
            f.seek(offset)
            data = f.read(min(limit, end - offset))
    except FileNotFoundError:
        return b"", 0
    return data, offset + len(data)
