#!/usr/bin/env python3
"""Idle-ladder benchmark: wake latency, memory per idle user at each ladder step, tracking CPU.

Run as root from the repository root::

    .venv/bin/python integration/bench/idle.py

Three parts, each against a real ``workspace-supervisor run`` (own config, cgroup subtree,
workspace root; everything removed at the end):

1. **Tracking CPU** (stub IDEs, ``integration/bench/server.py``): two daemons side by side with
   ``--cpu-users`` users each, measured over the same windows - one with the ladder running
   (default 1 s tick, every signal tracked, rungs moved past the run) and one without it (tick 24 h:
   the ladder's loop runs once before any user exists, so nothing is watched or sampled by it).
   The figure is the difference of the daemons' CPU (user + system time / wall).
2. **Memory per idle user** (real Theia, through the front door): ``--users`` users load their
   workbench in headless Chromium (so each backend forks its file watcher and opens a terminal),
   close the tab and walk down a ladder with ``--stage`` seconds per rung; each user's tree
   (every process in its cgroup) is measured ``--settle`` seconds into every stage: RSS (the target's
   unit), PSS (shared pages split between users) and the cgroup's own memory figure. ``--baseline-users``
   never-laddered users (same load, ladder at 24 h) are the reference.
3. **Wake latency** (real Theia, through the front door): users whose whole tree the ladder froze,
   and users whose language servers it paused (a ``pylsp`` stand-in started from Theia's terminal by
   ``~/.bashrc``, see tests/test_idle_theia.py), get a request through the front door as soon as
   the kernel reports them frozen / paused: a socket.io CONNECT on their open WebSocket (a browser's
   next message) and an HTTP ``GET /`` on a kept-alive connection. Time from the first byte sent to
   the answer received; the never-laddered users get the same requests in the same rounds (the
   baseline: what the request costs without any wake). For paused users, the time until their
   language servers run again is measured too.

Prints a table (figure, baseline, target, PASS/MISS) and writes everything to
``artifacts/bench-idle.json``. See integration/bench/README.md.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import re
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from integration.bench import theia_users as tu  # noqa: E402
from integration.bench.common import (  # noqa: E402
    BIN, CGROUP_MOUNT, BenchDaemon, BenchError, kill_leftovers, log, percentile, poll, remove_cgroup_tree,
    write_report,
)
from tests.frontdoor_client import ISSUER, Client, WebSocket, mint, ws_connect, ws_recv, ws_send  # noqa: E402

SERVER = HERE / "server.py"
SERVER_PYTHON = "/usr/bin/python3"
MIB = 2**20
LATER = "24h"
LOG_LEVEL = ["info"]  # --log-level
TICKER = "import os, time\nwhile True:\n    open(os.environ['HOME'] + '/lsp-ticks', 'a').write('.')\n    time.sleep(0.02)\n"
BASHRC = """# written by integration/bench/idle.py: a language-server stand-in started from Theia's terminal
if [ -z "$WSUP_LSP_STANDIN" ]; then
    export WSUP_LSP_STANDIN=1
    /usr/bin/python3 -I -S "$HOME/lsp_standin.py" pylsp --stdio >/dev/null 2>&1 &
fi
"""


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def load() -> float:
    return round(os.getloadavg()[0], 2)


# ---- a daemon under test -------------------------------------------------------------------------


class IdleBenchDaemon(BenchDaemon):
    """A benchmark daemon (:class:`~integration.bench.common.BenchDaemon`) at ``--log-level``, with
    the idle benchmark's views of its users."""

    def __init__(self, base: Path, name: str, sections: dict[str, dict[str, Any]]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WSUP_")}
        config: dict[str, dict[str, Any]] = {"daemon": {"log_level": LOG_LEVEL[0]}}
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        super().__init__(base, name, config, env=env, call_timeout=180)

    def status(self) -> dict[str, dict[str, Any]]:
        return {u["user"]: u for u in self.call("status")["users"]}

    def start_user(self, user: str) -> None:
        result = self.call("start", user=user)
        if result["state"] != "RUNNING":
            raise BenchError(f"{user} is {result['state']} after start: {result.get('reason')}")

    def frontdoor_port(self) -> int:
        found = poll(lambda: re.search(r"front door listening on 127\.0\.0\.1:(\d+)", self.log_text()), 10, "the front door")
        return int(found.group(1))

    def user_groups(self, user: str) -> list[Path]:
        """The user's cgroup directory in every hierarchy (v1: one per controller; v2: one)."""
        hierarchies = [CGROUP_MOUNT, *(h for h in CGROUP_MOUNT.iterdir() if h.is_dir() and not h.is_symlink())]
        return [h / self.name / user for h in hierarchies if (h / self.name / user).is_dir()]

    def log_of(self, user: str) -> str:
        """The user's IDE log (its stderr: gc-preload.js's report lines)."""
        try:
            return (self.base / "log" / f"{user}.log").read_text(errors="replace")
        except OSError:
            return ""



def remove_cgroups(name: str) -> None:
    for hierarchy in [CGROUP_MOUNT, *CGROUP_MOUNT.iterdir()]:
        if (hierarchy / name).is_dir():
            remove_cgroup_tree(hierarchy / name)


# ---- cgroup freezer state ------------------------------------------------------------------------


def frozen(group: Path) -> bool:
    """Whether a cgroup directory is frozen (v1 freezer.state, or v2 cgroup.events)."""
    try:
        return (group / "freezer.state").read_bytes().startswith(b"FROZEN")
    except FileNotFoundError:
        pass
    try:
        return b"frozen 1" in (group / "cgroup.events").read_bytes()
    except OSError:
        return False


def freezer_group(d: IdleBenchDaemon, user: str) -> Path:
    """The one directory that freezes the user: v1 freezer hierarchy, or the v2 group."""
    for hierarchy in (CGROUP_MOUNT / "freezer", CGROUP_MOUNT):
        group = hierarchy / d.name / user
        if (group / "freezer.state").exists() or (group / "cgroup.events").exists():
            return group
    raise BenchError(f"no freezer group for {user}")


def cgroup_memory(groups: list[Path]) -> dict[str, int]:
    """The memory controller's view of the user's group: usage, and anon / file from memory.stat."""
    for group in groups:
        stat_file = group / "memory.stat"
        if not stat_file.exists():
            continue
        stat = dict(line.split() for line in stat_file.read_text().splitlines() if len(line.split()) == 2)
        if (group / "memory.usage_in_bytes").exists():  # v1 (hierarchical totals)
            return {"usage": int((group / "memory.usage_in_bytes").read_text()),
                    "anon": int(stat.get("total_rss", 0)), "file": int(stat.get("total_cache", 0))}
        return {"usage": int((group / "memory.current").read_text()), "anon": int(stat.get("anon", 0)), "file": int(stat.get("file", 0))}
    return {"usage": 0, "anon": 0, "file": 0}


def measure_tree(d: IdleBenchDaemon, user: str) -> dict[str, Any]:
    groups = d.user_groups(user)
    procs = tu.theia_tree(groups)
    parts: dict[str, int] = {}
    for p in procs:
        kind = "backend" if "--expose-gc" in p.name else "file watcher" if "ipc-bootstrap" in p.name else p.name.split()[0]
        parts[kind] = parts.get(kind, 0) + p.rss
    return {"rss": sum(p.rss for p in procs), "pss": sum(p.pss for p in procs), "processes": len(procs),
            "rss_by_process": parts, "cgroup": cgroup_memory(groups), "exists": bool(groups)}


# ---- part 1: tracking CPU with 100 stub users ----------------------------------------------------


def run_cpu(args: argparse.Namespace, base: Path, tag: str, cleanup: list[Callable[[], None]]) -> dict[str, Any]:
    server = base / "server.py"
    shutil.copy(SERVER, server)
    os.chmod(server, 0o644)
    daemons: dict[str, IdleBenchDaemon] = {}
    rungs = {"lsp_pause_after": "1h", "gc_after": "2h", "freeze_after": "3h", "stop_after": "4h"}
    for label, tick in (("ladder", "1s"), ("no ladder", LATER)):
        name = f"wsup-bench-idle-{tag}-{'on' if label == 'ladder' else 'off'}"
        d = IdleBenchDaemon(base / name, name, {
            "pod": {"id": name, "capacity": args.cpu_users + 10},
            "ide": {"command": [SERVER_PYTHON, "-I", "-S", str(server)], "ready_timeout": "60s", "stop_grace": "3s"},
            "idle": {**rungs, "tick": tick},
        })
        cleanup.append(lambda d=d: (d.shutdown(), remove_cgroups(d.name)))
        d.start_daemon()
        daemons[label] = d
    users = [f"idle-{i:03d}" for i in range(args.cpu_users)]
    log(f"tracking CPU: starting {len(users)} stub users on each of two daemons (with and without the ladder)")
    for d in daemons.values():
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(d.start_user, users))
        for user in users[: args.cpu_files_users]:  # some workspaces with a tree, so inotify has work
            root = Path(d.status()[user]["workspace"])
            for i in range(20):
                (root / f"dir{i}" / "sub").mkdir(parents=True, exist_ok=True)
    log(f"settling {args.settle_cpu:g}s")
    time.sleep(args.settle_cpu)
    windows = []
    for w in range(args.cpu_windows):
        procs = {label: psutil.Process(d.pid) for label, d in daemons.items()}
        before = {label: p.cpu_times() for label, p in procs.items()}
        t0 = time.monotonic()
        load0 = load()
        time.sleep(args.cpu_window)
        wall = time.monotonic() - t0
        window: dict[str, Any] = {"wall_s": wall, "load_before": load0, "load_after": load()}
        for label, p in procs.items():
            after = p.cpu_times()
            used = (after.user - before[label].user) + (after.system - before[label].system)
            window[label] = {"cpu_s": used, "cpu_percent": 100 * used / wall, "rss_bytes": p.memory_info().rss}
        window["tracking_percent"] = window["ladder"]["cpu_percent"] - window["no ladder"]["cpu_percent"]
        log(f"window {w + 1}/{args.cpu_windows} ({wall:.0f}s): with the ladder {window['ladder']['cpu_percent']:.2f}% of a core, "
            f"without {window['no ladder']['cpu_percent']:.2f}%, load {load0}")
        windows.append(window)
    with_ladder = daemons["ladder"].status()
    tracked = sum(1 for u in users if with_ladder[u].get("idle_stage") == "active")
    for d in daemons.values():
        d.shutdown()
    return {"users": len(users), "windows": windows, "tracked_users": tracked}


# ---- parts 2 and 3: real Theia users -------------------------------------------------------------


class SocketIO:
    """A socket.io WebSocket to a user's Theia through the front door (what the workbench opens)."""

    def __init__(self, port: int, cookies: dict[str, str]) -> None:
        cookie = "; ".join(f"{k}={v}" for k, v in cookies.items())
        self.ws: WebSocket = ws_connect("127.0.0.1", port, "/socket.io/?EIO=4&transport=websocket",
                                        headers={"Cookie": cookie, "Origin": f"http://127.0.0.1:{port}"}, timeout=60)
        if self.ws.status != 101:
            raise BenchError(f"socket.io upgrade answered {self.ws.status}: {self.ws.head[:200]!r}")
        self.ws.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        opcode, payload = ws_recv(self.ws)
        if not payload.startswith(b"0{"):
            raise BenchError(f"no engine.io open packet: {payload[:100]!r}")

    def connect_namespace(self, during: Callable[[], None] | None = None) -> float:
        """Send a socket.io CONNECT to /services and wait for its answer; seconds from the first
        byte sent to the answer. ``during`` runs right after sending (e.g. to time a thaw)."""
        began = time.perf_counter()
        ws_send(self.ws, b"40/services,", opcode=0x1)
        if during is not None:
            during()
        while True:
            opcode, payload = ws_recv(self.ws)
            if opcode == 0x1 and payload == b"2":  # engine.io ping from the server
                ws_send(self.ws, b"3", opcode=0x1)
                continue
            if opcode == 0x1 and payload.startswith(b"40/services,{"):
                took = time.perf_counter() - began
                break
            if opcode == 0x8:
                raise SocketIOClosed(payload)
            raise BenchError(f"unexpected socket.io answer: {opcode} {payload[:120]!r}")
        ws_send(self.ws, b"41/services,", opcode=0x1)  # and leave the namespace again
        return took

    def answer_pings(self) -> None:
        """Answer the engine.io pings that arrived since the last read, as a browser does at once
        (Theia closes a connection whose ping goes unanswered for 60 s; this client reads a user's
        socket only when it samples that user)."""
        while self.ws.pending or select.select([self.ws.sock], [], [], 0)[0]:
            opcode, payload = ws_recv(self.ws)
            if opcode == 0x1 and payload == b"2":
                ws_send(self.ws, b"3", opcode=0x1)
            elif opcode == 0x8:
                raise SocketIOClosed(payload)

    def close(self) -> None:
        self.ws.close()


class SocketIOClosed(BenchError):
    """The IDE (or the front door) closed the socket.io WebSocket."""

    def __init__(self, payload: bytes) -> None:
        super().__init__(f"socket.io WebSocket closed by the other side: close frame {payload[:120]!r}")


class TheiaUser:
    def __init__(self, pod: TheiaPod, user: str, tier: str) -> None:
        self.pod, self.user, self.tier = pod, user, tier
        self.token = mint(pod.secret, user, tier=tier, sid=f"{user}-tab", ttl=6 * 3600)
        self.client: Client | None = None
        self.sio: SocketIO | None = None
        self.retries: list[str] = []
        self.reconnects: list[str] = []

    def sign_in(self) -> Client:
        if self.client is None:
            client = Client("127.0.0.1", self.pod.port, timeout=180)
            answer = client.get(f"/?token={self.token}")
            if answer.status != 303:
                raise BenchError(f"{self.user}: sign-in answered {answer.status}")
            self.client = client
        return self.client

    def http_roundtrip(self) -> float:
        client = self.sign_in()
        began = time.perf_counter()
        try:
            answer = client.get("/")
        except (ConnectionError, http.client.HTTPException) as exc:
            # The connection was closed under the request (a browser retries such a GET once).
            self.retries.append(f"{time.strftime('%H:%M:%S')} {self.user}: {type(exc).__name__}: {exc}")
            log(f"{self.user}: GET / on the kept-alive connection failed ({type(exc).__name__}); once more on a new one")
            client.close()
            began = time.perf_counter()
            answer = client.get("/")
        took = time.perf_counter() - began
        if answer.status != 200:
            raise BenchError(f"{self.user}: GET / answered {answer.status}: {answer.body[:200]!r}")
        return took

    def open_socketio(self) -> SocketIO:
        if self.sio is None:
            self.sign_in()
            assert self.client is not None
            self.http_roundtrip()  # Theia's connection cookie
            self.sio = SocketIO(self.pod.port, self.client.cookies)
        return self.sio

    def socketio_sample(self, during: Callable[[], None] | None = None) -> float:
        """One socket.io CONNECT round trip; a connection closed under it is reopened (as the
        workbench's socket.io client does) and counted in ``reconnects``, and the sample taken again."""
        try:
            return self.open_socketio().connect_namespace(during)
        except SocketIOClosed as exc:
            self.reconnects.append(f"{time.strftime('%H:%M:%S')} {self.user}: {exc}")
            assert self.sio is not None
            self.sio.close()
            self.sio = None
            return self.open_socketio().connect_namespace(during)

    def close(self) -> None:
        if self.sio is not None:
            self.sio.close()
        if self.client is not None:
            self.client.close()


class TheiaPod:
    def __init__(self, args: argparse.Namespace, base: Path, name: str) -> None:
        self.args = args
        self.secret = uuid.uuid4().hex.encode() * 2
        secret_file = base / "hs256.key"
        base.mkdir(mode=0o755)
        secret_file.write_bytes(self.secret)
        os.chmod(secret_file, 0o600)
        s = args.stage
        room = {"cpu": "1", "memory": "1Gi", "sessions": 5}
        self.total = args.users + args.baseline_users + args.frozen_users + args.lsp_users
        self.daemon = IdleBenchDaemon(base / "daemon", name, {
            "pod": {"id": name, "capacity": self.total + 5},
            "ide": {"command": tu.theia_command(args.prefix), "ready_timeout": "180s", "stop_grace": "5s", "env": {}},
            "http": {"listen": "127.0.0.1:0", "start_timeout": "180s", "max_cold_starts": 4},
            "auth": {"hs256_secret_file": str(secret_file), "issuer": ISSUER, "cookie_secure": False},
            "idle": {"tick": "100ms"},
            "tiers": {
                "laddered": {**room, "idle": {"lsp_pause_after": f"{s:g}s", "gc_after": f"{2 * s:g}s",
                                              "freeze_after": f"{3 * s:g}s", "stop_after": f"{4 * s:g}s"}},
                "never": {**room, "idle": {"lsp_pause_after": LATER, "gc_after": LATER, "freeze_after": LATER, "stop_after": LATER}},
                "frozen": {**room, "idle": {"lsp_pause_after": "300ms", "gc_after": "600ms", "freeze_after": "900ms", "stop_after": LATER}},
                "lsp": {**room, "idle": {"lsp_pause_after": "300ms", "gc_after": LATER, "freeze_after": LATER, "stop_after": LATER}},
            },
        })
        self.port = 0
        self.browser: tu.Browser | None = None

    def start(self) -> TheiaPod:
        self.daemon.start_daemon()
        self.port = self.daemon.frontdoor_port()
        self.browser = tu.Browser()
        return self

    def pid(self, user: str) -> int | None:
        info = self.daemon.status().get(user)
        return info["pid"] if info and info["state"] == "RUNNING" else None

    def load_workbench(self, u: TheiaUser) -> float:
        """Open the user's workbench in a tab until the backend has opened its terminal; close the
        tab. Returns the seconds it took."""
        assert self.browser is not None
        began = time.monotonic()
        tab = self.browser.open(f"{tu.user_origin(u.user, self.port)}/?token={u.token}")
        try:
            pid = int(poll(lambda: self.pid(u.user), 240, f"{u.user}'s IDE", interval=0.2))
            poll(lambda: tu.workbench_ready(pid), 240, f"{u.user}'s workbench", interval=0.2)
        finally:
            self.browser.close_tab(tab)
        return time.monotonic() - began

    def close(self) -> None:
        if self.browser is not None:
            self.browser.close()
        self.daemon.shutdown()


def track_memory(pod: TheiaPod, laddered: list[str], baseline: list[str], args: argparse.Namespace,
                 out: dict[str, Any], done: threading.Event) -> None:
    """Measure every laddered user --settle seconds into each stage, and the never-laddered ones
    every 10 s, until every laddered user is STOPPED (or ``done`` is set)."""
    d = pod.daemon
    seen: dict[str, dict[str, float]] = {u: {} for u in laddered}
    per_stage: dict[str, dict[str, Any]] = out.setdefault("laddered", {})
    base_samples: list[dict[str, Any]] = out.setdefault("baseline", [])
    last_base = 0.0
    deadline = time.monotonic() + args.users * 60 + 8 * args.stage + 600
    while not done.is_set() and time.monotonic() < deadline:
        try:
            status = d.status()
        except (OSError, BenchError, ValueError):
            time.sleep(0.5)
            continue
        now = time.monotonic()
        for user in laddered:
            info = status.get(user)
            if info is None or info.get("idle_stage") is None and info["state"] != "STOPPED":
                continue
            stage = "stopped" if info["state"] == "STOPPED" else str(info["idle_stage"])
            first = seen[user].setdefault(stage, now)
            record = per_stage.setdefault(stage, {})
            if user not in record and now - first >= (0 if stage == "stopped" else args.settle):
                m = measure_tree(d, user) if stage != "stopped" else {"rss": 0, "pss": 0, "processes": len(tu.theia_tree(d.user_groups(user))),
                                                                         "cgroup": {"usage": 0, "anon": 0, "file": 0}, "exists": bool(d.user_groups(user))}
                m["load"] = load()
                record[user] = m
        if now - last_base >= 10:
            last_base = now
            base_samples.append({u: measure_tree(d, u) for u in baseline if u in status and status[u]["state"] == "RUNNING"})
        if all(u in per_stage.get("stopped", {}) for u in laddered):
            break
        time.sleep(0.5)


def sample_wakes(pod: TheiaPod, frozen_users: list[TheiaUser], lsp_users: list[TheiaUser], base_users: list[TheiaUser],
                 args: argparse.Namespace) -> dict[str, Any]:
    d = pod.daemon
    freezers = {u.user: freezer_group(d, u.user) for u in frozen_users + lsp_users}
    samples: dict[str, list[float]] = {k: [] for k in (
        "frozen_ws", "frozen_http", "lsp_ws", "lsp_http", "baseline_ws", "baseline_http", "lsp_resume_ws")}
    not_ready = {"frozen": 0, "lsp": 0}

    def ready_frozen(u: TheiaUser) -> bool:
        return frozen(freezers[u.user])

    def ready_lsp(u: TheiaUser) -> bool:
        paused = freezers[u.user] / "paused"
        return frozen(paused) and not frozen(freezers[u.user])

    def pick(users: list[TheiaUser], ready: Callable[[TheiaUser], bool], kind: str, offset: int) -> TheiaUser:
        deadline = time.monotonic() + 30
        while True:
            for i in range(len(users)):
                u = users[(offset + i) % len(users)]
                if ready(u):
                    return u
            not_ready[kind] += 1
            if time.monotonic() > deadline:
                raise BenchError(f"no {kind} user ready for 30 s")
            time.sleep(0.005)

    rounds = 0
    everyone = frozen_users + lsp_users + base_users
    while min(len(samples[k]) for k in ("frozen_ws", "frozen_http", "lsp_ws", "lsp_http")) < args.wake_samples:
        for u in everyone:
            if u.sio is not None:
                try:
                    u.sio.answer_pings()
                except SocketIOClosed as exc:
                    u.reconnects.append(f"{time.strftime('%H:%M:%S')} {u.user} (between samples): {exc}")
                    u.sio.close()
                    u.sio = None
        for path in ("ws", "http"):
            u = pick(frozen_users, ready_frozen, "frozen", rounds)
            samples[f"frozen_{path}"].append(u.socketio_sample() if path == "ws" else u.http_roundtrip())
            u = pick(lsp_users, ready_lsp, "lsp", rounds)
            if path == "ws":
                resumed: list[float] = []
                began = time.perf_counter()
                paused = freezers[u.user] / "paused"

                def wait_resume() -> None:
                    while frozen(paused) and time.perf_counter() - began < 5:
                        time.sleep(0.0002)
                    resumed.append(time.perf_counter() - began)

                samples["lsp_ws"].append(u.socketio_sample(during=wait_resume))
                samples["lsp_resume_ws"].append(resumed[0])
            else:
                samples["lsp_http"].append(u.http_roundtrip())
            b = base_users[rounds % len(base_users)]
            samples[f"baseline_{path}"].append(b.socketio_sample() if path == "ws" else b.http_roundtrip())
        rounds += 1
        if rounds % 20 == 0:
            log(f"wake latency: {rounds} rounds, load {load()}")
    thaw_ms = [float(m.group(1)) for m in re.finditer(r"idle: frozen -> active \(woken by a request\) in ([\d.]+) ms", d.log_text())]
    resume_ms = [float(m.group(1)) for m in re.finditer(r"idle: lsp_paused -> active \(woken by a request\) in ([\d.]+) ms", d.log_text())]
    retries = [r for u in everyone for r in u.retries]
    reconnects = [r for u in everyone for r in u.reconnects]
    return {"samples_s": samples, "rounds": rounds, "waits_for_ready": not_ready, "http_retries": retries,
            "socketio_reconnects": reconnects,
            "daemon_thaw_ms": thaw_ms, "daemon_lsp_resume_ms": resume_ms}


def run_theia(args: argparse.Namespace, base: Path, tag: str, cleanup: list[Callable[[], None]]) -> dict[str, Any]:
    name = f"wsup-bench-idle-{tag}-theia"
    pod = TheiaPod(args, base / name, name)
    cleanup.append(lambda: (pod.close(), remove_cgroups(name)))
    pod.start()
    laddered = [TheiaUser(pod, f"rss-{i:02d}", "laddered") for i in range(args.users)]
    baseline = [TheiaUser(pod, f"base-{i}", "never") for i in range(args.baseline_users)]
    frozen_users = [TheiaUser(pod, f"frz-{i}", "frozen") for i in range(args.frozen_users)]
    lsp_users = [TheiaUser(pod, f"lsp-{i}", "lsp") for i in range(args.lsp_users)]
    out: dict[str, Any] = {"users": {"laddered": len(laddered), "baseline": len(baseline), "frozen": len(frozen_users),
                                     "lsp": len(lsp_users)}, "load_s": {}, "memory": {}}
    done = threading.Event()
    tracker: threading.Thread | None = None
    try:
        # The never-laddered users first (they are the reference the whole time), then the
        # laddered ones, whose ladder starts when their tab closes.
        log(f"loading {len(baseline)} never-laddered and {len(laddered)} laddered workbenches in Chromium, one at a time")
        for u in baseline:
            out["load_s"][u.user] = pod.load_workbench(u)
        tracker = threading.Thread(target=track_memory, args=(pod, [u.user for u in laddered], [u.user for u in baseline], args, out["memory"], done))
        tracker.start()
        for u in laddered:
            out["load_s"][u.user] = pod.load_workbench(u)
            log(f"  {u.user} loaded in {out['load_s'][u.user]:.1f}s (load {load()})")
        log(f"waiting for every laddered user to walk down to STOPPED ({4 * args.stage:g}s of idleness each)")
        tracker.join(timeout=8 * args.stage + args.users * 60 + 600)
        out["gc"] = [line for u in laddered for line in tu.gc_lines(pod.daemon.log_of(u.user))]
        # The wake part runs alone: no workbench loading or other ladder steps next to it.
        log(f"loading {len(lsp_users)} users with a language-server stand-in and {len(frozen_users)} to be frozen")
        for u in lsp_users:
            u.http_roundtrip()  # cold start: the home exists
            home = Path(pod.daemon.status()[u.user]["workspace"]).parent / ".home" / u.user
            uid = home.stat().st_uid
            for file, text in ((".bashrc", BASHRC), (".bash_profile", BASHRC), ("lsp_standin.py", TICKER)):
                (home / file).write_text(text)
                os.chown(home / file, uid, uid)
            out["load_s"][u.user] = pod.load_workbench(u)
            pid = pod.pid(u.user)
            assert pid is not None
            poll(lambda: any("pylsp" in tu.cmdline(p) for p in tu.descendants(pid)), 60, f"{u.user}'s language-server stand-in")
        for u in frozen_users:
            out["load_s"][u.user] = pod.load_workbench(u)
        for u in [*frozen_users, *lsp_users, *baseline]:
            u.open_socketio()
        if pod.browser is not None:  # every workbench is loaded: the browser's work is done
            pod.browser.close()
            pod.browser = None
        log(f"wake latency: sampling {args.wake_samples} requests of each kind (load {load()})")
        out["wake"] = sample_wakes(pod, frozen_users, lsp_users, baseline, args)
    finally:
        done.set()
        if tracker is not None:
            tracker.join(timeout=30)
        for u in [*laddered, *baseline, *frozen_users, *lsp_users]:
            u.close()
    out["browser_rss_note"] = "Chromium is outside every user's cgroup and is not counted"
    return out


# ---- report --------------------------------------------------------------------------------------


def build_rows(results: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(metric: str, unit: str, figure: float | None, baseline: float | None, target: str = "", ok: bool | None = None) -> None:
        rows.append({"metric": metric, "unit": unit, "figure": figure, "baseline": baseline, "target": target,
                     "result": "" if ok is None else ("PASS" if ok else "MISS")})

    theia = results.get("theia")
    if theia and "wake" in theia:
        s = {k: [v * 1000 for v in vals] for k, vals in theia["wake"]["samples_s"].items()}
        for stage, label in (("frozen", "frozen user"), ("lsp", "language servers paused")):
            for path, how in (("ws", "socket.io message on the open WebSocket"), ("http", "HTTP GET / (kept-alive)")):
                p99 = percentile(s[f"{stage}_{path}"], 99)
                row(f"wake: {label}, {how}, first byte -> answer, p99", "ms", p99, percentile(s[f"baseline_{path}"], 99), "< 20 ms", p99 < 20)
                row(f"  same, p50 (n={len(s[f'{stage}_{path}'])})", "ms", percentile(s[f"{stage}_{path}"], 50), percentile(s[f"baseline_{path}"], 50))
        row("  paused language servers running again after the first byte, p99", "ms", percentile(s["lsp_resume_ws"], 99), None)
        reconnects = theia["wake"].get("socketio_reconnects", [])
        row("  socket.io WebSockets closed by the other side (reopened, sample taken again)", "count", len(reconnects), None)
        retried = theia["wake"].get("http_retries", [])
        if retried:
            row("  HTTP requests whose kept-alive connection closed under them (retried once)", "count", len(retried), None)
        thaw = theia["wake"]["daemon_thaw_ms"]
        if thaw:
            row(f"  the daemon's own thaw of a frozen user (its log, n={len(thaw)}), p99", "ms", percentile(thaw, 99), None,
                f"p50 {percentile(thaw, 50):.2f} ms")
    if theia and theia.get("memory", {}).get("laddered"):
        mem = theia["memory"]
        base_rss = [m["rss"] for sample in mem["baseline"] for m in sample.values()]
        base_pss = [m["pss"] for sample in mem["baseline"] for m in sample.values()]
        b_rss, b_pss = mean(base_rss) / MIB, mean(base_pss) / MIB
        n = theia["users"]["laddered"]
        for stage in ("active", "lsp_paused", "reclaimed", "frozen", "stopped"):
            got = mem["laddered"].get(stage, {})
            if not got:
                continue
            rss = mean([m["rss"] for m in got.values()]) / MIB
            pss = mean([m["pss"] for m in got.values()]) / MIB
            cg = mean([m["cgroup"]["usage"] for m in got.values()]) / MIB
            target, ok = ("<= 100 MiB", rss <= 100) if stage != "active" else ("(before the ladder)", None)
            row(f"tree RSS per idle user after {stage} ({len(got)}/{n} users)", "MiB", rss, b_rss, target, ok)
            row(f"  PSS (shared pages split) / cgroup memory usage, {stage}", "MiB", pss, b_pss, f"cgroup {cg:.1f} MiB")
        gcs = [g for g in theia.get("gc", []) if g.get("ok")]
        if gcs:
            trimmed = sum(1 for g in gcs if g.get("trimmed"))
            row(f"  the GC rung in the backend (gc-preload.js, n={len(gcs)}, {trimmed} trimmed): its RSS before -> after",
                "MiB", mean([g["rss_after"] for g in gcs]) / MIB, None,
                f"before {mean([g['rss_before'] for g in gcs]) / MIB:.1f} MiB; GC {mean([g['ms'] for g in gcs]):.1f} ms, "
                f"malloc_trim {mean([g.get('trim_ms', 0.0) for g in gcs]):.1f} ms")
    cpu = results.get("cpu")
    if cpu:
        with_ = mean([w["ladder"]["cpu_percent"] for w in cpu["windows"]])
        without = mean([w["no ladder"]["cpu_percent"] for w in cpu["windows"]])
        tracking = with_ - without
        row(f"daemon CPU on activity tracking, {cpu['users']} users (with - without ladder)", "% core", tracking, None, "<= 1% of a core", tracking <= 1.0)
        row("  daemon CPU with the ladder / without it (baseline)", "% core", with_, without)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = ("metric", "figure", "baseline", "target", "result")
    lines = [header]
    for r in rows:
        fmt = "{:.2f} " if r["unit"] in ("ms", "% core") else "{:.0f} " if r["unit"] == "count" else "{:.1f} "
        lines.append((r["metric"],
                      "-" if r["figure"] is None else fmt.format(r["figure"]) + r["unit"],
                      "-" if r["baseline"] is None else fmt.format(r["baseline"]) + r["unit"],
                      r["target"], r["result"]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [""]
    for i, line in enumerate(lines):
        out.append(" | ".join(cell.ljust(w) if j in (0, 3, 4) else cell.rjust(w) for j, (cell, w) in enumerate(zip(line, widths))).rstrip())
        if i == 0:
            out.append("-+-".join("-" * w for w in widths))
    print("\n".join(out) + "\n", flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=16, help="laddered real Theia users for the memory figures (default %(default)s)")
    p.add_argument("--baseline-users", type=int, default=2, help="never-laddered Theia users, the reference (default %(default)s)")
    p.add_argument("--frozen-users", type=int, default=3, help="Theia users frozen again and again for wake latency (default %(default)s)")
    p.add_argument("--lsp-users", type=int, default=3, help="Theia users with paused language servers, for wake latency (default %(default)s)")
    p.add_argument("--wake-samples", type=int, default=200, help="requests of each kind (default %(default)s)")
    p.add_argument("--stage", type=float, default=20.0, help="seconds per ladder rung for the memory figures (default %(default)s)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds into a stage before its memory is read (default %(default)s)")
    p.add_argument("--cpu-users", type=int, default=100, help="stub users per daemon for the tracking CPU (default %(default)s)")
    p.add_argument("--cpu-files-users", type=int, default=20, help="of them, users given a 40-directory workspace tree (default %(default)s)")
    p.add_argument("--cpu-window", type=float, default=60.0, help="seconds per CPU window (default %(default)s)")
    p.add_argument("--cpu-windows", type=int, default=2, help="CPU windows (default %(default)s)")
    p.add_argument("--settle-cpu", type=float, default=15.0, help="seconds between bringing up the stub users and the first window")
    p.add_argument("--prefix", type=Path, default=None, help="a `images/theia/build --prefix` install (default: the checkout's build)")
    p.add_argument("--skip-theia", action="store_true", help="only the tracking CPU part")
    p.add_argument("--skip-cpu", action="store_true", help="only the Theia parts")
    p.add_argument("--json", type=Path, default=REPO / "artifacts" / "bench-idle.json", help="where to write the results")
    p.add_argument("--nice", type=int, default=0,
                   help="run the bench, the daemons and their users at this nice value (e.g. -10 on a busy machine)")
    p.add_argument("--log-level", default="info", choices=("debug", "info"), help="the daemons' log level (with --keep, for diagnosis)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs) for inspection")
    args = p.parse_args(argv)
    if args.settle >= args.stage:
        p.error("--settle must be shorter than --stage (each stage is measured --settle seconds into it)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("idle.py: run as root (the daemon creates cgroups and drops to per-user uids)", file=sys.stderr)
        return 2
    if not (BIN / "workspace-supervisor").exists():
        print(f"idle.py: {BIN / 'workspace-supervisor'} is missing; run with the project's venv python (.venv/bin/python)", file=sys.stderr)
        return 2
    LOG_LEVEL[0] = args.log_level
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by the daemons, their IDEs and Chromium
    tag = uuid.uuid4().hex[:8]
    base = Path(tempfile.mkdtemp(prefix=f"wsup-bench-idle-{tag}-", dir="/tmp"))
    os.chmod(base, 0o755)
    cleanup: list[Callable[[], None]] = []

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    started = time.time()
    load_before = os.getloadavg()
    if load_before[0] > 1.0:
        log(f"warning: load average {load_before[0]:.2f} on {os.cpu_count()} CPUs: other work will skew the timings")
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    code = 1
    try:
        if not args.skip_cpu:
            results["cpu"] = run_cpu(args, base, tag, cleanup)
            for job in reversed(cleanup):
                job()
            cleanup.clear()
        if not args.skip_theia:
            missing = tu.missing_requirements(args.prefix)
            if missing:
                skipped["theia"] = missing
                log(f"skipping the real-Theia parts: {missing}")
            else:
                results["theia"] = run_theia(args, base, tag, cleanup)
        rows = build_rows(results, args)
        print_table(rows)
        load_after = os.getloadavg()
        print(f"host: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, kernel {platform.release()}; "
              f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)", flush=True)
        for part, why in skipped.items():
            print(f"skipped {part}: {why}")
        write_report(args.json, args, started, load_before, load_after, rows, results, skipped=skipped)
        code = 0
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        code = 130
    except BenchError as exc:
        log(f"failed: {exc}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for job in reversed(cleanup):
            try:
                job()
            except Exception as exc:  # noqa: BLE001 - clean up the rest regardless
                log(f"cleanup: {exc}")
        kill_leftovers(base)
        for hierarchy in [CGROUP_MOUNT, *CGROUP_MOUNT.iterdir()]:
            for group in hierarchy.glob(f"wsup-bench-idle-{tag}-*") if hierarchy.is_dir() else []:
                remove_cgroups(group.name)
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
