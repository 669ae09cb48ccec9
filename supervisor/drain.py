"""Drain: hand the pod's users over before the pod goes away, losing nothing.

Started by SIGTERM (``[daemon] drain_deadline``) or ``workspacectl drain [--deadline D]``:

1. **mark**: ``Pod.draining`` is set, so every new start is refused with ``Draining`` (the front
   door answers 503 with Retry-After), ``/admitting`` answers 503 ``draining`` (``/readyz`` stays 200), and the registry is
   told at once (an immediate heartbeat with ``draining = true``: routers stop placing users here);
2. **wait**: connected users may finish until none of them is active or the deadline passes.
   Which RUNNING users are *idle* comes from the ``idle_users`` hook - in the daemon, the idle
   ladder: users past its first rung (no input, file change or CPU for ``[idle] lsp_pause_after``);
   every other RUNNING user is active, as is every STARTING one (a browser is waiting for it).
   Without the hook every RUNNING user counts as active. With nobody active the wait ends at once;
3. **stop**: every IDE is stopped gracefully at once (SIGTERM first, so Theia flushes what it
   holds, then the whole tree is killed after ``[ide] stop_grace``; whatever is left when
   ``[daemon] shutdown_deadline`` passes is killed);
4. **withdraw**: the pod's registry record, sessions and reservations are removed, and the daemon
   exits 0.

A second request moves the deadline earlier (never later); a second SIGTERM ends the wait at once.
Files users saved are on the workspace volume and are never touched by a drain.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Collection

import trio

from supervisor.sessions import State

if TYPE_CHECKING:
    from supervisor.manager import SessionManager
    from supervisor.publisher import Publisher

log = logging.getLogger(__name__)

#: How often the wait phase re-reads the users' activity.
POLL_INTERVAL = 0.5


class Drainer:
    """Carries out one drain for the daemon (see the module docstring). Phases:
    ``serving`` -> ``waiting`` -> ``stopping`` -> ``done``."""

    def __init__(
        self,
        manager: SessionManager,
        publisher: Publisher,
        *,
        idle_users: Callable[[], Collection[str]] | None = None,
    ) -> None:
        self.manager = manager
        self.publisher = publisher
        #: Hook: ids of the users known to be idle now (the idle ladder). None: not tracked, so
        #: every RUNNING user is presumed active until the deadline. Unknown users count as active.
        self.idle_users = idle_users
        self.phase = "serving"
        self.requested_by = ""
        self.deadline: float | None = None  # trio clock
        self.ended_wait = ""  # why the wait ended: "no active users" or "deadline"
        self.finished = trio.Event()
        self._requested = trio.Event()
        self._changed = trio.Event()

    # -- requests (from the event loop: a signal or the control socket) -------------------------

    def request(self, deadline: float, by: str) -> dict[str, Any]:
        """Start draining with ``deadline`` seconds for users to finish, or move a running drain's
        deadline earlier. Returns :meth:`status`."""
        now = trio.current_time()
        if self.phase == "serving":
            self.phase = "waiting"
            self.requested_by = by
            self.deadline = now + deadline
            self.manager.pod.draining = True
            self.publisher.wake()
            log.info("drain started by %s: admitting no new users; %d user(s) get %gs to finish",
                     by, self.manager.pod.occupied(), deadline)
            self._requested.set()
        elif self.phase == "waiting" and self.deadline is not None and now + deadline < self.deadline:
            self.deadline = now + deadline
            log.info("drain deadline moved by %s: users are stopped in %gs", by, deadline)
            self._changed.set()
        return self.status()

    def status(self) -> dict[str, Any]:
        remaining = None
        if self.phase == "waiting" and self.deadline is not None:
            remaining = round(max(0.0, self.deadline - trio.current_time()), 3)
        return {
            "phase": self.phase,
            "draining": self.phase != "serving",
            "requested_by": self.requested_by,
            "deadline_in_s": remaining,
            "active_users": len(self.active_users()) if self.phase != "serving" else None,
            "activity_tracking": self.idle_users is not None,
            "ended_wait": self.ended_wait,
        }

    def active_users(self) -> list[str]:
        """Users the wait phase still waits for: STARTING ones, and RUNNING ones not known idle."""
        users = self.manager.pod.users
        running = {u for u, s in users.items() if s.state is State.RUNNING}
        if self.idle_users is not None:
            running -= set(self.idle_users())
        return sorted(running | {u for u, s in users.items() if s.state is State.STARTING})

    # -- the service -----------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wait for a drain request, carry it out, then set :attr:`finished`."""
        task_status.started()
        await self._requested.wait()
        await self._wait_for_users()
        self.phase = "stopping"
        live = self.manager.pod.occupied()
        log.info("drain: %s; stopping %d user(s) gracefully", self.ended_wait, live)
        await self.manager.stop_all(self.manager.config.daemon.shutdown_deadline)
        await self.publisher.withdraw()
        self.phase = "done"
        log.info("drain finished: every user stopped, registry entries removed")
        self.finished.set()

    async def _wait_for_users(self) -> None:
        assert self.deadline is not None
        while True:
            self._changed = trio.Event()
            if not self.active_users():
                self.ended_wait = "no active users"
                return
            if trio.current_time() >= self.deadline:
                self.ended_wait = "deadline passed"
                return
            with trio.move_on_at(min(self.deadline, trio.current_time() + POLL_INTERVAL)):
                await self._changed.wait()
