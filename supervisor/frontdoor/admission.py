"""Admission decisions of the front door. Pure logic: no I/O, no clock reads (``now`` is passed in).

**Live browser sessions (409).** A browser session is the token's ``sid`` (one login). A sid is
*live* for its user while at least one request or WebSocket of it is open through the front door,
and for ``linger`` seconds after the last one ended (a page reload, or the moment between the
login redirect and the page's WebSocket, must not free the slot; an open Theia tab keeps its
WebSocket open, so it stays live for as long as it is open). Cookies alone do not make a session
live: a cookie outlives a closed tab, and counting it would lock a user out until the token
expired. A request from a sid that is already live is always admitted; a request from a new sid
is refused (409) when the user already has the tier's ``sessions`` live sids.

**Cold starts (429).** At most ``limit`` users may be in a cold start begun by the front door at
once. A request for a user whose cold start is already in flight joins it rather than starting
another; a request that would begin one more is refused (429 with Retry-After).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Sid:
    open: int = 0
    last_seen: float = 0.0


@dataclass
class SessionTable:
    """Which sids of which users are live (see the module docstring)."""

    linger: float
    _users: dict[str, dict[str, _Sid]] = field(default_factory=dict)

    def live(self, user: str, now: float) -> set[str]:
        sids = self._users.get(user, {})
        return {sid for sid, s in sids.items() if s.open > 0 or now - s.last_seen < self.linger}

    def admits(self, user: str, sid: str, limit: int, now: float) -> bool:
        """True if ``sid`` may have a connection now (already live, or a free session slot)."""
        live = self.live(user, now)
        return sid in live or len(live) < limit

    def open(self, user: str, sid: str, now: float) -> bool:
        """Count a connection of ``sid``; True if the sid was not live before (a new session)."""
        new = sid not in self._users.get(user, {})
        entry = self._users.setdefault(user, {}).setdefault(sid, _Sid())
        entry.open += 1
        entry.last_seen = now
        return new

    def close(self, user: str, sid: str, now: float) -> None:
        entry = self._users.get(user, {}).get(sid)
        if entry is None:
            return
        entry.open = max(0, entry.open - 1)
        entry.last_seen = now

    def touch(self, user: str, sid: str, now: float) -> bool:
        """Mark ``sid`` seen now (e.g. when its cookie is issued) without opening a connection;
        True if the sid was not live before."""
        new = sid not in self._users.get(user, {})
        self._users.setdefault(user, {}).setdefault(sid, _Sid()).last_seen = now
        return new

    def prune(self, now: float) -> list[tuple[str, str]]:
        """Forget sids that are no longer live; return them as (user, sid) (sessions that ended)."""
        ended: list[tuple[str, str]] = []
        for user in list(self._users):
            sids = self._users[user]
            for sid in [sid for sid, s in sids.items() if s.open == 0 and now - s.last_seen >= self.linger]:
                del sids[sid]
                ended.append((user, sid))
            if not sids:
                del self._users[user]
        return ended

    def total(self, now: float) -> int:
        """Live sessions on the pod."""
        return sum(len(self.live(user, now)) for user in self._users)

    def counts(self, now: float) -> dict[str, int]:
        """Live sids per user (for status and tests)."""
        return {user: n for user in self._users if (n := len(self.live(user, now)))}


@dataclass
class ColdStarts:
    """Cold starts in flight, bounded by ``limit`` (see the module docstring)."""

    limit: int
    in_flight: set[str] = field(default_factory=set)

    def begin(self, user: str) -> str:
        """``"join"`` (one is in flight for this user), ``"begin"`` (counted now; call :meth:`end`)
        or ``"refuse"`` (too many in flight)."""
        if user in self.in_flight:
            return "join"
        if len(self.in_flight) >= self.limit:
            return "refuse"
        self.in_flight.add(user)
        return "begin"

    def end(self, user: str) -> None:
        self.in_flight.discard(user)
