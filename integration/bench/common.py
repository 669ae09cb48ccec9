"""Helpers shared by the benchmarks (run as root from the repository; standard library + psutil)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import psutil

CGROUP_MOUNT = Path("/sys/fs/cgroup")


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
    """Thaw, kill whatever is left in, and remove ``group`` and every cgroup below it."""
    subdirs = sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for child in [*subdirs, group]:
        for state, thawed in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
            try:
                (child / state).write_text(thawed)
            except OSError:
                pass
        try:
            for pid in (child / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        except OSError:
            pass
        for _ in range(300):
            try:
                child.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)
        else:
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
