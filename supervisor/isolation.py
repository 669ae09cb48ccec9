"""Which isolation mechanisms this pod can give its users, checked at start-up.

:func:`probe` asks the kernel (a throw-away child tries each ``unshare``), the pod's privileges and
the tools (init, slirp4netns, nft, libseccomp); :func:`decide` (pure) turns ``[isolation]`` and
what is missing into the mechanisms in force, or into the errors the daemon refuses to start with.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from supervisor.config import ISOLATION_MECHANISMS, Config, IsolationConfig
from supervisor.launcher_child import CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUTS
from supervisor.sandbox import Mechanisms

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
_NAMESPACES = {"network": CLONE_NEWNET, "pid": CLONE_NEWPID, "mount": CLONE_NEWNS, "ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS}
_PRIVILEGE = (
    "run the daemon as root with CAP_SYS_ADMIN (Kubernetes: a privileged container, or capabilities SYS_ADMIN "
    "and NET_ADMIN with a seccomp and AppArmor profile that allow unshare and mount)"
)
_UNSHARE_PROBE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for name, flag in zip(sys.argv[1::2], sys.argv[2::2]):
    pid = os.fork()
    if pid == 0:
        os._exit(0 if libc.unshare(int(flag)) == 0 else ctypes.get_errno())
    print(name, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


@dataclass(frozen=True)
class Decision:
    """The mechanisms in force, and what to tell the operator."""

    mechanisms: Mechanisms
    errors: list[str]
    warnings: list[str]


def decide(settings: IsolationConfig, missing: dict[str, str]) -> Decision:
    """``on`` and unavailable is an error, ``auto`` and unavailable a warning (and off); a mechanism
    that needs another one that is not in force is not in force either."""
    errors: list[str] = []
    warnings: list[str] = []
    chosen: dict[str, bool] = {}
    for name in ISOLATION_MECHANISMS:
        wanted = getattr(settings, name)
        why = missing.get(name)
        if wanted == "off":
            chosen[name] = False
        elif why is None:
            chosen[name] = True
        elif wanted == "on":
            errors.append(f'isolation.{name} is "on" but this pod cannot give it: {why} (or set isolation.{name} = "auto" or "off")')
            chosen[name] = False
        else:
            warnings.append(f"isolation.{name} is not in force: {why}")
            chosen[name] = False
    if not chosen["mount"]:
        for name in ("network", "pid", "identity"):
            if chosen[name]:
                warnings.append(f"isolation.{name} is not in force: it needs isolation.mount, which is not")
                chosen[name] = False
    return Decision(Mechanisms(**chosen), errors, warnings)


def capabilities() -> int:
    """The daemon's effective capability set (bit n: capability n)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def probe(config: Config, python: str = sys.executable) -> dict[str, str]:
    """What is missing for each mechanism of ``[isolation]`` that is not off (absent: available)."""
    settings = config.isolation
    wanted = [name for name in ISOLATION_MECHANISMS if getattr(settings, name) != "off"]
    missing: dict[str, str] = {}
    caps = capabilities()
    namespaces = [n for n in wanted if n in _NAMESPACES]
    if namespaces and not caps & (1 << CAP_SYS_ADMIN):
        for name in namespaces:
            missing[name] = f"the daemon lacks CAP_SYS_ADMIN: {_PRIVILEGE}"
    elif namespaces:
        for name, err in _try_unshare(namespaces, python).items():
            if err:
                missing[name] = f"unshare(CLONE_NEW{name.upper()[:3]}...) fails: {os.strerror(err)}: {_PRIVILEGE}"
    if "mount" in wanted and "mount" not in missing and settings.read_only_root and _kernel() < (5, 12):
        missing["mount"] = f"read_only_root needs Linux >= 5.12 (mount_setattr), this is {os.uname().release}; set isolation.read_only_root = false"
    if "pid" in wanted and "pid" not in missing and not os.access(settings.init, os.X_OK):
        missing["pid"] = f"no init at {settings.init} (install Debian's tini, or set isolation.init)"
    if "network" in wanted and "network" not in missing:
        from supervisor import netstack

        problems = netstack.check(config.network)
        if problems:
            missing["network"] = "; ".join(problems)
    if "seccomp" in wanted:
        from supervisor import seccomp

        problems = seccomp.check()
        if problems:
            missing["seccomp"] = "; ".join(problems)
    return missing


def _try_unshare(names: list[str], python: str) -> dict[str, int]:
    args = [str(a) for name in names for a in (name, _NAMESPACES[name])]
    done = subprocess.run(
        [python, "-I", "-S", "-c", _UNSHARE_PROBE, *args], capture_output=True, text=True, timeout=30, check=False,
    )
    results = {name: int(err) for name, err in (line.split() for line in done.stdout.splitlines())}
    return {name: results.get(name, 1) for name in names}


def _kernel() -> tuple[int, int]:
    major, minor, *_ = (os.uname().release.split("-")[0] + ".0").split(".")
    return int(major), int(minor)


#: Directories too wide to hide from users: a key file directly in one is hidden by itself.
_SYSTEM_DIRS = {Path(p) for p in ("/", "/etc", "/usr", "/var", "/run", "/opt", "/home", "/root", "/tmp", "/srv", "/mnt")}


def key_paths(files: list[Path | None], workspace_root: Path) -> list[Path]:
    """What hides the daemon's key files from users: each file's directory (a Kubernetes Secret's
    mount point, where a rotation swaps symlinks inside it), or the file itself when it sits
    directly in a system directory or in one that holds the workspace root."""
    out = []
    for path in files:
        if path is not None:
            file = Path(os.path.abspath(path))
            wide = file.parent in _SYSTEM_DIRS or file.parent == workspace_root or file.parent in workspace_root.parents
            out.append(file if wide else file.parent)
    return out


def hidden_paths(paths: list[Path]) -> list[Path]:
    """The daemon's directories to hide from users: each once, none inside another."""
    unique = sorted({p.resolve() for p in paths})
    return [p for p in unique if not any(q in p.parents for q in unique)]
