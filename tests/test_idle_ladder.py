"""The idle ladder for real: real processes, real cgroup freezer, real inotify, real signals.

Thresholds are in seconds here (the defaults are minutes); the daemon runs with them as is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import is_root, pure_cgroup_v2, v1_controllers_mounted
from tests.harness import Daemon, http_get, lsp_progressing, lsp_ticks, poll, started

pytestmark = pytest.mark.skipif(
    not (is_root() and (v1_controllers_mounted() or pure_cgroup_v2())),
    reason="needs root and cgroup controllers (v1 cpu/memory/pids/freezer, or pure v2)",
)

FAST_LADDER = {
    "idle__lsp_pause_after": "1s", "idle__gc_after": "2s", "idle__freeze_after": "3s", "idle__stop_after": "5s",
    "idle__tick": "100ms", "idle__cpu_busy_threshold": "5%",
}


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    yield from started(**FAST_LADDER)


def stage(d: Daemon, user: str) -> Any:
    return d.user(user)["idle_stage"]


def test_idle_user_walks_down_the_ladder_and_wakes_on_file_change(daemon: Daemon) -> None:
    assert daemon.ctl("start", "lsp-1").returncode == 0
    info = daemon.user("lsp-1")
    home = Path(info["workspace"]).parent / ".home" / "lsp-1"
    poll(lambda: lsp_ticks(home) > 0, 5, "the language server to tick")
    assert stage(daemon, "lsp-1") == "active"

    poll(lambda: stage(daemon, "lsp-1") in ("lsp_paused", "reclaimed"), 5, "language servers paused")
    assert not lsp_progressing(home, 0.3), "the language server still runs while paused"
    poll(lambda: "garbage collection requested" in daemon.ctl("tail", "lsp-1").stdout, 5, "GC signal at the first rung")
    assert "uid=" in http_get(daemon.ide_socket("lsp-1"))  # the IDE itself still serves

    poll(lambda: stage(daemon, "lsp-1") == "reclaimed", 5, "reclaimed")
    poll(lambda: daemon.ctl("tail", "lsp-1").stdout.count("garbage collection requested") == 2, 5, "GC signal again")

    poll(lambda: stage(daemon, "lsp-1") == "frozen", 5, "frozen")
    with pytest.raises(OSError):
        http_get(daemon.ide_socket("lsp-1"), timeout=0.3)

    (Path(info["workspace"]) / "notes.txt").write_text("back to work\n")  # file activity wakes it
    poll(lambda: stage(daemon, "lsp-1") == "active", 5, "woken")
    assert "uid=" in http_get(daemon.ide_socket("lsp-1"))
    assert lsp_progressing(home, 0.3), "the language server did not resume"

    why = json.loads(daemon.ctl("why", "lsp-1", "--json").stdout)["why"]
    assert [h["to"] for h in why["history"]] == ["lsp_paused", "reclaimed", "frozen", "active"]
    assert "idle" in why["history"][0]["reason"] and "no input" in why["history"][0]["reason"]
    assert why["last_activity_s"]["files"] is not None


def test_idle_user_is_stopped_and_cold_starts_with_files_intact(daemon: Daemon) -> None:
    assert daemon.ctl("start", "sleepy").returncode == 0
    workspace = Path(daemon.user("sleepy")["workspace"])
    (workspace / "saved.txt").write_text("my work\n")
    poll(lambda: daemon.user("sleepy")["state"] == "STOPPED", 15, "stopped by the ladder")
    assert daemon.cgroup_dirs("sleepy") == []
    why = daemon.ctl("why", "sleepy")
    assert why.returncode == 0 and "stopped" in why.stdout
    assert daemon.ctl("start", "sleepy").returncode == 0
    assert (workspace / "saved.txt").read_text() == "my work\n"
    assert daemon.user("sleepy")["idle_stage"] == "active"


def test_a_cpu_bound_job_is_never_laddered() -> None:
    d = Daemon(**{**FAST_LADDER, "daemon__usage_interval": "200ms"})
    d.start()
    try:
        assert d.ctl("start", "spin-1").returncode == 0
        assert d.ctl("start", "calm-1").returncode == 0
        poll(lambda: stage(d, "calm-1") == "frozen", 10, "the idle user to freeze")
        assert stage(d, "spin-1") == "active"
        assert d.user("spin-1")["last_activity_s"]["cpu"] < 1.0
    finally:
        d.cleanup()
