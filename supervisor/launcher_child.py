"""The pre-spawned launcher process of :mod:`supervisor.launchpool` (stdlib only, no package imports).

Run by the daemon as ``python -I -S launcher_child.py FD PROCS_FILE...`` with ``FD`` one end of a
``SOCK_SEQPACKET`` socket pair and stdin/stdout/stderr on ``/dev/null``; it closes any other
descriptor it inherited. It:

1. joins the spare cgroup by writing ``0`` into every ``PROCS_FILE`` (the kernel's slow attach,
   paid here, off any user's start), sets ``no_new_privs`` and resets the signal dispositions
   Python changed (as ``subprocess`` does with ``restore_signals``), then sends ``R`` (ready);
2. waits for one launch message: a :mod:`marshal`-ed ``(argv, env, cwd, uid, gid)`` (bytes, list of
   ``KEY=VALUE`` bytes, bytes, int, int) with two file descriptors attached (``SCM_RIGHTS``): the
   log, then the IDE's listening socket. By then the daemon has renamed the spare group to the
   user's and written its limits;
3. points stdout and stderr at the log, puts the listening socket at fd 3 (``LISTEN_FDS``; ``FD``
   is never 3), changes directory, sets umask 077, sets the IDE's resource limits, drops
   supplementary groups, gid and uid, joins a fresh session keyring, and execs the IDE - it
   becomes the IDE, same pid. The socket to the daemon is close-on-exec, so the daemon sees
   end-of-file on success and ``E<message>`` on failure.

End-of-file instead of a launch message (the daemon went away or discards it) makes it exit.

The hygiene both launch paths share (:func:`set_ide_rlimits`, :func:`join_fresh_session_keyring`)
lives here, where the stdlib-only launcher can use it; :mod:`supervisor.launch` imports it.
"""

import ctypes
import errno
import marshal
import os
import resource
import signal
import sys
from _socket import AF_UNIX, SCM_RIGHTS, SOCK_SEQPACKET, SOL_SOCKET, CMSG_SPACE, socket

PR_SET_NO_NEW_PRIVS = 38
MSG_CMSG_CLOEXEC = 0x40000000
MAX_MESSAGE = 1 << 20
LISTEN_FD = 3

# ---- system-call filter --------------------------------------------------------------------------

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
BPF_MAXINSNS = 4096
SOCK_FILTER_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_seccomp(program: bytes) -> None:
    """Install ``program`` (classic BPF from :func:`supervisor.seccomp.compile_filter`) as this
    thread's seccomp filter; it stays across exec and into every child. Needs no_new_privs (or
    CAP_SYS_ADMIN). Call it from the one thread that execs, as the very last step before exec:
    everything after it runs under the filter (no keyrings, no mounts, ...)."""
    count, rest = divmod(len(program), SOCK_FILTER_SIZE)
    if rest or not 0 < count <= BPF_MAXINSNS:
        raise OSError(errno.EINVAL, f"system-call filter: {len(program)} bytes are not a classic BPF "
                      f"program of 1 to {BPF_MAXINSNS} instructions")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(count, ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        why = {
            errno.EACCES: "no_new_privs is not set and the process lacks CAP_SYS_ADMIN",
            errno.EINVAL: "the kernel lacks seccomp filter support (CONFIG_SECCOMP_FILTER) or "
                          "rejected the program",
            errno.ENOMEM: "too many filters or instructions already stacked on this process",
        }.get(err, os.strerror(err))
        raise OSError(err, f"prctl(PR_SET_SECCOMP): the system-call filter was refused: {why}")


# ---- IDE hygiene (both launch paths) -------------------------------------------------------------

#: Open files an IDE may have (soft = hard; at most the daemon's own hard limit, so no privilege is
#: needed): Theia with its terminals, watchers and language servers stays far below.
IDE_NOFILE = 65536
#: Every limit the IDE gets as the daemon started with, except these (README: "When a user breaks
#: what they own").
#: No core dumps: kernel.core_pattern is the host's (often a pipe to a host service), and a dump of
#: a large IDE fills a disk the user does not own.
RLIMIT_OVERRIDES = {resource.RLIMIT_CORE: (0, 0)}
#: The daemon's own limits when it started (in the launcher: when it started, from the daemon).
STARTED_RLIMITS = {
    getattr(resource, name): resource.getrlimit(getattr(resource, name))
    for name in dir(resource) if name.startswith("RLIMIT_")
}
KEYCTL_JOIN_SESSION_KEYRING = 1
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219, "riscv64": 219, "ppc64le": 271, "s390x": 280, "i686": 288, "armv7l": 311}


def ide_rlimits(started: dict) -> dict:
    """The IDE's limits: ``started`` (the daemon's at start-up) with the overrides and NOFILE."""
    limits = {**started, **RLIMIT_OVERRIDES}
    _soft, hard = started[resource.RLIMIT_NOFILE]
    nofile = IDE_NOFILE if hard == resource.RLIM_INFINITY else min(IDE_NOFILE, hard)
    limits[resource.RLIMIT_NOFILE] = (nofile, nofile)
    return limits


def set_ide_rlimits() -> None:
    """Set the IDE's resource limits (before the uid drop: as root, within the daemon's hard limits)."""
    for limit, value in ide_rlimits(STARTED_RLIMITS).items():
        resource.setrlimit(limit, value)


def join_fresh_session_keyring(libc: "ctypes.CDLL") -> None:
    """Leave the daemon's session keyring for a new anonymous one (after the uid drop, so that the
    user owns it): a process possesses its session keyring, so an inherited one would hand the
    IDE every key of the daemon's session. Where keyrings are not available at all (seccomp, no
    kernel support) there is nothing to leave."""
    machine = os.uname().machine
    number = SYS_KEYCTL.get(machine)
    if number is None:
        raise OSError(f"keyctl: unknown system call number on {machine}")
    if libc.syscall(ctypes.c_long(number), ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING), ctypes.c_void_p(None)) < 0:
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EPERM):
            raise OSError(err, "keyctl(KEYCTL_JOIN_SESSION_KEYRING)")


def fail(sock: "socket", what: str, exc: BaseException) -> None:
    try:
        sock.send(b"E" + f"{what}: {exc}".encode("utf-8", "replace"))
    finally:
        os._exit(127)


def prepare(sock: "socket", procs_files: list) -> None:
    for path in procs_files:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)


def receive(sock: "socket") -> tuple:
    data, ancdata, _flags, _addr = sock.recvmsg(MAX_MESSAGE, CMSG_SPACE(8), MSG_CMSG_CLOEXEC)
    if not data:
        os._exit(0)  # the daemon closed its end: nothing to launch
    fds = []
    for level, kind, payload in ancdata:
        if level == SOL_SOCKET and kind == SCM_RIGHTS:
            fds += [int.from_bytes(payload[i:i + 4], sys.byteorder) for i in range(0, len(payload) - 3, 4)]
    return marshal.loads(data), fds


def become(spec: tuple, fds: list) -> None:
    argv, env, cwd, uid, gid = spec
    if len(fds) != 2:
        raise OSError(f"the launch message came with {len(fds)} file descriptors, not 2 (log, socket)")
    log_fd, listen_fd = fds
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    if listen_fd == LISTEN_FD:
        os.set_inheritable(LISTEN_FD, True)  # it came close-on-exec (MSG_CMSG_CLOEXEC)
    else:
        os.dup2(listen_fd, LISTEN_FD)  # inheritable
        os.close(listen_fd)
    os.chdir(cwd)
    os.umask(0o077)
    set_ide_rlimits()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    join_fresh_session_keyring(ctypes.CDLL(None, use_errno=True))
    environ = dict(item.split(b"=", 1) for item in env)
    execvpe(argv, environ)


def execvpe(argv: list, environ: dict) -> None:
    """``os.execvpe`` without its lazy imports: the interpreter's files may not be readable by the
    user any more. The first error other than 'not there' wins, as in execvp(3)."""
    file = argv[0]
    if b"/" in file:
        os.execve(file, argv, environ)
    first = None
    last: OSError = FileNotFoundError(2, "not found in PATH", file)
    for directory in environ.get(b"PATH", b"/usr/bin:/bin").split(b":"):
        try:
            os.execve(os.path.join(directory or b".", file), argv, environ)
        except (FileNotFoundError, NotADirectoryError) as exc:
            last = exc
        except OSError as exc:
            last = exc
            first = first or exc
    raise first or last


def main() -> None:
    fd = int(sys.argv[1])
    if fd == LISTEN_FD:
        os._exit(2)  # the IDE's socket goes there
    os.closerange(3, fd)  # whatever else the daemon had open without close-on-exec
    os.closerange(fd + 1, 1 << 20)
    sock = socket(AF_UNIX, SOCK_SEQPACKET, 0, fd)
    os.set_inheritable(fd, False)  # it was inherited: the IDE must not get it
    try:
        prepare(sock, sys.argv[2:])
    except BaseException as exc:  # noqa: BLE001 - reported to the daemon, then exit
        fail(sock, "launcher set-up", exc)
    sock.send(b"R")
    try:
        spec, fds = receive(sock)
    except BaseException as exc:  # noqa: BLE001
        fail(sock, "launch message", exc)
    try:
        become(spec, fds)
    except BaseException as exc:  # noqa: BLE001
        fail(sock, f"exec {spec[0][0]!r}", exc)


if __name__ == "__main__":
    main()
