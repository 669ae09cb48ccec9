#!/usr/bin/env python3
"""Core benchmark: workspace-supervisor against supervisord managing the same trivial server.

Run as root from the repository root::

    .venv/bin/python integration/bench/core.py

It starts, in one run, one workspace-supervisor daemon (the real ``workspace-supervisor run`` with
its own config, cgroup subtree and workspace root) and one supervisord (pip ``supervisor``, same
interpreter), both managing ``integration/bench/server.py`` (a minimal HTTP server on a Unix
socket), and measures:

1. start to RUNNING beyond the server's own start-up. The server's start-up (spawn to the first
   HTTP answer on its socket) is measured directly, interleaved with the starts. Our start is
   one ``start`` request on the raw control socket (it returns once the server answers ``GET /``);
   supervisord's is XML-RPC ``startProcess`` with ``startsecs=0`` (it returns without any
   readiness check, so its figure is the bare RPC time).
2. kill -9 of the main pid to RUNNING again: poll the server's socket every 1 ms until a new pid
   answers (which does not disturb either daemon), then poll the daemon's status every 1 ms until it
   reports RUNNING with that pid.
3. wall time of the real CLIs: ``workspacectl status`` and ``supervisorctl status`` with 100 users.
4. the daemon's RSS and CPU (``cpu_times`` delta over an idle window, both daemons measured over
   the same window) with 100 and with 500 idle users.

Prints a table (ours, supervisord, ratio, target, PASS/MISS) and writes JSON to
``artifacts/bench-core.json``. Everything (processes, cgroups, temporary directories) is removed at
the end, also on failure or Ctrl-C. See ``integration/bench/README.md``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xmlrpc.client
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from integration.bench.common import (  # noqa: E402
    BIN, CGROUP_MOUNT, BenchDaemon, BenchError, kill_leftovers, log, percentile, poll, remove_cgroup_tree,
    write_report,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SERVER = HERE / "server.py"
SERVER_PYTHON = "/usr/bin/python3"
SUPERVISOR_VERSION = "4.3.0"
DEFAULT_SV_VENV = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "workspace-supervisor-bench" / f"supervisor-{SUPERVISOR_VERSION}"

# supervisord (pip `supervisor`) lives in a venv of its own: its import package is also called
# `supervisor` and would shadow this project's. Its commands run without PYTHONPATH.
OURS_ENV = dict(os.environ)
SV_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


# ---- small helpers -------------------------------------------------------------------------------


def http_pid(path: Path | str, timeout: float = 2.0) -> int | None:
    """The pid a bench server answers on ``path``; None if nothing answers (yet)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    except OSError:
        return None
    finally:
        sock.close()
    if not data.startswith(b"HTTP/1.") or b"pid=" not in data:
        return None
    return int(data.rsplit(b"pid=", 1)[1].split()[0])


def wait_answer(path: Path | str, timeout: float, not_pid: int | None = None, interval: float = 0.00025) -> int:
    """Poll ``path`` until a server (other than ``not_pid``) answers; return its pid."""
    deadline = time.monotonic() + timeout
    while True:
        pid = http_pid(path)
        if pid is not None and pid != not_pid:
            return pid
        if time.monotonic() > deadline:
            raise BenchError(f"nothing answered on {path} within {timeout}s")
        time.sleep(interval)


def cli_wall(argv: list[str], env: dict[str, str]) -> float:
    """Wall time (s) of one CLI invocation, output discarded; fails on a non-zero exit."""
    t0 = time.perf_counter()
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    elapsed = time.perf_counter() - t0
    if result.returncode not in (0, 3):  # supervisorctl status exits 3 when some program is stopped
        raise BenchError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.decode(errors='replace')}")
    return elapsed


# ---- the server's own start-up (the baseline) ----------------------------------------------------


class Baseline:
    """Starts the server directly (no supervisor) and times spawn -> first answer."""

    def __init__(self, base: Path, server: Path) -> None:
        self.dir = base / "baseline"
        self.dir.mkdir()
        self.server = server
        self.socket = self.dir / "server.sock"

    def once(self) -> float:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "BENCH_SOCKET": str(self.socket)}
        t0 = time.perf_counter()
        proc = subprocess.Popen([SERVER_PYTHON, "-I", "-S", str(self.server)], env=env, cwd=self.dir,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_answer(self.socket, 10)
            return time.perf_counter() - t0
        finally:
            proc.kill()
            proc.wait()
            try:
                self.socket.unlink()
            except FileNotFoundError:
                pass


# ---- the kernel's cgroup attach -------------------------------------------------------------------


class AttachProbe:
    """Times what the kernel charges for joining a process to cgroups, as the daemon's launcher does.

    A forked child writes ``0`` into ``cgroup.procs`` of a group (``<subtree>-attach``, next to the
    daemon's subtree) in every hierarchy the daemon uses, in the daemon's order, and reports how long
    the writes took. The first write after an idle spell waits for an RCU grace period (the global
    ``cgroup_threadgroup_rwsem`` is taken for writing), which no user-space code can shorten.
    """

    def __init__(self, name: str, hierarchies: list[Path]) -> None:
        self.name = name
        self.groups = [h / name for h in hierarchies]
        for group in self.groups:
            group.mkdir(exist_ok=True)

    def once(self) -> float:
        fds = [os.open(g / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC) for g in self.groups]
        read_end, write_end = os.pipe()
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                try:
                    t0 = time.perf_counter()
                    for fd in fds:
                        os.write(fd, b"0")
                    os.write(write_end, repr(time.perf_counter() - t0).encode())
                finally:
                    os._exit(0)
            os.close(write_end)
            data = os.read(read_end, 100)
            os.waitpid(pid, 0)
        finally:
            os.close(read_end)
            for fd in fds:
                os.close(fd)
        if not data:
            raise BenchError("the cgroup attach probe child failed")
        return float(data)


# ---- workspace-supervisor ------------------------------------------------------------------------


class Ours(BenchDaemon):
    label = "workspace-supervisor"
    cli_env = OURS_ENV
    shutdown_timeout = 90.0

    def __init__(self, base: Path, server: Path, name: str, capacity: int, healthy_after: float) -> None:
        super().__init__(base / "ours", name, {
            "pod": {"id": "bench-pod", "capacity": capacity},
            "ide": {"command": [SERVER_PYTHON, "-I", "-S", str(server)], "ready_timeout": "20s", "stop_grace": "3s"},
            "restart": {"healthy_after": f"{healthy_after}s"},
            # The idle ladder's rungs (2 m, 5 m, 15 m, 60 m by default) are moved past the run, so the
            # idle windows measure the steady state, not the one-off transitions of 500 users at once.
            "idle": {"lsp_pause_after": "1h", "gc_after": "2h", "freeze_after": "3h", "stop_after": "4h"},
        }, env=OURS_ENV, call_timeout=120)

    def server_socket(self, user: str) -> Path:
        return self.run_dir / "ide" / f"{user}.sock"

    def start(self, user: str) -> float:
        t0 = time.perf_counter()
        result = self.call("start", user=user)
        elapsed = time.perf_counter() - t0
        if result["state"] != "RUNNING":
            raise BenchError(f"workspace-supervisor: {user} is {result['state']} after start: {result.get('reason')}")
        return elapsed

    def stop(self, user: str) -> None:
        self.call("stop", user=user)

    def state(self, user: str) -> tuple[str, int | None]:
        info = self.call("status", users=[user])["users"][0]
        return info["state"], info["pid"]

    def running_count(self, users: list[str]) -> int:
        states = {u["user"]: u["state"] for u in self.call("status")["users"]}
        return sum(states.get(u) == "RUNNING" for u in users)

    def add_and_start(self, users: list[str], workers: int) -> None:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(self.start, users))

    def status_cli(self) -> list[str]:
        return [str(BIN / "workspacectl"), "--socket", str(self.socket), "status"]

    def status_raw(self) -> float:
        t0 = time.perf_counter()
        self.call("status")
        return time.perf_counter() - t0



# ---- supervisord ---------------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=120)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class UnixTransport(xmlrpc.client.Transport):
    """XML-RPC over supervisord's Unix socket, one kept-alive HTTP connection (as supervisorctl does)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.unix_path = path

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        cached = self._connection[1]
        if cached is not None and host == self._connection[0]:
            return cached
        connection = _UnixHTTPConnection(self.unix_path)
        self._connection = host, connection
        return connection


class Supervisord:
    label = "supervisord"
    cli_env = SV_ENV

    def __init__(self, base: Path, server: Path, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.base = base / "supervisord"
        self.base.mkdir(mode=0o755)
        self.server = server
        self.programs = self.base / "programs"
        self.sockets = self.base / "sockets"
        self.logs = self.base / "logs"
        for d in (self.programs, self.sockets, self.logs):
            d.mkdir()
        self.socket = self.base / "supervisor.sock"
        self.config = self.base / "supervisord.conf"
        self.config.write_text(
            f"[unix_http_server]\nfile={self.socket}\nchmod=0700\n\n"
            f"[supervisord]\nlogfile={self.base / 'supervisord.log'}\npidfile={self.base / 'supervisord.pid'}\n"
            f"childlogdir={self.logs}\nnodaemon=true\nminfds=8192\nminprocs=2048\nloglevel=info\n\n"
            "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
            f"[supervisorctl]\nserverurl=unix://{self.socket}\n\n"
            f"[include]\nfiles = {self.programs}/*.conf\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self._local = threading.local()

    def write_program(self, name: str, autostart: bool) -> None:
        (self.programs / f"{name}.conf").write_text(
            f"[program:{name}]\n"
            f"command={SERVER_PYTHON} -I -S {self.server}\n"
            f'environment=BENCH_SOCKET="{self.sockets / name}.sock"\n'
            f"directory={self.base}\n"
            f"autostart={'true' if autostart else 'false'}\nautorestart=true\nstartsecs=0\nstartretries=3\n"
            "stopsignal=TERM\nstopwaitsecs=3\nredirect_stderr=true\n"
            f"stdout_logfile={self.logs / name}.log\n"
        )

    @property
    def rpc(self) -> Any:
        """A per-thread XML-RPC proxy (its HTTP connection over the Unix socket is kept open)."""
        proxy = getattr(self._local, "proxy", None)
        if proxy is None:
            proxy = xmlrpc.client.ServerProxy("http://localhost", transport=UnixTransport(str(self.socket))).supervisor
            self._local.proxy = proxy
        return proxy

    def start_daemon(self, programs: list[str]) -> None:
        for name in programs:
            self.write_program(name, autostart=False)
        with open(self.base / "supervisord.out", "ab") as out:
            self.proc = subprocess.Popen([str(self.bin / "supervisord"), "-n", "-c", str(self.config)],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                         env=SV_ENV, cwd="/")
        poll(lambda: self._alive() and self._running(), 30, "supervisord's XML-RPC socket")

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BenchError(f"supervisord exited {self.proc.returncode}: see {self.base}/supervisord.out")
        return True

    def _running(self) -> bool:
        try:
            return bool(self.rpc.getState()["statename"] == "RUNNING")
        except (OSError, xmlrpc.client.Fault):
            self._local.proxy = None
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def server_socket(self, name: str) -> Path:
        return self.sockets / f"{name}.sock"

    def start(self, name: str) -> float:
        t0 = time.perf_counter()
        self.rpc.startProcess(name, True)
        return time.perf_counter() - t0

    def stop(self, name: str) -> None:
        self.rpc.stopProcess(name, True)

    def state(self, name: str) -> tuple[str, int | None]:
        info = self.rpc.getProcessInfo(name)
        return info["statename"], info["pid"] or None

    def running_count(self, names: list[str]) -> int:
        states = {p["name"]: p["statename"] for p in self.rpc.getAllProcessInfo()}
        return sum(states.get(n) == "RUNNING" for n in names)

    def add_and_start(self, names: list[str], workers: int) -> None:
        """`supervisorctl update` of new autostart programs: reloadConfig + addProcessGroup."""
        for name in names:
            self.write_program(name, autostart=True)
        added, _changed, _removed = self.rpc.reloadConfig()[0]
        missing = set(names) - set(added)
        if missing:
            raise BenchError(f"supervisord did not pick up {len(missing)} new programs, e.g. {sorted(missing)[:3]}")
        for name in names:
            self.rpc.addProcessGroup(name)
        poll(lambda: self.running_count(names) == len(names), 300, f"{len(names)} supervisord programs RUNNING", 0.2)

    def status_cli(self) -> list[str]:
        return [str(self.bin / "supervisorctl"), "-c", str(self.config), "status"]

    def status_raw(self) -> float:
        t0 = time.perf_counter()
        self.rpc.getAllProcessInfo()
        return time.perf_counter() - t0

    def shutdown(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # On SIGTERM supervisord stops its groups one after another (one main-loop pass each, ~100 s
        # for 500 programs); stopAllProcesses signals every program at once.
        try:
            self.rpc.stopAllProcesses(False)
            poll(lambda: all(p["statename"] not in ("RUNNING", "STARTING", "STOPPING", "BACKOFF")
                             for p in self.rpc.getAllProcessInfo()), 30, "supervisord's programs to stop", 0.2)
        except (OSError, xmlrpc.client.Error, BenchError) as exc:
            log(f"supervisord: stopping its programs: {exc}")
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            log("supervisord did not exit 90 s after SIGTERM; killing it")
            self.proc.kill()
            self.proc.wait()


# ---- measurements --------------------------------------------------------------------------------


def kill_to_running(daemon: Ours | Supervisord, name: str, timeout: float = 30) -> float:
    """kill -9 the main pid; time until a new pid answers on the socket AND the daemon says RUNNING."""
    state, old = daemon.state(name)
    if state != "RUNNING" or old is None:
        raise BenchError(f"{daemon.label}: {name} is {state} before the kill")
    t0 = time.perf_counter()
    os.kill(old, signal.SIGKILL)
    new = wait_answer(daemon.server_socket(name), timeout, not_pid=old, interval=0.001)
    deadline = time.monotonic() + timeout
    while daemon.state(name) != ("RUNNING", new):
        if time.monotonic() > deadline:
            raise BenchError(f"{daemon.label}: {name} not RUNNING with pid {new} {timeout}s after the kill")
        time.sleep(0.001)
    return time.perf_counter() - t0


def idle_window(daemons: list[Ours | Supervisord], seconds: float) -> dict[str, dict[str, float]]:
    """CPU share of a core over the same idle window for every daemon, and RSS at its end."""
    procs = {d.label: psutil.Process(d.pid) for d in daemons}
    before = {k: p.cpu_times() for k, p in procs.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    out = {}
    for label, p in procs.items():
        after = p.cpu_times()
        cpu = (after.user - before[label].user) + (after.system - before[label].system)
        mem = p.memory_full_info()
        out[label] = {"cpu_percent": 100 * cpu / wall, "cpu_seconds": cpu, "window_s": wall,
                      "rss_bytes": mem.rss, "uss_bytes": mem.uss}
    return out


def status_walls(daemons: list[Ours | Supervisord], runs: int) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {d.label: {"cli": [], "raw": []} for d in daemons}
    for d in daemons:  # warm the page cache and .pyc files
        cli_wall(d.status_cli(), d.cli_env)
    for _ in range(runs):
        for d in daemons:
            out[d.label]["cli"].append(cli_wall(d.status_cli(), d.cli_env))
            out[d.label]["raw"].append(d.status_raw())
    return out


def bring_up(daemons: list[Ours | Supervisord], users: list[str], workers: int) -> dict[str, float]:
    took = {}
    for d in daemons:
        t0 = time.perf_counter()
        d.add_and_start(users, workers)
        for user in users:
            wait_answer(d.server_socket(user), 30, interval=0.005)
        took[d.label] = time.perf_counter() - t0
        log(f"{d.label}: {len(users)} more users RUNNING and answering in {took[d.label]:.1f}s")
    return took


# ---- cleanup -------------------------------------------------------------------------------------


def find_groups(name: str) -> list[Path]:
    """Every cgroup directory called ``name`` (up to 4 levels down) in every hierarchy."""
    found = []
    for hierarchy in CGROUP_MOUNT.iterdir():
        for dirpath, dirnames, _ in os.walk(hierarchy):
            if len(Path(dirpath).relative_to(hierarchy).parts) >= 4:
                dirnames[:] = []
                continue
            if name in dirnames:
                found.append(Path(dirpath) / name)
                dirnames.remove(name)
    return found


def remove_cgroups(name: str) -> None:
    """Kill whatever is left in and remove every ``<hierarchy>/.../<name>`` subtree."""
    for group in find_groups(name):
        remove_cgroup_tree(group)


# ---- report --------------------------------------------------------------------------------------


def ms(seconds: float) -> float:
    return seconds * 1000


def build_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    ours, sv = "workspace-supervisor", "supervisord"
    base50 = percentile(r["baseline_s"], 50)
    attach50 = percentile(r["attach_s"], 50)
    rows: list[dict[str, Any]] = []

    def row(metric: str, unit: str, a: float | None, b: float | None, target: str = "", ok: bool | None = None) -> None:
        rows.append({"metric": metric, "unit": unit, "ours": a, "supervisord": b,
                     "ratio": a / b if a is not None and b else None, "target": target,
                     "result": "" if ok is None else ("PASS" if ok else "MISS")})

    row("server start-up alone (spawn -> first answer), p50", "ms", ms(base50), ms(base50), "(baseline, both)")
    s_ours, s_sv = r["start_s"][ours], r["start_s"][sv]
    over50 = ms(percentile(s_ours, 50) - base50)
    row("start -> RUNNING beyond server start-up, p50", "ms", over50, ms(percentile(s_sv, 50)), "<= 3 ms", over50 <= 3)
    row("start -> RUNNING beyond server start-up, p90", "ms", ms(percentile(s_ours, 90) - base50), ms(percentile(s_sv, 90)))
    pool = r.get("launcher_pool_after_starts") or {}
    if pool.get("launched"):
        # The launcher pool pays the attach when a launcher joins its spare group, off the start.
        row(f"  starts from the launcher pool (attach paid off the start): {pool['launched']}, fallbacks {pool['fallbacks']}", "", None, None)
        row("  kernel cgroup attach (procs write), p50, for reference", "ms", ms(attach50), None, "(kernel; no cgroups in supervisord)")
    else:
        row("  of which: kernel cgroup attach (procs write), p50", "ms", ms(attach50), None, "(kernel; no cgroups in supervisord)")
        row("  the rest: start beyond start-up and attach, p50", "ms", over50 - ms(attach50), ms(percentile(s_sv, 50)))
    row("start request total (ours waits for readiness), p50", "ms", ms(percentile(s_ours, 50)), ms(percentile(s_sv, 50)))
    row("supervisord: startProcess until the socket answers, p50", "ms", None, ms(percentile(r["start_to_answer_s"][sv], 50)))
    k_ours, k_sv = r["kill_s"][ours], r["kill_s"][sv]
    limit = 20 + ms(base50)
    k50 = ms(percentile(k_ours, 50))
    row("kill -9 -> RUNNING again and answering, p50", "ms", k50, ms(percentile(k_sv, 50)), f"<= {limit:.0f} ms (20 + start-up)", k50 <= limit)
    row("kill -9 -> RUNNING beyond server start-up, p50", "ms", k50 - ms(base50), ms(percentile(k_sv, 50)) - ms(base50))
    for n, phase in r["phases"].items():
        if "status" in phase:
            st = phase["status"]
            c_ours, c_sv = ms(percentile(st[ours]["cli"], 50)), ms(percentile(st[sv]["cli"], 50))
            target, ok = ("<= 60 ms", c_ours <= 60) if n == "100" else ("", None)
            row(f"`status` CLI wall time, {n} users, p50", "ms", c_ours, c_sv, target, ok)
            row(f"`status` raw request (control socket / XML-RPC), {n} users, p50", "ms",
                ms(percentile(st[ours]["raw"], 50)), ms(percentile(st[sv]["raw"], 50)))
        idle = phase["idle"]
        rss_o, rss_s = idle[ours]["rss_bytes"] / 2**20, idle[sv]["rss_bytes"] / 2**20
        row(f"daemon RSS, {n} idle users", "MiB", rss_o, rss_s, "<= 1.2x supervisord", rss_o <= 1.2 * rss_s)
        cpu_o, cpu_s = idle[ours]["cpu_percent"], idle[sv]["cpu_percent"]
        target, ok = ("<= 1% of a core", cpu_o <= 1.0) if n == "500" else ("", None)
        row(f"daemon CPU, {n} idle users ({idle[ours]['window_s']:.0f} s window)", "% core", cpu_o, cpu_s, target, ok)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = ("metric", "ours", "supervisord", "ratio", "target", "result")
    lines = [header]
    for r in rows:
        fmt = "{:.2f} " if r["unit"] in ("ms", "% core") else "{:.1f} "
        lines.append((
            r["metric"],
            "-" if r["ours"] is None else fmt.format(r["ours"]) + r["unit"],
            "-" if r["supervisord"] is None else fmt.format(r["supervisord"]) + r["unit"],
            "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
            r["target"],
            r["result"],
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [""]
    for i, line in enumerate(lines):
        out.append(" | ".join(cell.ljust(w) if j in (0, 4, 5) else cell.rjust(w)
                              for j, (cell, w) in enumerate(zip(line, widths))).rstrip())
        if i == 0:
            out.append("-+-".join("-" * w for w in widths))
    print("\n".join(out) + "\n", flush=True)


# ---- main ----------------------------------------------------------------------------------------


def ensure_supervisord(venv: Path) -> Path:
    """The bin directory of a venv holding supervisord; created (same Python, pinned version) if missing."""
    bin_dir = venv / "bin"
    if not (bin_dir / "supervisord").exists():
        log(f"creating {venv} with supervisor=={SUPERVISOR_VERSION} (once)")
        python = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([python, "-m", "venv", "--clear", str(venv)], check=True, env=SV_ENV)
        subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        f"supervisor=={SUPERVISOR_VERSION}"], check=True, env=SV_ENV)
    return bin_dir


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--starts", type=int, default=30, help="timed starts per contender (default %(default)s)")
    p.add_argument("--kills", type=int, default=15, help="timed kill -9 restarts per contender (default %(default)s)")
    p.add_argument("--status-runs", type=int, default=20, help="timed `status` CLI runs per contender and user count (default %(default)s; 0 skips)")
    p.add_argument("--users", type=int, nargs="+", default=[100, 500],
                   help="idle user counts to measure `status`, RSS and CPU at, ascending (default %(default)s)")
    p.add_argument("--idle-window", type=float, default=30.0,
                   help="seconds of idle CPU measurement per user count (default %(default)s; a multiple of the 10 s usage_interval)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds to let both daemons settle before each idle window")
    p.add_argument("--healthy-after", type=float, default=1.0,
                   help="[restart] healthy_after for our daemon: kills are spaced past it so each exit restarts at once")
    p.add_argument("--workers", type=int, default=8, help="concurrent start requests when bringing users up")
    p.add_argument("--supervisord-venv", type=Path, default=DEFAULT_SV_VENV,
                   help="venv with pip `supervisor` (created if missing; default %(default)s)")
    p.add_argument("--json", type=Path, default=REPO / "artifacts" / "bench-core.json", help="where to write the results")
    p.add_argument("--nice", type=int, default=0,
                   help="run the bench, both daemons and their servers at this nice value (e.g. -10 on a busy machine)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs) for inspection")
    args = p.parse_args(argv)
    if args.users != sorted(args.users) or args.users[0] < 1:
        p.error("--users must be ascending positive counts")
    return args


def run(args: argparse.Namespace, base: Path, name: str, stack: list[Any]) -> dict[str, Any]:
    server = base / "server.py"
    shutil.copy(SERVER, server)
    os.chmod(server, 0o644)
    top = args.users[-1]
    ours = Ours(base, server, name, capacity=top + 10, healthy_after=args.healthy_after)
    sv = Supervisord(base, server, ensure_supervisord(args.supervisord_venv))
    baseline = Baseline(base, server)
    daemons: list[Ours | Supervisord] = [ours, sv]
    stack.extend([sv, ours])  # shut down in this order on the way out

    log(f"starting both daemons (run dir {base}, cgroup subtree {name})")
    ours.start_daemon()
    sv.start_daemon(["bench-start", "bench-kill"])
    results: dict[str, Any] = {"baseline_s": [], "start_s": {d.label: [] for d in daemons},
                               "start_to_answer_s": {sv.label: []}, "kill_s": {d.label: [] for d in daemons},
                               "phases": {}}

    # 1. start -> RUNNING, interleaved with the server's own start-up.
    log(f"timing {args.starts} starts each (plus the bare server start-up)")
    baseline.once()
    hierarchies: list[Path] = []
    for d in daemons:  # warm-up: creates our user's uid, directories and cgroup parents
        d.start("bench-start")
        if isinstance(d, Ours):  # the hierarchies its users join: where <hierarchy>/<name>/bench-start exists
            hierarchies = sorted(g.parent.parent for g in find_groups("bench-start") if g.parent.name == name)
        d.stop("bench-start")
    if not hierarchies:
        raise BenchError(f"found no cgroup of the daemon's user bench-start under {CGROUP_MOUNT}/*/{name}")
    attach = AttachProbe(f"{name}-attach", hierarchies)
    results["attach_s"] = []
    for _ in range(args.starts):
        results["baseline_s"].append(baseline.once())
        time.sleep(0.02)
        results["start_s"][ours.label].append(ours.start("bench-start"))
        ours.stop("bench-start")
        time.sleep(0.02)
        t0 = time.perf_counter()
        results["start_s"][sv.label].append(sv.start("bench-start"))
        wait_answer(sv.server_socket("bench-start"), 10)
        results["start_to_answer_s"][sv.label].append(time.perf_counter() - t0)
        sv.stop("bench-start")
        time.sleep(0.02)
        results["attach_s"].append(attach.once())
        time.sleep(0.02)
    results["launcher_pool_after_starts"] = ours.call("pod").get("launcher_pool")

    # 2. kill -9 -> RUNNING again.
    log(f"timing {args.kills} kill -9 restarts each (spaced {args.healthy_after + 0.3:.1f}s apart)")
    for d in daemons:
        d.start("bench-kill")
        wait_answer(d.server_socket("bench-kill"), 10)
    for _ in range(args.kills):
        time.sleep(args.healthy_after + 0.3)
        for d in daemons:
            results["kill_s"][d.label].append(kill_to_running(d, "bench-kill"))
    results["launcher_pool_after_kills"] = ours.call("pod").get("launcher_pool")
    for d in daemons:
        d.stop("bench-kill")

    # 3./4. idle users: status CLI wall time, RSS and CPU.
    have = 0
    for n in args.users:
        users = [f"idle-{i:04d}" for i in range(have, n)]
        log(f"bringing up {len(users)} more idle users (to {n}) on each daemon")
        phase: dict[str, Any] = {"bring_up_s": bring_up(daemons, users, args.workers)}
        have = n
        for d in daemons:
            running = d.running_count([f"idle-{i:04d}" for i in range(n)])
            if running != n:
                raise BenchError(f"{d.label}: only {running} of {n} idle users RUNNING")
        time.sleep(args.settle)
        if args.status_runs:
            log(f"timing {args.status_runs} `status` CLI runs each with {n} users")
            phase["status"] = status_walls(daemons, args.status_runs)
        log(f"idle window of {args.idle_window:.0f}s with {n} users")
        phase["idle"] = idle_window(daemons, args.idle_window)
        results["phases"][str(n)] = phase
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("core.py: run as root (the daemon creates cgroups and drops to per-user uids)", file=sys.stderr)
        return 2
    for tool in ("workspace-supervisor", "workspacectl"):
        if not (BIN / tool).exists():
            print(f"core.py: {BIN / tool} is missing; run with the project's venv python (.venv/bin/python)", file=sys.stderr)
            return 2
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by both daemons and every server
    tag = uuid.uuid4().hex[:8]
    name = f"wsup-bench-{tag}"
    base = Path(tempfile.mkdtemp(prefix=f"wsup-bench-{tag}-", dir="/tmp"))
    os.chmod(base, 0o755)
    stack: list[Any] = []

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    started = time.time()
    load_before = os.getloadavg()
    if load_before[0] > 1.0:
        log(f"warning: load average {load_before[0]:.2f} on {os.cpu_count()} CPUs: other work will skew the timings")
    code = 1
    try:
        results = run(args, base, name, stack)
        rows = build_rows(results)
        print_table(rows)
        load_after = os.getloadavg()
        print(f"host: {os.cpu_count()} CPUs, kernel {platform.release()}; load average before {load_before[0]:.2f}, "
              f"after {load_after[0]:.2f} (1 min); nice {args.nice}", flush=True)
        write_report(args.json, args, started, load_before, load_after, rows, results)
        code = 0
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        code = 130
    except BenchError as exc:
        log(f"failed: {exc}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for daemon in stack:
            try:
                daemon.shutdown()
            except Exception as exc:  # noqa: BLE001 - clean up the rest regardless
                log(f"shutting down {daemon.label}: {exc}")
        kill_leftovers(base)
        remove_cgroups(name)
        remove_cgroups(f"{name}-attach")
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
