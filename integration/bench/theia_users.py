"""Real Theia users behind the real daemon's front door, for the idle tests and benchmark.

- :func:`theia_command`: the IDE command the daemon runs by default (the built app, both preloads,
  ``--no-cluster``: the file watcher runs inside the backend; images/theia/README.md);
- :class:`Browser`: one headless Chromium (Debian ``chromium``) driven over its DevTools HTTP
  endpoints (``/json/new``, ``/json/close``): each user's workbench is a tab at
  ``http://<user>.localhost:<port>/`` - Chromium resolves ``*.localhost`` to the loopback address
  itself, and a host of its own gives every user a cookie jar of its own in one browser;
- :func:`theia_tree`: the processes in a user's cgroup with their RSS and PSS;
- :func:`gc_lines`: the ``{"wsup":"gc",...}`` lines gc-preload.js wrote to the user's IDE log.

Standard library and psutil only; the tests import it as ``integration.bench.theia_users``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
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
        "--session-preference=security.workspace.trust.enabled=false", "--no-cluster",
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
    """The backend opened a terminal (it does on every page load): a workbench has loaded. (Without
    ``--no-cluster`` it also forks its file watcher first; with it there is no such process.)"""
    return any(is_shell(p) for p in descendants(pid))


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


class DevTools:
    """A minimal Chrome DevTools Protocol client for one tab (its WebSocket, standard library only):
    evaluate JavaScript in the page and type keys, as a user would."""

    def __init__(self, browser: Browser, tab: str, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", browser.devtools), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (f"GET /devtools/page/{tab} HTTP/1.1\r\nHost: 127.0.0.1:{browser.devtools}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
        )
        self.pending = bytearray()
        while b"\r\n\r\n" not in self.pending:
            piece = self.sock.recv(65536)
            if not piece:
                raise ConnectionError("DevTools closed the connection during the handshake")
            self.pending += piece
        head, _, rest = bytes(self.pending).partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"DevTools refused the WebSocket: {head[:200]!r}")
        self.pending = bytearray(rest)
        self.next_id = 0

    def _send(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
                                if n < 65536 else bytes([0x80 | 127]) + n.to_bytes(8, "big"))
        repeated = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big") if n else b""
        self.sock.sendall(head + mask + masked)

    def _read(self, n: int) -> bytes:
        while len(self.pending) < n:
            piece = self.sock.recv(65536)
            if not piece:
                raise EOFError("DevTools closed the connection")
            self.pending += piece
        data = bytes(self.pending[:n])
        del self.pending[:n]
        return data

    def _recv(self) -> str:
        message = b""
        while True:
            first, second = self._read(2)
            n = second & 0x7F
            if n == 126:
                n = int.from_bytes(self._read(2), "big")
            elif n == 127:
                n = int.from_bytes(self._read(8), "big")
            message += self._read(n)
            if first & 0x80:
                return message.decode()

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self._send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            answer = json.loads(self._recv())
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return dict(answer.get("result", {}))

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def type_line(self, text: str) -> None:
        """Type ``text`` into whatever has the focus, then Enter."""
        self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      nativeVirtualKeyCode=13, **({"text": "\r"} if kind == "keyDown" else {}))

    def click(self, selector: str, text: str | None = None) -> bool:
        """Press and release the mouse on the middle of the first element matching ``selector``
        (and whose trimmed text is ``text``, if given); False if there is none on screen."""
        box = self.evaluate(
            f"(() => {{ const e = [...document.querySelectorAll({json.dumps(selector)})]"
            f".find(e => {json.dumps(text)} === null || e.textContent.trim() === {json.dumps(text)}); if (!e) return null; "
            "const r = e.getBoundingClientRect(); return r.width && r.height ? [r.x + r.width / 2, r.y + r.height / 2] : null; })()"
        )
        if not box:
            return False
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=box[0], y=box[1])  # menus act on the hovered item
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)
        return True

    def key(self, key: str, code: str, key_code: int, *, ctrl: bool = False, shift: bool = False) -> None:
        """Press and release one key (e.g. ``key("`", "Backquote", 192, ctrl=True)``)."""
        modifiers = (2 if ctrl else 0) | (8 if shift else 0)
        for kind in ("rawKeyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=key_code,
                      nativeVirtualKeyCode=key_code, modifiers=modifiers)

    def close(self) -> None:
        self.sock.close()
