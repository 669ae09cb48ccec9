"""State files: a failed save keeps the last good file and is retried; odd files never block or crash."""

from __future__ import annotations

import os
from pathlib import Path

from supervisor.statefile import StateStore, UserRecord


def record(state: str) -> UserRecord:
    return UserRecord(user="alice", tier="free", uid=200000, gid=200000, state=state, pid=None, pid_start=None,
                      restarts=0, running_since_wall=None, started_wall=None)


def test_a_failed_save_keeps_the_last_good_file_and_the_next_save_retries(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.open()
    assert store.save(record("STARTING"))
    tmp = store.dir / ".alice.json.tmp"
    tmp.mkdir()  # the temporary file cannot be made: stands for ENOSPC or EIO
    assert not store.save(record("RUNNING"))
    assert "alice" in store.failing and "Is a directory" in store.failing["alice"]
    assert [r.state for r in store.load_all()] == ["STARTING"]  # the last good one
    tmp.rmdir()
    os.mkfifo(tmp)  # a FIFO left there must not block the open
    assert store.save(record("RUNNING"))
    assert store.failing == {} and [r.state for r in store.load_all()] == ["RUNNING"]
    assert not tmp.exists()


def test_load_skips_fifos_symlinks_huge_and_foreign_files(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.open()
    assert store.save(record("RUNNING"))
    os.mkfifo(store.dir / "bob.json")
    (store.dir / "carol.json").write_bytes(b" " * 2**20)
    (store.dir / "dave.json").symlink_to(store.dir / "alice.json")
    (store.dir / "erin.json").mkdir()
    (store.dir / "frank.json").write_text('{"version": 1, "user": "alice"}')
    assert [r.user for r in store.load_all()] == ["alice"]
