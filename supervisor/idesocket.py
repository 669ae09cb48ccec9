"""The daemon owns every user's IDE socket: nothing a user does to a path can redirect the front door.

For each spawn the daemon binds a fresh ``AF_UNIX`` stream socket at ``<run_dir>/ide/<user>.sock``
(the directory root's, 0700, opened without following symlinks), listens on it, and hands the
listening descriptor to the IDE as fd 3 with ``LISTEN_FDS=1``, ``LISTEN_FDNAMES=ide`` (systemd's
socket activation); the daemon closes its copy once the IDE has it. The old socket is unlinked
first, so a process still holding an earlier descriptor gets no connection meant for the new IDE.

The daemon's ``listen()`` lets the readiness probe's connection wait in the queue before the IDE
runs (it is answered the moment the IDE accepts: no polling). Linux stamps a listening socket's
peer credentials at every ``listen()``: the IDE's own ``listen()`` on fd 3 (Node's
``listen({fd: 3})`` makes one) re-stamps them with the IDE's uid, which the front door checks
(``SO_PEERCRED``) on every connection to the IDE before it sends a byte.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from pathlib import Path

from supervisor.errors import LaunchError
from supervisor.paths import open_daemon_dir, validate_user_id

log = logging.getLogger(__name__)

LISTEN_FD = 3  # where the IDE finds its listening socket (SD_LISTEN_FDS_START)
#: The environment that tells the IDE about it (LISTEN_PID too, where the pid is known before exec).
LISTEN_ENV = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "ide"}
DIR_NAME = "ide"
LEGACY_DIR_NAME = "users"  # <run_dir>/users/<user>/ide.sock: user-owned, before the daemon owned sockets
BACKLOG = 512


def socket_path(run_dir: Path, user: str) -> Path:
    return Path(run_dir) / DIR_NAME / f"{validate_user_id(user)}.sock"


def listen(run_dir: Path, user: str) -> socket.socket:
    """A new listening socket at :func:`socket_path`, replacing any old one (close-on-exec; the
    caller hands it over and closes it). Raises :class:`LaunchError` (e.g. the path is too long)."""
    path = socket_path(run_dir, user)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        dir_fd = open_daemon_dir(path.parent)
        try:
            _unlink(dir_fd, path.name)
            sock.bind(str(path))  # only root can change the directory the fd checked
        finally:
            os.close(dir_fd)
        sock.listen(BACKLOG)
        return sock
    except BaseException as exc:
        sock.close()
        if not isinstance(exc, (OSError, ValueError)):  # ValueError: run_dir is not absolute
            raise
        raise LaunchError(
            f"cannot create the IDE socket {path}: {exc}",
            hint="check [daemon] run_dir (a local directory, short enough for a socket path: 107 bytes)",
        ) from exc


def remove(run_dir: Path, user: str) -> None:
    """Unlink the user's socket (the IDE is gone); a missing one is fine."""
    path = socket_path(run_dir, user)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        _unlink(dir_fd, path.name)
    finally:
        os.close(dir_fd)


def _unlink(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def remove_legacy(run_dir: Path) -> int:
    """Remove ``<run_dir>/users/<user>/`` directories an older daemon made for users' own sockets
    (user-owned, so anything may be in them): entries are unlinked through directory fds, never
    following a symlink; a user's subdirectory is left (and logged). Returns how many were removed."""
    try:
        top = os.open(Path(run_dir) / LEGACY_DIR_NAME, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    removed = 0
    try:
        for entry in os.scandir(top):
            try:
                if not entry.is_dir(follow_symlinks=False):
                    os.unlink(entry.name, dir_fd=top)
                    continue
                inner = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=top)
                try:
                    for item in os.scandir(inner):
                        if not item.is_dir(follow_symlinks=False):
                            os.unlink(item.name, dir_fd=inner)
                finally:
                    os.close(inner)
                os.rmdir(entry.name, dir_fd=top)
                removed += 1
            except OSError as exc:
                log.warning("cannot remove the old socket directory %s: %s", Path(run_dir) / LEGACY_DIR_NAME / entry.name, exc)
    finally:
        os.close(top)
    with contextlib.suppress(OSError):
        os.rmdir(Path(run_dir) / LEGACY_DIR_NAME)
    return removed


def is_socket(path: Path) -> bool:
    """True if ``path`` (not followed) is a socket."""
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False
