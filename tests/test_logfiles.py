"""Per-user IDE logs: copy-truncate rotation keeps the writer's descriptor valid; tailing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supervisor import launch, logfiles


def test_rotation_keeps_the_open_descriptor_writing(tmp_path: Path) -> None:
    log = tmp_path / "u.log"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        for generation in range(4):
            os.write(fd, f"gen{generation} ".encode() * 100)
            assert logfiles.rotate_if_needed(log, max_bytes=100, backups=2)
        assert not logfiles.rotate_if_needed(log, max_bytes=100, backups=2)  # empty now
        os.write(fd, b"after rotation\n")
    finally:
        os.close(fd)
    assert log.read_bytes() == b"after rotation\n"  # appended at the start of the truncated file
    assert (tmp_path / "u.log.1").read_bytes().startswith(b"gen3 ")
    assert (tmp_path / "u.log.2").read_bytes().startswith(b"gen2 ")
    assert not (tmp_path / "u.log.3").exists()


def test_tail_and_follow(tmp_path: Path) -> None:
    log = tmp_path / "u.log"
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(100)))
    data, end = logfiles.read_tail(log, 3)
    assert data == b"line 97\nline 98\nline 99\n"
    with open(log, "ab") as f:
        f.write(b"new\n")
    assert logfiles.read_from(log, end) == (b"new\n", end + 4)
    os.truncate(log, 0)
    with open(log, "ab") as f:
        f.write(b"rotated\n")
    assert logfiles.read_from(log, end + 4) == (b"rotated\n", 8)
    assert logfiles.read_tail(tmp_path / "missing.log", 5) == (b"", 0)


def test_rotation_keeps_only_the_last_max_bytes_and_refuses_odd_files(tmp_path: Path) -> None:
    log = tmp_path / "u.log"
    log.write_bytes(b"x" * 10_000 + b"the end\n")
    assert logfiles.rotate_if_needed(log, max_bytes=100, backups=1)
    assert (tmp_path / "u.log.1").read_bytes() == (b"x" * 10_000 + b"the end\n")[-100:]
    assert log.stat().st_size == 0
    fifo, link, directory = tmp_path / "fifo.log", tmp_path / "link.log", tmp_path / "dir.log"
    os.mkfifo(fifo)
    link.symlink_to(log)
    directory.mkdir()
    for odd in (fifo, link, directory):  # refused at once: a FIFO must not block the daemon
        with pytest.raises(OSError):
            logfiles.rotate_if_needed(odd, max_bytes=0, backups=1)
        with pytest.raises(OSError):
            logfiles.read_tail(odd, 5)
        with pytest.raises(OSError):
            launch.open_log(odd)


def test_a_backup_that_cannot_be_written_still_truncates(tmp_path: Path) -> None:
    log = tmp_path / "u.log"
    log.write_bytes(b"y" * 1000)
    (tmp_path / "u.log.1").mkdir()  # stands for any backup that cannot be written (e.g. ENOSPC)
    assert logfiles.rotate_if_needed(log, max_bytes=100, backups=1)
    assert log.stat().st_size == 0
