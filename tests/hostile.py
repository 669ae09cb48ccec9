"""The hostile-tenant pod: one real daemon with two users, ``attacker`` and ``victim``, each running
``tests/fixtures/ide_shell_stub.py`` (a stand-in IDE with a terminal: ``POST /exec`` runs shell as
its user, in its tree), reached only through the front door with RS256 tokens.

The workspace root, state, logs and registry live on one small tmpfs so that a tenant can fill
"the disk". :meth:`Pod.assert_untouched` is what every attack must leave true: the daemon alive
with the same pid and answering ``/healthz`` within 1 s, the victim RUNNING with the same pid and
answering through the front door, its files byte for byte as they were.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.frontdoor_client import ISSUER, mint, outside_address
from tests.harness import SYSTEM_PYTHON, Daemon, poll

STUB = Path(__file__).parent / "fixtures" / "ide_shell_stub.py"
DISK = "64m"
#: Where the victim's requests come from: outside the pod, a client apart from the attacker's
#: terminal (every loopback address is one client to the front door's per-address limits).
VICTIM_SOURCE = outside_address() or "127.0.0.2"


def http_status(port: int, target: str, *, timeout: float = 1.0, source: str = "127.0.0.1") -> tuple[int, float]:
    """One request on a fresh connection: (status, seconds) - 0 when nothing came back in time."""
    began = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as sock:
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            head = sock.recv(64)
    except OSError:
        return 0, time.monotonic() - began
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return (int(match.group(1)) if match else 0), time.monotonic() - began


def listening_paths(pid: int) -> list[str]:
    """The paths of the Unix sockets ``pid`` holds that are bound to a name (its listener)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    paths = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes and fields[7].startswith("/"):
            paths.append(fields[7])
    return paths


def tree_digest(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry under ``root``: (uid, mode, sha256 of a file's bytes or the link target)."""
    found: dict[str, tuple[int, int, str]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        if path.is_symlink():
            what = "-> " + os.readlink(path)
        elif path.is_file():
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = ""
        found[str(path.relative_to(root))] = (st.st_uid, st.st_mode, what)
    return found


@dataclass
class Tenant:
    pod: Pod
    name: str
    tier: str

    @property
    def token(self) -> str:
        return mint(self.pod.private_key, self.name, alg="RS256", tier=self.tier, sid=f"{self.name}-tab")

    def request(self, method: str, target: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = 30.0, source: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.pod.port, timeout=timeout, source_address=(source, 0))
        try:
            conn.request(method, target, body=body, headers={"Authorization": f"Bearer {self.token}", **(headers or {})})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def sh(self, script: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run ``script`` in this tenant's terminal (through the front door); (exit code, output)."""
        status, _, body = self.request("POST", "/exec", script.encode(), {"X-Timeout": str(timeout)}, timeout + 15)
        assert status == 200, f"{self.name}'s terminal did not answer: {status} {body[:300]!r}"
        answer = json.loads(body)
        return int(answer["rc"]), str(answer["out"])

    def detach(self, script: str) -> int:
        """Start ``script`` in the background in its own session; the pid of its shell."""
        status, _, body = self.request("POST", "/exec", script.encode(), {"X-Detach": "1"})
        assert status == 200, f"{self.name}'s terminal did not answer: {status} {body[:300]!r}"
        return int(json.loads(body)["pid"])

    def status(self) -> dict[str, Any]:
        return self.pod.daemon.user(self.name)

    @property
    def workspace(self) -> Path:
        return Path(self.status()["workspace"])


class Pod:
    """The daemon, its tmpfs, and the two tenants; see the module docstring."""

    def __init__(self, **overrides: Any) -> None:
        self.shared = Path(tempfile.mkdtemp(prefix="wsup-hostile-", dir="/tmp"))
        os.chmod(self.shared, 0o755)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
        (self.shared / "jwt.pem").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        self.disk = self.shared / "disk"
        self.disk.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK},mode=755", "tmpfs", str(self.disk)], check=True)
        (self.disk / "workspace").mkdir(mode=0o755)
        # The IDE inside the workspace root: the one path below /tmp a user's own view keeps.
        stub = self.disk / "workspace" / ".stub" / "ide_shell_stub.py"
        stub.parent.mkdir(mode=0o755)
        shutil.copy(STUB, stub)
        os.chmod(stub, 0o644)
        self.daemon = Daemon(**{
            "pod__capacity": 10,
            "workspace__root": str(self.disk / "workspace"),
            "daemon__state_dir": str(self.disk / "state"),
            "daemon__log_dir": str(self.disk / "log"),
            "daemon__log_max_bytes": "4Mi",
            "daemon__log_backups": 2,
            "registry__path": str(self.disk / "registry" / "registry.db"),
            "http__listen": "127.0.0.1:0",
            "auth__public_key_file": str(self.shared / "jwt.pem"),
            "auth__issuer": ISSUER,
            "ide__command": [SYSTEM_PYTHON, "-I", "-S", str(stub), "{user}"],
            # The attacker's tier walks the idle ladder's first rung (which reads its processes'
            # command lines) after 1 s; the victim's keeps the defaults.
            "tiers.starter__idle": {"lsp_pause_after": "1s"},
            **overrides,
        })
        self.attacker = Tenant(self, "attacker", "starter")
        self.victim = Tenant(self, "victim", "free")
        self.port = self.probes_port = 0
        self.daemon_pid = self.victim_pid = 0
        self.victim_files: dict[str, tuple[int, int, str]] = {}
        self.secret = "victim-secret-" + os.urandom(8).hex()

    # ---- life ----------------------------------------------------------------------------------

    def start(self) -> Pod:
        self.daemon.start()
        self._find_ports()
        status, _, body = self.victim.request("GET", "/", source=VICTIM_SOURCE)  # a cold start through the front door
        assert status == 200, body
        rc, out = self.victim.sh(f"umask 077; printf %s {self.secret} > canary.txt; mkdir -p node_modules/pkg docs; "
                                 f"printf %s {self.secret} > node_modules/pkg/index.js; echo notes > docs/notes.txt")
        assert rc == 0, out
        self.fresh_attacker()
        self.baseline()
        return self

    def _find_ports(self) -> None:
        def last(pattern: str) -> int | None:
            found = re.findall(pattern, self.daemon.log_text())
            return int(found[-1]) if found else None

        self.port = poll(lambda: last(r"front door listening on 127\.0\.0\.1:(\d+)"), 10, "the front door")
        self.probes_port = poll(lambda: last(r"probes listening on 127\.0\.0\.1:(\d+)"), 10, "the probe port")

    def alive(self) -> bool:
        return self.daemon.proc is not None and self.daemon.proc.poll() is None

    def revive(self) -> None:
        """Start the daemon again if an earlier test took it down (that test has failed for it),
        first clearing what the attacker left at its old socket path (on main a directory there
        makes every re-adoption crash again)."""
        if self.alive() and self.daemon.ctl("pod").returncode != 0:
            assert self.daemon.proc is not None
            try:
                self.daemon.proc.wait(10)  # on its way out
            except subprocess.TimeoutExpired:
                self.daemon.kill()
        if not self.alive():
            shutil.rmtree(self.daemon.base / "run" / "users" / "attacker", ignore_errors=True)
            self.daemon.start()
            self._find_ports()

    def fresh_attacker(self) -> None:
        """The attacker back to a clean RUNNING tree (its old tree killed), whatever the last test left."""
        self.daemon.ctl("stop", "attacker")
        started = self.daemon.ctl("start", "attacker", "--tier", "starter")
        assert started.returncode == 0, started.stderr
        poll(lambda: self.attacker.status()["state"] == "RUNNING", 15, "the attacker RUNNING")

    def baseline(self) -> None:
        """What :meth:`assert_untouched` compares with (re-taken when an earlier test broke it)."""
        assert self.daemon.proc is not None
        self.daemon_pid = self.daemon.proc.pid
        if self.victim.status()["state"] != "RUNNING":
            started = self.daemon.ctl("start", "victim")
            assert started.returncode == 0, f"{started.stdout}{started.stderr}{self.daemon.log_text()[-3000:]}"
        self.victim_pid = int(self.victim.status()["pid"])
        self.victim_files = tree_digest(self.victim.workspace)

    def cleanup(self) -> None:
        try:
            self.daemon.cleanup()
        finally:
            subprocess.run(["umount", "-l", str(self.disk)], check=False)
            shutil.rmtree(self.shared, ignore_errors=True)

    # ---- what must hold ------------------------------------------------------------------------

    def healthz(self) -> None:
        for target in ("/healthz", "/readyz"):
            status, took = http_status(self.probes_port, target, source="127.0.0.9")
            assert status == 200 and took < 1.0, f"{target}: {status} after {took:.2f}s"

    def assert_untouched(self) -> None:
        assert self.alive(), f"the daemon exited:\n{self.daemon.log_text()[-3000:]}"
        assert self.daemon.proc is not None and self.daemon.proc.pid == self.daemon_pid, "the daemon was restarted"
        self.healthz()
        info = self.victim.status()
        assert (info["state"], info["pid"]) == ("RUNNING", self.victim_pid), info
        status, _, body = self.victim.request("GET", "/", source=VICTIM_SOURCE, timeout=10)
        assert status == 200 and body.decode().startswith(f"shell-ide user=victim uid={info['uid']} pid={self.victim_pid}\n"), (status, body)
        assert tree_digest(self.victim.workspace) == self.victim_files, "the victim's files changed"

    def victim_rtt(self, n: int = 30) -> float:
        """Median seconds of ``GET /`` through the front door, each on a fresh connection, timed by
        curl in a process of its own: timed from this process (http.client), whose threads share
        one GIL with the suite's own, a round trip took ~40 ms against ~1.5 ms, hiding what a
        flood costs."""
        script = (f"for i in $(seq {n}); do curl -sS -o /dev/null -w '%{{http_code}} %{{time_total}}\\n' "
                  f"--interface {VICTIM_SOURCE} -H 'Authorization: Bearer {self.victim.token}' "
                  f"http://127.0.0.1:{self.port}/; done")
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60 + n).stdout
        answers = [line.split() for line in out.splitlines()]
        assert len(answers) == n and all(code == "200" for code, _ in answers), out
        return statistics.median(float(took) for _, took in answers)

    def wait_ready_file(self, tenant: Tenant, name: str, timeout: float = 20.0) -> str:
        path = tenant.workspace / name
        poll(lambda: path.exists() and path.stat().st_size > 0, timeout, f"{name} from the attacker's script")
        return path.read_text()

    def state_settled(self, tenant: Tenant, old_pid: int) -> dict[str, Any]:
        """Wait (failing at once if the daemon dies) until ``tenant`` is RUNNING with a new pid or
        BACKOFF/FATAL with a reason; return its status."""
        def settled() -> dict[str, Any] | None:
            assert self.alive(), f"the daemon exited:\n{self.daemon.log_text()[-3000:]}"
            info = tenant.status()
            if info["state"] == "RUNNING" and info["pid"] != old_pid:
                return info
            if info["state"] in ("BACKOFF", "FATAL") and info.get("reason"):
                return info
            return None

        result: dict[str, Any] = poll(settled, 20, f"{tenant.name} to end in a clear state")
        return result
