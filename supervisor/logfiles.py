"""Per-user IDE log files: size-based rotation and tailing.

The IDE writes straight into its log (an ``O_APPEND`` descriptor it inherited), so it keeps
logging while the daemon restarts. Rotation is therefore copy-then-truncate: the current file is
copied to ``.1`` (older ones shifted up to ``.N``) and truncated in place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def rotate_if_needed(path: Path, max_bytes: int, backups: int) -> bool:
    """Rotate ``path`` when it is larger than ``max_bytes``; return whether it rotated."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size <= max_bytes:
        return False
    if backups > 0:
        for index in range(backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{index}")
            if older.exists():
                os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    os.truncate(path, 0)
    return True


def read_tail(path: Path, lines: int, chunk: int = 64 * 1024) -> tuple[bytes, int]:
    """The last ``lines`` lines of ``path`` and the offset where the file ended."""
    try:
        with open(path, "rb") as f:
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
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            if end < offset:
                offset = 0
            f.seek(offset)
            data = f.read(min(limit, end - offset))
    except FileNotFoundError:
        return b"", 0
    return data, offset + len(data)
