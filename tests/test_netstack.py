"""A user's network stack (supervisor/netstack.py): the ruleset (pure), and on the real kernel, in
a namespace the test makes with a server in another: outbound through slirp4netns, denied addresses
refused at once, the pod's loopback and addresses never reached, slirp4netns in a throwaway cgroup
and gone with it, a failed start leaving nothing behind."""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import trio

from supervisor import config, netstack
from supervisor.errors import ConfigError, LaunchError
from supervisor.netstack import NetStack, NetworkPolicy, parse_networks, policy_for, ruleset
from tests.harness import poll
from tests.outside import outside  # noqa: F401 - a fixture

DEFAULTS = config.from_dict({}).network
PROBLEMS = netstack.check(DEFAULTS) if os.geteuid() == 0 else ["not root"]
needs_stack = pytest.mark.skipif(bool(PROBLEMS), reason=f"cannot give a user a network here: {PROBLEMS}")


def test_ruleset_names_every_range_and_rejects_rather_than_drops() -> None:
    policy = NetworkPolicy(deny=parse_networks(["10.0.0.0/8", "fc00::/7", "192.0.2.7"], "t"), allow=parse_networks(["10.1.2.0/24", "2001:db8::/32"], "t"),
                           pod=parse_networks(["10.1.2.3", "fd00::2"], "t"))
    text = ruleset(policy)
    assert "set deny4 { type ipv4_addr; flags interval; auto-merge; elements = { 10.0.0.0/8, 192.0.2.7/32 }; }" in text
    assert "set allow4 { type ipv4_addr; flags interval; auto-merge; elements = { 10.1.2.0/24 }; }" in text
    assert "set never4 { type ipv4_addr; flags interval; auto-merge; elements = { 10.1.2.3/32, 10.0.2.0/24, 0.0.0.0/8, 224.0.0.0/4, 240.0.0.0/4 }; }" in text
    assert "fc00" not in text and "2001:db8" not in text and "fd00" not in text  # IPv6 is refused whole
    rules = text[text.index("chain output"):]
    assert rules.index('oifname "lo" accept') < rules.index("th dport 53 accept") < rules.index("@never4") < rules.index("@allow4 accept") < rules.index("@deny4")
    assert "ip daddr 10.0.2.3 meta l4proto { tcp, udp } th dport 53 accept" in rules  # slirp4netns's DNS, nothing else of its network
    assert "meta nfproto ipv6 meta l4proto tcp reject with tcp reset" in rules and "drop" not in rules


def test_the_pod_and_the_cluster_api_are_always_denied() -> None:
    settings = config.from_dict({"network": {"service_cidr": "10.96.0.0/12", "allow": ["192.168.5.0/24"]}}).network
    policy = policy_for(settings, {"KUBERNETES_SERVICE_HOST": "10.96.0.1"})
    assert ipaddress.ip_network("10.96.0.0/12") in policy.deny and ipaddress.ip_network("10.96.0.1/32") in policy.deny
    assert policy.pod == netstack.pod_addresses() and not set(policy.pod) & set(policy.deny)
    assert policy.allow == (ipaddress.ip_network("192.168.5.0/24"),)


@pytest.mark.parametrize("bad", [{"deny": ["10.0.0.0/33"]}, {"allow": ["example.com"]}, {"service_cidr": "nope"}, {"mtu": 100}])
def test_bad_network_config_is_refused_naming_the_key(bad: dict[str, object]) -> None:
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=f"network.{key}"):
        config.from_dict({"network": bad})


@pytest.fixture
def namespace() -> Iterator[int]:
    """A process alone in a new network namespace (like a launcher waiting for its launch)."""
    proc = subprocess.Popen(["unshare", "--net", "sleep", "600"])
    try:
        poll(lambda: os.readlink(f"/proc/{proc.pid}/ns/net") != os.readlink("/proc/self/ns/net"), 5, "the new namespace")
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def curl_in(pid: int, url: str) -> subprocess.CompletedProcess[str]:
    """curl in the namespace of ``pid`` as an ordinary user would (nobody: no capability there)."""
    return subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "--setuid=65534", "--setgid=65534", "curl", "-s", "-m", "3", url],
                          capture_output=True, text=True)


@pytest.fixture
def group() -> Iterator[Path]:
    """A throwaway cgroup under the test's own (cgroup v2 when it is the only hierarchy, else v1's
    pids hierarchy); whatever is left in it is killed and it is removed afterwards."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        own = Path("/sys/fs/cgroup") / next(line.split(":", 2)[2] for line in lines if line.startswith("0::")).lstrip("/")
    else:
        own = Path("/sys/fs/cgroup/pids") / next(line.split(":", 2)[2] for line in lines if line.split(":")[1] == "pids").lstrip("/")
    path = own / f"wsup-net-{os.urandom(4).hex()}"
    path.mkdir()
    try:
        yield path
    finally:
        kill_group(path)
        poll(lambda: not path.exists() or _rmdir(path), 5, f"{path} removed")


def kill_group(path: Path) -> None:
    if (path / "cgroup.kill").exists():
        (path / "cgroup.kill").write_text("1")
    else:
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def pod_server() -> Iterator[int]:
    """An HTTP server of the pod's own, on every address of the pod's namespace; yields its port."""
    server = http.server.HTTPServer(("0.0.0.0", 0), type("H", (http.server.BaseHTTPRequestHandler,), {
        "do_GET": lambda s: (s.send_response(200), s.end_headers(), s.wfile.write(b"pod-secret")),
        "log_message": lambda *a: None}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True


def live_slirps() -> list[int]:
    """The slirp4netns this test process started that still run (the dead ones reaped)."""
    live = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.name() == "slirp4netns":
                if child.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(child.pid, 0)
                else:
                    live.append(child.pid)
    return live


@needs_stack
def test_a_users_network_reaches_out_but_not_the_pod(namespace: int, outside: dict[str, str], group: Path) -> None:
    """Outbound TCP through slirp4netns to an allowed server; a denied one refused at once; the
    pod's loopback (directly, via slirp4netns's gateway or its DNS address) and its own addresses
    out of reach even when the allow list names them; slirp4netns in the user's group until killed."""
    pod = [str(n.network_address) for n in netstack.pod_addresses() if n.version == 4]
    settings = config.from_dict({"network": {
        "deny": [*DEFAULTS.deny, "198.18.0.0/15"], "allow": ["198.18.77.0/24", "10.0.0.0/8", *pod]}}).network
    slirp = trio.run(NetStack(settings, policy_for(settings)).prepare, namespace, [str(group / "cgroup.procs")])
    assert slirp in {int(p) for p in (group / "cgroup.procs").read_text().split()}

    assert curl_in(namespace, f"http://{outside['allowed']}:8080/").stdout == "outside-ok"
    began = time.monotonic()
    assert curl_in(namespace, f"http://{outside['denied']}:8080/").returncode == 7  # could not connect: refused, ...
    assert time.monotonic() - began < 1  # ... at once, not timed out
    with pod_server() as port:
        assert subprocess.run(["curl", "-s", "-m", "2", f"http://127.0.0.1:{port}/"], capture_output=True, text=True).stdout == "pod-secret"
        for address in ("127.0.0.1", "10.0.2.2", "10.0.2.3", *pod):
            began = time.monotonic()
            done = curl_in(namespace, f"http://{address}:{port}/")
            assert (done.returncode, done.stdout) == (7, ""), address
            assert time.monotonic() - began < 1, address
    # The user cannot lift the deny list: they have no capability in the namespace.
    lifted = subprocess.run(["nsenter", f"--net=/proc/{namespace}/ns/net", "--setuid=65534", "--setgid=65534", str(settings.nft), "flush", "ruleset"],
                            capture_output=True, text=True)
    assert lifted.returncode != 0 and "Operation not permitted" in lifted.stderr

    os.kill(namespace, 9)  # the namespace's owner gone, slirp4netns lives on: it holds the namespace ...
    assert not reaped(slirp)
    kill_group(group)  # ... until the group is killed, as the daemon kills a user's tree
    poll(lambda: reaped(slirp), 5, "slirp4netns killed with the group")
    assert (group / "cgroup.procs").read_text().split() == []


@needs_stack
def test_the_allow_list_overrides_the_deny_list(namespace: int, outside: dict[str, str]) -> None:
    settings = config.from_dict({"network": {"allow": [outside["denied"]]}}).network
    slirp = trio.run(NetStack(settings, policy_for(settings)).prepare, namespace, [])
    try:
        assert curl_in(namespace, f"http://{outside['denied']}:8080/").stdout == "outside-ok"  # 172.16/12, but allowed
        assert curl_in(namespace, f"http://{outside['allowed']}:8080/").stdout == "outside-ok"
    finally:
        os.kill(slirp, 9)
        poll(lambda: reaped(slirp), 5, "slirp4netns reaped")


@needs_stack
def test_a_failed_start_leaves_no_stack_behind(namespace: int) -> None:
    settings = config.from_dict({"network": {"ready_timeout": "2s"}}).network
    broken = NetStack(settings, NetworkPolicy(deny=()))
    broken.rules = b"table inet wsup { chain output { this is not nft; } }\n"
    with pytest.raises(LaunchError, match="nft refused the deny list"):
        trio.run(broken.prepare, namespace, [])
    with pytest.raises(LaunchError, match="slirp4netns"):
        trio.run(NetStack(settings, NetworkPolicy(deny=())).prepare, namespace, ["/nonexistent/cgroup.procs"])
    poll(lambda: not live_slirps(), 5, "no slirp4netns left")
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(LaunchError, match=f"no network namespace of pid {gone.pid}"):
        trio.run(NetStack(settings, NetworkPolicy(deny=())).prepare, gone.pid, [])
