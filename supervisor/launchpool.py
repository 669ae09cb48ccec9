"""A pool of launcher processes that already sit in spare cgroups: starts without the kernel's attach.

Joining a process to a cgroup (writing ``cgroup.procs``) waits for an RCU grace period, 7-13 ms
(``integration/bench/README.md``); on cgroup v1 there is no way to create a process inside a group.
So the pool keeps ``[ide] launcher_pool`` root processes ready (:mod:`supervisor.launcher_child`),
each of which joined a spare group (``<subtree>/.spare-<id>`` in every hierarchy) when it was
spawned, in the background. A start (:meth:`LauncherPool.launch`) renames a ready launcher's spare
group to the user's group (:class:`~supervisor.cgroups.base.SpareGroups`), writes the tier's limits
and only then sends the launch message; the launcher drops to the user's uid/gid (no supplementary
groups, ``no_new_privs``) and execs the IDE, which keeps the launcher's pid. The guarantees of
:func:`supervisor.launch.spawn` hold: the process is inside the user's group, under its limits,
before any user code runs.

:meth:`~LauncherPool.launch` returns None when no launcher is ready or the spare could not be given
to the user; nothing has changed then and the caller starts the IDE the ordinary way. Launchers are
the daemon's children: :meth:`LauncherPool.owns` tells the daemon's reaper to keep their exit
statuses (a launcher that became an IDE is a user's main process).

With a user's own view (:mod:`supervisor.sandbox`) every launcher enters its namespaces when it
starts and the pool's ``prepare_network`` makes its network usable before it counts as ready, so
a pooled start pays none of it. Then every start goes through a launcher: one from the pool, or
:meth:`LauncherPool.launch_fresh`, started in the user's own group (no pool: cgroup v2). With a
PID namespace the launcher forks the namespace's init and answers ``X<pid>``; the daemon, a child
subreaper, inherits the init when the launcher exits and keeps its exit status from then on
(:meth:`~LauncherPool.owns` until :meth:`~LauncherPool.settled`).
"""

from __future__ import annotations

import array
import logging
import marshal
import os
import secrets
import select
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Protocol

import trio

from supervisor import launch
from supervisor.launch import LaunchSpec
from supervisor.cgroups.base import Limits, SpareGroups
from supervisor.errors import CgroupError, LaunchError
from supervisor.launcher_child import CLONE_NEWNET

log = logging.getLogger(__name__)

CHILD = Path(__file__).with_name("launcher_child.py")
LAUNCHER_FD = 4  # the launcher's end of its socket, in the launcher (fd 3 is for the IDE's socket)


#: Makes the new network namespace of the launcher ``pid`` usable (supervisor.netstack), charging
#: what it starts to the groups of ``procs_files``; raises LaunchError.
PrepareNetwork = Callable[[int, list[str]], Awaitable[None]]


class PoolDriver(SpareGroups, Protocol):
    """What the pool needs of a cgroup driver: spare groups, and set_limits() for the user's limits."""

    def set_limits(self, user: str, limits: Limits) -> None: ...


@dataclass
class Launcher:
    """One ready launcher: its spare group, pid, pidfd and the daemon's end of its socket."""

    spare: str | None  # None: started straight in a user's groups (launch_fresh)
    pid: int
    pidfd: int
    sock: socket.socket


class LauncherPool:
    """Keeps ``size`` launchers ready; refills in the background after each :meth:`launch`."""

    spawn_timeout = 10.0  # a launcher's own start-up and cgroup attach
    exec_timeout = 10.0  # launch message to exec
    retry_initial = 1.0  # back-off after a launcher failed to come up
    retry_max = 60.0
    settle_max = 2.0  # longest a refill waits for the starts in flight to become ready
    settle_pause = 0.005

    def __init__(
        self, driver: PoolDriver | None, size: int, *, reap: Callable[[int], object], python: str = sys.executable,
        clone_flags: int = 0, prepare_network: PrepareNetwork | None = None,
    ) -> None:
        self.driver = driver  # None: no spare groups (cgroup v2), every launch is launch_fresh()
        self.size = size if driver is not None else 0
        self.reap = reap  # the daemon reaper's pop(pid): collects a dead launcher's exit status
        self.python = python
        #: The namespaces every launcher enters when it starts (supervisor.sandbox), and what makes
        #: a new network namespace usable (supervisor.netstack), given a pid in it and the cgroups.
        self.clone_flags = clone_flags
        self.prepare_network = prepare_network
        self.ready: list[Launcher] = []
        self._pids: set[int] = set()  # launchers alive (or not yet reaped) and not handed over
        self._handed: set[int] = set()  # PID namespace inits launched and not yet settled()
        self._wake = trio.Event()
        self._in_flight: set[int] = set()  # pids launched and not yet ready (see settled())
        self._settled = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.launched = 0
        self.fallbacks = 0

    def owns(self, pid: int) -> bool:
        return pid in self._pids or pid in self._handed

    def settled(self, pid: int) -> None:
        """The start of ``pid`` is over (ready, failed or gone): refills may run again."""
        self._handed.discard(pid)
        if pid in self._in_flight:
            self._in_flight.discard(pid)
            if not self._in_flight:
                self._settled.set()
                self._settled = trio.Event()

    def info(self) -> dict[str, int]:
        return {"size": self.size, "ready": len(self.ready), "launched": self.launched, "fallbacks": self.fallbacks}

    # ---- service -------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[LauncherPool] = trio.TASK_STATUS_IGNORED) -> None:
        """Remove spare groups a killed daemon left, then keep the pool full until cancelled."""
        for spare in self.driver.spares() if self.driver is not None else []:
            log.info("launcher pool: removing leftover spare group %s", spare)
            self._remove_spare(spare)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self)
                await self._fill_loop()
        finally:
            self._nursery = None
            for launcher in self.ready:
                self._kill_and_remove(launcher)
            self.ready.clear()

    async def _fill_loop(self) -> None:
        delay = self.retry_initial
        while True:
            while len(self.ready) < self.size:
                # A launcher's own start-up (~20 ms of CPU) would compete with the IDEs starting
                # now, and with the daemon answering their readiness: wait until they are up.
                if self._in_flight:
                    with trio.move_on_after(self.settle_max):
                        await self._settled.wait()
                    await trio.sleep(self.settle_pause)  # the readiness answer goes out first
                launcher = await self._spawn_one()
                if launcher is None:
                    await trio.sleep(delay)
                    delay = min(delay * 2, self.retry_max)
                    continue
                delay = self.retry_initial
                self.ready.append(launcher)
            await self._wake.wait()
            self._wake = trio.Event()

    async def _spawn_one(self) -> Launcher | None:
        assert self.driver is not None
        spare = secrets.token_hex(6)
        try:
            procs_files = self.driver.create_spare(spare)
        except CgroupError as exc:
            log.warning("launcher pool: cannot create a spare cgroup: %s", exc)
            return None
        try:
            return await self._start_launcher(spare, procs_files)
        except LaunchError as exc:
            log.warning("launcher pool: %s", exc)
            return None

    async def _start_launcher(self, spare: str | None, procs_files: list[str]) -> Launcher:
        """A launcher inside ``procs_files``' groups, in its namespaces (their network made usable),
        ready for its launch message; raises LaunchError (nothing left running, the spare removed)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid, pidfd = self._posix_spawn(theirs.fileno(), procs_files)
        except OSError as exc:
            ours.close()
            if spare is not None:
                self._remove_spare(spare)
            raise LaunchError(f"cannot spawn a launcher ({self.python} {CHILD}): {exc}") from exc
        finally:
            theirs.close()
        ours.setblocking(False)
        launcher = Launcher(spare, pid, pidfd, ours)
        answer = b""
        try:
            with trio.move_on_after(self.spawn_timeout):
                answer = await _receive(ours)
            if answer == b"R" and self.prepare_network is not None and self.clone_flags & CLONE_NEWNET:
                await self.prepare_network(pid, procs_files)
        except BaseException:  # cancelled (daemon shutting down), or no network: leave nothing behind
            self._kill_and_remove(launcher)
            raise
        if answer == b"R":
            return launcher
        why = answer[1:].decode("utf-8", "replace") if answer.startswith(b"E") else "no answer" if not answer else repr(answer)
        self._discard(launcher)
        raise LaunchError(f"a launcher did not come up: {why}")

    def _posix_spawn(self, fd: int, procs_files: list[str]) -> tuple[int, int]:
        """Start a launcher with its socket as fd 4 (LAUNCHER_FD) and /dev/null as stdio.

        posix_spawn (a vfork in glibc) blocks the event loop ~0.1 ms; subprocess.Popen costs more,
        and in a worker thread it holds the GIL for up to a switch interval (5 ms) at a time. The
        launcher closes every other inherited descriptor itself.
        """
        pid = os.posix_spawn(
            self.python, [self.python, "-I", "-S", str(CHILD), str(LAUNCHER_FD), str(self.clone_flags), *procs_files],
            {"PATH": launch.BASE_PATH, "LANG": "C.UTF-8"},
            file_actions=[
                (os.POSIX_SPAWN_DUP2, fd, LAUNCHER_FD),
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDWR, 0),
                (os.POSIX_SPAWN_DUP2, 0, 1),
                (os.POSIX_SPAWN_DUP2, 0, 2),
            ],
            setsid=True,
        )
        self._pids.add(pid)
        return pid, os.pidfd_open(pid)

    # ---- launching -----------------------------------------------------------------------------

    async def launch(self, spec: LaunchSpec, limits: Limits, listen_fd: int) -> int | None:
        """Start ``spec``'s IDE from a ready launcher, with ``listen_fd`` at its fd 3 (and
        ``LISTEN_PID``), and return its pid; None (nothing changed, start it the ordinary way) when
        no launcher is ready or its spare group cannot become the user's. The caller closes
        ``listen_fd``.

        Raises CgroupError when the limits cannot be written and LaunchError when the exec fails
        (the user's group then exists and holds at most the dying launcher: the caller's failure
        handling kills and removes it, as after a failed ordinary start).
        """
        if not self.ready:
            self.fallbacks += 1
            log.info("user=%s launcher pool empty; starting the ordinary way", spec.user)
            return None
        launcher = self.ready.pop(0)
        self._in_flight.add(launcher.pid)  # before the refill wakes: it waits for this start
        self._wake.set()
        try:
            return await self._launch(launcher, spec, limits, listen_fd)
        finally:
            if launcher.pid in self._pids:  # not handed over: nothing to wait for
                self.settled(launcher.pid)

    async def launch_fresh(self, spec: LaunchSpec, listen_fd: int) -> int:
        """Start ``spec``'s IDE through a launcher started now, straight in the user's groups
        (``spec.procs_files``, already under the user's limits): the path when no launcher is
        ready, or there are no spare groups (cgroup v2), and the user's tree gets namespaces.
        Raises LaunchError (nothing left running) like :meth:`launch`."""
        launcher = await self._start_launcher(None, spec.procs_files)
        self._in_flight.add(launcher.pid)
        try:
            return await self._exec(launcher, spec, listen_fd)
        finally:
            if launcher.pid in self._pids:
                self.settled(launcher.pid)

    async def _launch(self, launcher: Launcher, spec: LaunchSpec, limits: Limits, listen_fd: int) -> int | None:
        assert self.driver is not None and launcher.spare is not None
        try:
            self.driver.assign_spare(launcher.spare, spec.user)
        except CgroupError as exc:
            self.fallbacks += 1
            log.warning("user=%s launcher pool: %s; starting the ordinary way", spec.user, exc)
            self._discard(launcher)
            return None
        # The launcher is in the user's group now: on any failure it must not run on.
        try:
            self.driver.set_limits(spec.user, limits)
            self._send(launcher, spec, listen_fd)
        except CgroupError:
            self._discard(launcher, remove_spare=False)
            raise
        except OSError as exc:
            self._discard(launcher, remove_spare=False)
            if isinstance(exc, (BrokenPipeError, ConnectionError)):
                self.fallbacks += 1
                log.warning("user=%s launcher pool: the launcher went away (%s); starting the ordinary way", spec.user, exc)
                return None
            raise LaunchError(f"cannot start the IDE for {spec.user}: {exc}") from exc
        return await self._exec(launcher, spec, listen_fd, sent=True)

    async def _exec(self, launcher: Launcher, spec: LaunchSpec, listen_fd: int, *, sent: bool = False) -> int:
        """Send the launch message (unless ``sent``) and wait for the outcome: end of file (the
        launcher exec'd: it is the IDE), ``X<pid>`` (it forked the PID namespace's init ``pid``,
        which the daemon inherits as the launcher exits) or ``E<why>``."""
        if not sent:
            try:
                self._send(launcher, spec, listen_fd)
            except OSError as exc:
                self._discard(launcher, remove_spare=False)
                raise LaunchError(f"cannot start the IDE for {spec.user}: {exc}") from exc
        answer: bytes | None = None
        with trio.move_on_after(self.exec_timeout):
            answer = await _receive(launcher.sock)
        if answer is None:
            self._discard(launcher, remove_spare=False)
            raise LaunchError(f"cannot start the IDE for {spec.user}: the launcher did not exec within {self.exec_timeout:g} s")
        if answer.startswith(b"X") and answer[1:].isdigit():
            pid = int(answer[1:])
            # The launcher waits for us to close its socket before it exits; until then nobody
            # can reap the init, and from then on its exit status is kept for the daemon.
            self._handed.add(pid)
            self._in_flight.add(pid)  # the daemon's settled(pid) names the init from now on
            self._discard(launcher, remove_spare=False)
            self.launched += 1
            return pid
        if answer:
            self._discard(launcher, remove_spare=False)
            why = answer[1:].decode("utf-8", "replace") if answer.startswith(b"E") else repr(answer)
            raise LaunchError(f"cannot start the IDE for {spec.user}: {why}")
        # End of file: the close-on-exec socket closed, the launcher is the IDE now.
        launcher.sock.close()
        os.close(launcher.pidfd)
        self._pids.discard(launcher.pid)
        self.launched += 1
        return launcher.pid

    @staticmethod
    def _send(launcher: Launcher, spec: LaunchSpec, listen_fd: int) -> None:
        env = dict(spec.env)
        if spec.view is None or not spec.view["pid"]:
            env["LISTEN_PID"] = str(launcher.pid)  # the launcher's pid becomes the IDE's
        message = marshal.dumps((
            [os.fsencode(a) for a in spec.argv],
            [os.fsencode(f"{k}={v}") for k, v in env.items()],
            os.fsencode(spec.cwd), spec.uid, spec.gid, spec.view,
        ))
        log_fd = launch.open_log(spec.log_path)
        try:
            launcher.sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [log_fd, listen_fd]))])
        finally:
            os.close(log_fd)

    # ---- discarding ----------------------------------------------------------------------------

    def _discard(self, launcher: Launcher, *, remove_spare: bool = True) -> None:
        """Kill a launcher; reap it (and remove its spare group) once it is gone, in the background."""
        launcher.sock.close()
        pidfd_kill(launcher.pidfd)
        if self._nursery is None:
            self._finish(launcher, remove_spare, wait=True)
        else:
            self._nursery.start_soon(self._finish_async, launcher, remove_spare)

    async def _finish_async(self, launcher: Launcher, remove_spare: bool) -> None:
        with trio.move_on_after(self.spawn_timeout):
            await trio.lowlevel.wait_readable(launcher.pidfd)
        self._finish(launcher, remove_spare, wait=False)

    def _finish(self, launcher: Launcher, remove_spare: bool, *, wait: bool) -> None:
        if wait:
            _wait_pidfd(launcher.pidfd, self.spawn_timeout)
        os.close(launcher.pidfd)
        self.reap(launcher.pid)
        self._pids.discard(launcher.pid)
        if remove_spare and launcher.spare is not None:
            self._remove_spare(launcher.spare)

    def _kill_and_remove(self, launcher: Launcher) -> None:
        launcher.sock.close()
        pidfd_kill(launcher.pidfd)
        self._finish(launcher, True, wait=True)

    def _remove_spare(self, spare: str) -> None:
        if self.driver is None:
            return
        try:
            self.driver.remove_spare(spare)
        except CgroupError as exc:
            log.error("launcher pool: cannot remove spare group %s: %s", spare, exc)


async def _receive(sock: socket.socket) -> bytes:
    """The next message from a launcher; b"" at end of file (it exec'd, or exited)."""
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return sock.recv(4096)
        except BlockingIOError:
            continue
        except ConnectionError:
            return b""


def pidfd_kill(pidfd: int) -> None:
    """SIGKILL through a pidfd; nothing if the process is gone."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_pidfd(pidfd: int, timeout: float) -> None:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.poll(timeout * 1000)
