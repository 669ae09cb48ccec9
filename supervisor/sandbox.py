"""Each user's own view of the machine, planned: namespaces, mounts, identity files, init (pure).

The daemon decides here what a user's tree gets; the launcher (:mod:`supervisor.launcher_child`)
carries it out as root between fork and exec, and :mod:`supervisor.isolation` decides at start-up
which mechanisms are in force. A plan is a plain dict (it travels to the launcher by
:mod:`marshal`): see :func:`view`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.launcher_child import CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUTS

#: Inside a user's network namespace slirp4netns answers DNS here (supervisor.netstack).
SLIRP_DNS = "10.0.2.3"
HOSTNAME_MAX = 64


@dataclass(frozen=True)
class Mechanisms:
    """The mechanisms in force for every user of this daemon (``[isolation]`` after the checks)."""

    network: bool = False
    pid: bool = False
    mount: bool = False
    ipc: bool = False
    uts: bool = False
    identity: bool = False
    seccomp: bool = False

    @property
    def any(self) -> bool:
        return any(vars(self).values())

    def clone_flags(self) -> int:
        """The ``CLONE_NEW*`` bits a user's launcher unshares."""
        return (
            (CLONE_NEWNET if self.network else 0) | (CLONE_NEWPID if self.pid else 0) | (CLONE_NEWNS if self.mount else 0)
            | (CLONE_NEWIPC if self.ipc else 0) | (CLONE_NEWUTS if self.uts else 0)
        )


@dataclass(frozen=True)
class Account:
    """Who the user is inside their view."""

    user: str
    uid: int
    gid: int
    home: Path
    shell: str


def hostname(template: str, user: str) -> str:
    """The user's hostname from ``[isolation] hostname``; user ids are valid host labels already."""
    name = template.replace("{user}", user)
    if not 0 < len(name.encode()) <= HOSTNAME_MAX:
        raise ValueError(f"hostname {name!r} must be 1 to {HOSTNAME_MAX} bytes")
    return name


def passwd(pod_passwd: str, account: Account, tenant_uids: range) -> str:
    """The pod's ``/etc/passwd`` without any tenant (a uid in ``tenant_uids``) or name clash, plus
    the user's own entry: what ``whoami``, ``id``, git and ssh look up."""
    kept = [
        line for line in pod_passwd.splitlines()
        if line and not line.startswith("#") and _keep(line, account.user, account.uid, tenant_uids)
    ]
    own = f"{account.user}:x:{account.uid}:{account.gid}:{account.user}:{account.home}:{account.shell}"
    return "\n".join([*kept, own]) + "\n"


def group(pod_group: str, account: Account, tenant_uids: range) -> str:
    """The pod's ``/etc/group`` without tenant groups, plus the user's own group (no members)."""
    kept = [
        line for line in pod_group.splitlines()
        if line and not line.startswith("#") and _keep(line, account.user, account.gid, tenant_uids)
    ]
    return "\n".join([*kept, f"{account.user}:x:{account.gid}:"]) + "\n"


def _keep(line: str, name: str, number: int, tenant_ids: range) -> bool:
    """A passwd or group line to keep: well-formed, not the user's name or number, not a tenant's."""
    fields = line.split(":")
    if len(fields) < 3 or not fields[2].isdigit():
        return False
    value = int(fields[2])
    return fields[0] != name and value != number and value not in tenant_ids


def hosts(name: str) -> str:
    """``/etc/hosts`` naming the user's host on their own loopback (the pod's names the pod)."""
    return f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{name}\n"


def resolv_conf(pod_resolv: str) -> str:
    """The pod's resolver settings with slirp4netns's DNS forwarder as the only nameserver (the
    pod's own nameserver is an address the user's network may not reach directly)."""
    kept = [line for line in pod_resolv.splitlines() if line.split()[:1] in (["search"], ["domain"], ["options"])]
    return "\n".join([f"nameserver {SLIRP_DNS}", *kept]) + "\n"


@dataclass(frozen=True)
class PodFiles:
    """The pod's own identity files, read once at start-up."""

    passwd: str
    group: str
    resolv_conf: str

    @classmethod
    def read(cls, etc: Path = Path("/etc")) -> PodFiles:
        def text(name: str) -> str:
            try:
                return (etc / name).read_text(errors="replace")
            except FileNotFoundError:
                return ""

        return cls(passwd=text("passwd"), group=text("group"), resolv_conf=text("resolv.conf"))


def view(
    mechanisms: Mechanisms,
    *,
    account: Account,
    host: str,
    workspace_root: Path,
    hidden: list[Path],
    tmp_size: int,
    read_only_root: bool,
    init: list[str],
    pod_files: PodFiles,
    tenant_uids: range,
    seccomp_program: bytes,
) -> dict[str, Any] | None:
    """The launcher's plan for one user (None: nothing to do, the pod's view).

    ``keep``: paths that stay reachable and writable (the workspace root, below which every
    user's workspace and HOME live); ``hide``: the daemon's directories, covered by an empty
    read-only tmpfs; ``tmpfs``: the private scratch mounts with their options; ``files``: the
    per-user files bound over the pod's; ``init``: argv prefix that becomes PID 1.
    """
    if not mechanisms.any:
        return None
    root = workspace_root
    for path in hidden:
        if path == root or path in root.parents:
            raise ValueError(f"the daemon's directory {path} contains the workspace root {root}: it cannot be hidden from users")
    files: list[tuple[bytes, bytes]] = []
    if mechanisms.identity:
        files += [
            (b"/etc/passwd", passwd(pod_files.passwd, account, tenant_uids).encode()),
            (b"/etc/group", group(pod_files.group, account, tenant_uids).encode()),
        ]
    if mechanisms.mount:
        files.append((b"/etc/hosts", hosts(host).encode()))
    if mechanisms.network:
        files.append((b"/etc/resolv.conf", resolv_conf(pod_files.resolv_conf).encode()))
    tmp_options = b"size=%d,mode=1777" % tmp_size
    return {
        "pid": mechanisms.pid,
        "proc": mechanisms.pid and mechanisms.mount,
        "keep": [bytes(root)] if mechanisms.mount else [],
        "read_only": mechanisms.mount and read_only_root,
        "tmpfs": [(p, tmp_options) for p in (b"/tmp", b"/var/tmp", b"/dev/shm")] if mechanisms.mount else [],
        "hide": sorted({bytes(p) for p in hidden}) if mechanisms.mount else [],
        "files": files,
        "hostname": host.encode() if mechanisms.uts else b"",
        "init": [a.encode() for a in init] if mechanisms.pid else [],
        "seccomp": seccomp_program if mechanisms.seccomp else b"",
    }


@dataclass(frozen=True)
class Sandbox:
    """Everything the daemon needs to plan every user's view: fixed at start-up."""

    mechanisms: Mechanisms
    hostname_template: str = "{user}"
    init: tuple[str, ...] = ()
    read_only_root: bool = True
    pod_files: PodFiles = PodFiles("", "", "")
    hidden: tuple[Path, ...] = ()
    tenant_uids: range = range(0)
    seccomp_program: bytes = b""

    def view_for(self, account: Account, workspace_root: Path, tmp_size: int) -> dict[str, Any] | None:
        return view(
            self.mechanisms, account=account, host=hostname(self.hostname_template, account.user),
            workspace_root=workspace_root, hidden=list(self.hidden), tmp_size=tmp_size,
            read_only_root=self.read_only_root, init=list(self.init), pod_files=self.pod_files,
            tenant_uids=self.tenant_uids, seccomp_program=self.seccomp_program,
        )

    def describe(self) -> dict[str, bool]:
        """Which mechanisms are in force (``workspacectl pod``, /metrics)."""
        return dict(vars(self.mechanisms))
