"""What each user's own network ([isolation] network) costs: memory per user, outbound throughput.

Run as root from the repository root::

    .venv/bin/python integration/bench/netstack.py [--users 10] [--mib 256]

- memory: ``--users`` network namespaces made usable exactly as the daemon does for a user
  (supervisor.netstack.NetStack.prepare: the deny list in nftables, slirp4netns), then the RSS and
  PSS of each slirp4netns (``/proc/PID/smaps_rollup``) - the memory the network stack adds per
  user; the nftables rules live in kernel memory of the namespace (not counted). Target <= 5 MiB.
  Also the first one's RSS and PSS again after it carried the throughput runs (its buffers).
- throughput: a TCP sink in another namespace the bench makes (a veth pair, as tests/outside.py);
  ``--mib`` MiB sent to it from the pod's namespace over the veth (the baseline: the host's own
  path) and from a user's namespace through slirp4netns, same run; MiB/s of each and the ratio.

Prints the figures; writes artifacts/bench-netstack.json. No assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(REPO), str(HERE)]

import trio  # noqa: E402
from common import log, percentile  # noqa: E402

from supervisor import config, netstack  # noqa: E402
from supervisor.netstack import NetStack, policy_for  # noqa: E402
from tests.outside import outside_namespace  # noqa: E402

SINK = ("import socket, sys\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8)\n"
        "while True:\n    c, _ = s.accept()\n    n = 0\n"
        "    while (b := c.recv(1 << 20)):\n        n += len(b)\n    c.sendall(str(n).encode()); c.close()\n")
SEND = ("import socket, sys, time\nmib = int(sys.argv[3]); block = b'x' * (1 << 20)\n"
        "c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60); t = time.monotonic()\n"
        "for _ in range(mib):\n    c.sendall(block)\nc.shutdown(socket.SHUT_WR); got = int(c.recv(64))\n"
        "print(mib / (time.monotonic() - t), got)\n")


def smaps_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0])
    return out


def send(prefix: list[str], address: str, mib: int) -> float:
    done = subprocess.run([*prefix, sys.executable, "-c", SEND, address, "9000", str(mib)], capture_output=True, text=True, check=True)
    rate, got = done.stdout.split()
    assert int(got) == mib << 20, (got, mib)
    return float(rate)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=10)
    p.add_argument("--mib", type=int, default=256, help="MiB per throughput run (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="throughput runs per path, median reported (default %(default)s)")
    p.add_argument("--json", type=Path, default=REPO / "artifacts" / "bench-netstack.json")
    args = p.parse_args()
    settings = config.from_dict({}).network
    problems = netstack.check(settings) if os.geteuid() == 0 else ["run as root"]
    if problems:
        print(f"cannot run: {problems}", file=sys.stderr)
        return 2
    namespaces: list[subprocess.Popen[bytes]] = []
    slirps: list[int] = []
    results: dict[str, object] = {"load_at_start": os.getloadavg(), "users": args.users, "mib": args.mib}
    try:
        with outside_namespace(SINK, ("0.0.0.0", "9000")) as outside:
            settings = config.from_dict({"network": {"allow": [outside["allowed"]]}}).network
            stack = NetStack(settings, policy_for(settings))
            prepare_s = []
            for _ in range(args.users):
                proc = subprocess.Popen(["unshare", "--net", "sleep", "3600"])
                namespaces.append(proc)
                while os.readlink(f"/proc/{proc.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
                    time.sleep(0.005)
                began = time.monotonic()
                slirps.append(trio.run(stack.prepare, proc.pid, []))
                prepare_s.append(time.monotonic() - began)
            time.sleep(1)  # let each slirp4netns settle after its start-up
            mem = [smaps_kib(slirp) for slirp in slirps]
            rss = [m["Rss"] / 1024 for m in mem]
            pss = [m["Pss"] / 1024 for m in mem]
            results["prepare_s"] = {"p50": percentile(prepare_s, 50), "max": max(prepare_s)}
            results["slirp_rss_mib"] = {"mean": sum(rss) / len(rss), "max": max(rss)}
            results["slirp_pss_mib"] = {"mean": sum(pss) / len(pss), "max": max(pss)}
            time.sleep(0.5)
            sink = outside["allowed"]
            host = [send([], sink, args.mib) for _ in range(args.rounds)]
            user = [send(["nsenter", f"--net=/proc/{namespaces[0].pid}/ns/net"], sink, args.mib) for _ in range(args.rounds)]
            results["host_mib_s"] = sorted(host)[len(host) // 2]
            results["slirp_mib_s"] = sorted(user)[len(user) // 2]
            after = smaps_kib(slirps[0])  # its buffers after carrying the transfers
            results["slirp_after_transfer_mib"] = {"rss": after["Rss"] / 1024, "pss": after["Pss"] / 1024}
            results["raw"] = {"host_mib_s": host, "slirp_mib_s": user, "rss_mib": rss, "pss_mib": pss, "prepare_s": prepare_s}
    finally:
        for slirp in slirps:
            os.kill(slirp, 9)
            os.waitpid(slirp, 0)
        for proc in namespaces:
            proc.kill()
            proc.wait()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    r = results
    rss_mean = r["slirp_rss_mib"]["mean"]  # type: ignore[index]
    print(f"\nper user, {args.users} users (load at start {r['load_at_start'][0]:.2f}):")  # type: ignore[index]
    print(f"  network stack memory: RSS {rss_mean:.2f} MiB, PSS {r['slirp_pss_mib']['mean']:.2f} MiB (slirp4netns)"  # type: ignore[index]
          f"  target <= 5 MiB: {'PASS' if rss_mean <= 5 else 'MISS'}")
    print(f"  after carrying the transfers below: RSS {r['slirp_after_transfer_mib']['rss']:.2f} MiB, "  # type: ignore[index]
          f"PSS {r['slirp_after_transfer_mib']['pss']:.2f} MiB")  # type: ignore[index]
    print(f"  set-up (deny list + slirp4netns ready): p50 {r['prepare_s']['p50'] * 1000:.1f} ms, max {r['prepare_s']['max'] * 1000:.1f} ms"  # type: ignore[index]
          " (off the start: the launcher pool does it ahead on cgroup v1)")
    print(f"outbound TCP, {args.mib} MiB, median of {args.rounds}: host {r['host_mib_s']:.0f} MiB/s, "
          f"through slirp4netns {r['slirp_mib_s']:.0f} MiB/s, ratio {r['slirp_mib_s'] / r['host_mib_s']:.2f}")  # type: ignore[operator]
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
