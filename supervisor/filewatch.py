"""File-change activity: one inotify instance watching every user's workspace.

Bounded for big trees: directories named in ``skip`` (node_modules, .git, ...) are never
descended into, and each user gets at most ``max_watches`` directory watches (the rest of a huge
tree goes unwatched - the CPU signal still sees a build there). New directories are watched as
they appear, within the same budget. Runs on the trio loop: the inotify descriptor is awaited
with ``wait_readable``; no thread.

The workspace is the user's: any directory in it may be swapped for a symlink (to another user's
tree, to ``/``) between two steps. So no path is ever resolved again: the workspace is opened once
(``O_NOFOLLOW``), every directory below it is opened from its parent's descriptor, one name at a
time, with ``O_NOFOLLOW | O_DIRECTORY`` (a symlink or a file fails), and the watch is added on
the opened directory itself (``/proc/self/fd/N`` names exactly that inode; ``IN_ONLYDIR``). A
directory is only ever reached through names inside the workspace, so the watcher cannot leave it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import trio

log = logging.getLogger(__name__)

IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x8, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_IGNORED = 0x100, 0x200, 0x8000
IN_ONLYDIR, IN_ISDIR = 0x01000000, 0x40000000
MASK = IN_CREATE | IN_DELETE | IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO
DEFAULT_SKIP = frozenset({"node_modules", ".git", "__pycache__", ".venv", "venv", "target", ".cache", "dist", "build"})
OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


class Inotify:
    """An inotify descriptor (non-blocking): watches added on open directories, events read raw."""

    def __init__(self) -> None:
        self.fd = _check(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))

    def add(self, dir_fd: int) -> int:
        """Watch the directory open as ``dir_fd``; its watch descriptor."""
        return _check(_libc.inotify_add_watch(self.fd, f"/proc/self/fd/{dir_fd}".encode(), MASK | IN_ONLYDIR))

    def remove(self, wd: int) -> None:
        _libc.inotify_rm_watch(self.fd, wd)  # fails only for a watch already gone

    def read(self) -> list[tuple[int, int, str]]:
        """The pending events: (watch descriptor, mask, name)."""
        events: list[tuple[int, int, str]] = []
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return events
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, size = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                name = data[offset : offset + size].rstrip(b"\0").decode(errors="surrogateescape")
                offset += size
                events.append((wd, mask, name))

    def close(self) -> None:
        os.close(self.fd)


def open_beneath(root_fd: int, names: tuple[str, ...]) -> int:
    """The directory ``root_fd``/``names...``, opened one name at a time without following a
    symlink; OSError when any of them is not a directory (any more)."""
    fd = os.open(".", OPEN_DIR, dir_fd=root_fd)
    for name in names:
        try:
            child = os.open(name, OPEN_DIR, dir_fd=fd)
        finally:
            os.close(fd)
        fd = child
    return fd


@dataclass
class _Tree:
    user: str
    root: Path
    root_fd: int
    wds: dict[int, tuple[str, ...]] = field(default_factory=dict)  # watch descriptor -> names below the root
    truncated: bool = False


class FileWatcher:
    """Calls ``on_change(user)`` when anything changes in a watched workspace."""

    def __init__(self, on_change: Callable[[str], None], *, max_watches: int = 2000, skip: frozenset[str] = DEFAULT_SKIP) -> None:
        self.on_change = on_change
        self.max_watches = max_watches
        self.skip = skip
        self.inotify = Inotify()
        self.trees: dict[str, _Tree] = {}
        self.owner: dict[int, str] = {}  # watch descriptor -> user

    def watch(self, user: str, root: Path) -> None:
        """Start watching ``root`` for ``user`` (replacing an earlier watch of that user)."""
        self.unwatch(user)
        try:
            root_fd = os.open(root, OPEN_DIR)
        except OSError as exc:
            log.warning("user=%s not watching %s for file changes: %s (a symlink or not a directory?)", user, root, exc.strerror)
            return
        tree = self.trees[user] = _Tree(user, root, root_fd)
        pending: list[tuple[str, ...]] = [()]
        while pending:
            names = pending.pop()
            try:
                fd = open_beneath(root_fd, names)
            except OSError:
                continue  # gone, or swapped for something that is not a directory
            try:
                if not self._add(tree, names, fd):
                    break
                with os.scandir(fd) as entries:
                    for entry in entries:
                        if len(tree.wds) + len(pending) >= self.max_watches:
                            tree.truncated = True
                            break
                        if entry.is_dir(follow_symlinks=False) and entry.name not in self.skip:
                            pending.append((*names, entry.name))
            except OSError:
                continue
            finally:
                os.close(fd)
        if tree.truncated:
            log.info("user=%s watching %d directories of %s (budget reached; the rest is unwatched)", user, len(tree.wds), root)

    def _add(self, tree: _Tree, names: tuple[str, ...], fd: int) -> bool:
        """Watch the directory open as ``fd``; False when the user's budget is spent."""
        if len(tree.wds) >= self.max_watches:
            tree.truncated = True
            return False
        try:
            wd = self.inotify.add(fd)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                log.warning("user=%s cannot watch more directories: the kernel's inotify watch limit is reached "
                            "(raise fs.inotify.max_user_watches)", tree.user)
            return True
        if self.owner.setdefault(wd, tree.user) == tree.user:  # never take over another user's watch
            tree.wds[wd] = names
        return True

    def unwatch(self, user: str) -> None:
        tree = self.trees.pop(user, None)
        if tree is None:
            return
        for wd in tree.wds:
            self.owner.pop(wd, None)
            self.inotify.remove(wd)
        os.close(tree.root_fd)

    def watched(self, user: str) -> int:
        tree = self.trees.get(user)
        return len(tree.wds) if tree else 0

    def _event(self, wd: int, mask: int, name: str) -> None:
        user = self.owner.get(wd)
        tree = self.trees.get(user) if user is not None else None
        if user is None or tree is None:
            return  # IN_Q_OVERFLOW (wd -1), or a watch being removed
        if mask & IN_IGNORED:  # the directory is gone
            self.owner.pop(wd, None)
            tree.wds.pop(wd, None)
            return
        self.on_change(user)
        if mask & IN_CREATE and mask & IN_ISDIR and name not in self.skip and wd in tree.wds:
            names = (*tree.wds[wd], name)
            try:
                fd = open_beneath(tree.root_fd, names)
            except OSError:
                return  # swapped or gone already
            try:
                self._add(tree, names, fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        for user in list(self.trees):
            self.unwatch(user)
        self.inotify.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver events until cancelled; then the watcher is closed."""
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(self.inotify.fd)
                for wd, mask, name in self.inotify.read():
                    self._event(wd, mask, name)
        finally:
            self.close()
