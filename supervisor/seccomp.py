"""The system-call filter every user's process tree runs under (daemon side).

The profile is data: the system calls no IDE session needs, grouped with the reason each is
denied (Docker's default profile is the reference). Everything else is allowed - IDEs run
arbitrary toolchains, debuggers included (``ptrace``, ``process_vm_*`` and ``pidfd_*`` stay). A
denied call fails with ``EPERM``; ``clone3`` fails with ``ENOSYS``, because its flags are in
memory where a filter cannot read them, and libc then falls back to ``clone``, whose flags it can.

:func:`compile_filter` turns the profile into a classic BPF program once, with libseccomp
(through pyseccomp); the stdlib-only launcher installs those bytes as its very last step before
exec (:func:`supervisor.launcher_child.install_seccomp`). :func:`check` says what this machine
lacks for it.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
from dataclasses import dataclass
from types import ModuleType

from .errors import SeccompUnavailable
from .launcher_child import PR_SET_SECCOMP, SECCOMP_MODE_FILTER

#: libseccomp's answer for a name it does not know (``__NR_SCMP_ERROR``).
UNKNOWN_SYSCALL = -1


@dataclass(frozen=True)
class Denied:
    """System calls denied outright, and why."""

    reason: str
    calls: tuple[str, ...]


PROFILE: tuple[Denied, ...] = (
    Denied("kernel modules: loading code into the shared kernel",
           ("init_module", "finit_module", "delete_module", "create_module", "query_module",
            "get_kernel_syms")),
    Denied("kexec and reboot: replacing or stopping the kernel everyone runs on",
           ("kexec_load", "kexec_file_load", "reboot")),
    Denied("swap: the pod's memory, not a user's", ("swapon", "swapoff")),
    Denied("eBPF and perf: large kernel attack surface; perf observes other users' processes",
           ("bpf", "perf_event_open")),
    Denied("kernel keyrings: not namespaced, a long record of bugs (the launcher leaves the "
           "daemon's session keyring before the filter is installed)",
           ("keyctl", "add_key", "request_key")),
    Denied("mounting, old and new mount API: the user's mount namespace is the daemon's to set up",
           ("mount", "umount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount", "fspick",
            "move_mount", "open_tree", "mount_setattr")),
    Denied("joining another namespace (creating one: see NAMESPACE_FLAGS)", ("setns",)),
    Denied("userfaultfd: stalls kernel page faults at will, the usual tool of kernel race exploits",
           ("userfaultfd",)),
    Denied("file handles: open a file by handle past every directory permission ('shocker')",
           ("open_by_handle_at", "name_to_handle_at")),
    Denied("io_uring: a second system-call path this filter cannot see, many kernel bugs "
           "(libuv and others fall back to ordinary calls)",
           ("io_uring_setup", "io_uring_enter", "io_uring_register")),
    Denied("fanotify: filesystem-wide watches (IDEs watch files with inotify)", ("fanotify_init",)),
    Denied("quotas, process accounting and the kernel log: the host's, not a user's",
           ("quotactl", "quotactl_fd", "acct", "syslog")),
    Denied("raw I/O ports and x86 virtual 8086 mode", ("iopl", "ioperm", "vm86", "vm86old")),
    Denied("setting the clock shared by every user (reading it stays allowed, adjtimex included)",
           ("settimeofday", "stime", "clock_settime", "clock_settime64", "clock_adjtime",
            "clock_adjtime64")),
    Denied("obsolete or legacy: nothing current uses them, old code paths left to attack",
           ("_sysctl", "sysfs", "ustat", "uselib", "nfsservctl", "lookup_dcookie", "vhangup")),
)

#: ``clone`` and ``unshare`` fail with EPERM when any of these flags is set: no new namespaces
#: (a new user namespace hands out every capability inside it and opens most of the kernel to the
#: user). ``CLONE_NEWTIME`` (0x80) only for unshare: in clone's flags those bits are the exit signal.
NAMESPACE_FLAGS: dict[str, int] = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
CLONE_NEWTIME = 0x00000080

#: Denied with ENOSYS, so that libc falls back to a call the filter can inspect.
ENOSYS_CALLS = ("clone3",)

#: The only ``personality`` values allowed (Docker's, plus gdb's ADDR_NO_RANDOMIZE, which only
#: makes the user's own debuggee's addresses predictable): the query, Linux, 32-bit Linux and
#: UNAME26. The other domains and flags (READ_IMPLIES_EXEC, MMAP_PAGE_ZERO, ...) are denied.
PERSONALITY_ALLOWED = frozenset({
    0x0, 0x8, 0x20000, 0x20008, 0x40000, 0x40008, 0xFFFFFFFF,
})

#: The other ABIs a process of the native architecture can call the kernel with, filtered with
#: the same rules: on x86_64, 32-bit x86 (``int 0x80``) and x32 (numbers with bit 30 set), on
#: arm64 32-bit ARM, on s390x 31-bit s390. A deny list that left one out would allow everything
#: through it; a call from any other architecture kills the process (ACT_BADARCH).
COMPAT_ARCHES: dict[str, tuple[str, ...]] = {
    "X86_64": ("X86", "X32"),
    "AARCH64": ("ARM",),
    "S390X": ("S390",),
}
#: Architectures where clone's flags are its second argument, not its first.
CLONE_FLAGS_SECOND = frozenset({"S390", "S390X"})


def denied_calls() -> tuple[str, ...]:
    """Every system call the profile names (outright, by flag or value, or ENOSYS)."""
    outright = tuple(name for group in PROFILE for name in group.calls)
    return outright + ("clone", "unshare", "personality") + ENOSYS_CALLS


def blocks_outside(allowed: frozenset[int], bits: int = 32) -> list[tuple[int, int]]:
    """``(mask, value)`` pairs, as few as the prefix tree gives, whose matches (``x & mask ==
    value``) are exactly the ``bits``-bit numbers not in ``allowed``: a deny list can only OR
    rules, and libseccomp allows one comparison per argument in a rule."""
    full = (1 << bits) - 1
    blocks: list[tuple[int, int]] = []

    def split(prefix: int, length: int) -> None:
        shift = bits - length
        inside = [v for v in allowed if v >> shift == prefix]
        if not inside:
            blocks.append(((full >> shift) << shift, prefix << shift))
        elif length < bits:
            split(prefix << 1, length + 1)
            split((prefix << 1) | 1, length + 1)

    split(0, 0)
    return blocks


def load_libseccomp() -> ModuleType:
    """pyseccomp, or :class:`SeccompUnavailable` saying how to get libseccomp."""
    try:
        import pyseccomp
    except (ImportError, RuntimeError, OSError) as exc:
        raise SeccompUnavailable(f"libseccomp cannot be loaded ({exc})") from exc
    module: ModuleType = pyseccomp
    return module


@functools.cache
def compile_filter() -> bytes:
    """The classic BPF program of the profile for this machine's architectures (``struct
    sock_filter`` array, native byte order), built once."""
    sc = load_libseccomp()
    arches = {getattr(sc.Arch, name): name for name in dir(sc.Arch) if not name.startswith("_")}
    native = arches.get(sc.system_arch(), "")
    flt = sc.SyscallFilter(sc.ALLOW)
    flt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    for name in COMPAT_ARCHES.get(native, ()):
        flt.add_arch(getattr(sc.Arch, name))

    def rule(action: int, call: str, *args: object) -> None:
        if sc.resolve_syscall(sc.Arch.NATIVE, call) == UNKNOWN_SYSCALL:
            raise SeccompUnavailable(f"libseccomp does not know the system call {call!r}",
                                     hint="upgrade libseccomp2, or set [isolation] seccomp = \"off\"")
        flt.add_rule(action, call, *args)

    eperm = sc.ERRNO(errno.EPERM)
    for group in PROFILE:
        for call in group.calls:
            rule(eperm, call)
    clone_arg = 1 if native in CLONE_FLAGS_SECOND else 0
    for flag in NAMESPACE_FLAGS.values():
        rule(eperm, "clone", sc.Arg(clone_arg, sc.MASKED_EQ, flag, flag))
    for flag in (*NAMESPACE_FLAGS.values(), CLONE_NEWTIME):
        rule(eperm, "unshare", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    for mask, value in blocks_outside(PERSONALITY_ALLOWED):
        rule(eperm, "personality", sc.Arg(0, sc.MASKED_EQ, mask, value))
    for call in ENOSYS_CALLS:
        rule(sc.ERRNO(errno.ENOSYS), call)

    fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
    with open(fd, "w+b", buffering=0) as file:
        flt.export_bpf(file)
        file.seek(0)
        return file.read()


#: Before 4.8 a ptrace tracer could change a system call after the filter had allowed it; the
#: profile allows ptrace for debuggers, so such a kernel does not hold the filter.
MIN_KERNEL = (4, 8)


def check() -> list[str]:
    """What this machine lacks for the filter (empty: nothing); each entry says what to do."""
    missing: list[str] = []
    try:
        compile_filter()
    except SeccompUnavailable as exc:
        missing.append(str(exc))
    try:
        with open("/proc/self/status") as status:
            has_seccomp = any(line.startswith("Seccomp:") for line in status)
    except OSError as exc:
        missing.append(f"kernel seccomp support: /proc/self/status unreadable ({exc})")
        return missing
    if not has_seccomp:
        missing.append("kernel seccomp support: no 'Seccomp:' line in /proc/self/status "
                       "(a kernel built with CONFIG_SECCOMP is needed)")
    elif not _filter_mode_available():
        missing.append("kernel seccomp filter mode: prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER) "
                       "is refused (a kernel with CONFIG_SECCOMP_FILTER, and a pod seccomp "
                       "profile that allows prctl, are needed)")
    release = os.uname().release
    if kernel_version(release) < MIN_KERNEL:
        missing.append(f"kernel {release}: seccomp needs Linux >= 4.8 (older kernels let a "
                       "ptrace tracer change a system call after the filter allowed it)")
    return missing


def kernel_version(release: str) -> tuple[int, int]:
    """``(major, minor)`` of a ``uname -r`` string such as ``6.1.0-18-amd64``."""
    found = re.match(r"(\d+)\.(\d+)", release)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def _filter_mode_available() -> bool:
    """Ask the kernel to install a filter from a NULL program: EFAULT (it went on to read the
    program) or EACCES means filter mode exists; EINVAL means it does not. Nothing is installed."""
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.c_void_p(None),
                        ctypes.c_ulong(0), ctypes.c_ulong(0))
    return result != 0 and ctypes.get_errno() in (errno.EFAULT, errno.EACCES)
