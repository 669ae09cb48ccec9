"""Every Prometheus metric of the daemon, defined in one place (names start ``workspace_supervisor_``).

Labels are by tier, reason, kind or direction - never by user id (cardinality). Label values
known up front are created at import so that dashboards see zeros rather than gaps.
"""

from __future__ import annotations

import math
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.process_collector import ProcessCollector

from supervisor.idle import Stage
from supervisor.sessions import State

disable_created_metrics()  # no *_created series: they double the series count and nobody graphs them
REGISTRY = CollectorRegistry(auto_describe=True)
PREFIX = "workspace_supervisor"

AUTH_REJECTIONS = Counter(
    f"{PREFIX}_auth_rejections", "Requests refused by the front door, by reason code.", ["reason"], registry=REGISTRY
)
PROXY_CONNECTIONS = Counter(
    f"{PREFIX}_proxy_connections", "Client connections proxied to an IDE, by kind (http, websocket), or to a user's own port (port: /port/<N>/, HTTP or WebSocket).", ["kind"], registry=REGISTRY
)
PROXY_ACTIVE = Gauge(
    f"{PREFIX}_proxy_active_connections", "Client connections being proxied now, by kind.", ["kind"], registry=REGISTRY
)
PROXY_BYTES = Counter(
    f"{PREFIX}_proxy_bytes", "Bytes proxied, by direction (client_to_ide, ide_to_client).", ["direction"], registry=REGISTRY
)
UPSTREAM_REJECTIONS = Counter(
    f"{PREFIX}_upstream_rejections",
    "Connections to a user's IDE socket refused before a byte was sent, by reason (peer_uid: the socket's peer "
    "credentials name another uid than the user's; the request is answered 502 ide_unavailable).",
    ["reason"], registry=REGISTRY,
)
UPSTREAM_REJECTIONS.labels(reason="peer_uid")
FRONTDOOR_LIMITS = Counter(
    f"{PREFIX}_frontdoor_limits",
    "Times a front-door limit held a client back, by limit: unauthenticated (connection over [http] max_unauthenticated, "
    "answered 429 and closed), unauthenticated_idle (closed after unauthenticated_timeout), rejected_tokens (429 "
    "too_many_rejections), connections, websockets and requests (429 too_many_connections over the tier's "
    "max_connections, max_websockets, max_requests), evicted (a connection without credentials waiting for a request "
    "closed to make room for another client's: all [http] max_connections open), relay_memory (the WebSocket relay's pending bytes went over "
    "[http] relay_memory: reads cut to 4 KiB).",
    ["limit"], registry=REGISTRY,
)
FRONTDOOR_LIMIT_NAMES = ("unauthenticated", "unauthenticated_idle", "rejected_tokens", "connections", "websockets", "requests",
                         "evicted", "relay_memory")
for _limit in FRONTDOOR_LIMIT_NAMES:
    FRONTDOOR_LIMITS.labels(limit=_limit)
PROBE_CONNECTIONS_CLOSED = Counter(
    f"{PREFIX}_probe_connections_closed",
    "Connections to the probe port closed unanswered, by reason (evicted: to make room for a new connection, "
    "its peer holding too many or the port full; timeout: its request head or answer took too long).",
    ["reason"], registry=REGISTRY,
)
for _reason in ("evicted", "timeout"):
    PROBE_CONNECTIONS_CLOSED.labels(reason=_reason)
COLD_STARTS = Counter(
    f"{PREFIX}_cold_starts",
    "IDEs started because a start request (a browser at the front door, or an operator) found the user not running, by tier. "
    "Counted in one place, SessionManager.start.",
    ["tier"], registry=REGISTRY,
)

for _kind in ("http", "websocket", "port"):
    PROXY_CONNECTIONS.labels(kind=_kind)
    PROXY_ACTIVE.labels(kind=_kind)
for _direction in ("client_to_ide", "ide_to_client"):
    PROXY_BYTES.labels(direction=_direction)

# ---- the pod, its users and their processes (session manager) ----------------------------------
#
# Gauges of the pod's current state are set from the session manager's live state just before each
# scrape (``supervisor.probes``); counters and histograms are updated where the event happens.

USERS = Gauge(f"{PREFIX}_users", "Users known to this pod, by state and tier.", ["state", "tier"], registry=REGISTRY)
ACTIVE_USERS = Gauge(
    f"{PREFIX}_active_users", "Users occupying a slot now (STARTING, RUNNING, PAUSED, BACKOFF, STOPPING).", registry=REGISTRY
)
CAPACITY = Gauge(f"{PREFIX}_capacity", "Most users this pod runs at once ([pod] capacity).", registry=REGISTRY)
FREE_SLOTS = Gauge(f"{PREFIX}_free_slots", "Users this pod can still admit (0 while draining).", registry=REGISTRY)
SESSIONS = Gauge(f"{PREFIX}_sessions", "Browser sessions open on this pod (as reported to the registry).", registry=REGISTRY)
DRAINING = Gauge(f"{PREFIX}_draining", "1 while the pod is draining (admitting no new users), else 0.", registry=REGISTRY)
EFFECT_FAILURES = Counter(
    f"{PREFIX}_effect_failures",
    "Effects carried out for a user that failed and put the user in BACKOFF/FATAL (the manager's containment "
    "boundary), by effect (start, kill the tree, watch its exit, ...). See `workspacectl status` for whom and why.",
    ["effect"], registry=REGISTRY,
)
STATE_SAVE_FAILURES = Counter(
    f"{PREFIX}_state_save_failures",
    "Writes of a user's state file that failed (disk full, I/O error); the last good file is kept and the write "
    "retried. `workspacectl pod` lists the users whose file is behind (state_files_unsaved).",
    registry=REGISTRY,
)

ISOLATION = Gauge(
    f"{PREFIX}_isolation_in_force",
    "1 for each mechanism of a user's own view ([isolation]: network, pid, mount, ipc, uts, identity, seccomp) in "
    "force for every user of this pod, else 0 (off, or 'auto' and unavailable: see the daemon's start-up log).",
    ["mechanism"], registry=REGISTRY,
)
SPAWN_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0)


def spawn_buckets(timeout: float) -> tuple[float, ...]:
    """Histogram buckets for spawn durations: the standard ones below ``timeout``, then ``timeout``
    itself (a spawn slower than that has failed; it lands in +Inf only if observed at all)."""
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    return tuple(b for b in SPAWN_BUCKETS if b < timeout) + (float(timeout),)


def _spawn_histogram(timeout: float) -> Histogram:
    return Histogram(
        f"{PREFIX}_spawn_duration_seconds",
        "Time from spawning an IDE to its answering GET / (RUNNING), by tier; buckets end at [ide] ready_timeout.",
        ["tier"], buckets=spawn_buckets(timeout), registry=REGISTRY,
    )


SPAWN_DURATION = _spawn_histogram(60.0)
RESTARTS = Counter(
    f"{PREFIX}_restarts",
    "Automatic restarts of IDEs that exited or failed, by tier and how the process ended "
    "(exit, signal, oom, unknown).",
    ["tier", "reason"], registry=REGISTRY,
)
RESTART_REASONS = ("exit", "signal", "oom", "unknown")
OOM_KILLS = Counter(
    f"{PREFIX}_oom_kills", "Processes killed by the kernel OOM killer at a user's memory limit, by tier.", ["tier"], registry=REGISTRY
)

# ---- the idle ladder (supervisor.idle) -----------------------------------------------------------

IDLE_USERS = Gauge(
    f"{PREFIX}_idle_users",
    "Users on each stage of the idle reclaim ladder (active, lsp_paused, reclaimed, frozen, stopped). "
    "Zeros until the idle ladder runs in the daemon.",
    ["stage"], registry=REGISTRY,
)
IDLE_TRANSITIONS = Counter(
    f"{PREFIX}_idle_transitions",
    "Moves on the idle reclaim ladder, by the stage entered (active = woken up). "
    "Zeros until the idle ladder runs in the daemon.",
    ["stage"], registry=REGISTRY,
)

# ---- the occupancy registry (supervisor.publisher) -----------------------------------------------

REGISTRY_HEARTBEAT = Histogram(
    f"{PREFIX}_registry_heartbeat_seconds",
    "Time a registry heartbeat (publish of the pod record, with pending session writes) took, successful or not.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0), registry=REGISTRY,
)
REGISTRY_FAILURES = Counter(
    f"{PREFIX}_registry_heartbeat_failures",
    "Registry heartbeats that failed, by reason (registry_unavailable, registry_corrupt, timeout, ...).",
    ["reason"], registry=REGISTRY,
)
REGISTRY_FAILURE_REASONS = (
    "registry_unavailable", "registry_corrupt", "registry_schema_too_new", "registry_closed",
    "fdb_library_missing", "registry_error", "timeout",
)
REGISTRY_UP = Gauge(
    f"{PREFIX}_registry_up", "1 when the last registry heartbeat succeeded, 0 when it failed.", registry=REGISTRY
)
REGISTRY_LAST_SUCCESS = Gauge(
    f"{PREFIX}_registry_last_success_timestamp_seconds",
    "Unix time of the last successful registry heartbeat (0: none yet).", registry=REGISTRY,
)

# ---- resource use of the users' cgroups, summed per tier ------------------------------------------

CGROUP_CPU = Counter(
    f"{PREFIX}_cgroup_cpu_seconds",
    "CPU time used by the users' cgroups, by tier (summed from the periodic usage samples).",
    ["tier"], registry=REGISTRY,
)
CGROUP_MEMORY = Gauge(
    f"{PREFIX}_cgroup_memory_bytes",
    "Memory charged to the users' cgroups now, by tier (as of the last usage sample).",
    ["tier"], registry=REGISTRY,
)

BUILD = Info(f"{PREFIX}_build", "The daemon's version and cgroup version.", registry=REGISTRY)
ProcessCollector(namespace=PREFIX, registry=REGISTRY)

for _stage in Stage:
    IDLE_USERS.labels(stage=_stage.label)
    IDLE_TRANSITIONS.labels(stage=_stage.label)
for _reason in REGISTRY_FAILURE_REASONS:
    REGISTRY_FAILURES.labels(reason=_reason)


def configure(*, tiers: Iterable[str], ready_timeout: float, version: str, cgroup_version: int) -> None:
    """Fit the metrics to one daemon's configuration: spawn-duration buckets ending at the start
    timeout, and every per-tier series created up front (zeros rather than gaps)."""
    global SPAWN_DURATION
    REGISTRY.unregister(SPAWN_DURATION)
    SPAWN_DURATION = _spawn_histogram(ready_timeout)
    for tier in tiers:
        COLD_STARTS.labels(tier=tier)
        SPAWN_DURATION.labels(tier=tier)
        OOM_KILLS.labels(tier=tier)
        CGROUP_CPU.labels(tier=tier)
        CGROUP_MEMORY.labels(tier=tier)
        for reason in RESTART_REASONS:
            RESTARTS.labels(tier=tier, reason=reason)
        for state in State:
            USERS.labels(state=state.value, tier=tier)
    BUILD.info({"version": version, "cgroup_version": str(cgroup_version)})
