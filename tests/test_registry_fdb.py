"""The FoundationDB registry.

- ``TestFdbRegistry``: the conformance suite against a real cluster, when ``FDB_CLUSTER_FILE``
  names one (see ``supervisor/registry/fdb.py`` for how to run it); skipped otherwise.
- Loading: without ``libfdb_c.so`` (as on CI) opening fails with a clear error; tested for real.
- ``TestFdbTransactionsOnMemoryStore``: the same suite runs the FdbRegistry transaction bodies
  and key layout (real tuple layer, real ``Subspace``) on an in-memory key-value store with the
  binding's transaction interface, serialised by a lock. It checks the layout and index
  maintenance, not FoundationDB itself (conflicts, the retry loop, timeouts): that is the real run.
"""

from __future__ import annotations

import ctypes.util
import functools
import json
import os
import subprocess
import sys
import threading
import uuid
from bisect import bisect_left
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import pytest
from fdb.subspace_impl import Subspace

from registry_conformance import START, FakeClock, RegistryConformance, pod
from supervisor.config import RegistryConfig
from supervisor.registry import (
    FdbLibraryMissing,
    Registry,
    RegistryError,
    RegistryUnavailable,
    open_registry,
    place,
)
from supervisor.registry.fdb import API_VERSION, FdbRegistry, Keys, open_fdb

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILE = os.environ.get("FDB_CLUSTER_FILE", "")
LIBRARY_FOUND = ctypes.util.find_library("fdb_c") is not None or Path("/usr/lib/libfdb_c.so").exists()


def _library_loads() -> bool:
    try:
        ctypes.CDLL("libfdb_c.so")
    except OSError:
        return LIBRARY_FOUND
    return True


HAVE_LIBRARY = _library_loads()


# --- a real cluster --------------------------------------------------------------------------------


@pytest.mark.skipif(
    not CLUSTER_FILE,
    reason="FDB_CLUSTER_FILE is not set: no FoundationDB cluster to run the registry conformance suite "
           "against (how to run it: supervisor/registry/fdb.py)",
)
class TestFdbRegistry(RegistryConformance):
    @pytest.fixture
    def store(self) -> Iterator[tuple[str, ...]]:
        from supervisor.registry.fdb import load_fdb

        fdb = load_fdb()  # with FDB_CLUSTER_FILE set, a missing library fails the run
        directory = ("workspace-supervisor-test", uuid.uuid4().hex)
        yield directory
        fdb.directory.remove_if_exists(fdb.open(CLUSTER_FILE), directory)

    def open_registry(self, store: tuple[str, ...], clock: FakeClock, *, lease: float) -> Registry:
        return open_fdb(CLUSTER_FILE, directory=store, clock=clock, lease=lease)

    def _db(self) -> Any:
        from supervisor.registry.fdb import load_fdb

        return load_fdb().open(CLUSTER_FILE)

    def raw_pod_value(self, registry: Registry, pod_id: str) -> dict[str, Any]:
        assert isinstance(registry, FdbRegistry)
        value: dict[str, Any] = json.loads(bytes(self._db()[registry.keys.pod(pod_id)]))
        return value

    def write_raw_pod_value(self, registry: Registry, pod_id: str, value: dict[str, Any]) -> None:
        assert isinstance(registry, FdbRegistry)
        self._db()[registry.keys.pod(pod_id)] = json.dumps(value).encode()


@pytest.mark.skipif(not HAVE_LIBRARY, reason="needs libfdb_c.so (FoundationDB client) to reach a cluster")
def test_unreachable_cluster_is_an_outage_not_a_hang(tmp_path: Path) -> None:
    cluster_file = tmp_path / "fdb.cluster"
    cluster_file.write_text("test:test@127.0.0.1:1\n")  # nothing listens on port 1
    with pytest.raises(RegistryUnavailable) as failed:
        open_fdb(cluster_file, timeout=0.5)
    assert "fdbcli" in failed.value.hint


# --- loading the client library ------------------------------------------------------------------


@pytest.mark.skipif(HAVE_LIBRARY, reason="libfdb_c.so is installed here; this checks the error without it")
def test_missing_library_is_named_with_the_sqlite_alternative(tmp_path: Path) -> None:
    with pytest.raises(FdbLibraryMissing) as failed:
        open_fdb(tmp_path / "fdb.cluster")
    error = failed.value
    assert isinstance(error, RegistryError) and error.reason == "fdb_library_missing"
    assert "libfdb_c.so" in str(error)
    assert '[registry] backend = "sqlite"' in error.hint
    with pytest.raises(FdbLibraryMissing):  # the daemon's path to it, and again: no state left behind
        open_registry(RegistryConfig(backend="fdb", fdb_cluster_file=tmp_path / "fdb.cluster"))


def test_importing_the_registry_does_not_load_the_bindings() -> None:
    code = ("import sys, supervisor.registry, supervisor.registry.fdb; "
            "print(sorted(m for m in sys.modules if m == 'fdb' or m.startswith('fdb.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO).stdout
    assert out.strip() == "[]"


def test_api_version_is_explicit_and_known_to_the_binding() -> None:
    import fdb

    assert API_VERSION == 710
    assert API_VERSION <= fdb.LATEST_API_VERSION


def test_room_index_keys_sort_most_room_first() -> None:
    keys = Keys(Subspace(("t",)))
    order = [keys.room(10, "b"), keys.room(7, "a"), keys.room(7, "b"), keys.room(1, "a"), keys.room(0, "a")]
    assert sorted(order) == order
    begin, end = keys.rooms()
    assert all(begin <= k < end for k in order)
    assert not begin <= keys.pod("a") < end


# --- the transaction bodies on an in-memory store --------------------------------------------------


class KeyValue(NamedTuple):
    key: bytes
    value: bytes


class MemoryValue:
    """What ``tr.get`` returns in the binding: a value future with ``present()``."""

    def __init__(self, value: bytes | None) -> None:
        self._value = value

    def present(self) -> bool:
        return self._value is not None

    def __bytes__(self) -> bytes:
        assert self._value is not None
        return self._value


class MemoryError_(Exception):
    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code = code


class MemoryTransaction:
    """The subset of ``fdb.Transaction`` FdbRegistry uses, on a private copy of the data."""

    def __init__(self, data: dict[bytes, bytes]) -> None:
        self.data = dict(data)

    @property
    def snapshot(self) -> MemoryTransaction:
        return self

    def get(self, key: bytes) -> MemoryValue:
        assert isinstance(key, bytes)
        return MemoryValue(self.data.get(key))

    def set(self, key: bytes, value: bytes) -> None:
        assert isinstance(key, bytes) and isinstance(value, bytes)
        self.data[key] = value

    def clear(self, key: bytes) -> None:
        self.data.pop(key, None)

    def clear_range(self, begin: bytes, end: bytes) -> None:
        for key in [k for k in self.data if begin <= k < end]:
            del self.data[key]

    def get_range(self, begin: bytes, end: bytes, limit: int = 0, reverse: bool = False) -> list[KeyValue]:
        keys = sorted(self.data)
        selected = keys[bisect_left(keys, begin):bisect_left(keys, end)]
        if reverse:
            selected.reverse()
        if limit:
            selected = selected[:limit]
        return [KeyValue(k, self.data[k]) for k in selected]

    def add_read_conflict_key(self, key: bytes) -> None:
        assert isinstance(key, bytes)

    def add_read_conflict_range(self, begin: bytes, end: bytes) -> None:
        assert begin < end


class MemoryStore:
    """Serialisable by construction: one transaction at a time, published on commit."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.lock = threading.Lock()
        self.outage: MemoryError_ | None = None
        self.unknown_results = 0  # commits that succeed but report commit_unknown_result
        self.attempts = 0

    def transactional(self, func: Callable[..., Any]) -> Callable[..., Any]:
        """Like ``fdb.transactional``: a store argument gets a fresh transaction, retried on
        retryable errors and committed; a transaction argument is passed through."""

        @functools.wraps(func)
        def wrapper(db_or_tr: Any, *args: Any) -> Any:
            if isinstance(db_or_tr, MemoryTransaction):
                return func(db_or_tr, *args)
            while True:
                with self.lock:
                    self.attempts += 1
                    if self.outage is not None:
                        raise self.outage
                    tr = MemoryTransaction(self.data)
                    result = func(tr, *args)
                    self.data = tr.data
                    if self.unknown_results:
                        self.unknown_results -= 1
                        continue  # 1021 commit_unknown_result is retryable: run the body again
                    return result

        return wrapper


class TestFdbTransactionsOnMemoryStore(RegistryConformance):
    @pytest.fixture
    def store(self) -> MemoryStore:
        return MemoryStore()

    def open_registry(self, store: MemoryStore, clock: FakeClock, *, lease: float) -> Registry:
        return FdbRegistry(store, space=Subspace(("wsup-test",)), transactional=store.transactional,
                           error_types=(MemoryError_,), clock=clock, lease=lease, name="memory store")

    def raw_pod_value(self, registry: Registry, pod_id: str) -> dict[str, Any]:
        assert isinstance(registry, FdbRegistry)
        store: MemoryStore = registry._db
        value: dict[str, Any] = json.loads(store.data[registry.keys.pod(pod_id)])
        return value

    def write_raw_pod_value(self, registry: Registry, pod_id: str, value: dict[str, Any]) -> None:
        assert isinstance(registry, FdbRegistry)
        store: MemoryStore = registry._db
        store.data[registry.keys.pod(pod_id)] = json.dumps(value).encode()

    def test_store_errors_are_outages_and_the_registry_catches_up(self, store: MemoryStore,
                                                                  registry: Registry) -> None:
        registry.publish_pod(pod("a", 2))
        store.outage = MemoryError_(1031, "Operation aborted because the transaction timed out")
        for attempt in (lambda: registry.publish_pod(pod("a", 1)), lambda: place(registry, "u1"),
                        registry.list_pods, lambda: registry.pods_with_room()):
            with pytest.raises(RegistryUnavailable, match="1031") as failed:
                attempt()
            assert "fdbcli" in failed.value.hint
        store.outage = None
        assert registry.publish_pod(pod("a", 1)).free_slots == 1
        assert place(registry, "u1").pod_id == "a"

    def test_retry_after_unknown_commit_result_reserves_once(self, store: MemoryStore,
                                                            registry: Registry) -> None:
        registry.publish_pod(pod("a", 2))
        store.unknown_results = 1
        before = store.attempts
        held = place(registry, "u1")
        assert store.attempts - before == 2  # the body ran twice
        assert registry.list_reservations() == [held]
        stored = registry.get_pod("a")
        assert stored is not None and stored.reserved == 1 and stored.room == 1

    def test_index_holds_one_entry_per_offerable_pod(self, store: MemoryStore, registry: Registry,
                                                     clock: FakeClock) -> None:
        assert isinstance(registry, FdbRegistry)
        registry.publish_pod(pod("a", 3))
        registry.publish_pod(pod("b", 0))
        registry.publish_pod(pod("c", 5, draining=True))
        held = place(registry, "u1")
        registry.publish_pod(pod("a", 2))
        registry.release(held.reservation_id)
        begin, end = registry.keys.rooms()
        entries = [registry.keys.unpack(k)[1:] for k in sorted(store.data) if begin <= k < end]
        assert entries == [(-2, "a")]
        registry.remove_pod("a")
        assert not [k for k in store.data if begin <= k < end]
        assert registry.get_pod("a", include_expired=True) is None
        assert clock.now == START
