"""Each user's own view of the machine, on the real kernel: two tenants with terminals
(``tests/hostile.py``: the stand-in IDE runs shell as its user) in one daemon with every
``[isolation]`` mechanism this machine can give. What one tenant does in its terminal must stay
invisible to the other, and everything that signals, freezes, stops or re-adopts a user must
work on the namespace's init as it did on a bare IDE.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from supervisor import netstack
from supervisor.paths import user_paths
from tests.harness import SLOW, Daemon, isolation_available, poll
from tests.hostile import STUB as SHELL_STUB, Pod
from tests.outside import SERVER, outside  # noqa: F401 - a fixture

ISOLATION, MISSING = isolation_available()
CORE = ("pid", "mount", "ipc", "uts", "identity")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or any(m in MISSING for m in CORE),
    reason=f"needs root and the kernel's namespaces: {MISSING}",
)
#: Every mechanism this machine can give (network and seccomp when their tools are here).
ON = {name.removeprefix("isolation__"): value for name, value in ISOLATION.items()}


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    pod = Pod(**ISOLATION)
    try:
        yield pod.start()
    finally:
        pod.cleanup()


def stop(pod: Pod, user: str) -> None:
    assert pod.daemon.ctl("stop", user).returncode == 0
    poll(lambda: pod.daemon.user(user)["state"] == "STOPPED", 15, f"{user} STOPPED")


def sh_ok(tenant, script: str) -> str:  # type: ignore[no-untyped-def]
    rc, out = tenant.sh(script)
    assert rc == 0, out
    return out


def test_pod_shows_the_mechanisms_in_force(pod: Pod) -> None:
    shown = pod.daemon.ctl_json("pod")["pod"]["isolation"]
    assert shown == {name: value == "on" for name, value in ON.items()}
    metrics = subprocess.run(["curl", "-s", f"http://127.0.0.1:{pod.probes_port}/metrics"], capture_output=True, text=True).stdout
    for name, value in ON.items():
        assert f'workspace_supervisor_isolation_in_force{{mechanism="{name}"}} {1.0 if value == "on" else 0.0}' in metrics


def test_a_user_sees_only_their_own_processes(pod: Pod) -> None:
    victim_pid = pod.victim.status()["pid"]
    out = sh_ok(pod.attacker, "ps -eo pid=,user=,args=")
    rows = [line.split(None, 2) for line in out.strip().splitlines()]
    assert rows[0][0] == "1" and "tini" in rows[0][2], out  # the namespace's init
    assert {row[1] for row in rows} == {"attacker"}, out
    assert "victim" not in out
    # Not even by the daemon's pid numbers: the victim's init has no entry in the attacker's /proc.
    assert sh_ok(pod.attacker, f"test -e /proc/{victim_pid} && echo seen || echo unseen").strip() == "unseen"


def test_status_shows_the_init_as_the_daemon_sees_it(pod: Pod) -> None:
    pid = int(pod.victim.status()["pid"])
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[0].endswith(b"tini")
    nspid = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("NSpid:"))
    assert nspid.split()[1:] == [str(pid), "1"]  # the daemon's number, and 1 in the user's namespace


def test_identity_hostname_and_home(pod: Pod) -> None:
    out = sh_ok(pod.victim, "whoami; id -un; id -gn; hostname; getent passwd $(id -u); echo ~")
    whoami, user, group, host, entry, tilde = out.strip().splitlines()
    home = str(user_paths(pod.disk / "workspace", 4, "victim").home)
    assert (whoami, user, group, host) == ("victim", "victim", "victim", "victim")
    fields = entry.split(":")
    assert fields[0] == "victim" and fields[5] == tilde == home
    assert "attacker" not in sh_ok(pod.victim, "cat /etc/passwd /etc/group")


def test_tmp_shm_and_ipc_are_private(pod: Pod) -> None:
    mark = os.urandom(6).hex()
    sh_ok(pod.attacker, f"echo {mark} > /tmp/mark; echo {mark} > /var/tmp/mark; echo {mark} > /dev/shm/mark; "
                        f"ipcmk -M 4096 -p 0666 >/dev/null; ipcmk -Q -p 0666 >/dev/null")
    seen = sh_ok(pod.victim, "cat /tmp/mark /var/tmp/mark /dev/shm/mark 2>&1; ipcs -m -q")
    assert mark not in seen and "0x" not in seen, seen
    assert not Path("/tmp/mark").exists() and not Path("/dev/shm/mark").exists()
    host = subprocess.run(["ipcs", "-m", "-q"], capture_output=True, text=True).stdout
    assert str(pod.attacker.status()["uid"]) not in host


def test_tmp_is_sized_by_tier_and_charged_to_the_user(pod: Pod) -> None:
    out = sh_ok(pod.victim, "df -B1 --output=size /tmp /var/tmp /dev/shm | tail -n +2")
    assert [int(v) for v in out.split()] == [256 * 2**20] * 3  # the free tier's tmp_size default
    group = next(d for d in pod.daemon.cgroup_dirs("victim") if (d / "memory.usage_in_bytes").exists() or (d / "memory.current").exists())
    usage_file = group / ("memory.current" if (group / "memory.current").exists() else "memory.usage_in_bytes")
    before = int(usage_file.read_text())
    sh_ok(pod.victim, "head -c 40000000 /dev/zero > /dev/shm/ballast")
    assert int(usage_file.read_text()) - before >= 38_000_000  # the tmpfs pages are the user's
    sh_ok(pod.victim, "rm /dev/shm/ballast")


def test_the_daemon_is_hidden_and_the_image_read_only(pod: Pod) -> None:
    base = pod.daemon.base
    hidden = [pod.disk / "state", pod.disk / "log", base / "run"]
    out = sh_ok(pod.attacker, " ; ".join(f"ls -A {p} 2>&1 | head -1" for p in hidden) + "; touch /usr/x /etc/x 2>&1; "
                "touch ~/home-ok && echo home-writable; touch ./ws-ok && echo workspace-writable")
    assert "victim" not in out and ".sock" not in out and "ide" not in out.split("touch")[0], out
    assert out.count("Read-only file system") == 2, out
    assert "home-writable" in out and "workspace-writable" in out


def test_the_daemons_keys_are_hidden() -> None:
    """A key file readable by all (a Kubernetes Secret's default mode) is still out of users' reach:
    its directory is covered in their view (a file directly in /etc would be covered by /dev/null)."""
    # Not below /tmp or /var/tmp (private in a user's view anyway); /var/lib is writable in the VM tier too.
    keys = Path(tempfile.mkdtemp(prefix="wsup-test-keys-", dir="/var/lib"))
    (keys / "cookie.key").write_bytes(os.urandom(48))
    os.chmod(keys, 0o755)
    os.chmod(keys / "cookie.key", 0o644)
    d = Daemon(**ISOLATION, auth__cookie_secret_file=str(keys / "cookie.key"))
    shutil.copy(SHELL_STUB, d.stub_dir / "sh.py")
    d.config.write_text(d.config.read_text().replace(str(d.stub_dir / "ide_stub.py"), str(d.stub_dir / "sh.py")))
    try:
        d.start()
        assert d.ctl("start", "keyreader").returncode == 0
        out = unix_exec(d.ide_socket("keyreader"), f"ls -A {keys}; cat {keys}/cookie.key | wc -c; echo done")
        assert out.count("Permission denied") == 2 and out.split()[-2:] == ["0", "done"], out  # covered: nothing to read
    finally:
        d.cleanup()
        shutil.rmtree(keys, ignore_errors=True)


def unix_exec(socket_path: Path, script: str) -> str:
    """Run ``script`` in the shell stub listening on ``socket_path`` (no front door)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(socket_path))
        body = script.encode()
        sock.sendall(b"POST /exec HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return str(json.loads(answer.split(b"\r\n\r\n", 1)[1])["out"])


def test_orphans_are_reaped_in_the_namespace(pod: Pod) -> None:
    out = sh_ok(pod.attacker, "for i in 1 2 3; do (sh -c 'exit 0' &) ; done; sleep 0.5; ps -eo stat= | grep -c '^Z' || true")
    assert out.strip() == "0", out


def test_pause_resume_and_signals_reach_the_tree(pod: Pod) -> None:
    d = pod.daemon
    assert d.ctl("pause", "attacker").returncode == 0
    poll(lambda: pod.attacker.status()["state"] == "PAUSED", 10, "PAUSED")
    assert d.ctl("resume", "attacker").returncode == 0
    poll(lambda: pod.attacker.status()["state"] == "RUNNING", 10, "RUNNING")
    assert sh_ok(pod.attacker, "echo alive").strip() == "alive"


def test_an_oom_kill_inside_the_namespace_is_seen(pod: Pod) -> None:
    before = int(pod.attacker.status()["oom_kills"])
    # Over the tier's memory limit (starter: 1Gi): the kernel kills the hog (cgroup v1) or, with
    # memory.oom.group, the whole tree (v2), which the daemon then restarts.
    pod.attacker.detach("python3 -c 'b = bytearray(1500 << 20); b[::4096] = bytes(len(b[::4096]))'")
    poll(lambda: int(pod.attacker.status()["oom_kills"]) > before or int(pod.attacker.status()["restarts"]) > 0, 20, "the OOM kill seen")
    poll(lambda: pod.attacker.status()["state"] == "RUNNING", 20, "the attacker RUNNING after it")
    assert sh_ok(pod.attacker, "whoami").strip() == "attacker"


def test_stop_and_restart_end_the_whole_namespace(pod: Pod) -> None:
    d = pod.daemon
    pid = int(pod.attacker.status()["pid"])
    pod.attacker.detach("sleep 600")
    stop(pod, "attacker")
    assert not Path(f"/proc/{pid}").exists()
    assert not any((g / "cgroup.procs").read_text().strip() for g in d.cgroup_dirs("attacker") if (g / "cgroup.procs").exists())
    pod.fresh_attacker()
    assert int(pod.attacker.status()["pid"]) != pid
    assert sh_ok(pod.attacker, "whoami").strip() == "attacker"


def test_users_are_readopted_after_a_daemon_restart(pod: Pod) -> None:
    d = pod.daemon
    pid = int(pod.victim.status()["pid"])
    d.kill(signal.SIGKILL)
    d.start()
    pod._find_ports()
    status = poll(lambda: (s := pod.victim.status())["state"] == "RUNNING" and s, 15, "the victim re-adopted")
    assert int(status["pid"]) == pid
    assert sh_ok(pod.victim, "whoami").strip() == "victim"  # through the new daemon's front door
    assert d.ctl("restart", "victim").returncode == 0
    poll(lambda: pod.victim.status()["state"] == "RUNNING" and int(pod.victim.status()["pid"]) != pid, 20, "restarted")
    pod.baseline()


# ---- network -------------------------------------------------------------------------------------

needs_network = pytest.mark.skipif("network" in MISSING, reason=f"no network of each user's own here: {MISSING.get('network')}")
@needs_network
def test_outbound_tcp_works_and_denied_destinations_fail_fast(pod: Pod, outside: dict[str, str]) -> None:
    out = sh_ok(pod.victim, f"curl -s -m 5 http://{outside['allowed']}:8080/; echo; "
                            f"s=$(date +%s%N); curl -s -m 5 http://{outside['denied']}:8080/; echo \"rc=$? ms=$(( ($(date +%s%N) - s) / 1000000 ))\"")
    lines = out.strip().splitlines()
    assert lines[0] == "outside-ok", out
    rc, ms = re.match(r"rc=(\d+) ms=(\d+)", lines[-1]).groups()  # type: ignore[union-attr]
    assert rc == "7" and int(ms) < 1000 * SLOW, out  # refused at once (curl 7: could not connect), not curl's 5 s time-out
    assert subprocess.run(["curl", "-s", "-m", "2", f"http://{outside['denied']}:8080/"], capture_output=True, text=True).stdout == "outside-ok"


@needs_network
def test_the_pods_loopback_and_addresses_are_out_of_reach(pod: Pod) -> None:
    probes = pod.probes_port  # the daemon's probe port, on the pod's 127.0.0.1
    pod_ip = next((str(n.network_address) for n in netstack.pod_addresses() if n.version == 4), None)
    targets = [f"127.0.0.1:{probes}", f"10.0.2.2:{probes}"] + ([f"{pod_ip}:{probes}"] if pod_ip else [])
    out = sh_ok(pod.attacker, "; ".join(f"curl -s -m 3 -o /dev/null -w '%{{http_code}} ' http://{t}/healthz" for t in targets) + "; echo")
    assert out.split() == ["000"] * len(targets), out


@needs_network
def test_a_users_loopback_server_is_theirs_alone(pod: Pod) -> None:
    port = 20000 + int.from_bytes(os.urandom(2), "big") % 20000
    pod.victim.detach(f"exec python3 -c \"{SERVER}\" 127.0.0.1 {port} victim-dev-server")
    poll(lambda: sh_ok(pod.victim, f"curl -s -m 1 http://127.0.0.1:{port}/ || true") == "victim-dev-server", 10, "the victim's server")
    assert sh_ok(pod.attacker, f"curl -s -m 2 http://127.0.0.1:{port}/; echo rc=$?").strip() == "rc=7"
    assert subprocess.run(["curl", "-s", "-m", "2", f"http://127.0.0.1:{port}/"], capture_output=True).returncode == 7
    # The attacker may take the same port on their own loopback: it is another loopback.
    pod.attacker.detach(f"exec python3 -c \"{SERVER}\" 127.0.0.1 {port} attacker-dev-server")
    poll(lambda: sh_ok(pod.attacker, f"curl -s -m 1 http://127.0.0.1:{port}/ || true") == "attacker-dev-server", 10, "the attacker's server")
    # Through the front door's /port/<N>/: each user reaches their own server only.
    for tenant, expected in ((pod.victim, "victim-dev-server"), (pod.attacker, "attacker-dev-server")):
        status, _, body = tenant.request("GET", f"/port/{port}/")
        assert (status, body.decode()) == (200, expected)
    status, _, body = pod.victim.request("GET", f"/port/{port + 1}/", headers={"Accept": "application/json"})
    assert status == 502 and b"nothing_listens" in body


@needs_network
def test_the_network_stack_is_the_users_and_goes_with_the_tree(pod: Pod) -> None:
    groups = [g for g in pod.daemon.cgroup_dirs("attacker") if (g / "cgroup.procs").exists()]
    pids = {int(p) for g in groups for p in (g / "cgroup.procs").read_text().split()}
    slirps = [p for p in pids if Path(f"/proc/{p}/comm").read_text().strip() == "slirp4netns"]
    assert len(slirps) == 1, pids
    stop(pod, "attacker")
    poll(lambda: not Path(f"/proc/{slirps[0]}").exists(), 5, "slirp4netns killed with the tree and reaped")
    pod.fresh_attacker()


@pytest.mark.skipif("seccomp" in MISSING, reason=f"no system-call filter here: {MISSING.get('seccomp')}")
def test_the_system_call_filter_denies_what_no_ide_needs(pod: Pod) -> None:
    out = sh_ok(pod.attacker, "grep ^Seccomp: /proc/self/status; unshare -U true 2>&1; unshare -n true 2>&1; "
                "python3 -c 'import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
                "print(libc.mount(b\"none\", b\"/tmp\", b\"tmpfs\", 0, None), os.strerror(ctypes.get_errno()))'; echo done")
    assert "Seccomp:\t2" in out, out
    assert out.count("Operation not permitted") == 3, out  # unshare -U, unshare -n, mount
    assert out.strip().endswith("done")


@pytest.mark.parametrize("problem", ["no init", "no CAP_SYS_ADMIN"])
def test_a_required_mechanism_that_is_unavailable_stops_the_start(problem: str) -> None:
    overrides = {"isolation__pid": "on", "isolation__mount": "on"}
    wrapper: list[str] = []
    if problem == "no init":
        overrides["isolation__init"] = "/nonexistent/tini"
        expected = "no init at /nonexistent/tini"
    else:
        wrapper = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", "--"]
        expected = "lacks CAP_SYS_ADMIN"
    d = Daemon(**overrides)
    try:
        with pytest.raises(AssertionError, match="daemon exited early"):
            d.start(wrapper=wrapper)
        log = d.log_text()
        assert 'isolation.pid is "on" but this pod cannot give it' in log and expected in log, log[-2000:]
        assert d.proc is not None and d.proc.returncode == 1
    finally:
        d.cleanup()


def test_auto_falls_back_with_a_warning() -> None:
    d = Daemon(isolation__pid="auto", isolation__mount="on", isolation__init="/nonexistent/tini")
    try:
        d.start()
        assert d.ctl_json("pod")["pod"]["isolation"]["pid"] is False
        assert "isolation.pid is not in force: no init at /nonexistent/tini" in d.log_text()
    finally:
        d.cleanup()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
