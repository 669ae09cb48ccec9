"""File-change activity: one inotify instance (pyinotify) watching every user's workspace.

Bounded for big trees: directories named in ``skip`` (node_modules, .git, ...) are never
descended into, and each user gets at most ``max_watches`` directory watches (the rest of a huge
tree goes unwatched - the CPU signal still sees a build there). New directories are watched as
they appear, within the same budget. Runs on the trio loop: the inotify descriptor is awaited
with ``wait_readable``; no thread.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import trio

with warnings.catch_warnings():
    # pyinotify imports asyncore (deprecated in 3.11, gone in 3.12 where pyasyncore provides it);
    # pyinotify only uses it for its own asyncore notifier, which we do not use.
    warnings.filterwarnings("ignore", message="The asyncore module is deprecated", category=DeprecationWarning)
    import pyinotify

log = logging.getLogger(__name__)

MASK = (
    pyinotify.IN_CREATE | pyinotify.IN_DELETE | pyinotify.IN_MODIFY | pyinotify.IN_CLOSE_WRITE
    | pyinotify.IN_MOVED_FROM | pyinotify.IN_MOVED_TO
)
DEFAULT_SKIP = frozenset({"node_modules", ".git", "__pycache__", ".venv", "venv", "target", ".cache", "dist", "build"})


@dataclass
class _Tree:
    user: str
    root: Path
    wds: set[int] = field(default_factory=set)
    truncated: bool = False


class FileWatcher:
    """Calls ``on_change(user)`` when anything changes in a watched workspace."""

    def __init__(self, on_change: Callable[[str], None], *, max_watches: int = 2000, skip: frozenset[str] = DEFAULT_SKIP) -> None:
        self.on_change = on_change
        self.max_watches = max_watches
        self.skip = skip
        self.wm = pyinotify.WatchManager()
        self.notifier = pyinotify.Notifier(self.wm, default_proc_fun=self._event, timeout=0)
        self.trees: dict[str, _Tree] = {}
        self.owner: dict[int, str] = {}  # watch descriptor -> user

    def watch(self, user: str, root: Path) -> None:
        """Start watching ``root`` for ``user`` (replacing an earlier watch of that user)."""
        self.unwatch(user)
        tree = _Tree(user, root)
        self.trees[user] = tree
        pending = [str(root)]
        while pending:
            directory = pending.pop()
            if not self._add(tree, directory):
                break
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False) and entry.name not in self.skip:
                            pending.append(entry.path)
            except OSError:
                continue
        if tree.truncated:
            log.info("user=%s watching %d directories of %s (budget reached; the rest is unwatched)", user, len(tree.wds), root)

    def _add(self, tree: _Tree, directory: str) -> bool:
        if len(tree.wds) >= self.max_watches:
            tree.truncated = True
            return False
        result = self.wm.add_watch(directory, MASK, rec=False, auto_add=False, quiet=True)
        wd = result.get(directory, -1)
        if wd >= 0:
            tree.wds.add(wd)
            self.owner[wd] = tree.user
        return True

    def unwatch(self, user: str) -> None:
        tree = self.trees.pop(user, None)
        if tree is None:
            return
        for wd in tree.wds:
            self.owner.pop(wd, None)
        live = [wd for wd in tree.wds if self.wm.get_path(wd) is not None]
        if live:
            self.wm.rm_watch(live, quiet=True)

    def watched(self, user: str) -> int:
        tree = self.trees.get(user)
        return len(tree.wds) if tree else 0

    def _event(self, event: pyinotify.Event) -> None:
        user = self.owner.get(event.wd)
        if user is None:
            return
        if event.mask & pyinotify.IN_IGNORED:
            self.owner.pop(event.wd, None)
            tree = self.trees.get(user)
            if tree:
                tree.wds.discard(event.wd)
            return
        if event.mask & pyinotify.IN_Q_OVERFLOW:
            return
        self.on_change(user)
        if event.mask & pyinotify.IN_CREATE and event.mask & pyinotify.IN_ISDIR and event.name not in self.skip:
            tree = self.trees.get(user)
            if tree is not None:
                self._add(tree, event.pathname)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        fd = self.wm.get_fd()
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(fd)
                self.notifier.read_events()
                self.notifier.process_events()
        finally:
            self.notifier.stop()
