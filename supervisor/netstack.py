"""A user's network: own namespace, outbound through slirp4netns, destinations behind a deny list.

The user's launcher unshares a new network namespace (:mod:`supervisor.sandbox`); before any user
code runs, :class:`NetStack` makes it usable:

1. the deny list is loaded into the namespace's own nftables (:func:`ruleset`, pure): the user has
   no capability there, so it stays; a denied destination is refused at once (TCP reset, ICMP
   admin-prohibited), never left to time out;
2. slirp4netns, a user-mode TCP/IP stack, is started in the pod's namespace against the user's
   (``--configure``: tap0 10.0.2.100/24, loopback up, DNS forwarder at 10.0.2.3;
   ``--disable-host-loopback``: 10.0.2.2 never reaches the pod's loopback; no port forwarding at
   all), in its own sandbox and seccomp filter, and moved into the user's cgroups: it counts against
   the user's memory and dies with the user's tree. It holds the namespace itself, so it does not
   exit when the user's processes do: whoever ends a tree kills its whole group (the daemon does).

Outbound connections leave from the pod's address as slirp4netns's own; nothing comes in.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import psutil
import trio

from supervisor.errors import LaunchError
from supervisor.isolation import CAP_NET_ADMIN, CAP_SYS_ADMIN, capabilities
from supervisor.launchpool import pidfd_kill
from supervisor.sandbox import SLIRP_DNS

if TYPE_CHECKING:
    from supervisor.config import Config, NetworkConfig
    from supervisor.launchpool import PrepareNetwork

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
TUN = Path("/dev/net/tun")


#: Never reached, whatever the allow list says (with the pod's own addresses): slirp4netns's own
#: network in the user's namespace (gateway 10.0.2.2, DNS 10.0.2.3: only DNS is reached there;
#: slirp4netns maps any other port of 10.0.2.3 to the pod's nameserver, the pod's loopback when its
#: resolver is 127.0.0.x), and what is not one host out there ("this network", multicast, reserved).
NEVER = tuple(ipaddress.ip_network(n) for n in ("10.0.2.0/24", "0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4"))


@dataclass(frozen=True)
class NetworkPolicy:
    """Where a user's connections may go: anything but ``deny``, except what ``allow`` names; never
    to the pod's own addresses (``pod``) nor :data:`NEVER`, whatever ``allow`` says."""

    deny: tuple[Network, ...]
    allow: tuple[Network, ...] = ()
    pod: tuple[Network, ...] = ()


def parse_networks(values: Iterable[str], where: str) -> tuple[Network, ...]:
    """CIDRs (or bare addresses) as networks; ValueError naming the bad one."""
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{where}: {value!r} is not an address or CIDR ({exc})") from None
    return tuple(out)


def pod_addresses() -> tuple[Network, ...]:
    """The pod's own addresses (every interface but loopback), each as a /32 or /128."""
    found = []
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                ip = ipaddress.ip_address(a.address.split("%")[0])
                if not ip.is_loopback:
                    found.append(ipaddress.ip_network(ip))
    return tuple(sorted(set(found), key=str))


def policy_for(settings: NetworkConfig, environ: dict[str, str] | None = None) -> NetworkPolicy:
    """``[network]`` plus what is known of the pod: its own addresses, the cluster's API service."""
    environ = dict(os.environ) if environ is None else environ
    deny = list(parse_networks(settings.deny, "network.deny"))
    if settings.service_cidr:
        deny += parse_networks([settings.service_cidr], "network.service_cidr")
    if environ.get("KUBERNETES_SERVICE_HOST"):
        deny += parse_networks([environ["KUBERNETES_SERVICE_HOST"]], "KUBERNETES_SERVICE_HOST")
    return NetworkPolicy(deny=tuple(dict.fromkeys(deny)), allow=parse_networks(settings.allow, "network.allow"), pod=pod_addresses())


def ruleset(policy: NetworkPolicy) -> str:
    """The nftables script loaded into a user's namespace (``nft -f -``). IPv6 (but loopback) is
    refused whole: slirp4netns gives the namespace none, so IPv6 entries of the lists change nothing."""

    def named_set(name: str, nets: Iterable[Network]) -> str:
        elements = ", ".join(str(n) for n in nets if n.version == 4)
        body = "type ipv4_addr; flags interval; auto-merge;"
        return f"  set {name} {{ {body}{f' elements = {{ {elements} }};' if elements else ''} }}"

    return "\n".join([
        "table inet wsup {",
        named_set("never4", (*policy.pod, *NEVER)),
        named_set("allow4", policy.allow),
        named_set("deny4", policy.deny),
        "  chain output {",
        "    type filter hook output priority 0; policy accept;",
        '    oifname "lo" accept',
        f"    ip daddr {SLIRP_DNS} meta l4proto {{ tcp, udp }} th dport 53 accept",
        "    ip daddr @never4 meta l4proto tcp reject with tcp reset",
        "    ip daddr @never4 reject with icmpx type admin-prohibited",
        "    ip daddr @allow4 accept",
        "    ip daddr @deny4 meta l4proto tcp reject with tcp reset",
        "    ip daddr @deny4 reject with icmpx type admin-prohibited",
        "    meta nfproto ipv6 meta l4proto tcp reject with tcp reset",
        "    meta nfproto ipv6 reject with icmpx type admin-prohibited",
        "  }",
        "}",
        "",
    ])


def check(settings: NetworkConfig) -> list[str]:
    """What this machine lacks for a network of each user's own (empty: nothing)."""
    problems = []
    for name, path in (("slirp4netns", settings.slirp4netns), ("nft", settings.nft)):
        if not os.access(path, os.X_OK):
            problems.append(f"no {name} at {path} (Debian: apt-get install {'slirp4netns' if name == 'slirp4netns' else 'nftables'})")
    if not TUN.exists():
        problems.append(f"no {TUN} (Kubernetes: mount the host's /dev/net/tun, or run privileged)")
    caps = capabilities()
    for cap, name in ((CAP_NET_ADMIN, "NET_ADMIN"), (CAP_SYS_ADMIN, "SYS_ADMIN")):
        if not caps & (1 << cap):
            problems.append(f"the daemon lacks CAP_{name} (Kubernetes: capabilities add {name}, or privileged)")
    return problems


class NetStack:
    """Makes new network namespaces usable: :meth:`prepare` for each launcher."""

    def __init__(self, settings: NetworkConfig, policy: NetworkPolicy) -> None:
        self.settings = settings
        self.policy = policy
        self.rules = ruleset(policy).encode()

    async def prepare(self, pid: int, procs_files: list[str]) -> int:
        """Deny list, then slirp4netns, for the namespace of ``pid`` (a launcher, our child, still
        root and waiting); slirp4netns's pid. Raises LaunchError, leaving no slirp4netns behind.
        Both act on the namespace opened once here, whatever becomes of ``pid`` meanwhile."""
        try:
            ns = _high(os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            raise _failed(f"no network namespace of pid {pid}: {exc}") from exc
        try:
            await self._load_rules(ns)
            slirp, ready, pidfd = self._spawn_slirp(ns)
        except OSError as exc:
            raise _failed(f"cannot start it for pid {pid}: {exc}") from exc
        finally:
            os.close(ns)
        try:
            for path in procs_files:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, str(slirp).encode())
                finally:
                    os.close(fd)
            await self._wait_ready(ready)
        except BaseException as exc:
            pidfd_kill(pidfd)
            if isinstance(exc, OSError):
                raise _failed(f"cannot move slirp4netns into the user's cgroup: {exc}") from exc
            raise
        finally:
            os.close(pidfd)
            os.close(ready)
        return slirp

    async def _load_rules(self, ns: int) -> None:
        argv = [shutil.which("nsenter") or "/usr/bin/nsenter", f"--net=/proc/self/fd/{ns}", "--", str(self.settings.nft), "-f", "-"]
        with trio.move_on_after(self.settings.ready_timeout) as timer:
            done = await trio.run_process(argv, stdin=self.rules, capture_stdout=True, capture_stderr=True, check=False, pass_fds=(ns,))
        if timer.cancelled_caught:
            raise _failed(f"nft did not load the deny list within {self.settings.ready_timeout:g} s")
        if done.returncode != 0:
            raise _failed(f"nft refused the deny list: {done.stderr.decode(errors='replace').strip()[-500:]}")

    def _spawn_slirp(self, ns: int) -> tuple[int, int, int]:
        """slirp4netns for the namespace ``ns`` (its fd 4): (its pid, the read end of its ready pipe, a pidfd)."""
        ready_read, ready_write = os.pipe2(os.O_CLOEXEC)
        try:
            ready_write = _high(ready_write)
        except OSError:
            os.close(ready_read)
            raise
        try:
            child = os.posix_spawn(
                str(self.settings.slirp4netns),
                [str(self.settings.slirp4netns), "--configure", f"--mtu={self.settings.mtu}", "--disable-host-loopback",
                 "--enable-sandbox", "--enable-seccomp", "--ready-fd=3", "--netns-type=path", "/proc/self/fd/4", "tap0"],
                {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDWR, 0),
                    (os.POSIX_SPAWN_DUP2, 0, 1),
                    (os.POSIX_SPAWN_DUP2, 0, 2),
                    (os.POSIX_SPAWN_DUP2, ready_write, 3),
                    (os.POSIX_SPAWN_DUP2, ns, 4),
                ],
                setsid=True,
            )
        except OSError:
            os.close(ready_read)
            raise
        finally:
            os.close(ready_write)
        return child, ready_read, os.pidfd_open(child)

    async def _wait_ready(self, ready: int) -> None:
        with trio.move_on_after(self.settings.ready_timeout):
            await trio.lowlevel.wait_readable(ready)
            if os.read(ready, 1) == b"1":
                return
            raise _failed("slirp4netns exited before it was ready")
        raise _failed(f"slirp4netns was not ready within {self.settings.ready_timeout:g} s")


def _failed(what: str) -> LaunchError:
    return LaunchError(
        f"the user's network: {what}",
        hint="the start failed and nothing of it is left running; `workspacectl pod` and the start-up log show whether the "
             "network mechanism is in force; run slirp4netns by hand as the daemon does (README \"A user's network\") to see "
             "its own error; on a slow machine raise [network] ready_timeout",
    )


def _high(fd: int) -> int:
    """``fd`` moved above the numbers a child's file actions write (3, 4)."""
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    finally:
        os.close(fd)


def preparer(config: Config) -> PrepareNetwork:
    """The launcher pool's hook: every new namespace made usable with ``[network]``'s policy."""
    policy = policy_for(config.network)
    log.info("users' network: %d denied ranges, %d allowed, %d pod addresses always refused", len(policy.deny), len(policy.allow), len(policy.pod))
    stack = NetStack(config.network, policy)

    async def prepare(pid: int, procs_files: list[str]) -> None:
        await stack.prepare(pid, procs_files)

    return prepare
