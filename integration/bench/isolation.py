"""What a user's own view of the machine ([isolation]) costs a cold start of the real Theia.

Run as root from the repository root::

    .venv/bin/python integration/bench/isolation.py [--runs 20] [--tier free]

Two daemons in turn, the same real Theia (the checkout's build, images/theia/build), the same
front door and the same tier: the baseline with every ``[isolation]`` mechanism off, then with
every mechanism this machine can give on (the product's default). For each, one warm-up and then
``--runs`` cold starts: the user stopped, then one page-load request for ``/`` until the whole
workbench HTML has arrived. Prints p50 / p99 of both, the ratio, and the product targets (with
isolation: p50 < 1 s, p99 < 2 s); writes artifacts/bench-isolation.json. No assertions: figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(REPO), str(HERE)]

from common import log, percentile  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from theia_users import missing_requirements, theia_command  # noqa: E402

from supervisor.config import ISOLATION_MECHANISMS  # noqa: E402
from tests.frontdoor_client import AUDIENCE, ISSUER, Client, mint  # noqa: E402
from tests.harness import Daemon, isolation_available, poll  # noqa: E402

USER = "bench-iso"


def cold_starts(mechanisms: dict[str, str], pem: Path, key: bytes, runs: int, tier: str) -> dict[str, Any]:
    d = Daemon(**{
        "http__listen": "127.0.0.1:0", "http__start_timeout": "60s",
        "auth__algorithms": ["RS256"], "auth__public_key_file": str(pem), "auth__issuer": ISSUER,
        "auth__audience": AUDIENCE, "auth__cookie_secure": False,
        "daemon__log_level": "info", "ide__command": theia_command(), "ide__env": {}, "ide__ready_timeout": "60s",
        "idle__lsp_pause_after": "1h", "idle__gc_after": "2h", "idle__freeze_after": "3h", "idle__stop_after": "4h",
        **{f"isolation__{name}": value for name, value in mechanisms.items()},
    })
    try:
        d.start()
        port = int(poll(lambda: (m := re.search(r"front door listening on 127\.0\.0\.1:(\d+)", d.log_text())) and m.group(1), 15, "front door"))
        token = mint(key, USER, alg="RS256", tier=tier, sid=f"{USER}-bench", ttl=3600)
        client = Client("127.0.0.1", port, timeout=30)
        try:
            answer = client.get(f"/?token={token}")
            assert answer.status == 303, (answer.status, answer.body[:300])
            cookie = re.search(r"wsup_session=([^;]+)", answer.header("set-cookie") or "")
        finally:
            client.close()
        assert cookie, "no session cookie"
        headers = {"Cookie": f"wsup_session={cookie.group(1)}", "Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
        samples: list[float] = []
        for run in range(runs + 1):
            if run:
                assert d.ctl("stop", USER).returncode == 0
            client = Client("127.0.0.1", port, timeout=60)
            began = time.monotonic()
            try:
                page = client.get("/", headers=headers)
            finally:
                client.close()
            took = time.monotonic() - began
            assert page.status == 200 and b"bundle.js" in page.body, (page.status, page.body[:300])
            if run:
                samples.append(took)
        in_force = d.ctl_json("pod")["pod"]["isolation"]
        return {"p50": percentile(samples, 50), "p99": percentile(samples, 99), "min": min(samples), "max": max(samples),
                "samples": samples, "in_force": in_force}
    finally:
        d.cleanup()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="cold starts measured per daemon, after one warm-up (default %(default)s)")
    p.add_argument("--tier", default="free", help="tier of the user (default %(default)s)")
    p.add_argument("--json", type=Path, default=REPO / "artifacts" / "bench-isolation.json")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    why = missing_requirements(browser=False)
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    overrides, missing = isolation_available()
    on = {name.removeprefix("isolation__"): value for name, value in overrides.items()}
    if missing:
        log(f"not available here, left off: {missing}")
    keys = Path(tempfile.mkdtemp(prefix="wsup-bench-iso-"))
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (keys / "jwt.pem").write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    key = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    load = os.getloadavg()
    results = {"host": {"cpus": os.cpu_count(), "kernel": platform.release()}, "load_at_start": load, "runs": args.runs, "tier": args.tier}
    log(f"baseline: isolation off ({args.runs} cold starts)")
    results["off"] = cold_starts({name: "off" for name in ISOLATION_MECHANISMS}, keys / "jwt.pem", key, args.runs, args.tier)
    log(f"isolated: {', '.join(n for n, v in on.items() if v == 'on')} ({args.runs} cold starts)")
    results["on"] = cold_starts(on, keys / "jwt.pem", key, args.runs, args.tier)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    off, iso = results["off"], results["on"]
    print(f"\ncold start of real Theia to workbench HTML, tier {args.tier}, {args.runs} runs each (load at start {load[0]:.2f}):")
    print(f"{'':<12}{'off':>10}{'isolated':>10}{'ratio':>8}{'target':>10}  result")
    for q, target in (("p50", 1.0), ("p99", 2.0)):
        print(f"{q:<12}{off[q]:>10.3f}{iso[q]:>10.3f}{iso[q] / off[q]:>8.2f}{'< %g s' % target:>10}  {'PASS' if iso[q] < target else 'MISS'}")
    print(f"in force: {', '.join(n for n, v in iso['in_force'].items() if v)}; JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
