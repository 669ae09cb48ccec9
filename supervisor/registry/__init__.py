"""Occupancy registry: which pods exist, how full they are, and where a new user should go.

Layering: :mod:`.records` (frozen records, versioned value encoding) and :mod:`.placement` (room
arithmetic, :func:`place`) are pure; :mod:`.base` states the :class:`Registry` protocol;
:mod:`.sqlite` (embedded default) and :mod:`.fdb` (FoundationDB) implement it and pass one
conformance suite (``tests/registry_conformance.py``). The FoundationDB bindings are imported only
when that backend is opened.

All registries are synchronous; call them from trio with ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import time

from supervisor.config import RegistryConfig
from supervisor.registry.base import Clock, Registry
from supervisor.registry.errors import (
    FdbLibraryMissing,
    NoCapacity,
    RegistryClosed,
    RegistryCorrupt,
    RegistryError,
    RegistryUnavailable,
    SchemaTooNew,
)
from supervisor.registry.placement import DEFAULT_TTL, place
from supervisor.registry.records import SCHEMA_VERSION, PodRecord, Reservation, SessionRecord
from supervisor.registry.sqlite import SqliteRegistry

__all__ = [
    "DEFAULT_TTL",
    "SCHEMA_VERSION",
    "Clock",
    "FdbLibraryMissing",
    "NoCapacity",
    "PodRecord",
    "Registry",
    "RegistryClosed",
    "RegistryCorrupt",
    "RegistryError",
    "RegistryUnavailable",
    "Reservation",
    "SchemaTooNew",
    "SessionRecord",
    "SqliteRegistry",
    "open_registry",
    "place",
]


def open_registry(config: RegistryConfig, *, clock: Clock = time.time) -> Registry:
    """Open the backend ``config.backend`` names, with ``config.lease`` as the pod lease.

    Raises :class:`RegistryError` (e.g. :class:`FdbLibraryMissing`, :class:`RegistryUnavailable`)
    when it cannot be opened; the daemon may start without a registry and retry.
    """
    if config.backend == "fdb":
        from supervisor.registry.fdb import open_fdb

        return open_fdb(config.fdb_cluster_file, clock=clock, lease=config.lease)
    return SqliteRegistry(config.path, clock=clock, lease=config.lease)
