"""The embedded SQLite registry: the conformance suite on a real file, plus what only SQLite has
(several processes on one file, WAL, the room index's query plan, file-level failures)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import pytest

from registry_conformance import LEASE, START, FakeClock, RegistryConformance, pod, race
from supervisor.config import RegistryConfig
from supervisor.registry import (
    SCHEMA_VERSION,
    NoCapacity,
    Registry,
    RegistryCorrupt,
    RegistryError,
    RegistryUnavailable,
    SchemaTooNew,
    SqliteRegistry,
    open_registry,
    place,
)

REPO = Path(__file__).resolve().parents[1]


class TestSqliteRegistry(RegistryConformance):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Path:
        return tmp_path / "state" / "registry.db"

    def open_registry(self, store: Path, clock: FakeClock, *, lease: float) -> Registry:
        return SqliteRegistry(store, clock=clock, lease=lease, busy_timeout=30.0)

    def raw_pod_value(self, registry: Registry, pod_id: str) -> dict[str, Any]:
        assert isinstance(registry, SqliteRegistry)
        with sqlite3.connect(registry.path) as conn:
            (value,) = conn.execute("SELECT value FROM pods WHERE pod_id = ?", (pod_id,)).fetchone()
        conn.close()
        decoded: dict[str, Any] = json.loads(value)
        return decoded

    def write_raw_pod_value(self, registry: Registry, pod_id: str, value: dict[str, Any]) -> None:
        assert isinstance(registry, SqliteRegistry)
        with sqlite3.connect(registry.path) as conn:
            conn.execute("UPDATE pods SET value = ? WHERE pod_id = ?", (json.dumps(value), pod_id))
        conn.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "registry.db"


@pytest.fixture
def registry(db_path: Path, clock: FakeClock) -> Iterator[SqliteRegistry]:
    with SqliteRegistry(db_path, clock=clock, lease=LEASE) as opened:
        yield opened


# --- several processes on one file ---------------------------------------------------------------

_PLACER = textwrap.dedent("""
    import json, sys
    from supervisor.registry import NoCapacity, SqliteRegistry, place
    path, user, now = sys.argv[1], sys.argv[2], float(sys.argv[3])
    registry = SqliteRegistry(path, clock=lambda: now, busy_timeout=60)
    print("ready", flush=True)
    sys.stdin.readline()  # released together with the other processes
    try:
        held = place(registry, user)
        print(json.dumps({"pod": held.pod_id, "id": held.reservation_id}), flush=True)
    except NoCapacity:
        print(json.dumps({"pod": None}), flush=True)
""")


def race_processes(path: Path, users: list[str], now: float) -> list[dict[str, Any]]:
    """Start one placing process per user, wait until every one has opened the registry, release
    them together and return what each placed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _PLACER, str(path), user, repr(now)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        for user in users
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line == "ready\n", (line, proc.stderr.read() if proc.stderr else "")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            results.append(json.loads(out))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_processes_racing_for_the_last_slot(registry: SqliteRegistry, clock: FakeClock) -> None:
    registry.publish_pod(pod("a", 1))
    results = race_processes(registry.path, [f"user{i}" for i in range(6)], clock.now)
    won = [r for r in results if r["pod"] is not None]
    assert len(won) == 1 and won[0]["pod"] == "a", results
    assert [r.reservation_id for r in registry.list_reservations()] == [won[0]["id"]]


def test_processes_never_overbook_any_pod(registry: SqliteRegistry, clock: FakeClock) -> None:
    for pod_id in ("a", "b", "c"):
        registry.publish_pod(pod(pod_id, 2))
    results = race_processes(registry.path, [f"user{i}" for i in range(10)], clock.now)
    assert sorted(r["pod"] for r in results if r["pod"]) == ["a", "a", "b", "b", "c", "c"], results
    assert sum(r["pod"] is None for r in results) == 4
    assert all(p.reserved == 2 and p.room == 0 for p in registry.list_pods())


# --- storage details -----------------------------------------------------------------------------


def test_wal_mode_and_parent_directories(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "var" / "lib" / "workspace-supervisor" / "registry.db"
    with SqliteRegistry(path, clock=clock) as registry:
        registry.publish_pod(pod("a", 1))
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
        finally:
            conn.close()
    assert path.with_name("registry.db-wal").exists() or path.exists()


def test_pods_with_room_walks_the_room_index(registry: SqliteRegistry) -> None:
    plan = registry.explain_pods_with_room()
    assert any("USING INDEX pods_room" in step for step in plan), plan
    assert not any("TEMP B-TREE" in step for step in plan), plan  # no sort: index order is the answer
    assert not any(step.startswith("SCAN p") for step in plan), plan


def test_open_registry_from_config(tmp_path: Path, clock: FakeClock) -> None:
    config = RegistryConfig(backend="sqlite", path=tmp_path / "r.db", lease=42.0)
    registry = open_registry(config, clock=clock)
    try:
        assert isinstance(registry, SqliteRegistry)
        assert registry.publish_pod(pod("a", 1)).lease_expires_at == START + 42.0
    finally:
        registry.close()


# --- failures are RegistryErrors with hints, and the registry recovers ---------------------------


def test_corrupt_file_is_a_registry_error_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    path.write_bytes(b"this is not an sqlite database, it is junk" * 100)
    with pytest.raises(RegistryCorrupt) as failed:
        SqliteRegistry(path)
    assert str(path) in str(failed.value)
    assert "move" in failed.value.hint and "aside" in failed.value.hint
    assert failed.value.reason == "registry_corrupt"


def test_parent_that_is_a_file_is_a_registry_error_with_a_hint(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    with pytest.raises(RegistryUnavailable) as failed:
        SqliteRegistry(tmp_path / "not-a-dir" / "registry.db")
    assert "[registry] path" in failed.value.hint


def test_path_that_is_a_directory_is_a_registry_error(tmp_path: Path) -> None:
    (tmp_path / "registry.db").mkdir()
    with pytest.raises(RegistryUnavailable, match="cannot be written") as failed:
        SqliteRegistry(tmp_path / "registry.db")
    assert "writable" in failed.value.hint


def test_newer_schema_on_disk_is_refused_at_open(db_path: Path) -> None:
    SqliteRegistry(db_path).close()
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.close()
    with pytest.raises(SchemaTooNew):
        SqliteRegistry(db_path)


def test_locked_registry_is_an_outage_and_then_catches_up(db_path: Path, clock: FakeClock) -> None:
    registry = SqliteRegistry(db_path, clock=clock, busy_timeout=0.05)
    registry.publish_pod(pod("a", 2))
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        for attempt in (lambda: registry.publish_pod(pod("a", 1)), lambda: place(registry, "u1"),
                        lambda: registry.remove_pod("a")):
            with pytest.raises(RegistryUnavailable, match="locked") as failed:
                attempt()
            assert isinstance(failed.value, RegistryError) and failed.value.hint
        assert [p.free_slots for p in registry.list_pods()] == [2]  # WAL: readers are not blocked
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert registry.publish_pod(pod("a", 1)).free_slots == 1  # the next heartbeat goes through
    assert place(registry, "u1").pod_id == "a"
    with pytest.raises(NoCapacity):
        place(registry, "u2")
    registry.close()


def test_file_corrupted_under_a_running_registry(db_path: Path, clock: FakeClock) -> None:
    registry = SqliteRegistry(db_path, clock=clock)
    registry.publish_pod(pod("a", 2))
    registry.close()
    reopened = SqliteRegistry(db_path, clock=clock)
    try:
        for suffix in ("", "-wal", "-shm"):
            target = Path(str(db_path) + suffix)
            if target.exists():
                target.write_bytes(b"\x00garbage" * 4096)
        with pytest.raises(RegistryCorrupt) as failed:
            reopened.publish_pod(pod("a", 1))
        assert "aside" in failed.value.hint
    finally:
        reopened.close()


def test_one_object_from_many_threads_is_safe(registry: SqliteRegistry) -> None:
    """The daemon's worker threads change between calls; one registry object serves them all."""
    registry.publish_pod(pod("a", 5))
    heartbeat = partial(registry.publish_pod, pod("a", 5))
    results = race([heartbeat if i % 2 else partial(place, registry, f"u{i}") for i in range(10)])
    assert not [r for r in results if isinstance(r, BaseException)], results
    stored = registry.get_pod("a")
    assert stored is not None and stored.reserved == 5 and stored.room == 0


# --- the files are the daemon's alone ---------------------------------------------------------------


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_a_new_registry_is_private(tmp_path: Path, clock: FakeClock) -> None:
    old_umask = os.umask(0)  # even with a permissive umask
    try:
        path = tmp_path / "new" / "registry.db"
        with SqliteRegistry(path, clock=clock) as registry:
            registry.publish_pod(pod("a", 1))
            files = [p for p in path.parent.iterdir()]
            assert {p.name for p in files} >= {"registry.db", "registry.db-wal", "registry.db-shm"}
            assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}
        assert _mode(path.parent) == 0o700
    finally:
        os.umask(old_umask)


def test_loose_registry_files_are_tightened_at_open(tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "registry.db"
    with SqliteRegistry(path, clock=clock) as registry:
        registry.publish_pod(pod("a", 1))
        wal = path.with_name("registry.db-wal")
        assert wal.exists()
        os.chmod(path, 0o644)
        os.chmod(wal, 0o666)
        with SqliteRegistry(path, clock=clock) as second:  # what the next daemon to start sees
            assert [p.pod_id for p in second.list_pods()] == ["a"]
    assert _mode(path) == 0o600
    assert any("registry.db was mode 0644" in r.getMessage() for r in caplog.records)
    assert any("registry.db-wal was mode 0666" in r.getMessage() for r in caplog.records)
