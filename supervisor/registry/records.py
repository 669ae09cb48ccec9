"""Typed, frozen records of the registry, and their versioned value encoding.

Both backends store each record as a compact JSON object carrying ``"v": SCHEMA_VERSION``. A
reader accepts any version up to its own (missing fields of older versions get defaults, unknown
fields are ignored) and refuses newer ones with :class:`SchemaTooNew`, so a rolling upgrade never
misreads a record.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping, TypeVar

from supervisor.registry.errors import RegistryCorrupt, SchemaTooNew

SCHEMA_VERSION = 1
"""Version of every stored value (and of the key / table layout)."""


def check_id(what: str, value: object) -> None:
    if not isinstance(value, str) or not value or len(value) > 253:
        raise ValueError(f"{what} must be a non-empty string of at most 253 characters, not {value!r}")


def _check_count(what: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be a whole number >= 0, not {value!r}")


def _check_time(what: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number of seconds, not {value!r}")


@dataclass(frozen=True, kw_only=True)
class PodRecord:
    """One pod's occupancy as it publishes it on every heartbeat.

    ``free_slots`` is what the pod can still admit (at most ``capacity - active_users``, lower when
    CPU or memory headroom is short). ``heartbeat_at``, ``lease_expires_at`` and ``reserved`` are
    filled in by the registry: the time of the last heartbeat, when the pod counts as dead without
    another one, and the live reservations on the pod that it has not claimed yet.
    """

    pod_id: str
    capacity: int
    active_users: int
    sessions: int
    free_slots: int
    cpu_headroom_millicores: int
    memory_headroom_bytes: int
    draining: bool = False
    cgroup_version: int = 2
    daemon_version: str = ""
    address: str = ""  # how routers reach the pod's front door (host:port); empty = by pod id
    heartbeat_at: float = 0.0
    lease_expires_at: float = 0.0
    reserved: int = 0

    def __post_init__(self) -> None:
        check_id("pod_id", self.pod_id)
        for name in ("capacity", "active_users", "sessions", "free_slots", "cpu_headroom_millicores",
                     "memory_headroom_bytes", "reserved"):
            _check_count(name, getattr(self, name))
        if self.free_slots > self.capacity:
            raise ValueError(f"free_slots ({self.free_slots}) is above capacity ({self.capacity})")
        if not isinstance(self.draining, bool):
            raise ValueError(f"draining must be a bool, not {self.draining!r}")
        if self.cgroup_version not in (0, 1, 2):
            raise ValueError(f"cgroup_version must be 1, 2 or 0 (unknown), not {self.cgroup_version!r}")
        if not isinstance(self.daemon_version, str) or not isinstance(self.address, str):
            raise ValueError("daemon_version and address must be strings")
        _check_time("heartbeat_at", self.heartbeat_at)
        _check_time("lease_expires_at", self.lease_expires_at)

    def alive(self, now: float) -> bool:
        """True while the lease runs."""
        return now < self.lease_expires_at

    @property
    def room(self) -> int:
        """Slots a router may still reserve: 0 when draining, else free slots minus reservations."""
        return 0 if self.draining else max(0, self.free_slots - self.reserved)


@dataclass(frozen=True, kw_only=True)
class SessionRecord:
    """One browser session: which user, on which pod, in which workspace, since when."""

    session_id: str
    user: str
    pod_id: str
    workspace: str
    since: float

    def __post_init__(self) -> None:
        check_id("session_id", self.session_id)
        check_id("user", self.user)
        check_id("pod_id", self.pod_id)
        if not isinstance(self.workspace, str):
            raise ValueError(f"workspace must be a string path, not {self.workspace!r}")
        _check_time("since", self.since)


@dataclass(frozen=True, kw_only=True)
class Reservation:
    """A slot held on a pod for a user until ``expires_at`` (or until released or claimed)."""

    reservation_id: str
    pod_id: str
    user: str
    created_at: float
    expires_at: float

    def __post_init__(self) -> None:
        check_id("reservation_id", self.reservation_id)
        check_id("pod_id", self.pod_id)
        check_id("user", self.user)
        _check_time("created_at", self.created_at)
        _check_time("expires_at", self.expires_at)

    def live(self, now: float) -> bool:
        return now < self.expires_at


# --- value encoding (shared by every backend) ---------------------------------------------------

_POD_STORED = ("capacity", "active_users", "sessions", "free_slots", "cpu_headroom_millicores",
               "memory_headroom_bytes", "draining", "cgroup_version", "daemon_version", "address",
               "heartbeat_at", "lease_expires_at")


_SESSION_FIELDS = tuple(f.name for f in fields(SessionRecord))
_RESERVATION_FIELDS = tuple(f.name for f in fields(Reservation))


def encode(value: Mapping[str, Any]) -> bytes:
    """Compact, key-sorted JSON with the schema version added."""
    return json.dumps({**value, "v": SCHEMA_VERSION}, sort_keys=True, separators=(",", ":")).encode()


def decode(raw: bytes | str, what: str) -> dict[str, Any]:
    """Parse a stored value and check its schema version."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryCorrupt(f"stored {what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise RegistryCorrupt(f"stored {what} is not a JSON object")
    version = value.get("v")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RegistryCorrupt(f"stored {what} has no valid schema version (\"v\": {version!r})")
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"stored {what} has schema version {version}; this daemon reads up to {SCHEMA_VERSION}"
        )
    return value


R = TypeVar("R")


def _build(what: str, factory: Callable[..., R], known: tuple[str, ...], value: Mapping[str, Any]) -> R:
    """Build a record from the known fields of a stored value (unknown fields are ignored)."""
    try:
        return factory(**{k: value[k] for k in known if k in value})
    except (TypeError, ValueError) as exc:
        raise RegistryCorrupt(f"stored {what} is malformed: {exc}") from None


def pod_value(record: PodRecord, *, room_key: int | None) -> bytes:
    """Encode a pod record with its room index key (see :func:`placement.room_key`), kept so the
    next write can move the index entry."""
    fields = asdict(record)
    return encode({**{k: fields[k] for k in _POD_STORED}, "room_key": room_key})


def pod_from_value(pod_id: str, raw: bytes | str, *, reserved: int = 0) -> tuple[PodRecord, int | None]:
    """Decode a pod value; returns the record and its room index key (None: not indexed)."""
    what = f"pod {pod_id!r}"
    value = decode(raw, what)
    key = value.get("room_key")
    if key is not None and (not isinstance(key, int) or isinstance(key, bool)):
        raise RegistryCorrupt(f"stored {what} has a malformed room index key {key!r}")
    record = _build(what, PodRecord, (*_POD_STORED, "pod_id", "reserved"),
                    {**value, "pod_id": pod_id, "reserved": reserved})
    return record, key


def session_value(session: SessionRecord) -> bytes:
    return encode(asdict(session))


def session_from_value(raw: bytes | str) -> SessionRecord:
    return _build("session", SessionRecord, _SESSION_FIELDS, decode(raw, "session"))


def reservation_value(reservation: Reservation) -> bytes:
    return encode(asdict(reservation))


def reservation_from_value(raw: bytes | str) -> Reservation:
    return _build("reservation", Reservation, _RESERVATION_FIELDS, decode(raw, "reservation"))
