"""One conformance suite for every :class:`supervisor.registry.Registry` implementation.

A backend's test module subclasses :class:`RegistryConformance` as ``Test<Backend>`` and provides:

- a ``store`` fixture: a fresh, empty place for one test's registries (a file path, a directory);
- :meth:`RegistryConformance.open_registry`: open one more registry object on that store (several
  objects on one store stand for several daemons or routers sharing it);
- :meth:`RegistryConformance.raw_pod_value` / :meth:`RegistryConformance.write_raw_pod_value`:
  read and write a pod's stored value bypassing the registry (to check the schema version).

Time is a :class:`FakeClock`; nothing here sleeps. Concurrency tests release their threads with a
barrier and check the outcome, which is exact whatever the interleaving.
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace
from functools import partial
from typing import Any, Callable, Iterator

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.errors import SupervisorError
from supervisor.registry import (
    SCHEMA_VERSION,
    NoCapacity,
    PodRecord,
    Registry,
    RegistryClosed,
    RegistryError,
    Reservation,
    SchemaTooNew,
    SessionRecord,
    place,
)

LEASE = 15.0
START = 1_800_000_000.0


class FakeClock:
    """Seconds since the epoch that move only when told to."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def pod(pod_id: str, free: int, *, capacity: int = 10, draining: bool = False, **extra: Any) -> PodRecord:
    active = capacity - free
    return PodRecord(
        pod_id=pod_id,
        capacity=capacity,
        active_users=active,
        sessions=active,
        free_slots=free,
        cpu_headroom_millicores=250 * free,
        memory_headroom_bytes=2**29 * free,
        draining=draining,
        **extra,
    )


def session(session_id: str, user: str, pod_id: str, since: float) -> SessionRecord:
    return SessionRecord(session_id=session_id, user=user, pod_id=pod_id,
                         workspace=f"/workspace/shard-3/{user}", since=since)


def ids(pods: list[PodRecord]) -> list[str]:
    return [p.pod_id for p in pods]


def race(callers: list[Callable[[], Any]]) -> list[Any]:
    """Run every caller in its own thread, released together by a barrier; return each one's
    result or exception, in order."""
    barrier = threading.Barrier(len(callers))
    results: list[Any] = [None] * len(callers)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = callers[i]()
        except BaseException as exc:  # collected and inspected by the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(callers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


class RegistryConformance:
    """The behaviour every registry backend must show. Subclass it as ``Test<Backend>``."""

    # --- provided by the backend's test module ------------------------------------------------------

    @pytest.fixture
    def store(self) -> Any:
        raise NotImplementedError

    def open_registry(self, store: Any, clock: FakeClock, *, lease: float) -> Registry:
        raise NotImplementedError

    def raw_pod_value(self, registry: Registry, pod_id: str) -> dict[str, Any]:
        raise NotImplementedError

    def write_raw_pod_value(self, registry: Registry, pod_id: str, value: dict[str, Any]) -> None:
        raise NotImplementedError

    # --- fixtures --------------------------------------------------------------------------------

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    def connect(self, store: Any, clock: FakeClock) -> Iterator[Callable[..., Registry]]:
        opened: list[Registry] = []

        def connect(*, lease: float = LEASE) -> Registry:
            registry = self.open_registry(store, clock, lease=lease)
            opened.append(registry)
            return registry

        yield connect
        for registry in opened:
            registry.close()

    @pytest.fixture
    def registry(self, connect: Callable[..., Registry]) -> Registry:
        return connect()

    # --- pods, heartbeats, leases ----------------------------------------------------------------

    def test_implements_the_protocol(self, registry: Registry) -> None:
        assert isinstance(registry, Registry)
        assert registry.lease == LEASE
        assert registry.describe()

    def test_publish_stamps_heartbeat_and_lease_and_round_trips(self, registry: Registry, clock: FakeClock) -> None:
        record = pod("p1", 4, capacity=100, cgroup_version=1, daemon_version="0.1.0", address="10.0.0.5:8080",
                     heartbeat_at=1.0, lease_expires_at=2.0, reserved=7)
        stored = registry.publish_pod(record)
        assert stored == replace(record, heartbeat_at=clock.now, lease_expires_at=clock.now + LEASE, reserved=0)
        assert registry.get_pod("p1") == stored
        assert registry.list_pods() == [stored]

    def test_publish_is_an_upsert(self, registry: Registry, clock: FakeClock) -> None:
        registry.publish_pod(pod("p1", 4))
        clock.advance(5)
        second = registry.publish_pod(pod("p1", 2, draining=True))
        assert registry.list_pods() == [second]
        assert second.free_slots == 2 and second.draining
        assert second.heartbeat_at == clock.now

    def test_unknown_pod(self, registry: Registry) -> None:
        assert registry.get_pod("nope") is None
        assert registry.get_pod("nope", include_expired=True) is None
        assert registry.list_pods(include_expired=True) == []
        assert registry.remove_pod("nope") is False

    def test_lease_uses_the_registry_lease(self, connect: Callable[..., Registry], clock: FakeClock) -> None:
        registry = connect(lease=60.0)
        assert registry.publish_pod(pod("p1", 1)).lease_expires_at == clock.now + 60.0

    def test_lease_expiry_with_the_injected_clock(self, registry: Registry, clock: FakeClock) -> None:
        registry.publish_pod(pod("p1", 3))
        clock.advance(LEASE - 0.001)
        assert ids(registry.list_pods()) == ["p1"]
        assert ids(registry.pods_with_room()) == ["p1"]
        clock.advance(0.001)  # the lease ends exactly at heartbeat + lease
        assert registry.get_pod("p1") is None
        assert registry.list_pods() == []
        assert ids(registry.list_pods(include_expired=True)) == ["p1"]
        dead = registry.get_pod("p1", include_expired=True)
        assert dead is not None and not dead.alive(clock.now)
        assert registry.pods_with_room() == []
        with pytest.raises(NoCapacity):
            place(registry, "u1")
        with pytest.raises(NoCapacity, match="dead"):
            registry.reserve("u1", "p1", ttl=30)
        renewed = registry.publish_pod(pod("p1", 3))  # the next heartbeat brings it back
        assert renewed.lease_expires_at == clock.now + LEASE
        assert place(registry, "u1").pod_id == "p1"

    def test_remove_expired_pods(self, registry: Registry, clock: FakeClock) -> None:
        registry.publish_pod(pod("old", 3))
        clock.advance(10)
        registry.publish_pod(pod("new", 3))
        clock.advance(LEASE + 5)  # old expired 15 s ago, new 5 s ago
        assert registry.remove_expired_pods(grace=20) == []
        assert registry.remove_expired_pods(grace=10) == ["old"]
        assert ids(registry.list_pods(include_expired=True)) == ["new"]
        assert registry.remove_expired_pods() == ["new"]
        assert registry.list_pods(include_expired=True) == []

    # --- the room index --------------------------------------------------------------------------

    def test_pods_with_room_most_free_first(self, registry: Registry) -> None:
        for pod_id, free in [("a", 3), ("b", 10), ("c", 0), ("e", 7), ("d", 7)]:
            registry.publish_pod(pod(pod_id, free))
        assert ids(registry.pods_with_room()) == ["b", "d", "e", "a"]  # full c left out; ties by id
        assert ids(registry.pods_with_room(limit=2)) == ["b", "d"]
        assert registry.pods_with_room(limit=0) == []
        assert ids(registry.list_pods()) == ["a", "b", "c", "d", "e"]

    def test_room_index_follows_heartbeats_and_reservations(self, registry: Registry) -> None:
        for pod_id, free in [("a", 3), ("b", 10), ("d", 7), ("e", 7)]:
            registry.publish_pod(pod(pod_id, free))
        registry.publish_pod(pod("b", 1))
        assert ids(registry.pods_with_room()) == ["d", "e", "a", "b"]
        registry.reserve("u1", "d", ttl=30)
        assert [(p.pod_id, p.room) for p in registry.pods_with_room()] == [("e", 7), ("d", 6), ("a", 3), ("b", 1)]
        registry.reserve("u2", "b", ttl=30)
        assert ids(registry.pods_with_room()) == ["e", "d", "a"]
        registry.publish_pod(pod("b", 0))
        registry.publish_pod(pod("a", 9))
        assert ids(registry.pods_with_room()) == ["a", "e", "d"]

    def test_draining_pods_are_not_offered(self, registry: Registry) -> None:
        registry.publish_pod(pod("a", 10, draining=True))
        registry.publish_pod(pod("b", 1))
        assert ids(registry.pods_with_room()) == ["b"]
        assert place(registry, "u1").pod_id == "b"
        with pytest.raises(NoCapacity):
            place(registry, "u2")
        with pytest.raises(NoCapacity, match="draining"):
            registry.reserve("u2", "a", ttl=30)
        draining = registry.get_pod("a")
        assert draining is not None and draining.draining and draining.room == 0
        registry.publish_pod(pod("a", 10))  # drain cancelled
        assert place(registry, "u2").pod_id == "a"

    # --- placement and reservations --------------------------------------------------------------

    def test_place_picks_most_room_and_counts_reservations(self, registry: Registry, clock: FakeClock) -> None:
        registry.publish_pod(pod("a", 2))
        registry.publish_pod(pod("b", 1))
        first = place(registry, "u1", ttl=30)
        assert first == Reservation(reservation_id=first.reservation_id, pod_id="a", user="u1",
                                    created_at=clock.now, expires_at=clock.now + 30)
        counted = registry.get_pod("a")
        assert counted is not None and counted.reserved == 1 and counted.room == 1
        clock.advance(1)
        second = place(registry, "u2")  # a and b now have 1 each: ties go by pod id
        clock.advance(1)
        third = place(registry, "u3")
        assert (second.pod_id, third.pod_id) == ("a", "b")
        with pytest.raises(NoCapacity) as refused:
            place(registry, "u4")
        assert isinstance(refused.value, SupervisorError) and refused.value.reason == "no_capacity"
        assert refused.value.hint
        assert not isinstance(refused.value, RegistryError)  # the daemon counts only storage failures
        assert registry.list_reservations() == [first, second, third]
        assert registry.list_reservations(pod="b") == [third]

    def test_place_is_idempotent_per_user(self, registry: Registry) -> None:
        registry.publish_pod(pod("a", 5))
        first = place(registry, "u1")
        assert place(registry, "u1") == first
        again = registry.get_pod("a")
        assert again is not None and again.reserved == 1

    def test_a_reservation_on_a_pod_that_died_is_not_returned_again(self, registry: Registry, clock: FakeClock) -> None:
        registry.publish_pod(pod("a", 5))
        first = place(registry, "u1", ttl=60)
        clock.advance(LEASE)
        registry.publish_pod(pod("b", 5))
        second = place(registry, "u1", ttl=60)
        assert second.pod_id == "b" and second.reservation_id != first.reservation_id

    def test_release_gives_the_slot_back(self, registry: Registry) -> None:
        registry.publish_pod(pod("a", 1))
        held = place(registry, "u1")
        with pytest.raises(NoCapacity):
            place(registry, "u2")
        assert registry.release(held.reservation_id) is True
        assert registry.release(held.reservation_id) is False
        assert registry.release("no-such-reservation") is False
        assert place(registry, "u2").pod_id == "a"

    def test_expired_reservations_stop_counting(self, registry: Registry, clock: FakeClock) -> None:
        """No heartbeat in between: the expiry alone makes the slot placeable again."""
        registry.publish_pod(pod("a", 1))
        held = place(registry, "u1", ttl=10)
        clock.advance(9.999)
        with pytest.raises(NoCapacity):
            place(registry, "u2")
        clock.advance(0.001)
        assert registry.list_reservations() == []
        assert registry.list_reservations(include_expired=True) == [held]
        refreshed = registry.get_pod("a")
        assert refreshed is not None and refreshed.reserved == 0
        assert ids(registry.pods_with_room()) == ["a"]
        assert place(registry, "u2").pod_id == "a"

    def test_heartbeat_naming_the_user_claims_the_reservation(self, registry: Registry) -> None:
        registry.publish_pod(pod("a", 2))
        held = place(registry, "u1")
        stored = registry.publish_pod(pod("a", 1), users={"u1", "u0"})  # u1 arrived: one slot fewer
        assert stored.reserved == 0 and stored.room == 1
        assert registry.list_reservations(include_expired=True) == []
        assert registry.release(held.reservation_id) is False
        assert place(registry, "u2").pod_id == "a"
        with pytest.raises(NoCapacity):
            place(registry, "u3")

    def test_heartbeat_without_the_user_keeps_counting(self, registry: Registry) -> None:
        registry.publish_pod(pod("a", 1))
        place(registry, "u1")
        stored = registry.publish_pod(pod("a", 1), users={"someone-else"})
        assert stored.reserved == 1 and stored.room == 0
        assert registry.pods_with_room() == []
        with pytest.raises(NoCapacity):
            place(registry, "u2")

    def test_heartbeat_sweeps_expired_reservations(self, registry: Registry, clock: FakeClock) -> None:
        registry.publish_pod(pod("a", 3))
        place(registry, "u1", ttl=5)
        live = place(registry, "u2", ttl=50)
        clock.advance(6)
        registry.publish_pod(pod("a", 3))
        assert registry.list_reservations(include_expired=True) == [live]

    def test_reserve_on_a_named_pod(self, registry: Registry) -> None:
        registry.publish_pod(pod("a", 9))
        registry.publish_pod(pod("b", 1))
        assert registry.reserve("u1", "b", ttl=30).pod_id == "b"
        with pytest.raises(NoCapacity, match="full"):
            registry.reserve("u2", "b", ttl=30)
        with pytest.raises(NoCapacity, match="not in the registry"):
            registry.reserve("u2", "zz", ttl=30)
        assert registry.reserve("u2", "a", ttl=30).pod_id == "a"

    @pytest.mark.parametrize("ttl", [0, -1.0, math.nan, math.inf])
    def test_reserve_rejects_a_bad_ttl(self, registry: Registry, ttl: float) -> None:
        registry.publish_pod(pod("a", 9))
        with pytest.raises(ValueError, match="ttl"):
            place(registry, "u1", ttl=ttl)
        assert registry.list_reservations(include_expired=True) == []

    def test_reserve_rejects_an_empty_user(self, registry: Registry) -> None:
        registry.publish_pod(pod("a", 9))
        with pytest.raises(ValueError, match="user"):
            place(registry, "")

    def test_records_are_validated(self) -> None:
        with pytest.raises(ValueError, match="free_slots"):
            replace(pod("a", 1, capacity=10), free_slots=11)
        with pytest.raises(ValueError, match="pod_id"):
            pod("", 1)
        with pytest.raises(ValueError, match="since"):
            session("s", "u", "a", math.nan)

    # --- removal ---------------------------------------------------------------------------------

    def test_remove_pod_takes_its_sessions_and_reservations(self, registry: Registry, clock: FakeClock) -> None:
        registry.publish_pod(pod("a", 5))
        registry.publish_pod(pod("b", 5))
        on_a = session("s1", "u1", "a", clock.now)
        on_b = session("s2", "u2", "b", clock.now + 1)
        registry.put_session(on_a)
        registry.put_session(on_b)
        held = registry.reserve("u3", "a", ttl=30)
        kept = registry.reserve("u4", "b", ttl=30)
        assert registry.remove_pod("a") is True
        assert registry.get_pod("a", include_expired=True) is None
        assert registry.list_sessions() == [on_b]
        assert registry.list_sessions(user="u1") == []
        assert registry.list_sessions(pod="a") == []
        assert registry.list_reservations(include_expired=True) == [kept]
        assert registry.release(held.reservation_id) is False
        assert ids(registry.pods_with_room()) == ["b"]
        assert registry.remove_pod("a") is False
        assert place(registry, "u3").pod_id == "b"  # no stale index entry for a

    # --- sessions --------------------------------------------------------------------------------

    def test_sessions_by_pod_and_user(self, registry: Registry) -> None:
        s1 = session("s1", "u1", "a", 1.0)
        s2 = session("s2", "u2", "a", 2.0)
        s3 = session("s3", "u1", "b", 3.0)
        for s in (s3, s1, s2):
            registry.put_session(s)
        assert registry.list_sessions() == [s1, s2, s3]
        assert registry.list_sessions(pod="a") == [s1, s2]
        assert registry.list_sessions(user="u1") == [s1, s3]
        assert registry.list_sessions(pod="a", user="u1") == [s1]
        moved = replace(s1, pod_id="b", user="u9", since=4.0)
        registry.put_session(moved)  # an upsert re-indexes the session
        assert registry.list_sessions(pod="a") == [s2]
        assert registry.list_sessions(user="u1") == [s3]
        assert registry.list_sessions(user="u9") == [moved]
        assert registry.list_sessions(pod="b") == [s3, moved]
        assert registry.remove_session("s2") is True
        assert registry.remove_session("s2") is False
        assert registry.list_sessions(pod="a") == []
        assert registry.list_sessions() == [s3, moved]

    # --- schema versions -------------------------------------------------------------------------

    def test_values_carry_the_schema_version(self, registry: Registry) -> None:
        registry.publish_pod(pod("a", 5))
        raw = self.raw_pod_value(registry, "a")
        assert raw["v"] == SCHEMA_VERSION
        assert raw["free_slots"] == 5

    def test_a_newer_schema_is_refused_not_misread(self, registry: Registry) -> None:
        registry.publish_pod(pod("a", 5))
        raw = self.raw_pod_value(registry, "a")
        self.write_raw_pod_value(registry, "a", {**raw, "v": SCHEMA_VERSION + 1})
        with pytest.raises(SchemaTooNew) as refused:
            registry.get_pod("a")
        assert isinstance(refused.value, RegistryError)
        assert "upgrade" in refused.value.hint
        with pytest.raises(RegistryError):
            registry.list_pods()

    def test_unknown_fields_of_the_same_version_are_ignored(self, registry: Registry) -> None:
        stored = registry.publish_pod(pod("a", 5))
        raw = self.raw_pod_value(registry, "a")
        self.write_raw_pod_value(registry, "a", {**raw, "added_later": [1, 2]})
        assert registry.get_pod("a") == stored

    # --- lifecycle -------------------------------------------------------------------------------

    def test_closed_registry_raises_a_registry_error(self, connect: Callable[..., Registry]) -> None:
        registry = connect()
        registry.close()
        registry.close()  # idempotent
        with pytest.raises(RegistryClosed):
            registry.list_pods()
        with pytest.raises(RegistryError):
            registry.publish_pod(pod("a", 1))

    def test_registries_on_one_store_see_each_other(self, connect: Callable[..., Registry]) -> None:
        pod_side, router = connect(), connect()
        pod_side.publish_pod(pod("a", 1))
        held = place(router, "u1")
        assert pod_side.list_reservations() == [held]
        pod_side.publish_pod(pod("a", 0), users={"u1"})
        assert router.list_reservations() == []
        assert router.pods_with_room() == []

    # --- concurrency -----------------------------------------------------------------------------

    def test_threads_racing_for_the_last_slot_separate_registries(self, connect: Callable[..., Registry]) -> None:
        connect().publish_pod(pod("a", 1))
        routers = [connect() for _ in range(8)]
        results = race([partial(place, r, f"user{i}") for i, r in enumerate(routers)])
        won = [r for r in results if isinstance(r, Reservation)]
        lost = [r for r in results if isinstance(r, NoCapacity)]
        assert len(won) == 1 and len(lost) == 7, results
        assert routers[0].list_reservations() == won

    def test_threads_racing_for_the_last_slot_one_registry(self, registry: Registry) -> None:
        registry.publish_pod(pod("a", 1))
        results = race([partial(place, registry, f"user{i}") for i in range(8)])
        won = [r for r in results if isinstance(r, Reservation)]
        assert len(won) == 1 and all(isinstance(r, NoCapacity) for r in results if r not in won), results
        assert registry.list_reservations() == won

    def test_threads_never_overbook_any_pod(self, connect: Callable[..., Registry], clock: FakeClock) -> None:
        setup = connect()
        for pod_id in ("a", "b", "c"):
            setup.publish_pod(pod(pod_id, 2))
        setup.publish_pod(pod("draining", 5, draining=True))
        setup.publish_pod(pod("dead", 5))
        clock.advance(LEASE)
        for pod_id in ("a", "b", "c", "draining"):
            setup.publish_pod(pod(pod_id, 2 if pod_id != "draining" else 5, draining=pod_id == "draining"))
        routers = [connect() for _ in range(4)]
        results = race([partial(place, routers[i % 4], f"user{i}") for i in range(16)])
        won = [r for r in results if isinstance(r, Reservation)]
        assert len(won) == 6 and sum(isinstance(r, NoCapacity) for r in results) == 10, results
        assert sorted(r.pod_id for r in won) == ["a", "a", "b", "b", "c", "c"]
        assert len({r.user for r in won}) == 6

    async def test_trio_callers_via_worker_threads(self, registry: Registry) -> None:
        registry.publish_pod(pod("a", 3))
        outcomes: list[str] = []

        async def router(i: int) -> None:
            try:
                held = await trio.to_thread.run_sync(lambda: place(registry, f"user{i}"))
                outcomes.append(held.pod_id)
            except NoCapacity:
                outcomes.append("full")

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(router, i)
        assert sorted(outcomes) == ["a"] * 3 + ["full"] * 7

    # --- a property: room is never oversold, and place() agrees with pods_with_room() ----------

    def test_property_room_is_never_oversold(self, registry: Registry, clock: FakeClock) -> None:
        """Random heartbeats, placements, releases, removals and clock jumps: place() agrees with
        pods_with_room(), never hands out a slot a pod does not have, and room is ordered."""

        @settings(max_examples=40, deadline=None)
        @given(steps=STEPS)
        def check(steps: list[tuple[Any, ...]]) -> None:
            for stale in registry.list_pods(include_expired=True):  # one store serves every example
                registry.remove_pod(stale.pod_id)
            clock.now = START
            run_steps(registry, clock, steps)

        check()


USERS = ["u0", "u1", "u2", "u3", "u4"]
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.sampled_from("abc"), st.integers(0, 3), st.booleans(),
                  st.sets(st.sampled_from(USERS), max_size=2)),
        st.tuples(st.just("place"), st.sampled_from(USERS), st.sampled_from([5.0, 20.0])),
        st.tuples(st.just("release"), st.integers(0, 10)),
        st.tuples(st.just("advance"), st.sampled_from([1.0, 4.0, 10.0])),
        st.tuples(st.just("remove"), st.sampled_from("abc")),
    ),
    max_size=25,
)


def run_steps(registry: Registry, clock: FakeClock, steps: list[tuple[Any, ...]]) -> None:
    placed: list[Reservation] = []
    for step in steps:
        if step[0] == "publish":
            _, pod_id, free, draining, users = step
            registry.publish_pod(pod(pod_id, free, capacity=3, draining=draining), users=users)
        elif step[0] == "place":
            _, user, ttl = step
            offered = registry.pods_with_room(limit=1)
            mine = [r for r in registry.list_reservations() if r.user == user]
            try:
                held = place(registry, user, ttl=ttl)
            except NoCapacity:
                assert offered == [], "place() refused while pods_with_room() offered a pod"
                continue
            if held in mine:
                continue  # the user's live reservation, handed out again
            assert offered and held.pod_id == offered[0].pod_id
            assert held.created_at == clock.now and held.expires_at == clock.now + ttl
            placed.append(held)
            after = registry.get_pod(held.pod_id)
            assert after is not None and not after.draining
            assert after.reserved <= after.free_slots
        elif step[0] == "release" and placed:
            registry.release(placed[step[1] % len(placed)].reservation_id)
        elif step[0] == "advance":
            clock.advance(step[1])
        elif step[0] == "remove":
            registry.remove_pod(step[1])
        offered_all = registry.pods_with_room(limit=10)
        assert [p.room for p in offered_all] == sorted((p.room for p in offered_all), reverse=True)
        for p in offered_all:
            assert p.room > 0 and not p.draining and p.alive(clock.now)
        for p in registry.list_pods():
            assert p.reserved == len(registry.list_reservations(pod=p.pod_id))
