#!/usr/bin/env python3
"""Front-door benchmark: the daemon's front door against configurable-http-proxy and direct.

Run as root from the repository root::

    .venv/bin/python integration/bench/frontdoor.py [--rounds 3] [--cold-runs 20] [--cpu 1]

One run starts, side by side:

- ``direct``: the echo upstream ``node/echo-server.mjs`` (HTTP + WebSocket echo, Node's standard
  library only) on a 127.0.0.1 TCP port;
- ``chp``: configurable-http-proxy (npm, the JupyterHub proxy, pinned in ``node/package.json``)
  on its own port with that upstream as its default target;
- ``ours``: the real daemon (``python -m supervisor.daemon run``) with its front door on a free
  port, RS256 tokens (a key pair made by the run), whose IDE command is the same echo program: the
  daemon starts it as the user's uid in the user's cgroup, listening on the user's Unix socket,
  exactly as it runs Theia. After a WebSocket's 101 the front door's relay thread carries the
  bytes (``supervisor/frontdoor/relay.py``). ``ours`` has ``[http] kernel_splice = true`` (the
  default: large ``Content-Length`` response bodies moved with ``os.splice``) and ``[http]
  relay_fast_path = true`` (the default: the relay's C fast path passes on WebSocket frames that
  need no decision); a second daemon, ``ours-python``, has both false (bodies through h11, every
  WebSocket byte through the Python relay loop), to measure what the two give;
- for the cold start, a third daemon whose IDE is the real Theia (``images/theia/build``
  installed with ``--prefix`` into the run's directory).

All clients are one Node program, ``node/load.mjs``, the same for every path; it signs in like a
browser (``/?token=`` once, then the session cookie). Figures (target in brackets, CHP as measured
when the issue was written in parentheses):

1. WebSocket round trip, 100 B, one connection, client + proxy + upstream pinned to one CPU
   (``--cpu``): p50, ratio to direct [<= 2.0] (2.33);
2. 50 connections, 100 B round trips each, not pinned: messages (round trips) per second [>= 60k] (53k);
3. 1 MiB echo throughput, one connection, pinned: fraction of direct [>= 0.5] (0.20);
4. 10 MB GET, one keep-alive connection, pinned: p50 time, ratio to direct [<= 1.5] (1.87);
5. cold start: the user stopped, then one request for ``/`` (as a page load) until the whole
   workbench HTML of a real Theia has arrived: p50 [< 1 s], p99 [< 2 s].

Figures 1-4 are measured in ``--rounds`` rounds, every path once per round in rotating order, and
the median over rounds is reported (each round's own figure is already a p50 or a rate). The CPU
time used by each proxy process during each measurement is recorded too (for the splice question).
Prints a table and writes ``artifacts/bench-frontdoor.json``. Everything is removed at the end,
also on failure, Ctrl-C or SIGTERM. See ``integration/bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from tests.frontdoor_client import AUDIENCE, ISSUER, Client, mint  # noqa: E402
from tests.harness import Daemon, poll  # noqa: E402

NODE_DIR = HERE / "node"
ECHO = NODE_DIR / "echo-server.mjs"
LOAD = NODE_DIR / "load.mjs"
CHP_MAIN = NODE_DIR / "node_modules" / "configurable-http-proxy" / "bin" / "configurable-http-proxy"
THEIA = REPO / "images" / "theia"
USER = "bench-echo"
COLD_USER = "bench-cold"
WS_PATHS = ("direct", "chp", "ours", "ours-python")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_tcp(port: int, timeout: float, what: str) -> None:
    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    poll(up, timeout, what)


def load_info() -> dict[str, Any]:
    """What else the machine is doing: load average and the busiest processes not ours."""
    procs = []
    for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_percent"]):
        procs.append(p)
    time.sleep(0.5)
    busy = []
    for p in procs:
        try:
            busy.append((p.cpu_percent(None), p.pid, " ".join(p.info["cmdline"] or [p.info["name"] or "?"])[:80]))
        except psutil.Error:
            pass
    busy.sort(reverse=True)
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "busiest": [f"{c:.0f}% {cmd}" for c, _, cmd in busy[:5] if c > 5]}


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def set_affinity(pids: list[int], cpus: set[int]) -> None:
    """Pin every thread of every process (threads keep their own affinity in Linux)."""
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                pass


# ---- the contenders ----------------------------------------------------------------------------------


class Route:
    """One way to the echo upstream: where the client connects and which processes serve it."""

    def __init__(self, name: str, port: int, headers: dict[str, str], proxy_pids: Callable[[], list[int]],
                 upstream_pids: Callable[[], list[int]], socket: str | None = None) -> None:
        self.name = name
        self.port = port
        self.socket = socket  # a Unix socket to connect to instead of 127.0.0.1:port
        self.headers = headers
        self.proxy_pids = proxy_pids
        self.upstream_pids = upstream_pids


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = Path(tempfile.mkdtemp(prefix="wsup-bench-fd-", dir="/tmp"))
        os.chmod(self.base, 0o755)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.daemons: list[Daemon] = []
        self.paths: dict[str, Route] = {}
        self.all_cpus = set(range(os.cpu_count() or 1))
        self.results: dict[str, Any] = {"figures": {}, "raw": {}, "load": {}}
        self.private_key: Any = None

    # -- set-up --------------------------------------------------------------------------------------

    def keys(self) -> Path:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = self.base / "jwt.pem"
        pem.write_bytes(self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return pem

    def spawn(self, argv: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(self.base / log_name, "wb")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=NODE_DIR, start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def start_direct_and_chp(self) -> None:
        port = free_port()
        echo = self.spawn([self.args.node, str(ECHO), "--port", str(port)], "echo-direct.log")
        wait_tcp(port, 10, "the direct echo upstream")
        self.paths["direct"] = Route("direct", port, {}, lambda: [], lambda: [echo.pid])
        chp_port, api_port = free_port(), free_port()
        chp = self.spawn(
            [self.args.node, str(CHP_MAIN), "--ip", "127.0.0.1", "--port", str(chp_port), "--api-ip", "127.0.0.1",
             "--api-port", str(api_port), "--default-target", f"http://127.0.0.1:{port}", "--log-level", "warn"],
            "chp.log", env={**os.environ, "CONFIGPROXY_AUTH_TOKEN": os.urandom(16).hex()},
        )
        wait_tcp(chp_port, 20, "configurable-http-proxy")
        self.paths["chp"] = Route("chp", chp_port, {}, lambda: [chp.pid], lambda: [echo.pid])
        self.results["versions"] = {
            "node": subprocess.run([self.args.node, "--version"], capture_output=True, text=True).stdout.strip(),
            "configurable-http-proxy": json.loads((CHP_MAIN.parents[1] / "package.json").read_text())["version"],
        }

    def start_prototypes(self) -> None:
        """Minimal pure-Python relays (relay_proto.py) in front of the direct upstream."""
        upstream = self.paths["direct"].port
        for runtime in ("trio", "asyncio"):
            for mode in ("copy", "splice"):
                port = free_port()
                proc = self.spawn([sys.executable, str(HERE / "relay_proto.py"), "--runtime", runtime, "--mode", mode, "--port", str(port),
                                   "--upstream", f"127.0.0.1:{upstream}"], f"proto-{runtime}-{mode}.log")
                wait_tcp(port, 15, f"the {runtime} {mode} relay")
                name = f"proto-{runtime}-{mode}"
                self.paths[name] = Route(name, port, {}, lambda pid=proc.pid: [pid], self.paths["direct"].upstream_pids)

    def daemon(self, name: str, command: list[str], pem: Path, **extra: Any) -> tuple[Daemon, int]:
        d = Daemon(**{
            "http__listen": "127.0.0.1:0",
            "http__start_timeout": "60s",
            "auth__algorithms": ["RS256"],
            "auth__public_key_file": str(pem),
            "auth__issuer": ISSUER,
            "auth__audience": AUDIENCE,
            "auth__cookie_secure": False,
            "daemon__log_level": "info",
            "ide__command": command,
            "ide__env": {},
            "ide__ready_timeout": "60s",
            "ide__stop_grace": "5s",
            "restart__healthy_after": "5s",
            # The idle ladder must not step in during the run.
            "idle__lsp_pause_after": "1h", "idle__gc_after": "2h", "idle__freeze_after": "3h", "idle__stop_after": "4h",
            # One tier with no effective CPU limit on this host, so the upstream is never throttled.
            "tiers__bench": {"cpu": str(len(self.all_cpus)), "memory": "2Gi", "sessions": 100, "start_cpu": str(len(self.all_cpus))},
            **extra,
        })
        self.daemons.append(d)
        d.start()
        port = int(poll(lambda: (m := re.search(r"front door listening on 127\.0\.0\.1:(\d+)", d.log_text())) and m.group(1), 15, f"{name}'s front door"))
        return d, port

    def sign_in(self, port: int, user: str, tier: str) -> str:
        """Like a browser: ``/?token=`` once, then the session cookie (returned)."""
        token = mint(self.private_key, user, alg="RS256", tier=tier, sid=f"{user}-bench", ttl=4 * 3600)
        client = Client("127.0.0.1", port, timeout=30)
        try:
            answer = client.get(f"/?token={token}")
            assert answer.status == 303, (answer.status, answer.body[:300])
            return client.cookies["wsup_session"]
        finally:
            client.close()

    def start_ours(self, pem: Path) -> None:
        echo = self.base / "echo-server.mjs"
        shutil.copy(ECHO, echo)
        os.chmod(echo, 0o644)
        for name, native in (("ours", True), ("ours-python", False)):
            d, port = self.daemon(name, [self.args.node, str(echo)], pem, http__kernel_splice=native,
                                  http__relay_fast_path=native, **self.args.daemon_set)
            cookie = self.sign_in(port, USER, "bench")
            headers = {"Cookie": f"wsup_session={cookie}"}
            client = Client("127.0.0.1", port, timeout=60)
            try:
                first = client.get("/", headers=headers)  # the cold start of the echo "IDE"
                assert first.status == 200, (first.status, first.body[:300])
            finally:
                client.close()
            info = d.user(USER)
            assert info["state"] == "RUNNING", info
            wanted = "front door WebSockets: " + ("C fast path" if native else "pure-Python relay")
            if wanted not in d.log_text():
                raise SystemExit(f"{name}: the daemon's log lacks {wanted!r} (is the fast path built? "
                                 "pip install -e . with gcc installed)")
            daemon_pid = d.proc.pid if d.proc else 0
            self.paths[name] = Route(name, port, headers, lambda p=daemon_pid: [p], lambda dd=d: [int(dd.user(USER)["pid"])])
            if name == "ours" and self.args.ide_direct:
                # The same IDE, reached without the front door: its Unix socket (the daemon's), its
                # uid and cgroup - what the front door adds, apart from where the IDE runs.
                self.paths["ide-direct"] = Route("ide-direct", 0, {}, lambda: [], lambda dd=d: [int(dd.user(USER)["pid"])],
                                                 socket=str(d.ide_socket(USER)))

    # -- measuring -----------------------------------------------------------------------------------

    def run_load(self, path: Route, opts: dict[str, Any], pinned: bool) -> dict[str, Any]:
        cpu = self.args.cpu
        pids = path.proxy_pids() + path.upstream_pids()
        set_affinity(pids, {cpu} if pinned else self.all_cpus)
        where = {"socket": path.socket} if path.socket else {"host": "127.0.0.1", "port": path.port}
        argv = [self.args.node, str(LOAD), json.dumps({**where, "headers": path.headers, **opts})]
        if pinned:
            argv = ["taskset", "-c", str(cpu), *argv]
        before = cpu_seconds(path.proxy_pids())
        began = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=NODE_DIR)
        wall = time.monotonic() - began
        used = cpu_seconds(path.proxy_pids()) - before
        set_affinity(pids, self.all_cpus)
        try:
            result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise RuntimeError(f"load.mjs {opts['mode']} on {path.name} printed nothing usable: {done.stdout[-500:]} {done.stderr[-2000:]}") from None
        if not result.get("ok"):
            raise RuntimeError(f"load.mjs {opts['mode']} on {path.name} failed: {result.get('error')}")
        result["proxy_cpu_s"] = used
        result["wall_s"] = wall
        return result

    def verify(self) -> None:
        for path in self.paths.values():
            self.run_load(path, {"mode": "verify"}, pinned=False)
        log("every path echoes 100 B, 70 kB and 1 MiB frames byte for byte")

    def figures(self) -> None:
        a = self.args
        tests: list[tuple[str, dict[str, Any], bool, Callable[[dict[str, Any]], float]]] = [
            ("ws_rtt_100b_us", {"mode": "rtt", "size": 100, "count": a.rtt_count, "warmup": 500}, not a.no_pin, lambda r: r["rtt_us"][0]),
            ("ws_50conn_msgs_per_s", {"mode": "multi", "size": 100, "connections": 50, "seconds": a.seconds, "warmup_s": 0.5}, False,
             lambda r: r["msgs_per_s"]),
            ("ws_1mib_echo_mib_per_s", {"mode": "bulk", "size": 2**20, "seconds": a.seconds}, not a.no_pin, lambda r: r["mib_per_s"]),
            ("get_10mb_s", {"mode": "get", "path": "/bytes/10000000", "count": a.get_count, "warmup": 2}, not a.no_pin,
             lambda r: r["seconds"][0]),
        ]
        raw: dict[str, dict[str, list[dict[str, Any]]]] = {name: {p: [] for p in self.paths} for name, *_ in tests}
        order = list(self.paths)
        for rnd in range(a.rounds):
            self.results["load"][f"round{rnd + 1}"] = os.getloadavg()
            for name, opts, pinned, value in tests:
                rotated = order[rnd % len(order):] + order[: rnd % len(order)]
                for p in rotated:
                    r = self.run_load(self.paths[p], opts, pinned)
                    r["value"] = value(r)
                    raw[name][p].append(r)
                line = "  ".join(f"{p} {raw[name][p][-1]['value']:.4g}" for p in order)
                log(f"round {rnd + 1}/{a.rounds} {name}{' (pinned)' if pinned else ''}: {line}")
        self.results["raw"].update(raw)
        for name, *_ in tests:
            self.results["figures"][name] = {
                p: {
                    "median": statistics.median(r["value"] for r in raw[name][p]),
                    "rounds": [r["value"] for r in raw[name][p]],
                    "proxy_cpu_s": [r["proxy_cpu_s"] for r in raw[name][p]],
                    # the proxy's CPU per operation (round trip, 1 MiB echo, 10 MB GET), warm-up included
                    "proxy_cpu_us_per_op": statistics.median(r["proxy_cpu_s"] / r["ops"] * 1e6 for r in raw[name][p]),
                }
                for p in order
            }

    def under_http_load(self) -> None:
        """WebSocket round trips (100 B, unpinned) while ``--http-clients`` other connections fetch
        1 kB pages through the same proxy without pause: does HTTP work on the proxy's main
        thread delay the WebSocket relay? p50 / p90 / p99 per path, one round."""
        a = self.args
        out: dict[str, Any] = {}
        for name, path in self.paths.items():
            where = {"socket": path.socket} if path.socket else {"host": "127.0.0.1", "port": path.port}
            getter = json.dumps({**where, "headers": path.headers, "mode": "get", "path": "/bytes/1000", "count": 10**9, "warmup": 0})
            getters = [subprocess.Popen([a.node, str(LOAD), getter], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        cwd=NODE_DIR, start_new_session=True) for _ in range(a.http_clients)]
            try:
                time.sleep(0.5)  # the page loads are under way
                r = self.run_load(path, {"mode": "rtt", "size": 100, "count": a.rtt_count, "warmup": 500}, pinned=False)
            finally:
                for g in getters:
                    g.kill()
                    g.wait()
            out[name] = {"rtt_us": dict(zip(("p50", "mean", "p90", "p99"), r["rtt_us"])), "proxy_cpu_s": r["proxy_cpu_s"]}
            log(f"under HTTP load ({a.http_clients} clients of 1 kB GETs) ws_rtt_100b_us on {name}: "
                + " ".join(f"{k} {v:.0f}" for k, v in out[name]["rtt_us"].items()))
        self.results["figures"]["ws_rtt_under_http_load"] = out

    # -- cold start ----------------------------------------------------------------------------------

    def cold_start(self, pem: Path) -> None:
        a = self.args
        prefix = Path(a.theia) if a.theia else self.base / "theia"
        if not a.theia:
            if not (THEIA / "app" / "lib" / "backend" / "main.js").is_file():
                log("cold start skipped: Theia is not built (run images/theia/build) and no --theia given")
                self.results["figures"]["cold_start_s"] = None
                return
            done = subprocess.run([str(THEIA / "build"), "--no-apt", "--prefix", str(prefix)], capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise RuntimeError(f"images/theia/build --prefix failed: {done.stderr[-2000:]}")
        command = [
            a.node, "--expose-gc", "--require", str(prefix / "unix-socket-preload.js"), "--require", str(prefix / "gc-preload.js"),
            str(prefix / "lib" / "backend" / "main.js"), "{workspace}", "--hostname", "127.0.0.1",
            "--session-preference=security.workspace.trust.enabled=false",
        ]
        d, port = self.daemon("theia", command, pem)
        cookie = self.sign_in(port, COLD_USER, a.cold_tier)
        headers = {"Cookie": f"wsup_session={cookie}", "Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
        samples: list[float] = []
        logged: list[float] = []
        for run in range(a.cold_runs + 1):
            info = d.user(COLD_USER) if run else None
            if info and info["state"] != "STOPPED":
                stopped = d.ctl("stop", COLD_USER)
                assert stopped.returncode == 0, stopped.stderr
            log_size = len(d.log_text())
            client = Client("127.0.0.1", port, timeout=60)
            began = time.monotonic()
            try:
                page = client.get("/", headers=headers)
            finally:
                client.close()
            took = time.monotonic() - began
            html = page.body.decode(errors="replace")
            assert page.status == 200 and "bundle.js" in html, (page.status, html[:300])
            m = re.search(rf"user={COLD_USER} RUNNING ([\d.]+)s after the request arrived", d.log_text()[log_size:])
            if run == 0:
                log(f"cold start warm-up (not counted): {took:.3f}s")
                self.results["raw"]["cold_start_warmup_s"] = took
                continue
            samples.append(took)
            if m:
                logged.append(float(m.group(1)))
        self.results["raw"]["cold_start_s"] = samples
        self.results["raw"]["cold_start_to_running_s"] = logged
        self.results["figures"]["cold_start_s"] = {
            "p50": percentile(samples, 50), "p99": percentile(samples, 99), "min": min(samples), "max": max(samples),
            "runs": len(samples), "tier": a.cold_tier,
            "to_running_p50": percentile(logged, 50) if logged else None,
        }
        log(f"cold start: p50 {percentile(samples, 50):.3f}s p99 {percentile(samples, 99):.3f}s over {len(samples)} runs")

    # -- clean-up ------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for d in self.daemons:
            try:
                if self.args.keep:
                    shutil.copy(d.log, self.base / f"{d.name}.log")
                d.cleanup()
            except Exception as exc:  # noqa: BLE001 - clean up the rest anyway
                log(f"cleanup of {d.name}: {exc}")
        if self.args.keep:
            log(f"kept {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)


# ---- report ------------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    f = results["figures"]
    rows: list[dict[str, Any]] = []

    def add(label: str, unit: str, key: str, kind: str, target: float, prior: str, fmt: str) -> None:
        if key not in f:
            return
        m = {p: f[key][p]["median"] for p in f[key]}
        direct = m["direct"]
        if kind == "ratio_le":  # smaller is better; ratio = ours / direct
            ratio, chp_ratio, ok = m["ours"] / direct, m["chp"] / direct, m["ours"] / direct <= target
            shown = f"<= {target:g}x"
        elif kind == "fraction_ge":  # bigger is better; fraction = ours / direct
            ratio, chp_ratio, ok = m["ours"] / direct, m["chp"] / direct, m["ours"] / direct >= target
            shown = f">= {target:g}x"
        else:  # absolute, bigger is better
            ratio, chp_ratio, ok = m["ours"] / direct, m["chp"] / direct, m["ours"] >= target
            shown = f">= {target:,.0f}"
        rows.append({
            "figure": label, "unit": unit, "ours": m["ours"], "ours_python": m["ours-python"], "chp": m["chp"], "direct": direct,
            "ratio": ratio, "chp_ratio": chp_ratio, "target": shown, "chp_before": prior, "result": "PASS" if ok else "MISS", "fmt": fmt,
        })

    add("WS round trip 100 B, 1 conn, pinned (p50)", "us", "ws_rtt_100b_us", "ratio_le", 2.0, "2.33", "{:.1f}")
    add("WS 50 conns, 100 B round trips", "msg/s", "ws_50conn_msgs_per_s", "abs_ge", 60000, "53k", "{:,.0f}")
    add("WS 1 MiB echo throughput, pinned", "MiB/s", "ws_1mib_echo_mib_per_s", "fraction_ge", 0.5, "0.20", "{:.1f}")
    add("GET 10 MB, 1 conn, pinned (p50)", "s", "get_10mb_s", "ratio_le", 1.5, "1.87", "{:.4f}")
    head = f"{'figure':<44} {'unit':>6} {'ours':>10} {'ours-python':>11} {'CHP':>10} {'direct':>10} {'ours/dir':>8} {'CHP/dir':>8} {'target':>9} {'CHP then':>8}  result"
    lines = [head, "-" * len(head)]
    for r in rows:
        fm = r["fmt"]
        lines.append(
            f"{r['figure']:<44} {r['unit']:>6} {fm.format(r['ours']):>10} {fm.format(r['ours_python']):>11} {fm.format(r['chp']):>10} "
            f"{fm.format(r['direct']):>10} {r['ratio']:>8.2f} {r['chp_ratio']:>8.2f} {r['target']:>9} {r['chp_before']:>8}  {r['result']}"
        )
    cold = f.get("cold_start_s")
    if cold:
        for q, target in (("p50", 1.0), ("p99", 2.0)):
            ok = cold[q] < target
            rows.append({"figure": f"cold start to workbench HTML ({q}, {cold['runs']} runs)", "unit": "s", "ours": cold[q],
                         "target": f"< {target:g} s", "result": "PASS" if ok else "MISS"})
            lines.append(f"{rows[-1]['figure']:<44} {'s':>6} {cold[q]:>10.3f} {'':>11} {'':>10} {'':>10} {'':>8} {'':>8} {'< %g s' % target:>9} {'':>8}  {rows[-1]['result']}")
        if cold.get("to_running_p50") is not None:
            lines.append(f"  (cold start: request to RUNNING p50 {cold['to_running_p50']:.3f}s by the daemon's log - Theia's own start-up "
                         f"under the tier's start CPU ({cold['tier']}); the rest is routing and the workbench HTML)")
    elif "cold_start_s" in f:
        lines.append(f"{'cold start to workbench HTML':<44} skipped (Theia not built)")
    for r in rows:
        r.pop("fmt", None)
    return "\n".join(lines), rows


def cpu_report(results: dict[str, Any]) -> str:
    """CPU the proxy process spent per operation: what it would sustain on a core of its own."""
    f = results["figures"]
    proxies = [p for p in f.get("ws_rtt_100b_us", {}) if p not in ("direct", "ide-direct")]
    head = f"{'proxy CPU per operation':<34}" + "".join(f"{p.replace('proto-', ''):>16}" for p in proxies)
    out = ["proxy CPU (user+sys of the proxy process, warm-up included) per operation, medians over rounds - the load-independent cost:",
           head]
    for key, label, scale, unit in (("ws_rtt_100b_us", "100 B round trip, 1 conn", 1, "us"), ("ws_50conn_msgs_per_s", "100 B round trip, 50 conns", 1, "us"),
                                    ("ws_1mib_echo_mib_per_s", "1 MiB echo (both ways)", 1e-3, "ms"), ("get_10mb_s", "10 MB GET", 1e-3, "ms")):
        if key in f:
            out.append(f"{label + ' (' + unit + ')':<34}" + "".join(f"{f[key][p]['proxy_cpu_us_per_op'] * scale:>16,.1f}" for p in proxies))
    if "ws_50conn_msgs_per_s" in f and "ours" in f["ws_50conn_msgs_per_s"]:
        per = f["ws_50conn_msgs_per_s"]["ours"]["proxy_cpu_us_per_op"]
        out.append(f"  -> at that cost one core of its own carries about {1e6 / per:,.0f} round trips/s through the front door (50 conns)")
    return "\n".join(out)


def splice_report(results: dict[str, Any]) -> str:
    """Spliced HTTP bodies and the relay's C fast path (ours) against h11 and the Python relay loop
    (ours-python)."""
    f = results["figures"]
    out = ["kernel_splice and relay_fast_path on (ours) vs off (ours-python), medians over rounds; proxy CPU = the daemon's user+sys seconds per measurement:"]
    for key, label in (("get_10mb_s", "GET 10 MB s (lower better)"), ("ws_rtt_100b_us", "RTT 100 B us [fast path]"),
                       ("ws_50conn_msgs_per_s", "50 conns msg/s [fast path]"), ("ws_1mib_echo_mib_per_s", "1 MiB echo MiB/s [fast path]")):
        if key not in f:
            continue
        s, c = f[key]["ours"], f[key]["ours-python"]
        out.append(f"  {label:<30} on {s['median']:>12,.4g}  off {c['median']:>12,.4g}  "
                   f"(on/off {s['median'] / c['median']:.2f}; proxy CPU s on {statistics.median(s['proxy_cpu_s']):.3f} "
                   f"off {statistics.median(c['proxy_cpu_s']):.3f})")
    return "\n".join(out)


def load_report(results: dict[str, Any]) -> str | None:
    """Round trips while the same proxy serves a stream of page loads on other connections."""
    f = results["figures"].get("ws_rtt_under_http_load")
    if not f:
        return None
    clients = results["settings"]["http_clients"]
    out = [f"WS round trip 100 B (us, unpinned) while {clients} other connections fetch 1 kB pages without pause through the same path:",
           f"{'path':<14}{'p50':>10}{'p90':>10}{'p99':>10}"]
    for name, v in f.items():
        q = v["rtt_us"]
        out.append(f"{name:<14}{q['p50']:>10,.0f}{q['p90']:>10,.0f}{q['p99']:>10,.0f}")
    return "\n".join(out)


def proto_report(results: dict[str, Any]) -> str | None:
    """The minimal relays beside the front door, CHP and direct (medians over rounds)."""
    f = results["figures"]
    names = [p for p in f.get("ws_rtt_100b_us", {}) if p.startswith("proto-") or p == "ide-direct"]
    if not names:
        return None
    cols = ["direct", "chp", "ours", "ours-python", *names]
    head = f"{'figure':<26}" + "".join(f"{c.replace('proto-', ''):>15}" for c in cols)
    out = ["extra paths (ide-direct: the daemon's IDE without the front door; relay_proto.py: bytes only, no HTTP, no auth), "
           "medians over rounds:", head]
    for key, label, fmt in (("ws_rtt_100b_us", "RTT 100 B pinned us", "{:,.1f}"), ("ws_50conn_msgs_per_s", "50 conns msg/s", "{:,.0f}"),
                            ("ws_1mib_echo_mib_per_s", "1 MiB echo MiB/s", "{:,.1f}"), ("get_10mb_s", "GET 10 MB s", "{:.4f}")):
        if key in f:
            out.append(f"{label:<26}" + "".join(f"{fmt.format(f[key][c]['median']):>15}" for c in cols))
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds of figures 1-4 (median reported; default %(default)s)")
    p.add_argument("--seconds", type=float, default=3.0, help="duration of the 50-connection and 1 MiB figures (default %(default)s)")
    p.add_argument("--rtt-count", type=int, default=5000, help="round trips per RTT measurement (default %(default)s)")
    p.add_argument("--http-clients", type=int, default=2,
                   help="connections fetching 1 kB pages without pause during the 'under HTTP load' round trips (default %(default)s; 0 skips)")
    p.add_argument("--get-count", type=int, default=20, help="10 MB GETs per measurement (default %(default)s)")
    p.add_argument("--cold-runs", type=int, default=20, help="cold starts measured, after one warm-up (default %(default)s)")
    p.add_argument("--cold-tier", default="free", help="tier of the cold-start user (default %(default)s: 200m, 1 CPU while starting)")
    p.add_argument("--prototypes", action="store_true",
                   help="also measure minimal pure-Python relays (relay_proto.py: trio/asyncio x copy/splice) as extra paths")
    p.add_argument("--daemon-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a config setting for the echo daemons (ours, ours-python), e.g. http.buffer_size=64Ki; repeatable")
    p.add_argument("--ide-direct", action="store_true",
                   help="also measure the client straight onto the daemon's IDE (its Unix socket, uid and cgroup; no front door)")
    p.add_argument("--no-cold-start", action="store_true", help="skip the Theia cold start")
    p.add_argument("--theia", default=None, help="an installed Theia prefix (default: install the checkout's build into the run dir)")
    p.add_argument("--cpu", type=int, default=1, help="the CPU single-connection figures are pinned to (default %(default)s)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the single-connection figures")
    p.add_argument("--node", default=shutil.which("node") or "/usr/bin/node")
    p.add_argument("--json", type=Path, default=REPO / "artifacts" / "bench-frontdoor.json", help="where to write the results")
    p.add_argument("--keep", action="store_true", help="keep the run directory and the daemons' logs")
    args = p.parse_args(argv)
    overrides: dict[str, str] = {}
    for item in args.daemon_set:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot and section and name):
            p.error(f"--daemon-set needs SECTION.KEY=VALUE, not {item!r}")
        overrides[f"{section}__{name}"] = value
    args.daemon_set = overrides
    return args


def ensure_chp(node: str) -> None:
    if CHP_MAIN.is_file():
        return
    log("installing configurable-http-proxy (npm ci in integration/bench/node)")
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm is not on PATH (needed once, to install configurable-http-proxy)")
    subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR, check=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("run as root: the daemon starts users under their own uids and cgroups", file=sys.stderr)
        return 2
    if not Path(args.node).is_file():
        print(f"node not found ({args.node})", file=sys.stderr)
        return 2
    ensure_chp(args.node)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    bench = Bench(args)
    r = bench.results
    r["host"] = {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
    r["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    started = time.monotonic()
    try:
        r["load"]["start"] = load_info()
        log(f"load at start: {r['load']['start']}")
        if r["load"]["start"]["loadavg"][0] > 1:
            log("WARNING: load average above 1: other work shares these cores and skews every figure")
        pem = bench.keys()
        bench.start_direct_and_chp()
        bench.start_ours(pem)
        if args.prototypes:
            bench.start_prototypes()
        bench.verify()
        bench.figures()
        if args.http_clients:
            bench.under_http_load()
        r["load"]["after_figures"] = load_info()
        if not args.no_cold_start:
            bench.cold_start(pem)
        r["load"]["end"] = load_info()
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        bench.cleanup()
    r["seconds"] = time.monotonic() - started
    text, rows = table(r)
    r["table"] = rows
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(r, indent=2, default=str))
    print()
    print(text)
    print()
    print(splice_report(r))
    loaded = load_report(r)
    if loaded:
        print()
        print(loaded)
    print()
    print(cpu_report(r))
    protos = proto_report(r)
    if protos:
        print()
        print(protos)
    print()
    print(f"load average: start {r['load']['start']['loadavg']}, after the figures {r['load'].get('after_figures', {}).get('loadavg')}, "
          f"end {r['load'].get('end', {}).get('loadavg')}; busiest other processes at start: {r['load']['start']['busiest']}")
    print(f"run took {r['seconds']:.0f}s; JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
