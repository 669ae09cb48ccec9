"""Starting a user's process tree: cgroup joined before exec, uid/gid drop, clean environment.

:func:`build_spec` is pure (template expansion, environment); :func:`spawn` forks. In the child,
between fork and exec, the process first writes ``0`` into every ``cgroup.procs`` of the user's
group (file descriptors opened by the parent), so it is inside the user's cgroup before it runs a
single instruction of user code and no fork can escape. Then it sets the IDE's resource limits,
drops supplementary groups, gid and uid, joins a fresh session keyring and sets ``no_new_privs``
(the limits and the keyring: :mod:`supervisor.launcher_child`); only then does it exec the IDE,
with the listening socket the daemon made for it (:mod:`supervisor.idesocket`) at fd 3.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from supervisor import logfiles
from supervisor.errors import LaunchError
from supervisor.launcher_child import join_fresh_session_keyring, set_ide_rlimits
from supervisor.idesocket import LISTEN_ENV, LISTEN_FD

PR_SET_NO_NEW_PRIVS = 38
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_PLACEHOLDER = re.compile(r"\{(user|workspace|home)\}")

#: The environment an IDE gets besides HOME/USER/SHELL and the configured extras. Nothing of the
#: daemon's own environment is passed on.
BASE_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one user's IDE."""

    user: str
    uid: int
    gid: int
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    procs_files: list[str]
    log_path: Path
    #: The user's own view (namespaces, mounts, init, system-call filter) as
    #: :func:`supervisor.sandbox.view` plans it for the launcher; None: the pod's view.
    view: dict[str, Any] | None = None


def expand_argv(template: list[str], values: Mapping[str, str]) -> list[str]:
    """Replace ``{user}``, ``{workspace}``, ``{home}`` in every argument."""
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in template]


def build_spec(
    *,
    user: str,
    uid: int,
    gid: int,
    command: list[str],
    extra_env: Mapping[str, str],
    shell: str,
    workspace: Path,
    home: Path,
    procs_files: list[str],
    log_path: Path,
    view: dict[str, Any] | None = None,
) -> LaunchSpec:
    values = {"user": user, "workspace": str(workspace), "home": str(home)}
    env = {
        "HOME": str(home),
        "USER": user,
        "LOGNAME": user,
        "SHELL": shell,
        "PATH": BASE_PATH,
        "LANG": "C.UTF-8",
        **LISTEN_ENV,
    }
    env.update({k: _PLACEHOLDER.sub(lambda m: values[m.group(1)], v) for k, v in extra_env.items()})
    return LaunchSpec(
        user=user, uid=uid, gid=gid, argv=expand_argv(command, values), env=env,
        cwd=workspace, procs_files=list(procs_files), log_path=log_path, view=view,
    )


def _child_setup(procs_fds: list[int], uid: int, gid: int) -> None:  # pragma: no cover - runs in the child
    """Runs in the forked child before exec. Keep it to raw system calls."""
    for fd in procs_fds:
        os.write(fd, b"0")
    set_ide_rlimits()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    join_fresh_session_keyring(_libc)
    if _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def open_log(path: Path) -> int:
    """Open (create) a user's IDE log for appending; root-owned, 0640."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return logfiles.open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)


def _hold_listen_fd_number() -> None:
    """Keep fd 3 open in the daemon (/dev/null if nothing else holds it). Popen keeps fd 3 open
    across its close_fds only when it is in pass_fds, and it must be open in the parent then;
    the child replaces it with the IDE's socket after the fork. A trio daemon always has fd 3
    open (its epoll); the /dev/null is kept for good if not."""
    try:
        os.fstat(LISTEN_FD)
        return
    except OSError:
        pass
    while (fd := os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)) < LISTEN_FD:
        pass  # a closed stdio slot filled on the way
    if fd > LISTEN_FD:
        os.close(fd)  # another thread took fd 3 meanwhile: also fine


def _in_child(procs_fds: list[int], uid: int, gid: int, listen_fd: int) -> None:  # pragma: no cover - runs in the child
    _child_setup(procs_fds, uid, gid)
    os.dup2(listen_fd, LISTEN_FD)  # inheritable, unlike the daemon's copy


def spawn(spec: LaunchSpec, listen_fd: int) -> int:
    """Start the IDE with ``listen_fd`` at fd 3 and return its pid. The caller owns reaping (see
    :class:`Reaper`) and closes ``listen_fd``. No LISTEN_PID: the pid is not known before exec."""
    procs_fds: list[int] = []
    log_fd = -1
    _hold_listen_fd_number()
    try:
        for path in spec.procs_files:
            procs_fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        log_fd = open_log(spec.log_path)
        proc = subprocess.Popen(  # noqa: S603 - argv from the operator's config
            spec.argv,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            cwd=spec.cwd,
            env=spec.env,
            close_fds=True,
            pass_fds=(LISTEN_FD,),
            start_new_session=True,
            umask=0o077,
            preexec_fn=lambda: _in_child(procs_fds, spec.uid, spec.gid, listen_fd),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise LaunchError(f"cannot start the IDE for {spec.user}: {spec.argv[0]}: {exc}") from exc
    finally:
        for fd in procs_fds:
            os.close(fd)
        if log_fd >= 0:
            os.close(log_fd)
    # The daemon's Reaper waits for this child; tell Popen never to reap it behind our back.
    proc.returncode = 0
    return proc.pid


def process_start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` in clock ticks since boot (guards against pid reuse), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])  # field 22 overall: starttime
