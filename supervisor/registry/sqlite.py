"""The embedded registry: one SQLite file, shared by every daemon on a host.

- WAL journal, ``busy_timeout`` for waiting on other processes' locks, ``synchronous=NORMAL``.
- Every read-modify-write runs in ``BEGIN IMMEDIATE`` (the write lock is taken before the first
  read, so two processes placing on the last slot are serialised, never both admitted); reads run
  in one deferred transaction so they see one snapshot.
- Records are stored as versioned JSON values (see :mod:`supervisor.registry.records`) next to the
  few columns that are filtered or indexed. ``pods.room_key`` (room as of the pod's last write;
  NULL when the pod reports no free slot or drains, see :func:`placement.room_key`) feeds the
  partial index ``pods_room (room_key DESC, pod_id) WHERE room_key IS NOT NULL``, which
  :meth:`SqliteRegistry.pods_with_room` and placement walk in order without scanning every pod.
- One connection per registry object, guarded by a lock, so one object may be used from many
  threads (``trio.to_thread.run_sync`` picks any worker thread).
- The files hold every pod's and session's records: the database is created 0600 (SQLite gives
  its -wal, -shm and -journal files the database's mode) in a directory created 0700, and a
  looser mode found on any of them at open is tightened, with a warning.
- Every ``sqlite3`` and file-system error is raised as a :class:`RegistryError` whose hint says
  what to do (locked, read-only, corrupt, missing directory).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path
from typing import Any, Collection, Iterator

from supervisor.registry import records
from supervisor.registry.base import Clock
from supervisor.registry.errors import (
    RegistryClosed,
    RegistryCorrupt,
    RegistryError,
    RegistryUnavailable,
    SchemaTooNew,
)
from supervisor.registry.placement import (
    check_ttl,
    most_room_first,
    new_reservation_id,
    no_capacity,
    partition,
    refusal,
    room_key,
    stamp,
)
from supervisor.registry.records import SCHEMA_VERSION, PodRecord, Reservation, SessionRecord

log = logging.getLogger(__name__)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS pods (
    pod_id TEXT PRIMARY KEY,
    free_slots INTEGER NOT NULL,
    room_key INTEGER,                  -- room as of the last write; NULL = not offered
    lease_expires_at REAL NOT NULL,
    value TEXT NOT NULL                -- versioned JSON (records.pod_value)
)""",
    """CREATE INDEX IF NOT EXISTS pods_room ON pods (room_key DESC, pod_id) WHERE room_key IS NOT NULL""",
    """CREATE INDEX IF NOT EXISTS pods_lease ON pods (lease_expires_at)""",
    """CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    pod_id TEXT NOT NULL,
    user TEXT NOT NULL,
    since REAL NOT NULL,
    value TEXT NOT NULL
)""",
    """CREATE INDEX IF NOT EXISTS sessions_pod ON sessions (pod_id, since)""",
    """CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user, since)""",
    """CREATE TABLE IF NOT EXISTS reservations (
    reservation_id TEXT PRIMARY KEY,
    pod_id TEXT NOT NULL,
    user TEXT NOT NULL,
    expires_at REAL NOT NULL,
    created_at REAL NOT NULL,
    value TEXT NOT NULL
)""",
    """CREATE INDEX IF NOT EXISTS reservations_pod ON reservations (pod_id, expires_at)""",
    """CREATE INDEX IF NOT EXISTS reservations_user ON reservations (user, expires_at)""",
)

# Live reservations on the pod row ``p`` at time :now.
_RESERVED = "(SELECT count(*) FROM reservations r WHERE r.pod_id = p.pod_id AND r.expires_at > :now)"

# The room index walk: live pods in index order whose room, net of live reservations, is positive.
# ``room_key IS NOT NULL`` matches the partial index's WHERE, so the planner walks it in order.
_WITH_ROOM = f"""
SELECT p.pod_id, p.value, {_RESERVED} AS reserved FROM pods p
WHERE p.room_key IS NOT NULL AND p.lease_expires_at > :now AND p.free_slots > {_RESERVED}
ORDER BY p.room_key DESC, p.pod_id
"""

# SQLite primary result codes (sqlite3.h).
_BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 5, 6, 8, 10, 11, 13, 14, 26


class SqliteRegistry:
    """:class:`~supervisor.registry.base.Registry` on one SQLite file (see the module docstring)."""

    def __init__(
        self,
        path: Path | str,
        *,
        clock: Clock = time.time,
        lease: float = 15.0,
        busy_timeout: float = 5.0,
    ) -> None:
        if not lease > 0:
            raise ValueError(f"lease must be positive, not {lease!r}")
        self.path = Path(path)
        self.lease = float(lease)
        self.busy_timeout = float(busy_timeout)
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = self._connect()

    def describe(self) -> str:
        return f"sqlite registry at {self.path} (lease {self.lease:g}s)"

    def __repr__(self) -> str:
        return f"SqliteRegistry({str(self.path)!r})"

    def __enter__(self) -> SqliteRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- connection, transactions, errors ---------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise RegistryUnavailable(
                f"cannot create the registry directory {self.path.parent}: {exc.strerror or exc}",
                hint=f"make {self.path.parent} a writable directory, or point [registry] path elsewhere",
            ) from None
        try:
            self._private_files()
        except OSError as exc:
            raise RegistryUnavailable(f"registry {self.path} cannot be written (open): {exc.strerror or exc}",
                                      hint=self._writable_hint()) from None
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                str(self.path), timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("registry %s: journal mode is %s, not wal (file system without shared memory?)",
                            self.path, mode)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif not str(row[0]).isdigit():
                raise RegistryCorrupt(f"registry {self.path} has a malformed schema version {row[0]!r}",
                                      hint=self._corrupt_hint())
            elif int(row[0]) > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"registry {self.path} has schema version {row[0]}; this daemon knows up to {SCHEMA_VERSION}"
                )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._close_quietly(conn)
            raise self._error(exc, "open") from None
        except RegistryError:
            self._close_quietly(conn)
            raise
        return conn

    def _writable_hint(self) -> str:
        return f"make {self.path} and its directory writable with free space, or point [registry] path elsewhere"

    def _private_files(self) -> None:
        """Create the database file 0600 if it is missing; take group and other access off it and
        off its -wal, -shm and -journal files where an existing one has them."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._tighten(fd, self.path)
        finally:
            os.close(fd)
        for suffix in ("-wal", "-shm", "-journal"):
            try:
                fd = os.open(f"{self.path}{suffix}", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:  # missing (or not ours to fix: SQLite reports what it cannot open)
                continue
            try:
                self._tighten(fd, f"{self.path}{suffix}")
            finally:
                os.close(fd)

    @staticmethod
    def _tighten(fd: int, name: Path | str) -> None:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            os.fchmod(fd, mode & 0o700)
            log.warning("registry file %s was mode %04o, readable by others: now %04o", name, mode, mode & 0o700)

    @staticmethod
    def _close_quietly(conn: sqlite3.Connection | None) -> None:
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _corrupt_hint(self) -> str:
        return (f"stop the daemons sharing it and move {self.path} aside; "
                "every pod re-publishes itself within one heartbeat")

    def _error(self, exc: sqlite3.Error, doing: str) -> RegistryError:
        code = getattr(exc, "sqlite_errorcode", -1) & 0xFF
        text = str(exc)
        where = f"registry {self.path}"
        if code in (_BUSY, _LOCKED) or "locked" in text:
            return RegistryUnavailable(
                f"{where} is locked by another process ({doing} waited {self.busy_timeout:g}s): {text}",
                hint="another daemon holds a long write lock; it is retried on the next heartbeat",
            )
        if code in (_CORRUPT, _NOTADB) or "not a database" in text or "malformed" in text:
            return RegistryCorrupt(f"{where} is corrupt ({doing}): {text}", hint=self._corrupt_hint())
        if code in (_READONLY, _CANTOPEN, _IOERR, _FULL):
            return RegistryUnavailable(
                f"{where} cannot be written ({doing}): {text}",
                hint=self._writable_hint(),
            )
        if isinstance(exc, sqlite3.ProgrammingError) and "closed" in text:
            return RegistryClosed(f"{where} is closed")
        return RegistryError(f"{where} failed ({doing}): {text}")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RegistryClosed(f"registry {self.path} is closed")
        return self._conn

    @contextlib.contextmanager
    def _transaction(self, doing: str, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction: ``BEGIN IMMEDIATE`` for writes (lock before the first read), a deferred
        ``BEGIN`` for reads (one snapshot). Rolls back on any exception; maps sqlite errors."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.Error as exc:
                raise self._error(exc, doing) from None
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._error(exc, doing) from None
                raise

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        self._close_quietly(conn)

    # --- pods ------------------------------------------------------------------------------------

    def publish_pod(self, record: PodRecord, *, users: Collection[str] = ()) -> PodRecord:
        claimed = frozenset(users)
        with self._transaction("publish_pod", write=True) as conn:
            now = self._clock()  # after the lock: waiting for it must not age the heartbeat
            held = self._reservations(conn, "WHERE pod_id = ?", (record.pod_id,))
            keep, drop = partition(held, now, claimed)
            conn.executemany("DELETE FROM reservations WHERE reservation_id = ?",
                             [(r.reservation_id,) for r in drop])
            stored = stamp(record, now, self.lease, len(keep))
            self._write_pod(conn, stored)
        return stored

    def _write_pod(self, conn: sqlite3.Connection, pod: PodRecord) -> None:
        key = room_key(pod, pod.reserved)
        conn.execute(
            "INSERT INTO pods (pod_id, free_slots, room_key, lease_expires_at, value) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (pod_id) DO UPDATE SET free_slots = excluded.free_slots, "
            "room_key = excluded.room_key, lease_expires_at = excluded.lease_expires_at, value = excluded.value",
            (pod.pod_id, pod.free_slots, key, pod.lease_expires_at, records.pod_value(pod, room_key=key).decode()),
        )

    def _refresh_room_key(self, conn: sqlite3.Connection, pod_id: str, now: float) -> None:
        """Move the pod's room index entry after its reservations changed."""
        row = conn.execute(f"SELECT p.value, {_RESERVED} FROM pods p WHERE p.pod_id = :pod",
                           {"pod": pod_id, "now": now}).fetchone()
        if row is not None:
            self._write_pod(conn, records.pod_from_value(pod_id, row[0], reserved=row[1])[0])

    def get_pod(self, pod_id: str, *, include_expired: bool = False) -> PodRecord | None:
        now = self._clock()
        with self._transaction("get_pod", write=False) as conn:
            row = conn.execute(f"SELECT p.value, {_RESERVED} FROM pods p WHERE p.pod_id = :pod",
                               {"pod": pod_id, "now": now}).fetchone()
        if row is None:
            return None
        pod, _ = records.pod_from_value(pod_id, row[0], reserved=row[1])
        return pod if include_expired or pod.alive(now) else None

    def list_pods(self, *, include_expired: bool = False) -> list[PodRecord]:
        now = self._clock()
        where = "" if include_expired else "WHERE p.lease_expires_at > :now"
        with self._transaction("list_pods", write=False) as conn:
            rows = conn.execute(f"SELECT p.pod_id, p.value, {_RESERVED} FROM pods p {where} ORDER BY p.pod_id",
                                {"now": now}).fetchall()
        return [records.pod_from_value(pod_id, value, reserved=reserved)[0] for pod_id, value, reserved in rows]

    def pods_with_room(self, limit: int = 10) -> list[PodRecord]:
        if limit < 1:
            return []
        now = self._clock()
        with self._transaction("pods_with_room", write=False) as conn:
            rows = conn.execute(_WITH_ROOM + " LIMIT :limit", {"now": now, "limit": limit}).fetchall()
        pods = [records.pod_from_value(pod_id, value, reserved=reserved)[0] for pod_id, value, reserved in rows]
        return most_room_first(pods)

    def remove_pod(self, pod_id: str) -> bool:
        with self._transaction("remove_pod", write=True) as conn:
            return self._remove_pod(conn, pod_id)

    @staticmethod
    def _remove_pod(conn: sqlite3.Connection, pod_id: str) -> bool:
        conn.execute("DELETE FROM sessions WHERE pod_id = ?", (pod_id,))
        conn.execute("DELETE FROM reservations WHERE pod_id = ?", (pod_id,))
        return conn.execute("DELETE FROM pods WHERE pod_id = ?", (pod_id,)).rowcount > 0

    def remove_expired_pods(self, *, grace: float = 0.0) -> list[str]:
        now = self._clock()
        with self._transaction("remove_expired_pods", write=True) as conn:
            dead = [row[0] for row in conn.execute(
                "SELECT pod_id FROM pods WHERE lease_expires_at <= ? ORDER BY pod_id", (now - grace,))]
            for pod_id in dead:
                self._remove_pod(conn, pod_id)
        return dead

    # --- sessions --------------------------------------------------------------------------------

    def put_session(self, session: SessionRecord) -> None:
        with self._transaction("put_session", write=True) as conn:
            conn.execute(
                "INSERT INTO sessions (session_id, pod_id, user, since, value) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (session_id) DO UPDATE SET pod_id = excluded.pod_id, user = excluded.user, "
                "since = excluded.since, value = excluded.value",
                (session.session_id, session.pod_id, session.user, session.since,
                 records.session_value(session).decode()),
            )

    def remove_session(self, session_id: str) -> bool:
        with self._transaction("remove_session", write=True) as conn:
            return conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,)).rowcount > 0

    def list_sessions(self, *, pod: str | None = None, user: str | None = None) -> list[SessionRecord]:
        clauses, params = [], []
        if pod is not None:
            clauses.append("pod_id = ?")
            params.append(pod)
        if user is not None:
            clauses.append("user = ?")
            params.append(user)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._transaction("list_sessions", write=False) as conn:
            rows = conn.execute(f"SELECT value FROM sessions {where} ORDER BY since, session_id", params).fetchall()
        return [records.session_from_value(row[0]) for row in rows]

    # --- reservations ----------------------------------------------------------------------------

    @staticmethod
    def _reservations(conn: sqlite3.Connection, where: str, params: tuple[Any, ...]) -> list[Reservation]:
        rows = conn.execute(f"SELECT value FROM reservations {where} ORDER BY created_at, reservation_id",
                            params).fetchall()
        return [records.reservation_from_value(row[0]) for row in rows]

    def reserve(self, user: str, pod_id: str | None = None, *, ttl: float) -> Reservation:
        check_ttl(ttl)
        records.check_id("user", user)
        rid = new_reservation_id()
        with self._transaction("reserve", write=True) as conn:
            now = self._clock()
            # The user's live reservation on a live, non-draining pod is returned again.
            held = conn.execute(
                "SELECT r.value FROM reservations r JOIN pods p ON p.pod_id = r.pod_id "
                "WHERE r.user = :user AND r.expires_at > :now AND p.lease_expires_at > :now "
                "AND json_extract(p.value, '$.draining') = 0 AND (:pod IS NULL OR r.pod_id = :pod) "
                "ORDER BY r.created_at, r.reservation_id LIMIT 1",
                {"user": user, "now": now, "pod": pod_id},
            ).fetchone()
            if held is not None:
                return records.reservation_from_value(held[0])
            if pod_id is not None:
                row = conn.execute(f"SELECT p.value, {_RESERVED} FROM pods p WHERE p.pod_id = :pod",
                                   {"pod": pod_id, "now": now}).fetchone()
                pod = records.pod_from_value(pod_id, row[0], reserved=row[1])[0] if row else None
                refused = refusal(pod_id, pod, now)
                if refused is not None:
                    raise refused
                chosen = pod_id
            else:
                row = conn.execute(_WITH_ROOM + " LIMIT 1", {"now": now}).fetchone()
                if row is None:
                    raise no_capacity()
                chosen = row[0]
            reservation = Reservation(reservation_id=rid, pod_id=chosen, user=user, created_at=now,
                                      expires_at=now + ttl)
            conn.execute("DELETE FROM reservations WHERE pod_id = ? AND expires_at <= ?", (chosen, now))
            conn.execute(
                "INSERT INTO reservations (reservation_id, pod_id, user, expires_at, created_at, value) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (rid, chosen, user, reservation.expires_at, now, records.reservation_value(reservation).decode()),
            )
            self._refresh_room_key(conn, chosen, now)
        return reservation

    def release(self, reservation_id: str) -> bool:
        with self._transaction("release", write=True) as conn:
            now = self._clock()
            row = conn.execute("SELECT pod_id FROM reservations WHERE reservation_id = ?",
                               (reservation_id,)).fetchone()
            if row is None:
                return False
            conn.execute("DELETE FROM reservations WHERE reservation_id = ?", (reservation_id,))
            self._refresh_room_key(conn, row[0], now)
        return True

    def list_reservations(self, *, pod: str | None = None, include_expired: bool = False) -> list[Reservation]:
        now = self._clock()
        clauses: list[str] = []
        params: list[Any] = []
        if pod is not None:
            clauses.append("pod_id = ?")
            params.append(pod)
        if not include_expired:
            clauses.append("expires_at > ?")
            params.append(now)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._transaction("list_reservations", write=False) as conn:
            return self._reservations(conn, where, tuple(params))

    # --- for tests and operators -----------------------------------------------------------------

    def explain_pods_with_room(self) -> list[str]:
        """The query plan of the room index walk (a test asserts it uses ``pods_room``)."""
        with self._transaction("explain", write=False) as conn:
            rows = conn.execute("EXPLAIN QUERY PLAN " + _WITH_ROOM + " LIMIT 10", {"now": 0.0, "limit": 10})
            return [str(row[-1]) for row in rows]
