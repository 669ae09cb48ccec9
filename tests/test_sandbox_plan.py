"""The pure parts of a user's own view: identity files, the launcher's plan, which mechanisms
are in force (supervisor.sandbox, supervisor.isolation.decide)."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor import sandbox
from supervisor.config import IsolationConfig
from supervisor.isolation import decide, hidden_paths, key_paths
from supervisor.sandbox import Account, Mechanisms, PodFiles

POD_PASSWD = """root:x:0:0:root:/root:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
# a comment
alice:x:1000:1000::/home/alice:/bin/sh
tenant:x:200123:200123::/w:/bin/sh
broken line
"""
ACCOUNT = Account(user="alice", uid=200_500, gid=200_500, home=Path("/w/shard-1/.home/alice"), shell="/bin/bash")
TENANTS = range(200_000, 1_000_000)


def test_passwd_keeps_the_pods_system_users_and_adds_only_the_user() -> None:
    lines = sandbox.passwd(POD_PASSWD, ACCOUNT, TENANTS).splitlines()
    assert lines == [
        "root:x:0:0:root:/root:/bin/bash",
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin",
        "alice:x:200500:200500:alice:/w/shard-1/.home/alice:/bin/bash",
    ]  # the pod's own 'alice' (a name clash) and every other tenant are gone


def test_group_has_the_users_own_group() -> None:
    text = sandbox.group("root:x:0:\nusers:x:100:\ntenant:x:200123:\n", ACCOUNT, TENANTS)
    assert text == "root:x:0:\nusers:x:100:\nalice:x:200500:\n"


def test_resolv_conf_points_at_the_user_mode_stacks_dns_only() -> None:
    pod = "nameserver 10.96.0.10\nsearch ns.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
    assert sandbox.resolv_conf(pod) == f"nameserver {sandbox.SLIRP_DNS}\nsearch ns.svc.cluster.local svc.cluster.local\noptions ndots:5\n"


@pytest.mark.parametrize("template, ok", [("{user}", True), ("ws-{user}", True), ("x" * 65, False), ("", False)])
def test_hostname(template: str, ok: bool) -> None:
    if ok:
        assert sandbox.hostname(template, "alice") == template.replace("{user}", "alice")
    else:
        with pytest.raises(ValueError):
            sandbox.hostname(template, "alice")


def _view(m: Mechanisms, hidden: list[Path] | None = None) -> dict | None:  # type: ignore[type-arg]
    return sandbox.view(
        m, account=ACCOUNT, host="alice", workspace_root=Path("/w"), hidden=hidden or [Path("/run/wsup")],
        tmp_size=2**20, read_only_root=True, init=["/usr/bin/tini", "--"], pod_files=PodFiles(POD_PASSWD, "", ""),
        tenant_uids=TENANTS, seccomp_program=b"bpf",
    )


def test_no_mechanism_no_plan() -> None:
    assert _view(Mechanisms()) is None


def test_full_plan() -> None:
    plan = _view(Mechanisms(True, True, True, True, True, True, True))
    assert plan is not None
    assert plan["pid"] and plan["proc"] and plan["read_only"]
    assert plan["keep"] == [b"/w"] and plan["hide"] == [b"/run/wsup"]
    assert [p for p, _ in plan["tmpfs"]] == [b"/tmp", b"/var/tmp", b"/dev/shm"]
    assert all(o == b"size=1048576,mode=1777" for _, o in plan["tmpfs"])
    assert [t for t, _ in plan["files"]] == [b"/etc/passwd", b"/etc/group", b"/etc/hosts", b"/etc/resolv.conf"]
    assert plan["init"] == [b"/usr/bin/tini", b"--"] and plan["hostname"] == b"alice" and plan["seccomp"] == b"bpf"


def test_a_hidden_directory_may_not_contain_the_workspace_root() -> None:
    with pytest.raises(ValueError, match="contains the workspace root"):
        _view(Mechanisms(mount=True), hidden=[Path("/")])


def test_hidden_paths_are_unique_and_outermost() -> None:
    assert hidden_paths([Path("/run/a"), Path("/run/a/b"), Path("/var/log/x"), Path("/run/a")]) == [Path("/run/a"), Path("/var/log/x")]


def test_decide() -> None:
    settings = IsolationConfig(network="auto", pid="on", seccomp="off")
    d = decide(settings, {"network": "no slirp4netns", "pid": "no init", "seccomp": "no libseccomp"})
    assert not d.mechanisms.network and not d.mechanisms.pid and not d.mechanisms.seccomp
    assert d.mechanisms.mount and d.mechanisms.ipc
    assert d.errors == ['isolation.pid is "on" but this pod cannot give it: no init (or set isolation.pid = "auto" or "off")']
    assert d.warnings == ["isolation.network is not in force: no slirp4netns"]


def test_without_mount_the_mechanisms_that_need_it_are_not_in_force() -> None:
    d = decide(IsolationConfig(mount="auto"), {"mount": "no CAP_SYS_ADMIN"})
    assert not (d.mechanisms.network or d.mechanisms.pid or d.mechanisms.identity or d.mechanisms.mount)
    assert d.mechanisms.uts and d.mechanisms.ipc
    assert any("needs isolation.mount" in w for w in d.warnings)


def test_key_files_are_hidden_by_their_directory_unless_it_is_too_wide() -> None:
    keys = [Path("/etc/workspace-supervisor/auth/cookie.key"), None, Path("/etc/jwt.pem"), Path("/srv/x/jwt.pem")]
    assert key_paths(keys, Path("/srv/x/workspace")) == [
        Path("/etc/workspace-supervisor/auth"),  # a Secret's mount point: rotations swap files inside it
        Path("/etc/jwt.pem"),  # /etc itself cannot be hidden
        Path("/srv/x/jwt.pem"),  # its directory holds the workspace root
    ]
