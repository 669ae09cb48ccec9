"""File-change activity through real inotify: events per user, skipped trees, the watch budget."""

from __future__ import annotations

import os
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


# ---- a hostile workspace: symlinks swapped in, never followed ---------------------------------------


def watched_inodes(watcher: FileWatcher) -> set[tuple[int, int]]:
    """(device, inode) of every watch the watcher's inotify descriptor holds, from the kernel."""
    found = set()
    for line in Path(f"/proc/self/fdinfo/{watcher.inotify.fd}").read_text().splitlines():
        if line.startswith("inotify wd:"):
            fields = dict(part.split(":", 1) for part in line.split()[1:])
            found.add((int(fields["sdev"], 16), int(fields["ino"], 16)))
    return found


def key(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return (os.major(st.st_dev) << 20) | os.minor(st.st_dev), st.st_ino


def _layout(tmp_path: Path) -> tuple[Path, Path]:
    attacker, victim = tmp_path / "attacker", tmp_path / "victim"
    (attacker / "src").mkdir(parents=True)
    (victim / "b" / "c").mkdir(parents=True)
    return attacker, victim


async def test_symlinks_in_the_workspace_are_not_followed(tmp_path: Path) -> None:
    attacker, victim = _layout(tmp_path)
    (attacker / "to-victim").symlink_to(victim)
    (attacker / "to-root").symlink_to("/")
    changes: list[str] = []
    watcher = FileWatcher(changes.append)
    watcher.watch("attacker", attacker)
    assert watched_inodes(watcher) == {key(attacker), key(attacker / "src")}
    (tmp_path / "link").symlink_to(victim)
    watcher.watch("linked", tmp_path / "link")  # a workspace that is itself a symlink is not watched
    assert watcher.watched("linked") == 0 and key(victim) not in watched_inodes(watcher)
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        (victim / "b" / "secret").write_text("x")
        (attacker / "src" / "marker").write_text("x")
        await wait_for_change(changes, "attacker")
        nursery.cancel_scope.cancel()


async def test_a_directory_swapped_for_a_symlink_before_its_event_is_handled_is_not_followed(tmp_path: Path) -> None:
    attacker, victim = _layout(tmp_path)
    (attacker / "a" / "b").mkdir(parents=True)
    watcher = FileWatcher(lambda user: None)
    watcher.watch("attacker", attacker)
    # Both events wait in the queue while the attacker swaps: a new directory replaced by a symlink
    # to the victim, and a parent of a new directory replaced by a symlink to a tree of the same shape.
    (attacker / "new").mkdir()
    (attacker / "a" / "b" / "c").mkdir()
    (attacker / "new").rmdir()
    (attacker / "new").symlink_to(victim)
    (attacker / "a").rename(attacker / "a.real")
    (attacker / "a").symlink_to(victim.parent / "victim-shaped")
    (victim.parent / "victim-shaped").symlink_to(victim)  # a/b/c -> victim/b/c
    for wd, mask, name in watcher.inotify.read():
        watcher._event(wd, mask, name)
    watched = watched_inodes(watcher)
    assert not {key(victim), key(victim / "b"), key(victim / "b" / "c")} & watched
    assert key(attacker / "a.real" / "b") in watched
    watcher.close()


async def test_racing_swaps_never_take_the_watcher_out_of_the_workspace(tmp_path: Path) -> None:
    attacker, victim = _layout(tmp_path)
    watcher = FileWatcher(lambda user: None)
    watcher.watch("attacker", attacker)
    forbidden = {key(p) for p in (victim, victim / "b", Path("/"), Path("/etc"), tmp_path)}

    def swap() -> None:
        for i in range(300):
            new = attacker / f"d{i}"
            new.mkdir()
            new.rmdir()
            new.symlink_to(victim if i % 2 else Path("/etc"))
            os.rename(attacker / "src", attacker / "src.old")
            (attacker / "src").symlink_to(victim)
            (attacker / "src").unlink()
            os.rename(attacker / "src.old", attacker / "src")
            (attacker / "src" / f"s{i}").mkdir()

    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        await trio.to_thread.run_sync(swap)
        with trio.fail_after(5):  # until the last directory made is watched: every event handled
            while key(attacker / "src" / "s299") not in watched_inodes(watcher):
                await trio.sleep(0.01)
        assert not forbidden & watched_inodes(watcher)
        nursery.cancel_scope.cancel()
