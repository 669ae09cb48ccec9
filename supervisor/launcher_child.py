"""The launcher process of :mod:`supervisor.launchpool` (stdlib only, no package imports).

Run by the daemon as ``python -I -S launcher_child.py FD FLAGS PROCS_FILE...`` with ``FD`` one end
of a ``SOCK_SEQPACKET`` socket pair and stdin/stdout/stderr on ``/dev/null``; it closes any other
descriptor it inherited. It:

1. joins the cgroup by writing ``0`` into every ``PROCS_FILE`` (a spare group: the kernel's slow
   attach, paid here, off any user's start), enters new namespaces (``FLAGS``: ``CLONE_NEW*`` bits,
   0 for none; :func:`enter_namespaces`), sets ``no_new_privs`` and resets the signal dispositions
   Python changed (as ``subprocess`` does with ``restore_signals``), then sends ``R`` (ready). The
   daemon may then make its new network namespace usable (:mod:`supervisor.netstack`);
2. waits for one launch message: a :mod:`marshal`-ed ``(argv, env, cwd, uid, gid, view)`` (bytes,
   list of ``KEY=VALUE`` bytes, bytes, int, int, the plan of :func:`supervisor.sandbox.view` or
   None) with two file descriptors attached (``SCM_RIGHTS``): the log, then the IDE's listening
   socket. By then the daemon has given the group to the user and written its limits;
3. points stdout and stderr at the log, puts the listening socket at fd 3 (``LISTEN_FDS``; ``FD``
   is never 3), builds the user's view (:func:`build_view`: mounts, identity files, hostname),
   changes directory, sets umask 077, sets the IDE's resource limits, drops supplementary groups,
   gid and uid, joins a fresh session keyring, installs the system-call filter and execs the IDE
   (behind the view's init) - without a PID namespace it becomes the IDE, same pid: the socket to
   the daemon is close-on-exec, so the daemon sees end-of-file on success and ``E<message>`` on
   failure. With one, it forks the namespace's PID 1, which does all of step 3; see :func:`become`.

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


# ---- the user's own view of the machine (namespaces and mounts; supervisor.sandbox plans it) ------

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (new system calls are unified)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def enter_namespaces(libc: "ctypes.CDLL", flags: int) -> None:
    """Leave the daemon's namespaces for new ones (``CLONE_NEW*`` bits; a new PID namespace is for
    the children). The new mount namespace stops sharing mount events with the pod's."""
    if not flags:
        return
    _check(libc.unshare(ctypes.c_int(flags)), f"unshare(0x{flags:x})")
    if flags & CLONE_NEWNS:
        _check(libc.mount(None, b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None), "make / private")


def _mount(libc: "ctypes.CDLL", source: "bytes | None", target: bytes, fstype: "bytes | None", flags: int, data: "bytes | None" = None) -> None:
    _check(libc.mount(source, target, fstype, ctypes.c_ulong(flags), data), f"mount {target.decode(errors='replace')}")


def _set_read_only(libc: "ctypes.CDLL", path: bytes, read_only: bool) -> None:
    """Set (or clear) read-only on the mount at ``path`` and every mount below it (mount_setattr)."""

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    attr = MountAttr(MOUNT_ATTR_RDONLY if read_only else 0, 0 if read_only else MOUNT_ATTR_RDONLY, 0, 0)
    result = libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(-100), path, ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(0 if result == 0 else -1, f"mount_setattr {path.decode(errors='replace')} read-only={read_only}")


def build_view(libc: "ctypes.CDLL", plan: dict) -> None:
    """Make the user's view, in their namespaces, still as root (the order matters):

    1. the paths that must stay reachable (the workspace root) become mounts of their own;
    2. with ``read_only``, every mount is made read-only, then those paths writable again;
    3. a new /proc (this process is PID 1 of the user's PID namespace), tmpfs on /tmp, /var/tmp,
       /dev/shm; a kept path that a tmpfs covered (a workspace root below /tmp) is bound back;
    4. the daemon's directories (and its key files' directories) are covered by empty read-only
       tmpfs, a key file directly in a system directory by /dev/null;
    5. the per-user files (passwd, group, hosts, resolv.conf) are bound read-only over the pod's;
    6. the hostname.
    """
    keep = []
    for path in plan["keep"]:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        keep.append((path, fd))
        _mount(libc, path, path, None, MS_BIND | MS_REC)
    if plan["read_only"]:
        _set_read_only(libc, b"/", True)
        for path, _fd in keep:
            _set_read_only(libc, path, False)
    if plan["proc"]:
        _mount(libc, b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for path, options in plan["tmpfs"]:
        if os.path.isdir(path):
            _mount(libc, b"tmpfs", path, b"tmpfs", MS_NOSUID | MS_NODEV, options)
    for path, fd in keep:
        try:
            same = os.path.samestat(os.stat(path), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if not same:
            os.makedirs(path, 0o755, exist_ok=True)
            _mount(libc, b"/proc/self/fd/%d" % fd, path, None, MS_BIND | MS_REC)
        os.close(fd)
    for path in plan["hide"]:
        if os.path.isdir(path):
            _mount(libc, b"tmpfs", path, b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, b"size=4k,mode=000")
        elif os.path.exists(path):  # a key file directly in /etc: /dev/null over it
            _mount(libc, b"/dev/null", path, None, MS_BIND)
            _mount(libc, None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    if plan["files"]:
        staging = b"/tmp/.wsup-view-%d" % os.getpid()  # the user's own tmpfs, before any user code
        os.mkdir(staging, 0o700)
        for target, content in plan["files"]:
            source = staging + b"/" + os.path.basename(target)
            fd = os.open(source, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, content)
                os.fchmod(fd, 0o644)
            finally:
                os.close(fd)
            _mount(libc, source, target, None, MS_BIND)
            _mount(libc, None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
            os.unlink(source)  # the mount keeps the file
        os.rmdir(staging)
    if plan["hostname"]:
        name = plan["hostname"]
        _check(libc.sethostname(name, ctypes.c_size_t(len(name))), "sethostname")


def fail(sock: "socket", what: str, exc: BaseException) -> None:
    fail_with(sock, f"{what}: {exc}".encode("utf-8", "replace"))


def fail_with(sock: "socket", message: bytes) -> None:
    try:
        sock.send(b"E" + message)
    finally:
        os._exit(127)


def prepare(sock: "socket", flags: int, procs_files: list) -> None:
    for path in procs_files:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
    libc = ctypes.CDLL(None, use_errno=True)
    enter_namespaces(libc, flags)
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


def become(sock: "socket", spec: tuple, fds: list) -> None:
    """Become the user's tree. Without a PID namespace this process execs the IDE (same pid: the
    daemon sees end-of-file). With one, it forks the namespace's PID 1, which builds the view and
    execs the init (and the init the IDE); this process then tells the daemon ``X<pid>`` and exits,
    and the daemon (a child subreaper) is the new process's parent from then on."""
    argv, env, cwd, uid, gid, plan = spec
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
    if plan is None or not plan["pid"]:
        become_ide(argv, env, cwd, uid, gid, plan)
    report_read, report_write = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # PID 1 of the user's namespace
        os.close(report_read)
        try:
            become_ide(argv, env, cwd, uid, gid, plan)
        except BaseException as exc:  # noqa: BLE001 - reported through the pipe
            os.write(report_write, f"exec {argv[0]!r}: {exc}".encode("utf-8", "replace")[:4096])
        os._exit(127)
    os.close(report_write)
    report = b""
    while chunk := os.read(report_read, 4096):
        report += chunk
    if report:
        fail_with(sock, report)
    sock.send(b"X%d" % pid)
    sock.recv(1)  # the daemon closes its end once it holds the init (a pidfd, its status kept)
    os._exit(0)


def become_ide(argv: list, env: list, cwd: bytes, uid: int, gid: int, plan: "dict | None") -> None:
    """Build the view (if any), drop to the user and exec (the init, which starts the IDE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if plan is not None:
        build_view(libc, plan)
        argv = plan["init"] + argv
    os.chdir(cwd)
    os.umask(0o077)
    set_ide_rlimits()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    join_fresh_session_keyring(libc)
    environ = dict(item.split(b"=", 1) for item in env)
    if plan is not None and plan["seccomp"]:
        install_seccomp(plan["seccomp"])
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
        prepare(sock, int(sys.argv[2]), sys.argv[3:])
    except BaseException as exc:  # noqa: BLE001 - reported to the daemon, then exit
        fail(sock, "launcher set-up", exc)
    sock.send(b"R")
    try:
        spec, fds = receive(sock)
    except BaseException as exc:  # noqa: BLE001
        fail(sock, "launch message", exc)
    try:
        become(sock, spec, fds)
    except BaseException as exc:  # noqa: BLE001
        fail(sock, f"exec {spec[0][0]!r}", exc)


if __name__ == "__main__":
    main()
