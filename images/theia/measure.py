#!/usr/bin/env python3
"""Measure the built Theia backend as the daemon runs it: exec -> GET / 200 over its Unix socket,
RSS once ready, RSS after a SIGUSR2 GC, exit time after SIGTERM.

    python3 images/theia/measure.py [--root images/theia/app] [--runs 5] [--concurrency 1]
                                    [--uid 65001] [--no-hostname]

--root is the directory holding lib/ (the app, or an install prefix such as /opt/theia, which
also holds the preloads). Runs as root; each IDE runs as --uid (+ index when concurrent) with a
fresh HOME, workspace and socket directory under /tmp. Standard library only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(self.unix_path)
        except BaseException:
            s.close()
            raise
        self.sock = s


def get_status(path: str) -> int:
    c = UnixHTTPConnection(path)
    try:
        c.request("GET", "/")
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def refuses(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            return True
    return False


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def one(root: Path, uid: int, hostname: bool, result: dict) -> None:  # type: ignore[type-arg]
    result["uid"] = uid
    base = Path(tempfile.mkdtemp(prefix="wsup-theia-measure-"))
    base.chmod(0o711)
    home, ws, run = base / "home", base / "ws", base / "run"
    for d in (home, ws, run):
        d.mkdir(mode=0o700)
    for d in (home, ws):
        os.chown(d, uid, uid)
    sock = run / "ide.sock"  # root's, as the daemon makes it; handed over as fd 3
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(512)
    preloads = root if (root / "gc-preload.js").exists() else HERE
    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
            shutil.which("node") or "node", "--expose-gc",
            "--require", str(preloads / "unix-socket-preload.js"), "--require", str(preloads / "gc-preload.js"),
            str(root / "lib" / "backend" / "main.js"), str(ws)]
    if hostname:
        argv += ["--hostname", "127.0.0.1"]
    argv += ["--session-preference=security.workspace.trust.enabled=false"]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "SHELL": "/bin/bash", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "ide"}
    move = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.execvp(sys.argv[2], sys.argv[2:])"
    argv = [sys.executable, "-I", "-S", "-c", move, str(listener.fileno()), *argv]
    errlines: list[str] = []
    t0 = time.monotonic()
    p = subprocess.Popen(argv, env=env, cwd=str(ws), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, pass_fds=(listener.fileno(),))
    listener.close()
    reader = threading.Thread(target=lambda: errlines.extend(p.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"exited {p.returncode}: {''.join(errlines[-5:])}")
            if time.monotonic() - t0 > 60:
                raise RuntimeError("not ready within 60 s")
            try:
                if get_status(str(sock)) == 200:
                    break
            except OSError:
                pass
            time.sleep(0.01)
        result["ready_s"] = time.monotonic() - t0
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:  # node's listen() on fd 3 names it
            probe.connect(str(sock))
            result["peer_uid"] = struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        time.sleep(1)  # let start-up work settle before reading RSS
        result["rss_mib"] = rss_kib(p.pid) / 1024
        n = len(errlines)
        os.kill(p.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(l.startswith('{"wsup":"gc"') for l in errlines[n:]):
            time.sleep(0.01)
        gc = [json.loads(l) for l in errlines[n:] if l.startswith('{"wsup":"gc"')]
        result["gc"] = gc[0] if gc else None
        result["rss_after_gc_mib"] = rss_kib(p.pid) / 1024
        t1 = time.monotonic()
        p.terminate()
        result["exit_code"] = p.wait(timeout=15)
        result["stop_s"] = time.monotonic() - t1
        result["socket_refuses"] = refuses(sock)
    except Exception as exc:  # noqa: BLE001 - report and go on
        result["error"] = str(exc)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        reader.join(timeout=5)
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=HERE / "app")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--uid", type=int, default=65001)
    ap.add_argument("--no-hostname", action="store_true", help="omit --hostname 127.0.0.1")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (the IDE runs as --uid)", file=sys.stderr)
        return 2
    results: list[dict] = []  # type: ignore[type-arg]
    for _ in range(a.runs):
        batch = [{} for _ in range(a.concurrency)]
        threads = [threading.Thread(target=one, args=(a.root.resolve(), a.uid + i, not a.no_hostname, r))
                   for i, r in enumerate(batch)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results += batch
    for r in results:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "gc"}))
    ok = [r for r in results if "error" not in r]
    if ok:
        ready = sorted(r["ready_s"] for r in ok)
        print(f"ready (exec -> GET / 200): min {ready[0]:.2f}s median {statistics.median(ready):.2f}s "
              f"max {ready[-1]:.2f}s over {len(ready)} (concurrency {a.concurrency})")
        print(f"backend RSS when ready: median {statistics.median(r['rss_mib'] for r in ok):.0f} MiB; "
              f"after SIGUSR2 GC: {statistics.median(r['rss_after_gc_mib'] for r in ok):.0f} MiB")
        gcs = [r["gc"] for r in ok if r.get("gc")]
        if gcs:
            print(f"GC: heap used {statistics.median(g['heap_used_before'] for g in gcs) / 2**20:.1f} -> "
                  f"{statistics.median(g['heap_used_after'] for g in gcs) / 2**20:.1f} MiB, "
                  f"{statistics.median(g['ms'] for g in gcs):.0f} ms")
        print(f"stop after SIGTERM: median {statistics.median(r['stop_s'] for r in ok):.2f}s, exit codes "
              f"{sorted({r['exit_code'] for r in ok})}, socket refuses after exit: {all(r['socket_refuses'] for r in ok)}, "
              f"peer uid the IDE's: {all(r['peer_uid'] == r['uid'] for r in ok)}")
    return 1 if len(ok) != len(results) else 0


if __name__ == "__main__":
    sys.exit(main())
