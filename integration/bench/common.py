"""Helpers shared by the benchmarks (run as root from the repository; standard library, psutil and the tests' harness)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from tests import harness

CGROUP_MOUNT = Path("/sys/fs/cgroup")
BIN = Path(sys.executable).parent  # the project venv's bin: workspace-supervisor, workspacectl


class BenchError(Exception):
    """A benchmark could not measure what it set out to (says why)."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def poll(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until truthy (returning its value); BenchError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
    path.write_text("\n".join(lines) + "\n")


def remove_cgroup_tree(group: Path) -> None:
    """Thaw, kill whatever is left in, and remove ``group`` and every cgroup below it (says what stayed)."""
    for child in harness.remove_cgroup_tree(group):
        log(f"could not remove cgroup {child}")


def kill_leftovers(base: Path) -> None:
    """SIGKILL any process whose command line mentions this run's directory (servers, daemons)."""
    marker = str(base)
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] != me and any(marker in arg for arg in (p.info["cmdline"] or [])):
            try:
                p.kill()
            except psutil.Error:
                pass


def control_call(path: Path, verb: str, args: dict[str, Any], timeout: float) -> Any:
    """One raw request on a daemon's control socket (what workspacectl sends, without its start-up)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({"verb": verb, "args": args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data)
    if not answer.get("ok"):
        raise BenchError(f"workspace-supervisor {verb} {args}: {answer.get('error')}")
    return answer["result"]


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float, what: str) -> None:
    """SIGTERM ``proc`` (a daemon: it stops its users first), SIGKILL after ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log(f"{what} did not exit {timeout:g} s after SIGTERM; killing it")
        proc.kill()
        proc.wait()


class BenchDaemon:
    """One ``workspace-supervisor run`` of a benchmark: its own workspace, state, run and log
    directories under ``base``, its own cgroup subtree ``name``, registry file and free probe port,
    the front door off; ``sections`` add to or override that config."""

    def __init__(self, base: Path, name: str, sections: dict[str, dict[str, Any]], *,
                 env: dict[str, str], call_timeout: float) -> None:
        self.base = base
        self.name = name
        self.env = env
        self.call_timeout = call_timeout
        base.mkdir(mode=0o755)
        (base / "workspace").mkdir(mode=0o755)
        self.run_dir = base / "run"
        self.socket = self.run_dir / "control.sock"
        self.log_path = base / "daemon.log"
        config: dict[str, dict[str, Any]] = {
            "workspace": {"root": str(base / "workspace"), "shards": 10},
            "control": {"socket": str(self.socket)},
            "daemon": {"state_dir": str(base / "state"), "run_dir": str(self.run_dir), "log_dir": str(base / "log")},
            "cgroups": {"name": name},
            "registry": {"path": str(base / "registry.db")},
            "probes": {"listen": "127.0.0.1:0"},
            "http": {"listen": ""},
        }
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        self.config = base / "config.toml"
        write_toml(self.config, config)
        self.proc: subprocess.Popen[bytes] | None = None

    def start_daemon(self) -> None:
        """Start it and wait until its control socket answers."""
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([str(BIN / "workspace-supervisor"), "run", "--config", str(self.config)],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                         env=self.env)
        poll(lambda: self._alive() and self._answers(), 30, f"the daemon's control socket ({self.name})")

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BenchError(f"workspace-supervisor exited {self.proc.returncode}:\n{self.log_text()[-3000:]}")
        return True

    def _answers(self) -> bool:
        try:
            self.call("pod")
            return True
        except OSError:
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def call(self, verb: str, **args: Any) -> Any:
        """One raw control-socket request (what workspacectl sends, without its start-up)."""
        return control_call(self.socket, verb, args, self.call_timeout)

    shutdown_timeout = 120.0

    def shutdown(self) -> None:
        """SIGTERM: it drains (every user stopped gracefully) and exits; SIGKILL after ``shutdown_timeout``."""
        terminate(self.proc, self.shutdown_timeout, "workspace-supervisor")


def write_report(path: Path, args: argparse.Namespace, started: float, load_before: tuple[float, ...],
                 load_after: tuple[float, ...], rows: list[dict[str, Any]], raw: dict[str, Any],
                 **extra: Any) -> None:
    """Write a benchmark's JSON report: when and how it ran (command, host, load, settings), then
    ``extra`` fields, the printed table's rows and the raw figures."""
    report = {
        "version": 1,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "command": " ".join([sys.executable, *sys.argv]),
        "host": {"cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total, "kernel": platform.release(),
                 "python": platform.python_version(), "loadavg_before": load_before, "loadavg_after": load_after},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **extra,
        "rows": rows,
        "raw": raw,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"results written to {path}")
