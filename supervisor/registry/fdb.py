"""The cluster registry on FoundationDB, through the real ``foundationdb`` Python bindings.

Loading. ``import fdb`` and ``fdb.api_version(API_VERSION)`` happen in :func:`open_fdb`, not at
import time, so the daemon imports this module freely. A missing ``libfdb_c.so`` raises
:class:`FdbLibraryMissing` naming the library and the ``[registry] backend = "sqlite"``
alternative. ``API_VERSION`` is 710: everything used here (tuple layer, directory layer,
``@fdb.transactional``, the ``transaction_timeout`` database option) exists at 710, and every
binding this project allows (``foundationdb>=7.1``) and every client library from 7.1 on accepts
it. Note that the binding checks its own header version against the library: the PyPI binding
8.0.x needs a ``libfdb_c`` 8.0.x (pin ``foundationdb==7.3.*`` for a 7.3 client library).

Layout. Everything lives in the directory ``("workspace-supervisor", "registry")`` (configurable),
keys packed with the tuple layer, values versioned JSON (:mod:`supervisor.registry.records`)::

    ("meta", "schema_version")        -> tuple (SCHEMA_VERSION,)
    ("pod", pod_id)                   -> pod JSON (with "room_key", see placement.room_key)
    ("room", -room_key, pod_id)       -> b""      room index: most room first, ties by pod id
    ("res", pod_id, reservation_id)   -> reservation JSON
    ("res_id", reservation_id)        -> tuple (pod_id,)
    ("res_user", user, reservation_id)-> tuple (pod_id,)
    ("session", session_id)           -> session JSON
    ("pod_session", pod_id, session_id)  -> b""
    ("user_session", user, session_id)   -> b""

Transactions. Every operation is one function decorated with ``@fdb.transactional`` (the
binding's retry loop, with a ``transaction_timeout`` so an unreachable cluster raises instead of
retrying forever). A pod's room index entry is rewritten in the same transaction as its record.
Placement scans the room index with snapshot reads and adds read conflicts on the chosen pod's
record and reservation range only, so two routers racing for the last slot conflict and the loser
retries (and finds the pod full), while heartbeats of other pods do not abort placements. A
reservation id is drawn before the retry loop and looked up first, so a retry after
``commit_unknown_result`` never reserves twice.

Running the conformance suite against a real FoundationDB
---------------------------------------------------------
Neither the server nor ``libfdb_c`` can be installed on the CI machines (no package registry they
reach has them), so ``tests/test_registry_fdb.py`` skips its real run there. On a machine that can
install FoundationDB (packages from https://github.com/apple/foundationdb/releases; client and
server of one version, matching the ``foundationdb`` Python package's major.minor)::

    sudo dpkg -i foundationdb-clients_<version>_amd64.deb foundationdb-server_<version>_amd64.deb
    fdbcli --exec status                  # the server package starts a one-process cluster
    export FDB_CLUSTER_FILE=/etc/foundationdb/fdb.cluster
    .venv/bin/pytest tests/test_registry_fdb.py -v

The suite works in throwaway directories (``("workspace-supervisor-test", <uuid>)``) and removes
them afterwards. With ``FDB_CLUSTER_FILE`` set, a missing library fails the run instead of
skipping it. (The same text is in ``supervisor/registry/README.md``.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Collection, Iterable

from supervisor.registry import records
from supervisor.registry.base import Clock
from supervisor.registry.errors import (
    FdbLibraryMissing,
    RegistryClosed,
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

API_VERSION = 710
"""The FoundationDB API version this module selects (see the module docstring)."""

LIBRARY = "libfdb_c.so"
DEFAULT_DIRECTORY = ("workspace-supervisor", "registry")
DEFAULT_TIMEOUT = 5.0


def load_fdb() -> Any:
    """Import the bindings and select :data:`API_VERSION` (loads ``libfdb_c``). Idempotent."""
    try:
        import fdb
    except ImportError as exc:
        raise RegistryError(
            f"the foundationdb Python package is not installed: {exc}",
            reason="fdb_bindings_missing",
            hint='pip install "foundationdb>=7.1", or use the embedded registry: [registry] backend = "sqlite"',
        ) from None
    try:
        fdb.api_version(API_VERSION)
    except RuntimeError as exc:
        # A library too old for the binding's header, or another API version already selected.
        raise RegistryError(
            f"cannot select FoundationDB API version {API_VERSION}: {exc}",
            reason="fdb_api_version",
            hint="install a libfdb_c.so of the same major.minor version as the foundationdb Python package",
        ) from None
    except Exception as exc:  # the binding raises a bare Exception (or ctypes an OSError)
        raise FdbLibraryMissing(
            f"cannot load the FoundationDB client library {LIBRARY}: {exc}"
        ) from None
    return fdb


def open_fdb(
    cluster_file: Path | str | None,
    *,
    clock: Clock = time.time,
    lease: float = 15.0,
    directory: tuple[str, ...] = DEFAULT_DIRECTORY,
    timeout: float = DEFAULT_TIMEOUT,
) -> FdbRegistry:
    """Open the registry in ``directory`` of the cluster ``cluster_file`` names.

    Raises :class:`FdbLibraryMissing` without ``libfdb_c.so``, :class:`RegistryUnavailable` when
    the cluster file is missing or the cluster does not answer within ``timeout`` seconds.
    """
    fdb = load_fdb()
    if cluster_file is not None and not Path(cluster_file).is_file():
        raise RegistryUnavailable(
            f"FoundationDB cluster file {cluster_file} does not exist",
            hint="install foundationdb-clients (it writes /etc/foundationdb/fdb.cluster) or fix "
                 "[registry] fdb_cluster_file",
        )
    try:
        db = fdb.open(None if cluster_file is None else str(cluster_file))
        db.options.set_transaction_timeout(int(timeout * 1000))
        space = fdb.directory.create_or_open(db, directory)
    except fdb.FDBError as exc:
        raise _unavailable(exc, "open", cluster_file) from None
    return FdbRegistry(
        db,
        space=space,
        transactional=fdb.transactional,
        error_types=(fdb.FDBError,),
        clock=clock,
        lease=lease,
        name=f"FoundationDB registry {'/'.join(directory)} via {cluster_file or 'the default cluster file'}",
        cluster_file=cluster_file,
    )


def _unavailable(exc: BaseException, doing: str, cluster_file: Path | str | None) -> RegistryUnavailable:
    code = getattr(exc, "code", None)
    return RegistryUnavailable(
        f"FoundationDB {doing} failed: {exc}" + (f" (error {code})" if code is not None else ""),
        hint=f"check the cluster with `fdbcli -C {cluster_file or '/etc/foundationdb/fdb.cluster'} --exec status`; "
             "the daemon retries on its next heartbeat",
    )


# --- keys ----------------------------------------------------------------------------------------


class Keys:
    """The key layout (see the module docstring) inside one subspace or directory."""

    def __init__(self, space: Any) -> None:
        self.space = space

    def _range(self, prefix: tuple[Any, ...]) -> tuple[bytes, bytes]:
        span = self.space.range(prefix)
        return span.start, span.stop

    def unpack(self, key: bytes) -> tuple[Any, ...]:
        return tuple(self.space.unpack(key))

    def meta(self) -> bytes:
        return bytes(self.space.pack(("meta", "schema_version")))

    def pod(self, pod_id: str) -> bytes:
        return bytes(self.space.pack(("pod", pod_id)))

    def pods(self) -> tuple[bytes, bytes]:
        return self._range(("pod",))

    def room(self, room_key: int, pod_id: str) -> bytes:
        return bytes(self.space.pack(("room", -room_key, pod_id)))

    def rooms(self) -> tuple[bytes, bytes]:
        return self._range(("room",))

    def res(self, pod_id: str, reservation_id: str) -> bytes:
        return bytes(self.space.pack(("res", pod_id, reservation_id)))

    def res_of_pod(self, pod_id: str) -> tuple[bytes, bytes]:
        return self._range(("res", pod_id))

    def all_res(self) -> tuple[bytes, bytes]:
        return self._range(("res",))

    def res_id(self, reservation_id: str) -> bytes:
        return bytes(self.space.pack(("res_id", reservation_id)))

    def res_user(self, user: str, reservation_id: str) -> bytes:
        return bytes(self.space.pack(("res_user", user, reservation_id)))

    def res_of_user(self, user: str) -> tuple[bytes, bytes]:
        return self._range(("res_user", user))

    def session(self, session_id: str) -> bytes:
        return bytes(self.space.pack(("session", session_id)))

    def sessions(self) -> tuple[bytes, bytes]:
        return self._range(("session",))

    def pod_session(self, pod_id: str, session_id: str) -> bytes:
        return bytes(self.space.pack(("pod_session", pod_id, session_id)))

    def sessions_of_pod(self, pod_id: str) -> tuple[bytes, bytes]:
        return self._range(("pod_session", pod_id))

    def user_session(self, user: str, session_id: str) -> bytes:
        return bytes(self.space.pack(("user_session", user, session_id)))

    def sessions_of_user(self, user: str) -> tuple[bytes, bytes]:
        return self._range(("user_session", user))


def _pack(*items: Any) -> bytes:
    import fdb.tuple

    return bytes(fdb.tuple.pack(items))


def _unpack(raw: bytes) -> tuple[Any, ...]:
    import fdb.tuple

    return tuple(fdb.tuple.unpack(raw))


# --- transaction bodies (module-level: ``@fdb.transactional`` finds the ``tr`` argument by name) ---


def _get(tr: Any, key: bytes) -> bytes | None:
    value = tr.get(key)
    return bytes(value) if value.present() else None


@dataclass(frozen=True)
class _PodState:
    pod: PodRecord  # with ``reserved`` = live reservations
    room_key: int | None  # the room index entry as stored
    live: list[Reservation]
    expired: list[Reservation]


def _pod_state(tr: Any, keys: Keys, pod_id: str, now: float) -> _PodState | None:
    raw = _get(tr, keys.pod(pod_id))
    if raw is None:
        return None
    held = [records.reservation_from_value(kv.value) for kv in tr.get_range(*keys.res_of_pod(pod_id))]
    live, expired = partition(held, now)
    pod, key = records.pod_from_value(pod_id, raw, reserved=len(live))
    return _PodState(pod, key, live, expired)


def _write_pod(tr: Any, keys: Keys, pod: PodRecord, old_key: int | None) -> None:
    """Store the record and move its room index entry, in the caller's transaction."""
    key = room_key(pod, pod.reserved)
    if old_key is not None and old_key != key:
        tr.clear(keys.room(old_key, pod.pod_id))
    tr.set(keys.pod(pod.pod_id), records.pod_value(pod, room_key=key))
    if key is not None:
        tr.set(keys.room(key, pod.pod_id), b"")


def _delete_reservation(tr: Any, keys: Keys, reservation: Reservation) -> None:
    tr.clear(keys.res(reservation.pod_id, reservation.reservation_id))
    tr.clear(keys.res_id(reservation.reservation_id))
    tr.clear(keys.res_user(reservation.user, reservation.reservation_id))


def _tx_init(tr: Any, keys: Keys) -> None:
    raw = _get(tr, keys.meta())
    if raw is None:
        tr.set(keys.meta(), _pack(SCHEMA_VERSION))
        return
    (version,) = _unpack(raw)
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(f"the registry has schema version {version}; this daemon knows up to {SCHEMA_VERSION}")


def _tx_publish(tr: Any, keys: Keys, record: PodRecord, users: frozenset[str], now: float, lease: float) -> PodRecord:
    raw = _get(tr, keys.pod(record.pod_id))
    old_key = records.pod_from_value(record.pod_id, raw)[1] if raw is not None else None
    held = [records.reservation_from_value(kv.value) for kv in tr.get_range(*keys.res_of_pod(record.pod_id))]
    keep, drop = partition(held, now, users)
    for reservation in drop:
        _delete_reservation(tr, keys, reservation)
    stored = stamp(record, now, lease, len(keep))
    _write_pod(tr, keys, stored, old_key)
    return stored


def _tx_get_pod(tr: Any, keys: Keys, pod_id: str, now: float) -> PodRecord | None:
    state = _pod_state(tr, keys, pod_id, now)
    return None if state is None else state.pod


def _tx_list_pods(tr: Any, keys: Keys, now: float) -> list[PodRecord]:
    reserved: dict[str, int] = {}
    for kv in tr.get_range(*keys.all_res()):
        reservation = records.reservation_from_value(kv.value)
        if reservation.live(now):
            reserved[reservation.pod_id] = reserved.get(reservation.pod_id, 0) + 1
    pods = []
    for kv in tr.get_range(*keys.pods()):
        pod_id = keys.unpack(kv.key)[1]
        pods.append(records.pod_from_value(pod_id, kv.value, reserved=reserved.get(pod_id, 0))[0])
    return pods


def _room_candidates(tr: Any, keys: Keys, now: float) -> Iterable[_PodState]:
    """Live pods with room, in room index order (``tr`` may be a snapshot)."""
    for kv in tr.get_range(*keys.rooms()):
        pod_id = keys.unpack(kv.key)[2]
        state = _pod_state(tr, keys, pod_id, now)
        if state is not None and state.pod.alive(now) and state.pod.room > 0:
            yield state


def _tx_pods_with_room(tr: Any, keys: Keys, limit: int, now: float) -> list[PodRecord]:
    found: list[PodRecord] = []
    for state in _room_candidates(tr, keys, now):
        found.append(state.pod)
        if len(found) >= limit:
            break
    return most_room_first(found)


def _tx_reserve(
    tr: Any, keys: Keys, user: str, pod_id: str | None, ttl: float, now: float, reservation_id: str
) -> Reservation:
    # A retry after commit_unknown_result: the first attempt may have committed.
    done = _get(tr, keys.res_id(reservation_id))
    if done is not None:
        (held_pod,) = _unpack(done)
        raw = _get(tr, keys.res(held_pod, reservation_id))
        if raw is not None:
            return records.reservation_from_value(raw)
    for kv in tr.get_range(*keys.res_of_user(user)):
        (held_pod,) = _unpack(kv.value)
        raw = _get(tr, keys.res(held_pod, keys.unpack(kv.key)[-1]))
        if raw is not None:
            held = records.reservation_from_value(raw)
            if held.live(now) and (pod_id is None or held.pod_id == pod_id):
                pod_raw = _get(tr, keys.pod(held.pod_id))
                if pod_raw is not None:
                    pod = records.pod_from_value(held.pod_id, pod_raw)[0]
                    if pod.alive(now) and not pod.draining:
                        return held
    chosen: _PodState | None
    if pod_id is not None:
        chosen = _pod_state(tr, keys, pod_id, now)  # plain reads: conflicts with any change to the pod
        refused = refusal(pod_id, None if chosen is None else chosen.pod, now)
        if refused is not None:
            raise refused
    else:
        chosen = next(iter(_room_candidates(tr.snapshot, keys, now)), None)
        if chosen is None:
            raise no_capacity()
        tr.add_read_conflict_key(keys.pod(chosen.pod.pod_id))
        tr.add_read_conflict_range(*keys.res_of_pod(chosen.pod.pod_id))
    assert chosen is not None
    pod = chosen.pod
    for expired in chosen.expired:
        _delete_reservation(tr, keys, expired)
    reservation = Reservation(reservation_id=reservation_id, pod_id=pod.pod_id, user=user, created_at=now,
                              expires_at=now + ttl)
    tr.set(keys.res(pod.pod_id, reservation_id), records.reservation_value(reservation))
    tr.set(keys.res_id(reservation_id), _pack(pod.pod_id))
    tr.set(keys.res_user(user, reservation_id), _pack(pod.pod_id))
    _write_pod(tr, keys, replace(pod, reserved=pod.reserved + 1), chosen.room_key)
    return reservation


def _tx_release(tr: Any, keys: Keys, reservation_id: str, now: float) -> bool:
    where = _get(tr, keys.res_id(reservation_id))
    if where is None:
        return False
    (pod_id,) = _unpack(where)
    raw = _get(tr, keys.res(pod_id, reservation_id))
    if raw is not None:
        _delete_reservation(tr, keys, records.reservation_from_value(raw))
    tr.clear(keys.res_id(reservation_id))
    state = _pod_state(tr, keys, pod_id, now)
    if state is not None:
        _write_pod(tr, keys, state.pod, state.room_key)
    return True


def _tx_list_reservations(tr: Any, keys: Keys, pod: str | None) -> list[Reservation]:
    span = keys.all_res() if pod is None else keys.res_of_pod(pod)
    return [records.reservation_from_value(kv.value) for kv in tr.get_range(*span)]


def _remove_pod(tr: Any, keys: Keys, pod_id: str) -> bool:
    raw = _get(tr, keys.pod(pod_id))
    if raw is not None:
        try:
            old_key = records.pod_from_value(pod_id, raw)[1]
        except RegistryError:  # unreadable: find its index entry the slow way
            for kv in tr.get_range(*keys.rooms()):
                if keys.unpack(kv.key)[2] == pod_id:
                    tr.clear(kv.key)
        else:
            if old_key is not None:
                tr.clear(keys.room(old_key, pod_id))
        tr.clear(keys.pod(pod_id))
    for kv in tr.get_range(*keys.res_of_pod(pod_id)):
        reservation_id = keys.unpack(kv.key)[-1]
        tr.clear(keys.res_id(reservation_id))
        try:
            tr.clear(keys.res_user(records.reservation_from_value(kv.value).user, reservation_id))
        except RegistryError:
            pass  # its res_user entry is ignored by reserve (no record behind it)
    tr.clear_range(*keys.res_of_pod(pod_id))
    for kv in tr.get_range(*keys.sessions_of_pod(pod_id)):
        session_id = keys.unpack(kv.key)[-1]
        session_raw = _get(tr, keys.session(session_id))
        if session_raw is not None:
            try:
                tr.clear(keys.user_session(records.session_from_value(session_raw).user, session_id))
            except RegistryError:
                pass
        tr.clear(keys.session(session_id))
    tr.clear_range(*keys.sessions_of_pod(pod_id))
    return raw is not None


def _tx_remove_pod(tr: Any, keys: Keys, pod_id: str) -> bool:
    return _remove_pod(tr, keys, pod_id)


def _tx_remove_expired(tr: Any, keys: Keys, before: float) -> list[str]:
    dead = []
    for kv in tr.get_range(*keys.pods()):
        pod_id = keys.unpack(kv.key)[1]
        if records.pod_from_value(pod_id, kv.value)[0].lease_expires_at <= before:
            dead.append(pod_id)
    for pod_id in dead:
        _remove_pod(tr, keys, pod_id)
    return dead


def _tx_put_session(tr: Any, keys: Keys, session: SessionRecord) -> None:
    raw = _get(tr, keys.session(session.session_id))
    if raw is not None:
        old = records.session_from_value(raw)
        tr.clear(keys.pod_session(old.pod_id, old.session_id))
        tr.clear(keys.user_session(old.user, old.session_id))
    tr.set(keys.session(session.session_id), records.session_value(session))
    tr.set(keys.pod_session(session.pod_id, session.session_id), b"")
    tr.set(keys.user_session(session.user, session.session_id), b"")


def _tx_remove_session(tr: Any, keys: Keys, session_id: str) -> bool:
    raw = _get(tr, keys.session(session_id))
    if raw is None:
        return False
    old = records.session_from_value(raw)
    tr.clear(keys.pod_session(old.pod_id, session_id))
    tr.clear(keys.user_session(old.user, session_id))
    tr.clear(keys.session(session_id))
    return True


def _tx_list_sessions(tr: Any, keys: Keys, pod: str | None, user: str | None) -> list[SessionRecord]:
    if pod is None and user is None:
        found = [records.session_from_value(kv.value) for kv in tr.get_range(*keys.sessions())]
    else:
        span = keys.sessions_of_pod(pod) if pod is not None else keys.sessions_of_user(user or "")
        found = []
        for kv in tr.get_range(*span):
            raw = _get(tr, keys.session(keys.unpack(kv.key)[-1]))
            if raw is not None:
                found.append(records.session_from_value(raw))
    if user is not None:
        found = [s for s in found if s.user == user]
    return sorted(found, key=lambda s: (s.since, s.session_id))


# --- the registry --------------------------------------------------------------------------------


class FdbRegistry:
    """:class:`~supervisor.registry.base.Registry` on FoundationDB (see the module docstring).

    Build it with :func:`open_fdb`. The constructor takes the pieces it needs from the bindings
    (database, directory subspace, ``transactional`` decorator, error type) so the same
    transaction bodies can run against any store with FoundationDB's transaction interface.
    """

    def __init__(
        self,
        db: Any,
        *,
        space: Any,
        transactional: Callable[[Callable[..., Any]], Callable[..., Any]],
        error_types: tuple[type[BaseException], ...],
        clock: Clock = time.time,
        lease: float = 15.0,
        name: str = "FoundationDB registry",
        cluster_file: Path | str | None = None,
    ) -> None:
        if not lease > 0:
            raise ValueError(f"lease must be positive, not {lease!r}")
        self.lease = float(lease)
        self._db = db
        self._keys = Keys(space)
        self._clock = clock
        self._errors = error_types
        self._name = name
        self._cluster_file = cluster_file
        self._closed = False
        tx = transactional
        self._init = tx(_tx_init)
        self._publish = tx(_tx_publish)
        self._get_pod = tx(_tx_get_pod)
        self._list_pods = tx(_tx_list_pods)
        self._pods_with_room = tx(_tx_pods_with_room)
        self._remove_pod = tx(_tx_remove_pod)
        self._remove_expired = tx(_tx_remove_expired)
        self._put_session = tx(_tx_put_session)
        self._remove_session = tx(_tx_remove_session)
        self._list_sessions = tx(_tx_list_sessions)
        self._reserve = tx(_tx_reserve)
        self._release = tx(_tx_release)
        self._list_reservations = tx(_tx_list_reservations)
        self._run("open", self._init)

    @property
    def keys(self) -> Keys:
        return self._keys

    def describe(self) -> str:
        return f"{self._name} (lease {self.lease:g}s)"

    def __repr__(self) -> str:
        return f"FdbRegistry({self._name!r})"

    def __enter__(self) -> FdbRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, doing: str, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise RegistryClosed(f"{self._name} is closed")
        try:
            return fn(self._db, self._keys, *args)
        except self._errors as exc:
            raise _unavailable(exc, doing, self._cluster_file) from None

    def close(self) -> None:
        # The binding keeps one network thread per process; there is nothing to release per database.
        self._closed = True

    def publish_pod(self, record: PodRecord, *, users: Collection[str] = ()) -> PodRecord:
        stored: PodRecord = self._run("publish_pod", self._publish, record, frozenset(users), self._clock(), self.lease)
        return stored

    def get_pod(self, pod_id: str, *, include_expired: bool = False) -> PodRecord | None:
        now = self._clock()
        pod: PodRecord | None = self._run("get_pod", self._get_pod, pod_id, now)
        return pod if pod is not None and (include_expired or pod.alive(now)) else None

    def list_pods(self, *, include_expired: bool = False) -> list[PodRecord]:
        now = self._clock()
        pods: list[PodRecord] = self._run("list_pods", self._list_pods, now)
        return [p for p in pods if include_expired or p.alive(now)]

    def pods_with_room(self, limit: int = 10) -> list[PodRecord]:
        if limit < 1:
            return []
        pods: list[PodRecord] = self._run("pods_with_room", self._pods_with_room, limit, self._clock())
        return pods

    def remove_pod(self, pod_id: str) -> bool:
        return bool(self._run("remove_pod", self._remove_pod, pod_id))

    def remove_expired_pods(self, *, grace: float = 0.0) -> list[str]:
        dead: list[str] = self._run("remove_expired_pods", self._remove_expired, self._clock() - grace)
        return dead

    def put_session(self, session: SessionRecord) -> None:
        self._run("put_session", self._put_session, session)

    def remove_session(self, session_id: str) -> bool:
        return bool(self._run("remove_session", self._remove_session, session_id))

    def list_sessions(self, *, pod: str | None = None, user: str | None = None) -> list[SessionRecord]:
        found: list[SessionRecord] = self._run("list_sessions", self._list_sessions, pod, user)
        return found

    def reserve(self, user: str, pod_id: str | None = None, *, ttl: float) -> Reservation:
        check_ttl(ttl)
        records.check_id("user", user)
        reservation: Reservation = self._run(
            "reserve", self._reserve, user, pod_id, float(ttl), self._clock(), new_reservation_id()
        )
        return reservation

    def release(self, reservation_id: str) -> bool:
        return bool(self._run("release", self._release, reservation_id, self._clock()))

    def list_reservations(self, *, pod: str | None = None, include_expired: bool = False) -> list[Reservation]:
        now = self._clock()
        found: list[Reservation] = self._run("list_reservations", self._list_reservations, pod)
        return sorted((r for r in found if include_expired or r.live(now)),
                      key=lambda r: (r.created_at, r.reservation_id))
