"""Every Prometheus metric of the daemon, defined in one place (names start ``workspace_supervisor_``).

Labels are by tier, reason, kind or direction - never by user id (cardinality). Label values
known up front are created at import so that dashboards see zeros rather than gaps.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry(auto_describe=True)
PREFIX = "workspace_supervisor"

AUTH_REJECTIONS = Counter(
    f"{PREFIX}_auth_rejections", "Requests refused by the front door, by reason code.", ["reason"], registry=REGISTRY
)
PROXY_CONNECTIONS = Counter(
    f"{PREFIX}_proxy_connections", "Client connections proxied to an IDE, by kind (http, websocket).", ["kind"], registry=REGISTRY
)
PROXY_ACTIVE = Gauge(
    f"{PREFIX}_proxy_active_connections", "Client connections being proxied now, by kind.", ["kind"], registry=REGISTRY
)
PROXY_BYTES = Counter(
    f"{PREFIX}_proxy_bytes", "Bytes proxied, by direction (client_to_ide, ide_to_client).", ["direction"], registry=REGISTRY
)
COLD_STARTS = Counter(
    f"{PREFIX}_cold_starts", "IDEs started because a browser arrived for a user who was not running, by tier.", ["tier"], registry=REGISTRY
)

for _kind in ("http", "websocket"):
    PROXY_CONNECTIONS.labels(kind=_kind)
    PROXY_ACTIVE.labels(kind=_kind)
for _direction in ("client_to_ide", "ide_to_client"):
    PROXY_BYTES.labels(direction=_direction)
