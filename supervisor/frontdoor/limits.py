"""What one client can hold of the front door. Pure logic: no I/O, no clock reads (``now`` is passed in).

- :func:`client_key`: whom a peer address counts as. Every loopback address and the connection's
  own local address are one client, ``"local"``: users' processes share the pod's network and can
  pick any 127.x source address (counted apart, each would be a fresh client to them). Other IPv4
  addresses (also IPv4-mapped IPv6) count one by one; IPv6 addresses by their /64, the block one
  host is normally given (it can pick any address in it). So a user in the pod is at most one
  client per address of the pod (from one of them to loopback or to another: a handful), not
  one as for the probes (which also count connections *to* loopback as local) - a client from
  outside the pod must stay something a test on one host can be (a host address to 127.0.0.1).
- :class:`RejectionLimiter`: a token bucket per client for *rejected tokens*. Each rejection takes
  one; while the bucket is empty, requests from that client that would need a token's signature
  checked are answered 429 without parsing it. Valid sessions (the cookie's HMAC, tokens verified
  before) are not held back.
- :class:`Slots`: counted places per key under a limit (unauthenticated connections per client,
  connections, WebSockets and requests in flight per user).
- :class:`Waiting`: connections that could be closed to make room (no credentials yet, waiting
  for a request), by client; the one to close is the oldest of the client holding the most - never
  the newcomer's own client's (closing its own would only make a flood churn).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Generic, TypeVar

#: IPv6 clients are counted by this prefix (one host's usual allocation).
IPV6_PREFIX = 64
#: The client every process of the pod can connect as (see :func:`client_key`).
LOCAL = "local"

T = TypeVar("T")


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_key(host: str, local: str = "") -> str:
    """The key ``host`` (a peer's address as the socket gives it) is counted under; ``local`` is
    the connection's own address (a peer with the same address is in the pod)."""
    address = _address(host)
    if address is None:
        return host  # not an IP address (a Unix socket in tests): itself
    if address.is_loopback or address == _address(local):
        return LOCAL
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)


@dataclass
class _Bucket:
    level: float
    at: float


@dataclass
class RejectionLimiter:
    """A token bucket per client: ``burst`` rejections at once, refilled at ``rate`` per second.

    Memory is bounded: past ``max_clients`` buckets, the fullest are forgotten (a full one says
    nothing) down to three quarters of it; the most limited clients are kept."""

    burst: int
    rate: float
    max_clients: int = 100_000
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def _level(self, bucket: _Bucket, now: float) -> float:
        return min(float(self.burst), bucket.level + max(0.0, now - bucket.at) * self.rate)

    def retry_after(self, key: str, now: float) -> float:
        """0 if ``key`` may have a token checked now, else seconds until it may again."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        level = self._level(bucket, now)
        if level >= 1.0:
            return 0.0
        return (1.0 - level) / self.rate if self.rate > 0 else float("inf")

    def rejected(self, key: str, now: float) -> None:
        """One more rejected token from ``key``."""
        bucket = self._buckets.get(key)
        level = self._level(bucket, now) if bucket is not None else float(self.burst)
        self._buckets[key] = _Bucket(max(0.0, level - 1.0), now)
        if len(self._buckets) > self.max_clients:
            self._forget(now)

    def _forget(self, now: float) -> None:
        fullest_last = sorted(self._buckets, key=lambda k: self._level(self._buckets[k], now))
        for key in fullest_last[self.max_clients * 3 // 4:]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass
class Slots:
    """How many of something each key holds now; :meth:`take` refuses one beyond ``limit``."""

    held: dict[str, int] = field(default_factory=dict)

    def take(self, key: str, limit: int) -> bool:
        """Count one more for ``key`` unless it already holds ``limit``; True if counted
        (then call :meth:`give_back` once)."""
        n = self.held.get(key, 0)
        if n >= limit:
            return False
        self.held[key] = n + 1
        return True

    def give_back(self, key: str) -> None:
        n = self.held.get(key, 0) - 1
        if n > 0:
            self.held[key] = n
        else:
            self.held.pop(key, None)

    def count(self, key: str) -> int:
        return self.held.get(key, 0)

    def total(self) -> int:
        return sum(self.held.values())


@dataclass
class Waiting(Generic[T]):
    """Items (connections) that may be closed to make room, by key (client), oldest first.
    Every operation is O(1): a flood from many clients must not make each new
    connection cost more."""

    by_key: dict[str, dict[T, None]] = field(default_factory=dict)
    _by_count: dict[int, dict[str, None]] = field(default_factory=dict)  # keys holding n items (n >= 1)
    _most: int = 0  # the largest n with keys in _by_count
    _size: int = 0

    def _move(self, key: str, old: int, new: int) -> None:
        if old:
            keys = self._by_count[old]
            del keys[key]
            if not keys:
                del self._by_count[old]
        if new:
            self._by_count.setdefault(new, {})[key] = None
        if new > self._most:
            self._most = new
        while self._most and self._most not in self._by_count:
            self._most -= 1

    def add(self, key: str, item: T) -> None:
        items = self.by_key.setdefault(key, {})
        if item not in items:
            items[item] = None
            self._size += 1
            self._move(key, len(items) - 1, len(items))

    def discard(self, key: str, item: T) -> None:
        items = self.by_key.get(key)
        if items is None or item not in items:
            return
        del items[item]
        self._size -= 1
        self._move(key, len(items) + 1, len(items))
        if not items:
            del self.by_key[key]

    def victim(self, unless: str = "") -> T | None:
        """The oldest item of a key holding the most, other than ``unless``, taken out; None if
        there is none (or ``unless`` alone holds the most)."""
        if not self._most:
            return None
        keys = iter(self._by_count[self._most])
        key = next(keys)
        if key == unless:
            key = next(keys, "")
            if not key:
                return None
        items = self.by_key[key]
        item = next(iter(items))
        self.discard(key, item)
        return item

    def __len__(self) -> int:
        return self._size
