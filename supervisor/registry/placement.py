"""Placement: the router's entry point, and the pure room arithmetic both backends share.

``place(registry, user)`` atomically reserves one slot on the live, non-draining pod with the most
room and returns the reservation; the router sends the user's browser to ``reservation.pod_id``.
The reservation counts against the pod's room until it expires (``ttl``), is released, or the pod
claims it by naming the user in a heartbeat. The atomicity lives in each backend's
:meth:`~supervisor.registry.base.Registry.reserve` (one SQLite ``BEGIN IMMEDIATE`` transaction,
or one FoundationDB transaction with conflict ranges on the pod), so two routers racing for the
last slot never both get it.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import replace
from typing import Collection, Iterable

from supervisor.registry.base import Registry
from supervisor.registry.errors import NoCapacity
from supervisor.registry.records import PodRecord, Reservation

DEFAULT_TTL = 30.0
"""Seconds a placement holds its slot: enough for a browser redirect and a cold start."""


def place(registry: Registry, user: str, *, ttl: float = DEFAULT_TTL) -> Reservation:
    """Reserve a slot for ``user`` on the pod with the most room and return the reservation.

    Idempotent per user while the reservation lives: asking again returns the same reservation.
    Raises :class:`NoCapacity` when no live, non-draining pod has room, :class:`RegistryError`
    when the registry fails. Synchronous: call it with ``trio.to_thread.run_sync`` from trio.
    """
    return registry.reserve(user, None, ttl=ttl)


def check_ttl(ttl: float) -> None:
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0:
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")


def new_reservation_id() -> str:
    return uuid.uuid4().hex


def room_key(pod: PodRecord, reserved: int) -> int | None:
    """The pod's key in the room index as of a write: its room net of ``reserved``; ``None`` (no
    entry) while the pod itself reports no free slot or is draining.

    A pod whose free slots are all reserved keeps an entry (key 0, at the end of the index), so it
    is offered again the moment a reservation expires, without waiting for another write. Readers
    always recompute room from live reservations; the key only orders the walk.
    """
    if pod.draining or pod.free_slots == 0:
        return None
    return max(0, pod.free_slots - reserved)


def partition(
    reservations: Iterable[Reservation], now: float, users: Collection[str] = ()
) -> tuple[list[Reservation], list[Reservation]]:
    """Split a pod's reservations into (still counting, to delete): expired ones and those whose
    user the pod now reports as running (claimed) are deleted."""
    keep: list[Reservation] = []
    drop: list[Reservation] = []
    for reservation in reservations:
        if reservation.live(now) and reservation.user not in users:
            keep.append(reservation)
        else:
            drop.append(reservation)
    return keep, drop


def refusal(pod_id: str, pod: PodRecord | None, now: float) -> NoCapacity | None:
    """Why ``pod`` (with its ``reserved`` filled in) cannot take a reservation, or None if it can."""
    if pod is None:
        return NoCapacity(f"pod {pod_id!r} is not in the registry")
    if not pod.alive(now):
        return NoCapacity(f"pod {pod_id!r} is dead: its lease expired at {pod.lease_expires_at:.3f}")
    if pod.draining:
        return NoCapacity(f"pod {pod_id!r} is draining")
    if pod.room <= 0:
        return NoCapacity(
            f"pod {pod_id!r} is full ({pod.free_slots} free slots, {pod.reserved} reserved)"
        )
    return None


def no_capacity() -> NoCapacity:
    return NoCapacity("no live, non-draining pod has a free slot")


def stamp(record: PodRecord, now: float, lease: float, reserved: int) -> PodRecord:
    """The record as a heartbeat at ``now`` stores it."""
    return replace(record, heartbeat_at=now, lease_expires_at=now + lease, reserved=reserved)


def most_room_first(pods: Iterable[PodRecord]) -> list[PodRecord]:
    return sorted(pods, key=lambda p: (-p.room, p.pod_id))
