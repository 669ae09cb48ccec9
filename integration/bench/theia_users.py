"""Real Theia users behind the real daemon's front door, for the idle tests and benchmark.

- :func:`theia_command`: the IDE command the daemon runs (the built app, both preloads, as
  images/theia/README.md describes);
- :class:`Browser`: one headless Chromium (Debian ``chromium``) driven over its DevTools HTTP
  endpoints (``/json/new``, ``/json/close``): each user's workbench is a tab at
  ``http://<user>.localhost:<port>/`` - Chromium resolves ``*.localhost`` to the loopback address
  itself, and a host of its own gives every user a cookie jar of its own in one browser;
- :func:`theia_tree`: the processes in a user's cgroup with their RSS and PSS;
- :func:`gc_lines`: the ``{"wsup":"gc",...}`` lines gc-preload.js wrote to the user's IDE log.

Standard library and psutil only; the tests import it as ``integration.bench.theia_users``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[2]
THEIA_DIR = REPO / "images" / "theia"
NODE = shutil.which("node")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def theia_root(prefix: Path | None = None) -> tuple[Path, Path]:
    """(the directory of the preloads, the app directory holding lib/): a ``--prefix`` install,
    or the checkout's build."""
    if prefix is not None:
        return prefix, prefix
    return THEIA_DIR, THEIA_DIR / "app"


def theia_main(prefix: Path | None = None) -> Path:
    return theia_root(prefix)[1] / "lib" / "backend" / "main.js"


def theia_command(prefix: Path | None = None) -> list[str]:
    preloads, app = theia_root(prefix)
    assert NODE is not None, "node is not on PATH"
    return [
        NODE, "--expose-gc",
        "--require", str(preloads / "unix-socket-preload.js"), "--require", str(preloads / "gc-preload.js"),
        str(app / "lib" / "backend" / "main.js"), "{workspace}", "--hostname", "127.0.0.1",
        "--session-preference=security.workspace.trust.enabled=false",
    ]


def missing_requirements(prefix: Path | None = None, *, browser: bool = True) -> str | None:
    """Why the real-Theia checks cannot run here, or None."""
    if NODE is None:
        return "node is not on PATH"
    if not theia_main(prefix).is_file():
        return f"Theia app not built ({theia_main(prefix)} missing): run images/theia/build"
    if browser and CHROMIUM is None:
        return "needs Debian's chromium to load the workbench (apt-get install chromium)"
    return None


def user_origin(user: str, port: int) -> str:
    return f"http://{user}.localhost:{port}"


class Browser:
    """One headless Chromium; one tab per user (opened and closed over the DevTools endpoints)."""

    def __init__(self, *, extra_args: list[str] | None = None) -> None:
        assert CHROMIUM is not None, "chromium is not installed"
        self.profile = Path(tempfile.mkdtemp(prefix="wsup-chromium-", dir="/tmp"))
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update", "--mute-audio",
             f"--user-data-dir={self.profile}", "--remote-debugging-port=0", *(extra_args or []), "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.05)
        self.devtools = int(port_file.read_text().split()[0])

    def _call(self, path: str, method: str = "GET") -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.devtools}{path}", method=method)
        with urllib.request.urlopen(request, timeout=30) as answer:
            body = answer.read()
        try:
            return json.loads(body)
        except ValueError:
            return body.decode(errors="replace")

    def open(self, url: str) -> str:
        """Open ``url`` in a new tab; returns the tab's id."""
        target = self._call("/json/new?" + urllib.parse.quote(url, safe=":/?=&%"), method="PUT")
        return str(target["id"])

    def close_tab(self, tab: str) -> None:
        try:
            self._call(f"/json/close/{tab}")
        except OSError:
            pass

    def tabs(self) -> list[dict[str, Any]]:
        return [t for t in self._call("/json/list") if t.get("type") == "page"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def is_file_watcher(proc: psutil.Process) -> bool:
    return any(a.endswith("ipc-bootstrap") or a.endswith("ipc-bootstrap.js") for a in cmdline(proc))


def is_shell(proc: psutil.Process) -> bool:
    argv = cmdline(proc)
    return bool(argv) and os.path.basename(argv[0]).lstrip("-") in ("bash", "sh")


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def workbench_ready(pid: int) -> bool:
    """The backend forked its file watcher and opened a terminal: a workbench has loaded."""
    kids = descendants(pid)
    return any(is_file_watcher(p) for p in kids) and any(is_shell(p) for p in kids)


def cgroup_pids(cgroup_dirs: list[Path]) -> set[int]:
    pids: set[int] = set()
    for group in cgroup_dirs:
        for procs in [group / "cgroup.procs", *group.glob("*/cgroup.procs")]:
            try:
                pids.update(int(p) for p in procs.read_text().split())
            except (OSError, ValueError):
                continue
    return pids


@dataclass
class ProcMemory:
    pid: int
    name: str
    rss: int
    pss: int


def proc_memory(pid: int) -> ProcMemory | None:
    """RSS (from /proc/PID/status, readable while frozen) and PSS (smaps_rollup)."""
    try:
        proc = psutil.Process(pid)
        argv = cmdline(proc)
        name = " ".join(os.path.basename(a) for a in argv[:2]) or proc.name()
        rss = pss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
        return ProcMemory(pid, name, rss, pss)
    except (psutil.Error, OSError, ValueError):
        return None


def theia_tree(cgroup_dirs: list[Path]) -> list[ProcMemory]:
    """Every process in a user's cgroup (and its child groups) with RSS and PSS."""
    found = [proc_memory(pid) for pid in sorted(cgroup_pids(cgroup_dirs))]
    return [m for m in found if m is not None]


def gc_lines(log_text: str) -> list[dict[str, Any]]:
    lines = []
    for line in log_text.splitlines():
        start = line.find('{"wsup":"gc"')
        if start >= 0:
            try:
                lines.append(json.loads(line[start:]))
            except ValueError:
                continue
    return lines
