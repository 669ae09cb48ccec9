"""The contract every occupancy registry fulfils.

A registry is shared by every pod of a cluster (FoundationDB) or of a host (one SQLite file):
each daemon publishes its own pod record on every heartbeat, records its sessions, and routers
reserve slots with :func:`supervisor.registry.place`.

**The registry is synchronous.** Every method blocks on storage (a file lock, a network round
trip) for at most its backend's timeout. The daemon calls it from a worker thread with
``trio.to_thread.run_sync``; never call it from the event loop directly. Implementations are safe
to use from several threads at once.

**Outages raise, never crash.** Every storage failure is raised as :class:`RegistryError` (most
often :class:`RegistryUnavailable`; see :mod:`supervisor.registry.errors`) with a hint. The
daemon counts them, reports them in readiness details and retries on its next heartbeat; running
users are never affected.

**Time is injected.** Each registry takes a ``clock`` (seconds since the epoch, ``time.time`` by
default) and reads it once per operation. Heartbeat times and lease expiries are stamped with the
writer's clock and judged with the reader's, so hosts need loosely synchronised clocks (NTP).
"""

from __future__ import annotations

from typing import Callable, Collection, Protocol, runtime_checkable

from supervisor.registry.records import PodRecord, Reservation, SessionRecord

Clock = Callable[[], float]
"""Seconds since the epoch, as ``time.time`` returns them."""


@runtime_checkable
class Registry(Protocol):
    """Occupancy of the workspace pods: pod records with leases, sessions and slot reservations.

    Synchronous and thread-safe (see the module docstring). Every method raises
    :class:`RegistryError` when storage fails; records are validated when built, so a bad
    argument raises ``ValueError`` before anything is written.

    Room on a pod is ``free_slots`` as last published by the pod, minus the live reservations on it
    that the pod has not yet claimed. A reservation stops counting when it expires, when it is
    released, or when the pod publishes a heartbeat that names the reserved user among its
    ``users`` (its ``free_slots`` then already counts that user).
    """

    lease: float
    """Seconds a published pod record stays alive without another heartbeat."""

    def describe(self) -> str:
        """One line for logs and ``workspacectl pod``, e.g. ``sqlite registry at /var/lib/...``."""
        ...

    def publish_pod(self, record: PodRecord, *, users: Collection[str] = ()) -> PodRecord:
        """Insert or replace the pod's record (a heartbeat) and renew its lease.

        ``record.heartbeat_at``, ``record.lease_expires_at`` and ``record.reserved`` are ignored:
        the registry stamps ``heartbeat_at = now`` and ``lease_expires_at = now + lease``.
        ``users`` are the ids of the users the pod runs now; live reservations on this pod for one
        of them are claimed (deleted), and expired reservations on it are swept, in the same
        transaction as the record and its room index entry.

        Returns the record as stored, with the stamped times and the reservations still counting.
        """
        ...

    def get_pod(self, pod_id: str, *, include_expired: bool = False) -> PodRecord | None:
        """The pod's record, or ``None`` when it is not registered (or its lease expired and
        ``include_expired`` is false)."""
        ...

    def list_pods(self, *, include_expired: bool = False) -> list[PodRecord]:
        """Every pod with a live lease (or every pod), ordered by pod id."""
        ...

    def pods_with_room(self, limit: int = 10) -> list[PodRecord]:
        """Up to ``limit`` live, non-draining pods with room, most room first (ties by pod id).

        Answered from the room index (pods ordered by room as of their last write), not by
        scanning every pod. Expired leases are skipped; room accounts for live reservations.
        """
        ...

    def remove_pod(self, pod_id: str) -> bool:
        """Delete the pod's record, index entry, sessions and reservations. False if it was
        not registered."""
        ...

    def remove_expired_pods(self, *, grace: float = 0.0) -> list[str]:
        """Remove (as :meth:`remove_pod`) every pod whose lease expired more than ``grace``
        seconds ago; returns their ids."""
        ...

    def put_session(self, session: SessionRecord) -> None:
        """Insert or replace a session (by session id); it may move to another pod or user."""
        ...

    def remove_session(self, session_id: str) -> bool:
        """Delete the session; False if it did not exist."""
        ...

    def list_sessions(self, *, pod: str | None = None, user: str | None = None) -> list[SessionRecord]:
        """Sessions, optionally only those on ``pod`` and/or of ``user``, ordered by
        (since, session id). Read from the pod / user indexes when filtered."""
        ...

    def reserve(self, user: str, pod_id: str | None = None, *, ttl: float) -> Reservation:
        """Atomically reserve one slot for ``user`` for ``ttl`` seconds.

        ``pod_id=None`` picks the live, non-draining pod with the most room (from the room index);
        otherwise only that pod. If the user already holds a live reservation (on ``pod_id`` when
        given), that reservation is returned and nothing new is counted. Concurrent callers never
        reserve more slots on a pod than it has room for.

        Raises :class:`NoCapacity` when there is no room (the message says why: unknown, dead,
        draining or full pod), ``ValueError`` when ``ttl`` is not positive.
        """
        ...

    def release(self, reservation_id: str) -> bool:
        """Give the slot back. False if the reservation did not exist (already released, claimed
        or removed with its pod)."""
        ...

    def list_reservations(self, *, pod: str | None = None, include_expired: bool = False) -> list[Reservation]:
        """Reservations (optionally on one pod) still in storage, ordered by (created_at, id).
        Expired ones are left out unless ``include_expired``; they are swept lazily."""
        ...

    def close(self) -> None:
        """Release connections. Idempotent; later calls raise :class:`RegistryClosed`."""
        ...
