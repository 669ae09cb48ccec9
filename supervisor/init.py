"""`workspace-supervisor init`: PID 1 of a workspace pod, with the daemon as its only child.

The kernel kills every process of a PID namespace when its init exits, so the init must outlive
the daemon: it reaps every orphan, forwards SIGTERM/SIGINT/SIGHUP to the daemon, restarts the daemon
with backoff when it exits on its own (users keep running and the new daemon re-adopts them), and
on SIGUSR2 has the daemon detach and starts the new one at once (an upgrade in place). It exits only
after SIGTERM/SIGINT, with 0 when the daemon drained and exited 0. Not PID 1 (a test, a host), it
becomes a child subreaper instead.

Stdlib only and small: it must not hold the daemon's memory (trio, the config) for the pod's life.
:class:`Machine` decides (pure, unit-tested); :func:`run` carries the decisions out.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import NoReturn, Union

PR_SET_CHILD_SUBREAPER = 36
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Every signal the init waits for (blocked, taken with sigtimedwait): as PID 1 an unblocked signal
#: without a handler would be dropped by the kernel.
WATCHED = frozenset({signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2})


@dataclass(frozen=True)
class Backoff:
    """Delay before restarting a daemon that exited on its own: ``initial`` doubling up to
    ``maximum``, back to ``initial`` once a daemon has run ``reset_after`` seconds."""

    initial: float = 0.5
    maximum: float = 30.0
    reset_after: float = 60.0


@dataclass(frozen=True)
class Start:
    """Start a daemon now."""

    why: str


@dataclass(frozen=True)
class Forward:
    """Send ``signum`` to the running daemon."""

    signum: int
    why: str


@dataclass(frozen=True)
class Exit:
    """Exit the init with ``code`` (as PID 1 this ends the pod's PID namespace)."""

    code: int
    why: str


@dataclass(frozen=True)
class Say:
    """Only log."""

    why: str


Action = Union[Start, Forward, Exit, Say]


def describe(returncode: int) -> str:
    """A daemon's end in words; ``returncode`` as subprocess gives it (negative: killed by a signal)."""
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def exit_code(returncode: int) -> int:
    """The container's exit code for a daemon's returncode (128 + N for signal N, as shells do)."""
    return returncode if returncode >= 0 else 128 - returncode


@dataclass
class Machine:
    """What the init does on each event; times are monotonic seconds passed in by the caller."""

    backoff: Backoff = field(default_factory=Backoff)
    running: bool = False
    #: The signal that asked the pod to stop (SIGTERM/SIGINT), once one has.
    stopping: int | None = None
    #: SIGUSR2 was forwarded: the daemon's next exit is the detach of an upgrade.
    upgrading: bool = False
    started_at: float = 0.0
    restart_at: float | None = None
    delay: float = -1.0

    def __post_init__(self) -> None:
        if self.delay < 0:
            self.delay = self.backoff.initial

    def begin(self) -> list[Action]:
        return [Start("starting the daemon")]

    def started(self, now: float) -> None:
        self.running, self.started_at, self.restart_at = True, now, None

    def timeout(self, now: float) -> float | None:
        """Seconds until :meth:`tick` has something to do, None when only a signal can matter."""
        return None if self.restart_at is None else max(0.0, self.restart_at - now)

    def tick(self, now: float) -> list[Action]:
        if self.running or self.restart_at is None or now < self.restart_at:
            return []
        self.restart_at = None
        return [Start("backoff over: restarting the daemon")]

    def exited(self, returncode: int, now: float) -> list[Action]:
        """The daemon has exited (or could not be started: pass 127)."""
        self.running = False
        what = f"daemon {describe(returncode)}"
        if self.stopping is not None:
            name = signal.Signals(self.stopping).name
            if returncode == 0 and not self.upgrading:
                return [Exit(0, f"{what} after {name}: drained, exiting 0")]
            why = "it was detaching for an upgrade, users were not drained" if self.upgrading else "the drain was not clean"
            code = exit_code(returncode) or 1
            return [Exit(code, f"{what} after {name}: {why}; exiting {code}")]
        if self.upgrading:
            self.upgrading, self.delay = False, self.backoff.initial
            return [Start(f"{what} for the upgrade: starting the new daemon now")]
        ran = now - self.started_at
        if ran >= self.backoff.reset_after:
            self.delay = self.backoff.initial
        self.restart_at = now + self.delay
        why = f"{what} after {ran:.1f}s: restarting it in {self.delay:g}s (users keep running)"
        self.delay = min(self.delay * 2, self.backoff.maximum)
        return [Say(why)]

    def signalled(self, signum: int) -> list[Action]:
        name = signal.Signals(signum).name
        if signum in STOP_SIGNALS:
            first = self.stopping is None
            if first:
                self.stopping = signum
            if not self.running:
                return [Exit(1, f"{name} while the daemon is down: nobody can drain the users; exiting 1")]
            return [Forward(signum, "the pod is going away: the daemon drains" if first else "again: the daemon ends the drain's wait")]
        if self.stopping is not None:
            return [Say(f"{name} ignored: the pod is stopping")]
        if signum == signal.SIGUSR2:
            if not self.running:
                self.restart_at = None
                return [Start(f"{name} while the daemon is down: starting it now")]
            self.upgrading = True
            return [Forward(signum, "upgrade: the daemon detaches (users keep running), then the new one starts")]
        if signum == signal.SIGHUP and self.running:
            return [Forward(signum, "passed on")]
        if signum == signal.SIGUSR1:
            return [Say(f"{name} ignored: re-executing the init is not supported; restart the pod to upgrade the init itself")]
        return [Say(f"{name} ignored: the daemon is not running")]


def log(message: str) -> None:
    print(f"init: {message}", file=sys.stderr, flush=True)


def reap() -> list[tuple[int, int]]:
    """Reap every exited child (the daemon, orphans); never blocks. Returns (pid, returncode)."""
    found: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return found
        if pid == 0:
            return found
        found.append((pid, os.waitstatus_to_exitcode(status)))


def spawn(argv: list[str], env: dict[str, str]) -> int:
    """Start the daemon in its own session with the signals the init blocks unblocked and default."""
    return os.posix_spawn(argv[0], argv, env, setsid=True, setsigmask=(), setsigdef=WATCHED)


def become_subreaper() -> str | None:
    """Make this process a child subreaper (orphans of its descendants come to it); the error, or None."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        return f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}"
    return None


def run(daemon_args: list[str], backoff: Backoff = Backoff()) -> NoReturn:
    """Be the init until the pod stops; ``daemon_args`` go to ``workspace-supervisor run``."""
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
    if os.getpid() != 1 and (error := become_subreaper()):
        log(f"{error}; orphans go to the host's init")
    argv = [sys.executable, "-m", "supervisor.daemon", "run", *daemon_args]
    # Under the init SIGTERM always means the pod is going away: never a detach.
    env = {**os.environ, "WSUP_DAEMON_SIGTERM": "stop"}
    if "NOTIFY_SOCKET" in env:  # under systemd the init is the main process: the daemon notifies for it
        env["MAINPID"] = str(os.getpid())
    machine = Machine(backoff)
    daemon: int | None = None
    pending = machine.begin()
    while True:
        while pending:
            action = pending.pop(0)
            log(action.why)
            if isinstance(action, Exit):
                sys.exit(action.code)
            if isinstance(action, Forward) and daemon is not None:
                os.kill(daemon, action.signum)
            elif isinstance(action, Start):
                try:
                    daemon = spawn(argv, env)
                except OSError as exc:
                    log(f"cannot start {argv[0]}: {exc}")
                    pending += machine.exited(127, time.monotonic())
                    continue
                machine.started(time.monotonic())
                log(f"daemon started, pid {daemon}")
        timeout = machine.timeout(time.monotonic())
        info = signal.sigtimedwait(WATCHED, 3600.0 if timeout is None else timeout)
        if info is not None and info.si_signo != signal.SIGCHLD:
            pending += machine.signalled(info.si_signo)
        for pid, returncode in reap():
            if pid == daemon:
                daemon = None
                pending += machine.exited(returncode, time.monotonic())
        pending += machine.tick(time.monotonic())


def main(argv: list[str] | None = None) -> NoReturn:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):
        print("usage: workspace-supervisor init [--] [RUN ARGS...]\n\n" + (__doc__ or "").split("\n\n")[1])
        sys.exit(0)
    run(args[1:] if args[:1] == ["--"] else args)


if __name__ == "__main__":
    main()
