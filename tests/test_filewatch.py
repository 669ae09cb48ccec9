"""File-change activity through real inotify: events per user, skipped trees, the watch budget."""

from __future__ import annotations

from pathlib import Path

import trio

from supervisor.filewatch import FileWatcher


async def wait_for_change(changes: list[str], user: str) -> None:
    with trio.fail_after(5):
        while user not in changes:
            await trio.sleep(0.005)


async def test_changes_are_attributed_to_the_right_user(tmp_path: Path) -> None:
    changes: list[str] = []
    watcher = FileWatcher(changes.append)
    for user in ("alice", "bob"):
        (tmp_path / user / "src").mkdir(parents=True)
        watcher.watch(user, tmp_path / user)
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        (tmp_path / "bob" / "src" / "main.py").write_text("print(1)\n")
        await wait_for_change(changes, "bob")
        assert "alice" not in changes
        # A directory created later is watched too.
        (tmp_path / "alice" / "new").mkdir()
        await wait_for_change(changes, "alice")
        changes.clear()
        (tmp_path / "alice" / "new" / "file").write_text("x")
        await wait_for_change(changes, "alice")
        watcher.unwatch("alice")
        changes.clear()
        (tmp_path / "alice" / "src" / "after").write_text("x")
        (tmp_path / "bob" / "src" / "marker").write_text("x")
        await wait_for_change(changes, "bob")
        assert "alice" not in changes
        nursery.cancel_scope.cancel()


async def test_big_trees_are_bounded(tmp_path: Path) -> None:
    root = tmp_path / "carol"
    for i in range(50):
        (root / "node_modules" / f"pkg{i}" / "lib").mkdir(parents=True)
    for i in range(30):
        (root / "src" / f"d{i}").mkdir(parents=True)
    watcher = FileWatcher(lambda user: None, max_watches=10)
    watcher.watch("carol", root)
    assert watcher.watched("carol") == 10
    unbounded = FileWatcher(lambda user: None, max_watches=1000)
    unbounded.watch("carol", root)
    assert unbounded.watched("carol") == 1 + 1 + 30  # root, src, src/d*; node_modules skipped
