"""What the idle ladder reads from and sends to a user's processes, on real processes: command
lines read with a bound, signals only through pidfds of processes checked to be the user's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Iterator

import pytest

from supervisor.reclaim import CMDLINE_LIMIT, open_pidfds, process_tree, select_lsps, signal_pidfds
from tests.harness import poll

SLEEP = "import time; time.sleep(60)"


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rindex(b")") + 2 :].split()[0].decode()


def test_a_huge_command_line_is_read_only_up_to_the_bound(sleepers: list[subprocess.Popen[bytes]]) -> None:
    huge = ["x" * 100_000] * 20  # 2 MB of arguments
    proc = subprocess.Popen([sys.executable, "-c", SLEEP, "pylsp", *huge])
    sleepers.append(proc)
    poll(lambda: "pylsp" in process_tree([proc.pid]).get(proc.pid, (0, []))[1], 10, "the command line after exec")
    tree = process_tree([proc.pid])
    ppid, cmdline = tree[proc.pid]
    assert ppid == os.getpid()
    assert len("\0".join(cmdline).encode()) <= CMDLINE_LIMIT
    assert cmdline[:4] == [sys.executable, "-c", SLEEP, "pylsp"]
    assert select_lsps(tree, 1, ["pylsp"]) == [proc.pid]  # what the ladder matches is in the first bytes


def test_only_processes_in_the_group_after_opening_are_signalled(sleepers: list[subprocess.Popen[bytes]]) -> None:
    mine, other = (subprocess.Popen([sys.executable, "-c", SLEEP]) for _ in range(2))
    sleepers.extend([mine, other])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    pidfds = open_pidfds([mine.pid, other.pid, gone.pid], lambda: [mine.pid, gone.pid])
    try:
        assert len(pidfds) == 1
        signal_pidfds(pidfds, signal.SIGSTOP)
        poll(lambda: _state(mine.pid) == "T", 5, "the user's process stopped")
        assert _state(other.pid) != "T"
        signal_pidfds(pidfds, signal.SIGCONT)
        poll(lambda: _state(mine.pid) != "T", 5, "the user's process continued")
        mine.kill()
        mine.wait()  # reaped: its pid may be anyone's now; the pidfd still names the dead process
        signal_pidfds(pidfds, signal.SIGSTOP)  # no error, and nobody else gets it
    finally:
        for fd in pidfds:
            os.close(fd)


def test_a_failing_group_listing_leaks_no_pidfd(sleepers: list[subprocess.Popen[bytes]]) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SLEEP])
    sleepers.append(proc)
    before = len(os.listdir("/proc/self/fd"))

    def broken() -> list[int]:
        raise OSError("cgroup.procs vanished")

    with pytest.raises(OSError):
        open_pidfds([proc.pid], broken)
    assert len(os.listdir("/proc/self/fd")) == before
