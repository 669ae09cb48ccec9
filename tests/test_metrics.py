"""Metrics: names, labels and buckets (fast), the exposition of a real daemon checked by promtool,
and the shipped alert rules checked and unit-tested by promtool."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client import generate_latest

from supervisor import metrics
from tests.conftest import is_root, pure_cgroup_v2, v1_controllers_mounted
from tests.harness import Daemon, http_get, poll, started
from tests.probe_client import NO_PROMTOOL, PROMTOOL, promtool, samples, scrape, value

ALERTS = Path(__file__).parent.parent / "images" / "alerts"
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
needs_kernel = pytest.mark.skipif(
    not (is_root() and (v1_controllers_mounted() or pure_cgroup_v2())),
    reason="needs root and cgroup controllers (v1 cpu/memory/pids/freezer, or pure v2)",
)


# ---- the definitions ---------------------------------------------------------------------------


def test_every_metric_is_prefixed_and_never_labelled_by_user() -> None:
    metrics.configure(tiers=["free", "pro"], ready_timeout=30, version="test", cgroup_version=2)
    families = list(metrics.REGISTRY.collect())
    assert families
    for family in families:
        assert family.name.startswith("workspace_supervisor_"), family.name
        for sample in family.samples:
            assert not {"user", "user_id", "uid", "session", "session_id"} & set(sample.labels), sample


def test_the_issue_s_metrics_exist() -> None:
    metrics.configure(tiers=["free"], ready_timeout=30, version="test", cgroup_version=2)
    families = list(metrics.REGISTRY.collect())
    names = {s.name for f in families for s in f.samples}
    names |= {f"{f.name}_total" for f in families if f.type == "counter"}  # no label values yet: no samples
    for name in (
        "workspace_supervisor_users", "workspace_supervisor_active_users", "workspace_supervisor_capacity",
        "workspace_supervisor_sessions", "workspace_supervisor_free_slots", "workspace_supervisor_draining",
        "workspace_supervisor_spawn_duration_seconds_bucket", "workspace_supervisor_cold_starts_total",
        "workspace_supervisor_restarts_total", "workspace_supervisor_oom_kills_total",
        "workspace_supervisor_idle_users", "workspace_supervisor_idle_transitions_total",
        "workspace_supervisor_auth_rejections_total", "workspace_supervisor_proxy_connections_total",
        "workspace_supervisor_proxy_bytes_total", "workspace_supervisor_registry_heartbeat_seconds_bucket",
        "workspace_supervisor_registry_heartbeat_failures_total", "workspace_supervisor_registry_up",
        "workspace_supervisor_cgroup_cpu_seconds_total", "workspace_supervisor_cgroup_memory_bytes",
    ):
        assert name in names, name


def test_spawn_buckets_end_at_the_start_timeout() -> None:
    assert metrics.spawn_buckets(60.0)[-1] == 60.0
    assert metrics.spawn_buckets(7.0)[-3:] == (3.0, 5.0, 7.0)
    assert metrics.spawn_buckets(0.05) == (0.05,)
    with pytest.raises(ValueError):
        metrics.spawn_buckets(0)
    metrics.configure(tiers=["free"], ready_timeout=12, version="test", cgroup_version=1)
    bounds = {
        s.labels["le"] for f in metrics.REGISTRY.collect() for s in f.samples
        if s.name == "workspace_supervisor_spawn_duration_seconds_bucket"
    }
    assert "12.0" in bounds and "+Inf" in bounds and "15.0" not in bounds


def test_idle_ladder_series_are_zeros_for_every_stage() -> None:
    text = generate_latest(metrics.REGISTRY).decode()
    for stage in ("active", "lsp_paused", "reclaimed", "frozen", "stopped"):
        assert ("workspace_supervisor_idle_users", frozenset({("stage", stage)})) in samples(text)


@needs_promtool
def test_promtool_accepts_the_exposition() -> None:
    metrics.configure(tiers=["free", "starter", "pro"], ready_timeout=60, version="test", cgroup_version=2)
    result = promtool("check", "metrics", stdin=generate_latest(metrics.REGISTRY).decode())
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the alert rules -----------------------------------------------------------------------------


@needs_promtool
def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", "workspace-supervisor.rules.yml", cwd=ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 rules found" in result.stdout


@needs_promtool
def test_alert_rules_fire_as_specified() -> None:
    result = promtool("test", "rules", "workspace-supervisor.rules.test.yml", cwd=ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_use_only_metrics_the_daemon_exports() -> None:
    import re

    rules = (ALERTS / "workspace-supervisor.rules.yml").read_text()
    used = set(re.findall(r"workspace_supervisor_[a-z_]+", rules))
    exported = {s.name for f in metrics.REGISTRY.collect() for s in f.samples}
    assert used and used <= exported, used - exported


# ---- a real daemon --------------------------------------------------------------------------------


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    yield from started(**{"tiers.free__memory": "64Mi"})


@needs_kernel
@needs_promtool
def test_live_exposition_passes_promtool_and_counts_what_happened(daemon: Daemon) -> None:
    assert daemon.ctl("start", "alice").returncode == 0
    assert daemon.ctl("start", "spin-1", "--tier", "pro").returncode == 0
    text = scrape(daemon)
    result = promtool("check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr

    assert value(text, "workspace_supervisor_users", state="RUNNING", tier="free") == 1
    assert value(text, "workspace_supervisor_users", state="RUNNING", tier="pro") == 1
    assert value(text, "workspace_supervisor_users", state="STOPPED", tier="starter") == 0
    assert value(text, "workspace_supervisor_active_users") == 2
    assert value(text, "workspace_supervisor_capacity") == 10
    assert value(text, "workspace_supervisor_free_slots") == 8
    assert value(text, "workspace_supervisor_draining") == 0
    assert value(text, "workspace_supervisor_sessions") == 0
    assert value(text, "workspace_supervisor_cold_starts_total", tier="free") == 1
    assert value(text, "workspace_supervisor_cold_starts_total", tier="pro") == 1
    assert value(text, "workspace_supervisor_spawn_duration_seconds_count", tier="free") == 1
    assert value(text, "workspace_supervisor_spawn_duration_seconds_bucket", tier="free", le="10.0") == 1  # ready_timeout
    cgroup_version = str(daemon.ctl_json("pod")["pod"]["cgroup_version"])
    assert value(text, "workspace_supervisor_build_info", version="0.1.0", cgroup_version=cgroup_version) == 1

    # Starting a running user again is not a cold start.
    assert daemon.ctl("start", "alice").returncode == 0
    assert value(scrape(daemon), "workspace_supervisor_cold_starts_total", tier="free") == 1

    # Usage by tier, from the periodic samples (every 200ms here): the spinner burns CPU.
    poll(lambda: value(scrape(daemon), "workspace_supervisor_cgroup_cpu_seconds_total", tier="pro") > 0.2, 10, "CPU counted")
    text = scrape(daemon)
    assert value(text, "workspace_supervisor_cgroup_memory_bytes", tier="free") > 0
    assert value(text, "workspace_supervisor_cgroup_cpu_seconds_total", tier="starter") == 0

    # A healthy IDE killed by a signal is restarted: counted by tier and reason.
    pid = daemon.user("alice")["pid"]
    poll(lambda: daemon.user("alice")["uptime_s"] >= 2.0, 10, "healthy_after")
    os.kill(pid, signal.SIGKILL)
    poll(lambda: (u := daemon.user("alice"))["state"] == "RUNNING" and u["pid"] != pid, 10, "restart")
    text = scrape(daemon)
    assert value(text, "workspace_supervisor_restarts_total", tier="free", reason="signal") == 1
    assert value(text, "workspace_supervisor_restarts_total", tier="free", reason="exit") == 0
    assert value(text, "workspace_supervisor_spawn_duration_seconds_count", tier="free") == 2
    assert value(text, "workspace_supervisor_cold_starts_total", tier="free") == 1  # a restart is not a cold start

    # A crash loop counts every automatic restart.
    assert daemon.ctl("start", "crash-1").returncode == 1
    poll(lambda: daemon.user("crash-1")["state"] == "FATAL", 10, "FATAL")
    restarts = daemon.user("crash-1")["restarts"]
    assert restarts >= 2
    assert value(scrape(daemon), "workspace_supervisor_restarts_total", tier="free", reason="exit") == restarts


@needs_kernel
def test_oom_kills_are_counted_by_tier(daemon: Daemon) -> None:
    assert daemon.ctl("start", "hog-1").returncode == 0
    try:
        http_get(daemon.ide_socket("hog-1"), "/alloc?mb=256", timeout=10)
    except OSError:
        pass
    poll(lambda: value(scrape(daemon), "workspace_supervisor_oom_kills_total", tier="free") >= 1, 10, "OOM counted")
    assert value(scrape(daemon), "workspace_supervisor_oom_kills_total", tier="pro") == 0
