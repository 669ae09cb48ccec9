"""A user's network stack (supervisor/netstack.py): the deny list as nftables (pure), and on the
real kernel the allow list overriding it in a namespace the test makes, with slirp4netns."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from typing import Iterator

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
    policy = NetworkPolicy(deny=parse_networks(["10.0.0.0/8", "fc00::/7", "192.0.2.7"], "t"), allow=parse_networks(["10.1.2.0/24"], "t"))
    text = ruleset(policy)
    assert "set deny4 { type ipv4_addr; flags interval; auto-merge; elements = { 10.0.0.0/8, 192.0.2.7/32 }; }" in text
    assert "set deny6 { type ipv6_addr; flags interval; auto-merge; elements = { fc00::/7 }; }" in text
    assert "elements = { 10.1.2.0/24 }" in text and "set allow6 { type ipv6_addr; flags interval; auto-merge; }" in text
    rules = text[text.index("chain output"):]
    assert rules.index("@allow4 accept") < rules.index("@deny4") and "drop" not in rules
    assert "ip daddr 10.0.2.3 meta l4proto { tcp, udp } th dport 53 accept" in rules  # slirp4netns's DNS first


def test_the_pod_and_the_cluster_api_are_always_denied() -> None:
    settings = config.from_dict({"network": {"service_cidr": "10.96.0.0/12", "allow": ["192.168.5.0/24"]}}).network
    policy = policy_for(settings, {"KUBERNETES_SERVICE_HOST": "10.96.0.1"})
    assert ipaddress.ip_network("10.96.0.0/12") in policy.deny and ipaddress.ip_network("10.96.0.1/32") in policy.deny
    assert all(a in policy.deny for a in netstack.pod_addresses())
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
    return subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "curl", "-s", "-m", "3", url], capture_output=True, text=True)


def slirps_for(pid: int) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-f", f"slirp4netns .* {pid} tap0"], capture_output=True, text=True).stdout.split()]


@needs_stack
def test_the_allow_list_overrides_the_deny_list(namespace: int, outside: dict[str, str]) -> None:
    settings = config.from_dict({"network": {"allow": [outside["denied"]]}}).network
    stack = NetStack(settings, policy_for(settings))
    trio.run(stack.prepare, namespace, [])
    try:
        assert curl_in(namespace, f"http://{outside['denied']}:8080/").stdout == "outside-ok"  # 172.16/12, but allowed
        assert curl_in(namespace, f"http://{outside['allowed']}:8080/").stdout == "outside-ok"
        assert curl_in(namespace, "http://10.0.2.2:1/").returncode == 7  # the gateway is not the pod's loopback
    finally:
        for pid in slirps_for(namespace):
            os.kill(pid, 9)


@needs_stack
def test_a_failed_start_leaves_no_stack_behind(namespace: int) -> None:
    settings = config.from_dict({"network": {"ready_timeout": "2s"}}).network
    broken = NetStack(settings, NetworkPolicy(deny=()))
    broken.rules = b"table inet wsup { chain output { this is not nft; } }\n"
    with pytest.raises(LaunchError, match="nft refused the deny list"):
        trio.run(broken.prepare, namespace, [])
    with pytest.raises(LaunchError, match="slirp4netns"):
        trio.run(NetStack(settings, NetworkPolicy(deny=())).prepare, namespace, ["/nonexistent/cgroup.procs"])
    poll(lambda: not slirps_for(namespace), 5, "no slirp4netns left")
