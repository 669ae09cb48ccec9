"""The system-call filter (supervisor/seccomp.py, launcher_child.install_seccomp) on the real kernel.

A child ``python -I -S`` (as the launcher runs) sets no_new_privs, installs the compiled filter with
the launcher's own function, then tries each denied call in a fork of its own and does ordinary
work; the same probes without the filter show they would otherwise not fail with EPERM.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, strategies as st

from supervisor import seccomp
from supervisor.errors import SeccompUnavailable

SUPERVISOR_DIR = Path(seccomp.__file__).parent
MISSING = seccomp.check()
needs_seccomp = pytest.mark.skipif(bool(MISSING), reason=f"seccomp unavailable: {MISSING}")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the probes must be "
                                "calls that would succeed or fail otherwise than EPERM without the filter")
X86_64 = platform.machine() == "x86_64"

CLONE_NEWUSER, CLONE_NEWNET, SIGCHLD = 0x10000000, 0x40000000, 17

#: name -> (system call, arguments): calls the filter denies, harmless if it did not.
PROBES: dict[str, tuple[str, list[Any]]] = {
    "unshare(CLONE_NEWUSER)": ("unshare", [CLONE_NEWUSER]),
    "unshare(CLONE_NEWNET)": ("unshare", [CLONE_NEWNET]),
    "mount": ("mount", ["none", "/nonexistent/seccomp-probe", "tmpfs", 0, 0]),
    "bpf": ("bpf", [0, 0, 0]),
    "keyctl": ("keyctl", [0, -3, 0]),  # KEYCTL_GET_KEYRING_ID of the session keyring
    "init_module": ("init_module", [0, 0, ""]),
    "perf_event_open": ("perf_event_open", [0, 0, -1, -1, 0]),
    "io_uring_setup": ("io_uring_setup", [1, 0]),
    "clone(CLONE_NEWUSER)": ("clone", [CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0]),
    "personality(READ_IMPLIES_EXEC)": ("personality", [0x0400000]),
    "setns": ("setns", [-1, 0]),
    "clone3": ("clone3", [0, 0]),
}

CHILD = r"""
import ctypes, json, os, shutil, subprocess, sys, threading
sys.path.insert(0, SUPERVISOR_DIR)
import launcher_child

spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
if spec["no_new_privs"] and libc.prctl(38, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)):
    raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
if spec["uid"] is not None:
    os.setresgid(spec["uid"], spec["uid"], spec["uid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])
program = sys.stdin.buffer.read()
out = {}
if program:
    try:
        launcher_child.install_seccomp(program)
    except OSError as exc:
        print(json.dumps({"install_error": [exc.errno, str(exc)]}))
        sys.exit(0)

def in_fork(call):
    # the call in a child of its own; its errno, or 0 for success, or -signal
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(call())
        finally:
            os._exit(255)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

def syscall(nr, args):
    def call():
        cargs = [ctypes.c_char_p(a.encode()) if isinstance(a, str) else ctypes.c_long(a) for a in args]
        result = libc.syscall(ctypes.c_long(nr), *cargs)
        return ctypes.get_errno() if result < 0 else 0
    return call

def int80(nr, arg):
    # a 32-bit x86 system call from this 64-bit process: push rbx; mov eax, nr; mov ebx, arg;
    # int 0x80; pop rbx; ret - the kernel checks it against the filter's x86 rules
    import mmap
    code = (b"\x53\xb8" + nr.to_bytes(4, "little") + b"\xbb" + arg.to_bytes(4, "little")
            + b"\xcd\x80\x5b\xc3")
    def call():
        page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(code)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        result = ctypes.CFUNCTYPE(ctypes.c_int)(address)()
        return -result if result < 0 else 0
    return call

out["denied"] = {name: in_fork(syscall(nr, args)) for name, (nr, args) in spec["probes"].items()}
if spec["x86"]:
    out["denied"]["x32 unshare(CLONE_NEWUSER)"] = in_fork(syscall(0x40000000 | 272, [0x10000000]))
    out["denied"]["i386 unshare(CLONE_NEWUSER)"] = in_fork(int80(310, 0x10000000))
    out["denied"]["i386 keyctl"] = in_fork(int80(288, 0))

if spec["work"]:
    work = out["work"] = {}
    with open("/proc/self/status") as status:
        work["seccomp_mode"] = [l.split()[1] for l in status if l.startswith("Seccomp:")][0]
    results = []
    threads = [threading.Thread(target=results.append, args=(n,)) for n in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    work["threads"] = sorted(results)
    work["pipeline"] = subprocess.run(["sh", "-c", "printf 'b\\na\\n' | sort | tr a-z A-Z"],
                                      capture_output=True, text=True, check=True).stdout
    work["personality_query"] = in_fork(syscall(spec["personality"], [0xFFFFFFFF]))
    work["unshare_files"] = in_fork(syscall(spec["unshare"], [0x400]))  # CLONE_FILES
    if shutil.which("node"):
        work["node"] = subprocess.run(["node", "-e", spec["node_script"]], capture_output=True,
                                      text=True, timeout=60).stdout.strip()
    if shutil.which("strace"):
        trace = subprocess.run(["strace", "-f", "-e", "trace=execve", "sh", "-c", "true | true"],
                               capture_output=True, text=True, timeout=60)
        work["ptrace"] = [trace.returncode, "execve(" in trace.stderr]
    else:
        work["ptrace"] = [in_fork(lambda: libc.ptrace(0, 0, 0, 0) and ctypes.get_errno()), True]
print(json.dumps(out))
"""

NODE_SCRIPT = r"""
const { Worker } = require('worker_threads');
const { execSync } = require('child_process');
const fs = require('fs');
const w = new Worker('require("worker_threads").parentPort.postMessage(6 * 7)', { eval: true });
w.on('message', (n) => {
  fs.writeFileSync('/dev/null', 'x');
  console.log(JSON.stringify({ worker: n, exec: execSync('echo hi').toString().trim() }));
});
"""


def run_child(program: bytes, *, probes: bool = True, work: bool = False, no_new_privs: bool = True,
              uid: int | None = None) -> dict[str, Any]:
    resolve = seccomp.load_libseccomp().resolve_syscall
    native = seccomp.load_libseccomp().Arch.NATIVE
    spec = {
        "probes": {name: (resolve(native, call), args) for name, (call, args) in PROBES.items()} if probes else {},
        "x86": probes and X86_64,
        "work": work,
        "no_new_privs": no_new_privs,
        "uid": uid,
        "personality": resolve(native, "personality"),
        "unshare": resolve(native, "unshare"),
        "node_script": NODE_SCRIPT,
    }
    script = CHILD.replace("SUPERVISOR_DIR", repr(str(SUPERVISOR_DIR)))
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script, json.dumps(spec)], input=program,
                          capture_output=True, timeout=120, env={"PATH": os.environ["PATH"]})
    assert done.returncode == 0, done.stderr.decode()
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# ---- the profile as data ---------------------------------------------------------------------------

def test_profile_names_each_call_once() -> None:
    names = seccomp.denied_calls()
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    for call in ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_open", "pidfd_getfd"):
        assert call not in names, f"{call} is for debuggers"


def test_every_group_has_a_reason() -> None:
    assert all(group.reason and group.calls for group in seccomp.PROFILE)


@needs_seccomp
def test_every_name_is_known_to_libseccomp() -> None:
    sc = seccomp.load_libseccomp()
    unknown = [name for name in seccomp.denied_calls()
               if sc.resolve_syscall(sc.Arch.NATIVE, name) == seccomp.UNKNOWN_SYSCALL]
    assert unknown == []


@given(st.frozensets(st.integers(0, 255), max_size=6), st.integers(0, 255))
def test_blocks_outside_match_exactly_what_is_not_allowed(allowed: frozenset[int], x: int) -> None:
    blocks = seccomp.blocks_outside(allowed, bits=8)
    assert any(x & mask == value for mask, value in blocks) == (x not in allowed)


def test_personality_blocks_keep_the_allowed_values() -> None:
    blocks = seccomp.blocks_outside(seccomp.PERSONALITY_ALLOWED)
    for value in (*seccomp.PERSONALITY_ALLOWED, 0x0400000, 0x0100000, 0x1, 0xFFFFFFFE):
        assert any(value & m == v for m, v in blocks) == (value not in seccomp.PERSONALITY_ALLOWED)


@needs_seccomp
def test_compiled_program_fits_the_kernel_limit() -> None:
    program = seccomp.compile_filter()
    assert len(program) % 8 == 0 and 0 < len(program) // 8 <= 4096
    assert seccomp.compile_filter() is program  # built once


def test_libseccomp_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyseccomp", None)  # import fails as when it is not installed
    with pytest.raises(SeccompUnavailable) as caught:
        seccomp.load_libseccomp()
    assert "libseccomp2" in str(caught.value) and "seccomp" in caught.value.hint


# ---- on the real kernel ----------------------------------------------------------------------------

@needs_seccomp
@needs_root
def test_without_the_filter_no_probe_fails_with_eperm() -> None:
    denied = run_child(b"")["denied"]
    assert all(code != errno.EPERM for code in denied.values()), denied
    assert denied["unshare(CLONE_NEWNET)"] == 0 and denied["clone(CLONE_NEWUSER)"] == 0
    assert denied["clone3"] == errno.EINVAL


@needs_seccomp
@needs_root
def test_denied_calls_fail_with_eperm_and_clone3_with_enosys() -> None:
    denied = run_child(seccomp.compile_filter())["denied"]
    assert denied.pop("clone3") == errno.ENOSYS
    assert denied == {name: errno.EPERM for name in denied}
    if X86_64:
        assert {"x32 unshare(CLONE_NEWUSER)", "i386 unshare(CLONE_NEWUSER)", "i386 keyctl"} <= set(denied)


@needs_seccomp
@needs_root
def test_ordinary_work_runs_under_the_filter() -> None:
    work = run_child(seccomp.compile_filter(), probes=False, work=True)["work"]
    assert work["seccomp_mode"] == "2"
    assert work["threads"] == [0, 1, 2, 3]
    assert work["pipeline"] == "A\nB\n"
    assert work["personality_query"] == 0 and work["unshare_files"] == 0
    assert work["ptrace"] == [0, True]
    if "node" in work:
        assert json.loads(work["node"]) == {"worker": 42, "exec": "hi"}


@needs_seccomp
@needs_root
def test_install_needs_no_new_privs() -> None:
    result = run_child(seccomp.compile_filter(), probes=False, no_new_privs=False, uid=65534)
    code, message = result["install_error"]
    assert code == errno.EACCES and "no_new_privs" in message


@needs_seccomp
@needs_root
def test_install_refuses_what_is_not_a_program() -> None:
    result = run_child(b"\0" * 7, probes=False)
    code, message = result["install_error"]
    assert code == errno.EINVAL and "not a classic BPF program" in message


@pytest.mark.parametrize("release, version", [
    ("6.18.44-fc-v1147", (6, 18)), ("4.7.0", (4, 7)), ("6.1.0-18-amd64", (6, 1)), ("5.10", (5, 10)),
    ("4.19rc1", (4, 19)), ("unknown", (0, 0)),
])
def test_kernel_version(release: str, version: tuple[int, int]) -> None:
    assert seccomp.kernel_version(release) == version
