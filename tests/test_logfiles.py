"""Per-user IDE logs: copy-truncate rotation keeps the writer's descriptor valid; tailing."""

from __future__ import annotations

import os
from pathlib import Path

from supervisor import logfiles


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
