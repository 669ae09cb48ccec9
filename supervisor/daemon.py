"""`workspace-supervisor`: the trio entry point.

One nursery holds the services (session manager, control socket). Signals:

- SIGTERM / SIGINT: drain (:mod:`supervisor.drain`). With ``[daemon] sigterm = "stop"`` (the default,
  and always when running as PID 1) the pod stops admitting users, gives connected users up to
  ``drain_deadline`` to finish, stops every user gracefully within ``shutdown_deadline``, removes
  its registry entries and exits 0; a second signal ends the wait at once. With ``"detach"`` the
  daemon exits and leaves users running for the next daemon to re-adopt.
- SIGUSR2: detach (exit, users keep running) - for upgrades.
- SIGHUP: logged and ignored (configuration reload is not supported yet; restart to apply).
- SIGCHLD: exit statuses are collected; as PID 1 every orphaned zombie is reaped.

Under systemd (``$NOTIFY_SOCKET``, :mod:`supervisor.sdnotify`) it says READY=1 once serving, STATUS=
with the occupancy, WATCHDOG=1 from a trio task while the event loop runs, and STOPPING=1 (run as
the unit's main process) or RELOADING=1 (under ``workspace-supervisor init``, whose exit alone ends
the unit) when it drains or detaches.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import resource
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Callable, NoReturn

import trio

from supervisor import __version__, config as config_module, isolation, metrics, netstack
from supervisor.cgroups.detect import detect
from supervisor.config import Config
from supervisor.control import HANDLERS, ControlServer, pod_verbs, why_handler
from supervisor.drain import Drainer
from supervisor.errors import IsolationUnavailable, SupervisorError
from supervisor.sandbox import PodFiles, Sandbox
from supervisor.idle import Stage
from supervisor.init import become_subreaper
from supervisor.manager import SessionManager
from supervisor.probes import PodProbes, ProbeServer
from supervisor.publisher import Publisher
from supervisor.reclaim import IdleService
from supervisor.sdnotify import Notifier

log = logging.getLogger("supervisor")


async def wait_for_shutdown(default_mode: str, drainer: Drainer, drain_deadline: float, notifier: Notifier = Notifier(),
                            ready: tuple[str, ...] = ()) -> str:
    """Handle signals until the daemon should exit; return ``"drained"`` (a drain finished, begun
    by SIGTERM/SIGINT or by `workspacectl drain`) or ``"detach"`` (SIGUSR2, or SIGTERM/SIGINT with
    ``default_mode == "detach"``). ``ready`` is sent to systemd once the signals are caught: a
    SIGTERM right after READY=1 must drain, not kill."""
    outcome = "drained"
    async with trio.open_nursery() as nursery:

        async def until_drained() -> None:
            await drainer.finished.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(until_drained)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGHUP) as signals:
            notifier.send(*ready)
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    log.warning("SIGHUP: configuration reload is not supported yet; restart the daemon to apply changes")
                    continue
                if signum == signal.SIGUSR2 or default_mode == "detach":
                    log.info("%s received: shutting down (detach)", name)
                    notifier.send("RELOADING=1" if notifier.on_behalf_of else "STOPPING=1", "STATUS=detaching")
                    outcome = "detach"
                    nursery.cancel_scope.cancel()
                    break
                if drainer.phase == "serving":
                    log.info("%s received: draining (users get %gs to finish)", name, drain_deadline)
                    drainer.request(drain_deadline, by=name)
                    if notifier.on_behalf_of is None:
                        notifier.send("STOPPING=1")
                else:
                    log.info("%s received again: ending the drain's wait now", name)
                    drainer.request(0.0, by=name)
    return outcome


async def run_daemon(
    config: Config, *, notifier: Notifier = Notifier(), task_status: trio.TaskStatus[SessionManager] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run every service until a drain has finished or a detach signal arrives."""
    pid1 = os.getpid() == 1
    driver = detect(config.cgroups)
    metrics.configure(tiers=config.tiers, ready_timeout=config.ide.ready_timeout, version=__version__,
                      cgroup_version=driver.version)
    sandbox = build_sandbox(config)
    prepare_network = netstack.preparer(config) if sandbox.mechanisms.network else None
    manager = SessionManager(config, driver, sandbox=sandbox, prepare_network=prepare_network)
    publisher = Publisher(config, manager)
    drainer = Drainer(manager, publisher)
    probes = PodProbes(manager, publisher, drainer)
    probe_server = ProbeServer(config.probes.listen, probes)
    async with trio.open_nursery() as nursery:
        await nursery.start(probe_server.serve)  # /healthz answers at once, /startupz says 503 until started
        await nursery.start(manager.serve)
        await nursery.start(publisher.serve)
        await nursery.start(drainer.serve)
        manager.info_providers.update(registry=publisher.status, probes=lambda: probe_server.address, drain=drainer.status)
        idle = IdleService(manager, tick=config.idle.tick)
        # A drain does not wait for users the ladder has found idle (past its first rung).
        drainer.idle_users = lambda: [user for user, state in idle.states.items() if state.stage is not Stage.ACTIVE]
        await nursery.start(idle.serve)
        manager.user_info_providers.append(idle.describe)
        handlers = {**HANDLERS, "why": why_handler(idle), **pod_verbs(drainer, publisher)}
        await nursery.start(ControlServer(manager, config.control.socket, handlers).serve)
        if config.frontdoor_off is None:
            # Imported here: PyJWT and cryptography cost ~10 MiB of the daemon's memory, which a pod
            # whose front door is off (routing done elsewhere) need not pay.
            from supervisor.frontdoor import run_frontdoor

            await nursery.start(partial(run_frontdoor, config, manager, publisher=publisher, on_input=idle.note_input, wake=idle.wake,
                                        netns=sandbox.mechanisms.network))
        else:
            log.warning("front door disabled: %s", config.frontdoor_off)
            manager.info_providers["frontdoor"] = partial(dict, enabled=False, why=config.frontdoor_off)
        nursery.start_soon(trim_memory, config.daemon.usage_interval)
        probes.started = True
        log.info(
            "workspace-supervisor %s ready: pod %s, capacity %d, %s%s",
            __version__, config.pod_id, config.pod.capacity, driver.describe(), " (PID 1)" if pid1 else "",
        )

        def status() -> str:
            return status_line(drainer.phase, manager.pod.occupied(), config.pod.capacity)

        nursery.start_soon(tell_systemd, notifier, status)
        task_status.started(manager)
        outcome = await wait_for_shutdown("stop" if pid1 else config.daemon.sigterm, drainer, config.daemon.drain_deadline, notifier,
                                          ready=("READY=1", f"STATUS={status()}"))
        if outcome == "detach":
            log.info("detaching: %d user(s) keep running for the next daemon", manager.pod.occupied())
        nursery.cancel_scope.cancel()
    log.info("workspace-supervisor stopped")


def status_line(phase: str, occupied: int, capacity: int) -> str:
    """The one-line state `systemctl status` shows (STATUS=)."""
    if phase == "serving":
        return f"serving: {occupied}/{capacity} users"
    return f"draining ({phase}): {occupied} user(s) left"


async def tell_systemd(notifier: Notifier, status: Callable[[], str], every: float = 10.0) -> None:
    """Send STATUS= when it changes and WATCHDOG=1 every watchdog interval: a task of the event
    loop, so the pings stop (and systemd's watchdog fires) when the loop is stuck."""
    if notifier.address is None:
        return
    period = min(every, notifier.watchdog_interval or every)
    last = ""
    while True:
        lines = ["WATCHDOG=1"] if notifier.watchdog_interval else []
        if (now := status()) != last:
            lines.append(f"STATUS={now}")
            last = now
        notifier.send(*lines)
        await trio.sleep(period)


def build_sandbox(config: Config) -> Sandbox:
    """Check which ``[isolation]`` mechanisms this pod can give (raises IsolationUnavailable for a
    required one it cannot) and fix every user's view: the pod's identity files, the compiled
    system-call filter. With a PID namespace the daemon becomes a child subreaper: a user's
    namespace init is handed to it by the launcher that forked it."""
    decision = isolation.decide(config.isolation, isolation.probe(config))
    for warning in decision.warnings:
        log.warning("%s", warning)
    if decision.errors:
        raise IsolationUnavailable("; ".join(decision.errors))
    mechanisms = decision.mechanisms
    for name, in_force in vars(mechanisms).items():
        metrics.ISOLATION.labels(mechanism=name).set(1 if in_force else 0)
    if mechanisms.pid and (error := become_subreaper()):
        raise IsolationUnavailable(error)
    program = b""
    if mechanisms.seccomp:
        from supervisor import seccomp

        program = seccomp.compile_filter()
    daemon = config.daemon
    auth = config.auth
    keys = isolation.key_paths([auth.public_key_file, auth.jwks_file, auth.hs256_secret_file, auth.cookie_secret_file], config.workspace.root)
    hidden = isolation.hidden_paths([daemon.run_dir, daemon.state_dir, daemon.log_dir, config.control.socket.parent, *keys])
    log.info("isolation in force: %s", ", ".join(n for n, on in vars(mechanisms).items() if on) or "none")
    return Sandbox(
        mechanisms, hostname_template=config.isolation.hostname, init=(str(config.isolation.init), "--"),
        read_only_root=config.isolation.read_only_root, pod_files=PodFiles.read(), hidden=tuple(hidden),
        tenant_uids=range(config.users.uid_min, config.users.uid_max + 1), seccomp_program=program,
    )


async def trim_memory(interval: float) -> None:
    """Give the C heap's free pages back to the kernel every ``interval`` (glibc's ``malloc_trim``):
    without it, the peaks of a `status` of 500 users or a burst of starts stay in the daemon's RSS."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    while True:
        malloc_trim(0)
        await trio.sleep(interval)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workspace-supervisor", description="Run one confined IDE per user in this pod.")
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help in (("run", "run the daemon"), ("check-config", "validate the configuration and exit")):
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--config", type=Path, default=None,
                         help=f"TOML config file (default: $WSUP_CONFIG, else {config_module.DEFAULT_CONFIG_PATH} if it exists, else built-in defaults)")
        sub.add_argument("--socket", type=Path, default=None, help="control socket (overrides [control] socket)")
        if name == "check-config":
            sub.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                             help="the time the pod gives a stopping daemon (Kubernetes terminationGracePeriodSeconds, "
                                  "systemd TimeoutStopSec): drain_deadline + shutdown_deadline must fit it")
    commands.add_parser("config-reference", help="print every setting with its default and help")
    init = commands.add_parser("init", help="be a container's PID 1: run the daemon, restart it, reap orphans (supervisor.init)")
    init.add_argument("run_args", nargs=argparse.REMAINDER, metavar="[--] RUN ARGS", help="passed to `run`")
    return parser


def _config_path(arg: Path | None) -> Path | None:
    if arg is not None:
        return arg
    if os.environ.get("WSUP_CONFIG"):
        return Path(os.environ["WSUP_CONFIG"])
    return config_module.DEFAULT_CONFIG_PATH if config_module.DEFAULT_CONFIG_PATH.exists() else None


def main(argv: list[str] | None = None) -> NoReturn:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["init"]:
        # PID 1 lives as long as the pod: a fresh interpreter without trio and the config loaded.
        os.execv(sys.executable, [sys.executable, "-m", "supervisor.init", *argv[1:]])
    args = _parser().parse_args(argv)
    if args.command == "config-reference":
        print(config_module.describe())
        sys.exit(0)
    path = _config_path(args.config)
    environ = dict(os.environ)
    if args.socket is not None:
        environ["WSUP_CONTROL_SOCKET"] = str(args.socket)
    if args.command == "check-config":
        from supervisor import configcheck

        sys.exit(configcheck.run(path, environ, args.grace))
    try:
        config = config_module.load(path, environ)
    except SupervisorError as exc:
        print(f"workspace-supervisor: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(
        level=config.daemon.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log.info("configuration: %s", path or "built-in defaults")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):  # descriptors: what users' connections cannot use up
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    notifier = Notifier.from_environ(os.environ)  # taken out: nothing the daemon starts inherits it
    try:
        trio.run(partial(run_daemon, config, notifier=notifier))
    except SupervisorError as exc:
        log.error("%s", exc)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)


if __name__ == "__main__":
    main()
