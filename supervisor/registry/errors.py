"""Errors of the occupancy registry. All are :class:`supervisor.errors.SupervisorError` with a
stable ``reason`` (a metric label) and a ``hint``.

:class:`RegistryError` and its subclasses mean storage failed: the daemon counts them and retries.
:class:`NoCapacity` means the registry answered and the cluster is full.
"""

from __future__ import annotations

from supervisor.errors import SupervisorError


class RegistryError(SupervisorError):
    """The registry could not answer. The daemon keeps serving its users and retries."""

    reason = "registry_error"
    hint = "check the registry backend named by [registry] backend; the daemon retries on its next heartbeat"


class RegistryUnavailable(RegistryError):
    """Storage is unreachable, locked, read-only or timed out (an outage; retry later)."""

    reason = "registry_unavailable"


class RegistryCorrupt(RegistryError):
    """Stored data cannot be read (not a database, malformed value)."""

    reason = "registry_corrupt"


class SchemaTooNew(RegistryError):
    """A value was written by a newer daemon with a schema this one does not know."""

    reason = "registry_schema_too_new"
    hint = "upgrade this daemon: a newer workspace-supervisor wrote this registry"


class RegistryClosed(RegistryError):
    reason = "registry_closed"
    hint = "the registry was closed; open a new one"


class FdbLibraryMissing(RegistryError):
    """The FoundationDB client library (``libfdb_c.so``) cannot be loaded."""

    reason = "fdb_library_missing"
    hint = (
        "install the FoundationDB client package (foundationdb-clients, which ships libfdb_c.so) "
        'on this host, or use the embedded registry: [registry] backend = "sqlite"'
    )


class NoCapacity(SupervisorError):
    """No live, non-draining pod has a free slot (or the named pod has none).

    Not a :class:`RegistryError`: the registry answered; the cluster is full.
    """

    reason = "no_capacity"
    hint = "every pod is full, draining or dead; scale the workspace pods up or retry shortly"
