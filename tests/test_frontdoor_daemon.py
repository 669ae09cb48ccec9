"""The front door of the real daemon (real kernel, real uids, real cgroups) in front of stub IDEs.

The daemon runs ``tests/fixtures/ide_http_stub.py`` per user (HTTP/1.1 keep-alive, a Theia-like
connection cookie, WebSocket echo, large bodies) and is reached only through its front door on
127.0.0.1 with real clients (``http.client`` and a raw-socket WebSocket). Checked: cold start on the
first request, the sign-in redirect and cookie, routing by the authenticated user only, every
refusal (401/403/409/429/503/502) and its metric, a 20 MB download and upload without the daemon's
memory growing by that much, slowloris and malformed requests cut off while others are served, and
that no token ever reaches the daemon's log.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from supervisor.frontdoor import fastrelay
from tests.conftest import is_root, pure_cgroup_v2, v1_controllers_mounted
from tests.frontdoor_client import ISSUER, Client, WebSocket, mint, outside_address, ws_connect, ws_recv, ws_send
from tests.harness import SYSTEM_PYTHON, Daemon, poll

pytestmark = pytest.mark.skipif(
    not (is_root() and (v1_controllers_mounted() or pure_cgroup_v2())),
    reason="needs root and cgroup controllers (v1 cpu/memory/pids/freezer, or pure v2)",
)

STUB = Path(__file__).parent / "fixtures" / "ide_http_stub.py"
SECRET = b"front-door-daemon-test-secret-0123456789"
MINTED: list[str] = []


def token(user: str, **claims: Any) -> str:
    claims.setdefault("sid", f"{user}-tab")
    value = mint(SECRET, user, **claims)
    MINTED.append(value)
    return value


def bearer(user: str, **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user, **claims)}"}


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """The stub (readable by every user's uid) and the HS256 secret (root only)."""
    base = Path(tempfile.mkdtemp(prefix="wsup-fd-", dir="/tmp"))
    os.chmod(base, 0o755)
    shutil.copy(STUB, base / "ide_http_stub.py")
    os.chmod(base / "ide_http_stub.py", 0o644)
    (base / "hs256.key").write_bytes(SECRET)
    os.chmod(base / "hs256.key", 0o600)
    yield base
    shutil.rmtree(base, ignore_errors=True)


class FrontDoorDaemon:
    def __init__(self, shared: Path, **overrides: Any) -> None:
        self.daemon = Daemon(**{
            "http__listen": "127.0.0.1:0",
            "auth__hs256_secret_file": str(shared / "hs256.key"),
            "auth__issuer": ISSUER,
            "ide__command": [SYSTEM_PYTHON, "-I", "-S", str(shared / "ide_http_stub.py"), "{user}"],
            **overrides,
        })
        self.clients: list[Client] = []
        self.sockets: list[WebSocket] = []
        self.port = 0
        self.probes_port = 0

    def start(self) -> FrontDoorDaemon:
        self.daemon.start()
        self.port = int(poll(lambda: _search(r"front door listening on 127\.0\.0\.1:(\d+)", self.daemon.log_text()), 10, "front door"))
        self.probes_port = int(poll(lambda: _search(r"probes listening on 127\.0\.0\.1:(\d+)", self.daemon.log_text()), 10, "probes"))
        return self

    def client(self, **kwargs: Any) -> Client:
        client = Client("127.0.0.1", self.port, **kwargs)
        self.clients.append(client)
        return client

    def ws(self, target: str, headers: dict[str, str] | None = None) -> WebSocket:
        """A WebSocket handshake through the front door (closed at cleanup even if a test fails), from
        the page's own origin: https, as ``[auth] cookie_secure`` (the default) says the site is served."""
        ws = ws_connect("127.0.0.1", self.port, target, headers={"Origin": f"https://127.0.0.1:{self.port}", **(headers or {})})
        self.sockets.append(ws)
        return ws

    def metric(self, name: str, **labels: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.probes_port}/metrics", timeout=5).read().decode()
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith(name + ("{" if labels else " ")):
                if not labels or _labels(line) == wanted:
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def rss(self) -> int:
        assert self.daemon.proc is not None
        return int(psutil.Process(self.daemon.proc.pid).memory_info().rss)

    def cleanup(self) -> None:
        for client in self.clients:
            client.close()
        for ws in self.sockets:
            ws.close()
        log = self.daemon.log_text()
        self.daemon.cleanup()
        leaked = [t for t in MINTED if t in log]
        assert not leaked, "a token reached the daemon's log"
        assert "Traceback" not in log, log[-4000:]


def _labels(line: str) -> str:
    inside = line[line.index("{") + 1: line.index("}")]
    return ",".join(sorted(part for part in inside.split(",") if part))


def _search(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text)
    return match.group(1) if match else None


@pytest.fixture(scope="module")
def fd(shared_dir: Path) -> Iterator[FrontDoorDaemon]:
    d = FrontDoorDaemon(
        shared_dir, pod__capacity=40, http__max_cold_starts=1, http__header_timeout="1s", http__session_linger="1s",
        http__start_timeout="15s", **{"tiers.starter__sessions": 2},
    ).start()
    yield d
    d.cleanup()


def cookies_of(client: Client) -> str:
    return "; ".join(f"{k}={v}" for k, v in client.cookies.items())


# ---- sign-in, cold start, routing ----------------------------------------------------------------


def test_cold_start_through_the_front_door_with_the_cookie_flow(fd: FrontDoorDaemon) -> None:
    assert fd.daemon.ctl("status", "fd-alice").returncode == 3  # never started
    browser = fd.client()
    tok = token("fd-alice")
    signed_in = browser.get(f"/?folder=/workspace&token={tok}")
    assert signed_in.status == 303 and signed_in.header("location") == "/?folder=/workspace"
    cookie = signed_in.header("set-cookie") or ""
    assert cookie.startswith("wsup_session=") and tok not in cookie
    assert {"HttpOnly", "SameSite=Lax", "Secure", "Path=/"} <= {a.strip() for a in cookie.split(";")}
    began = time.monotonic()
    page = browser.get("/?folder=/workspace")
    took = time.monotonic() - began
    info = fd.daemon.user("fd-alice")
    assert page.status == 200, page.body
    assert page.body.startswith(f"stub-ide user=fd-alice uid={info['uid']} ".encode())
    assert info["state"] == "RUNNING" and info["browser_sessions"] == 1
    assert took < 10
    assert "theia-connection-token" in browser.cookies
    seen = {k.lower(): v for k, v in browser.get("/headers", headers={"Host": "pod-3.example.com"}).json()}
    assert seen["host"] == "pod-3.example.com"
    assert seen["cookie"].startswith("theia-connection-token=") and "wsup_session" not in seen["cookie"]
    pod = fd.daemon.ctl_json("pod")
    assert f"127.0.0.1:{fd.port}" in json.dumps(pod)


def test_one_users_cookie_never_reaches_another_users_ide(fd: FrontDoorDaemon) -> None:
    bob, carol = fd.client(), fd.client()
    bob.get("/?token=" + token("fd-bob"))
    carol.get("/?token=" + token("fd-carol"))
    assert carol.get("/").body.startswith(b"stub-ide user=fd-carol ")
    assert bob.get("/").status == 200
    bob_uid = fd.daemon.user("fd-bob")["uid"]
    for target in ("/", "/fd-carol", "/users/fd-carol/", "/../fd-carol", "//fd-carol/x", "/?user=fd-carol"):
        answer = bob.get(target, headers={"Host": "fd-carol"})
        assert answer.status == 200 and answer.body.startswith(f"stub-ide user=fd-bob uid={bob_uid} ".encode()), target
    # Bob rewrites his cookie to name carol: the signature no longer matches.
    version, payload, mac = bob.cookies["wsup_session"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["u"] = "fd-carol"
    forged = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).rstrip(b"=").decode()
    refused = fd.client().get("/", headers={"Cookie": f"wsup_session={version}.{forged}.{mac}"})
    assert refused.status == 401 and refused.json()["reason"] == "bad_cookie"
    # Bob's WebSocket reaches bob's IDE even when he holds carol's Theia cookie.
    ws = fd.ws("/ws", headers={
        "Cookie": f"wsup_session={bob.cookies['wsup_session']}; theia-connection-token={carol.cookies['theia-connection-token']}",
    })
    assert ws.status == 403  # bob's IDE does not know carol's connection token
    ws.close()


def test_websocket_upgrade_is_spliced_both_ways(fd: FrontDoorDaemon) -> None:
    browser = fd.client()
    browser.get("/?token=" + token("fd-dave"))
    browser.get("/")
    before = fd.metric("workspace_supervisor_proxy_connections_total", kind="websocket")
    ws = fd.ws("/ws?EIO=4&transport=websocket", headers={"Cookie": cookies_of(browser)})
    assert ws.status == 101 and "theia-connection-token" in (ws.header("set-cookie") or "")
    assert fd.metric("workspace_supervisor_proxy_active_connections", kind="websocket") >= 1
    poll(lambda: fd.daemon.ctl_json("pods")["pods"][0]["address"] == f"127.0.0.1:{fd.port}", 5,
         "the front door's address in the registry (where routers send browsers)")
    relay = fd.daemon.ctl_json("pod")["pod"]["frontdoor"]["websocket_relay"]
    assert relay.startswith("C fast path" if fastrelay.library_path() else "pure-Python relay"), relay
    for payload in (b"x", os.urandom(125), os.urandom(65_536), os.urandom(2**20)):
        ws_send(ws, payload)
        assert ws_recv(ws) == (2, payload)
    ws_send(ws, b"\x03\xe8", opcode=0x8)
    assert ws_recv(ws)[0] == 0x8
    ws.close()
    assert fd.metric("workspace_supervisor_proxy_connections_total", kind="websocket") == before + 1


def test_an_operator_paused_user_gets_503_at_once_until_resumed(fd: FrontDoorDaemon) -> None:
    browser = fd.client(timeout=10)
    browser.get("/?token=" + token("fd-paula"))
    assert browser.get("/").status == 200
    paused = fd.daemon.ctl("pause", "fd-paula")
    assert paused.returncode == 0, paused.stderr
    assert fd.daemon.user("fd-paula")["state"] == "PAUSED"
    began = time.monotonic()
    api = browser.get("/api")  # not held until an idle timeout ends in a 502
    assert time.monotonic() - began < 2
    assert api.status == 503 and api.json()["reason"] == "paused" and api.header("retry-after")
    assert "operator paused" in api.json()["message"] and "workspacectl resume fd-paula" in api.json()["hint"]
    page = browser.get("/", headers={"Accept": "text/html"})
    assert page.status == 503 and b"paused" in page.body
    assert fd.daemon.user("fd-paula")["state"] == "PAUSED"  # requests do not resume it
    resumed = fd.daemon.ctl("resume", "fd-paula")
    assert resumed.returncode == 0, resumed.stderr
    assert browser.get("/").status == 200


# ---- refusals -------------------------------------------------------------------------------------


def test_refusals_carry_a_reason_and_are_counted(fd: FrontDoorDaemon) -> None:
    def rejected(reason: str) -> float:
        return fd.metric("workspace_supervisor_auth_rejections_total", reason=reason)

    before = {r: rejected(r) for r in ("missing_token", "expired", "bad_signature", "invalid_user_id", "unknown_tier")}
    client = fd.client()
    cases = [
        ({}, 401, "missing_token"),
        (bearer("fd-erin", exp=int(time.time()) - 3600), 401, "expired"),
        ({"Authorization": "Bearer " + mint(b"not-the-daemons-secret-0123456789abc", "fd-erin")}, 401, "bad_signature"),
        (bearer("Erin"), 401, "invalid_user_id"),
        (bearer("fd-erin", tier="gold"), 403, "unknown_tier"),
    ]
    for headers, status, reason in cases:
        answer = client.get("/", headers=headers)
        assert (answer.status, answer.json()["reason"]) == (status, reason)
    for reason, count in before.items():
        assert rejected(reason) == count + 1, reason
    assert fd.daemon.ctl("status", "fd-erin").returncode == 3, "a refused request started an IDE"


def test_another_users_link_never_switches_a_browser_silently_and_forced_sign_ins_are_counted(fd: FrontDoorDaemon) -> None:
    navigate = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    own = f"https://127.0.0.1:{fd.port}"  # [auth] cookie_secure = true: the site is https

    def rejected(reason: str) -> float:
        return fd.metric("workspace_supervisor_auth_rejections_total", reason=reason)

    before = {r: rejected(r) for r in ("token_not_navigation", "bad_origin", "service_worker_refused")}
    browser = fd.client()
    first = browser.get("/?token=" + token("fd-hank"), headers=navigate)
    assert first.status == 303 and first.header("clear-site-data") == '"cache", "storage"'
    assert browser.get("/").body.startswith(b"stub-ide user=fd-hank ")
    # An iframe (or image, or fetch) with a token never signs in.
    framed = browser.get("/?token=" + token("fd-ivy"), headers={**navigate, "Sec-Fetch-Dest": "iframe"})
    assert (framed.status, framed.json()["reason"]) == (403, "token_not_navigation")
    # Ivy's link opened in Hank's browser: asked, not switched.
    page = browser.get("/?token=" + token("fd-ivy"), headers=navigate)
    assert page.status == 200 and b"fd-hank" in page.body and page.header("set-cookie") is None
    assert browser.get("/").body.startswith(b"stub-ide user=fd-hank ")
    form = dict(re.findall(r'name="(\w+)" value="([^"]*)"', page.body.decode()))
    post = {"Content-Type": "application/x-www-form-urlencoded", "Origin": own, "Sec-Fetch-Site": "same-origin"}
    switched = browser.request("POST", "/.wsup/sign-in", body=urllib.parse.urlencode(form).encode(), headers=post)
    assert switched.status == 303 and switched.header("clear-site-data") == '"cache", "storage"'
    assert browser.get("/").body.startswith(b"stub-ide user=fd-ivy ")
    # Another site's page using the cookie for a WebSocket; a service worker's script.
    ws = fd.ws("/ws", headers={"Cookie": cookies_of(browser), "Origin": "https://evil.example"})
    assert ws.status == 403
    assert browser.get("/sw.js", headers={"Service-Worker": "script"}).status == 403
    for reason, count in before.items():
        assert rejected(reason) == count + 1, reason
    assert fd.daemon.ctl("status", "fd-ivy").returncode == 0


def test_a_second_browser_session_beyond_the_tier_is_409(fd: FrontDoorDaemon) -> None:
    first = fd.client()
    first.get("/?token=" + token("fd-frank", sid="laptop"))
    first.get("/")
    ws = fd.ws("/ws", headers={"Cookie": cookies_of(first)})
    assert ws.status == 101
    second = fd.client()
    refused = second.get("/?token=" + token("fd-frank", sid="phone"))
    assert refused.status == 409 and refused.json()["reason"] == "too_many_sessions"
    assert "wsup_session" not in second.cookies
    assert fd.daemon.user("fd-frank")["browser_sessions"] == 1
    ws.close()
    poll(lambda: fd.client().get("/", headers=bearer("fd-frank", sid="phone")).status == 200, 5, "the session to be released")
    # starter allows 2
    assert fd.client().get("/", headers=bearer("fd-gina", tier="starter", sid="a")).status == 200
    keep = fd.client()
    keep.get("/?token=" + token("fd-gina", tier="starter", sid="a"))
    keep.get("/")
    ws_a = fd.ws("/ws", headers={"Cookie": cookies_of(keep)})
    assert fd.client().get("/", headers=bearer("fd-gina", tier="starter", sid="b")).status == 200
    assert fd.client().get("/", headers=bearer("fd-gina", tier="starter", sid="c")).status == 409
    ws_a.close()


def test_more_cold_starts_than_allowed_get_429(fd: FrontDoorDaemon) -> None:
    results: dict[str, Any] = {}

    def first() -> None:
        results["first"] = fd.client().get("/", headers=bearer("slow-fd1"))

    thread = threading.Thread(target=first)
    thread.start()
    poll(lambda: fd.daemon.ctl("status", "slow-fd1").returncode == 0, 5, "the first cold start")
    refused = fd.client().get("/", headers=bearer("slow-fd2"))
    thread.join(30)
    assert refused.status == 429 and refused.json()["reason"] == "too_many_cold_starts" and refused.header("retry-after")
    assert results["first"].status == 200
    assert fd.client().get("/", headers=bearer("slow-fd2")).status == 200  # once the first is up


def test_a_failing_ide_gets_a_clear_error_page(fd: FrontDoorDaemon) -> None:
    page = fd.client().get("/", headers={**bearer("crash-fd1"), "Accept": "text/html"})
    assert page.status == 502 and b"could not start" in page.body and b"fast failures" in page.body
    assert fd.daemon.user("crash-fd1")["state"] == "FATAL"


def test_pod_full_and_draining_are_503_with_retry_after(shared_dir: Path) -> None:
    d = FrontDoorDaemon(shared_dir, pod__capacity=1).start()
    try:
        assert d.client().get("/", headers=bearer("fd-one")).status == 200
        full = d.client().get("/", headers=bearer("fd-two"))
        assert full.status == 503 and full.json()["reason"] == "pod_full" and full.header("retry-after") == "5"
        assert d.daemon.ctl("drain", "--deadline", "60s").returncode == 0
        assert d.client().get("/", headers=bearer("fd-one")).status == 200  # running users keep working
        d.daemon.ctl("stop", "fd-one")
        draining = d.client().get("/", headers=bearer("fd-two"))
        assert draining.status == 503 and draining.json()["reason"] == "draining" and draining.header("retry-after")
    finally:
        d.cleanup()


# ---- bodies, hostile clients -------------------------------------------------------------------------


def test_large_bodies_stream_without_the_daemon_holding_them(fd: FrontDoorDaemon) -> None:
    client = fd.client()
    client.get("/", headers=bearer("fd-hank"))
    client.get("/big?mb=1", headers=bearer("fd-hank"), keep_body=False)  # warm up buffers
    baseline = fd.rss()
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, fd.rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        download = client.get("/big?mb=20", headers=bearer("fd-hank"), keep_body=False)
        payload = os.urandom(20 * 2**20)
        upload = client.request("POST", "/count", headers=bearer("fd-hank"), body=payload)
    finally:
        stop.set()
        sampler.join()
    assert download.status == 200 and download.length == 20 * 2**20
    import hashlib

    assert upload.json() == {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    growth = peak - baseline
    assert growth < 8 * 2**20, f"the daemon's RSS grew by {growth / 2**20:.1f} MiB while proxying 20 MiB each way"


def test_slowloris_and_malformed_requests_are_cut_off_while_others_are_served(fd: FrontDoorDaemon) -> None:
    fd.client().get("/", headers=bearer("fd-ivy"))
    outcome: dict[str, Any] = {}

    def slowloris() -> None:
        began = time.monotonic()
        received = b""
        with socket.create_connection(("127.0.0.1", fd.port), timeout=10) as sock:
            try:
                for piece in [b"GET / HTTP/1.1\r\n", b"Host: x\r\n"] + [b"X-a: b\r\n"] * 40:
                    sock.sendall(piece)
                    time.sleep(0.25)
                while chunk := sock.recv(4096):
                    received += chunk
            except (BrokenPipeError, ConnectionResetError):
                pass
        outcome["slow"] = (time.monotonic() - began, received)

    threads = [threading.Thread(target=slowloris) for _ in range(5)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    served = [fd.client().get("/", headers=bearer("fd-ivy")).status for _ in range(5)]
    for thread in threads:
        thread.join(15)
    assert served == [200] * 5
    took, received = outcome["slow"]
    # Cut off after the 1s header timeout instead of the 10s it would take; the 408 is a courtesy that
    # a client still sending may lose to a reset.
    assert took < 4 and (received == b"" or received.startswith(b"HTTP/1.1 408 ")), (took, received[:60])
    for junk, status in ((b"\x00\x01garbage\r\n\r\n", b"400"), (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 100_000 + b"\r\n\r\n", b"431")):
        with socket.create_connection(("127.0.0.1", fd.port), timeout=5) as sock:
            try:
                sock.sendall(junk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            answer = sock.recv(100)
        assert answer.startswith(b"HTTP/1.1 " + status), answer
    assert fd.client().get("/", headers=bearer("fd-ivy")).status == 200


@pytest.mark.skipif(not outside_address(), reason="this host has no non-loopback IPv4 address for a client outside the pod")
def test_one_client_flooding_the_front_door_leaves_another_user_served(shared_dir: Path) -> None:
    """From inside the pod: connections kept alive with the user's own token, garbage tokens, and
    hundreds of connections without credentials from any loopback address, against a front door
    of 45 connections - another user's new connections from outside are still served (an idle
    connection of the flood closed for each), and every limit answers and counts."""
    d = FrontDoorDaemon(shared_dir, http__max_connections=45, http__max_unauthenticated=30, http__rejected_tokens=10,
                        http__rejected_tokens_interval="60s", **{"tiers.free__max_connections": 20}).start()
    outside = outside_address()
    held: list[socket.socket] = []

    def request(head: bytes, source: str = "127.0.0.1") -> bytes:
        sock = socket.create_connection(("127.0.0.1", d.port), timeout=10, source_address=(source, 0))
        held.append(sock)
        try:
            sock.sendall(head)
            return sock.recv(4096)[:12]
        except (ConnectionResetError, BrokenPipeError):
            return b""

    try:
        victim = b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token("fd-victim").encode() + b"\r\n\r\n"
        assert request(victim, outside) == b"HTTP/1.1 200"
        attacker = token("fd-attacker")
        own = b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + attacker.encode() + b"\r\n\r\n"
        assert request(own) == b"HTTP/1.1 200"
        for sock in held:
            sock.close()
        held.clear()
        limits = {name: d.metric("workspace_supervisor_frontdoor_limits_total", limit=name)
                  for name in ("connections", "unauthenticated", "evicted", "rejected_tokens")}
        # The attacker's own token: 20 connections kept alive, then 429 and closed.
        answers = [request(own) for _ in range(40)]
        assert answers[:20] == [b"HTTP/1.1 200"] * 20 and set(answers[20:]) == {b"HTTP/1.1 429"}, answers
        # Garbage tokens: 10 checked, then 429 before any check.
        garbage = f"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {attacker[:-8]}AAAAAAAA\r\n\r\n".encode()
        answers = [request(garbage) for _ in range(12)]
        assert answers == [b"HTTP/1.1 401"] * 10 + [b"HTTP/1.1 429"] * 2, answers
        # Without credentials from 300 loopback addresses (one client, "local"): served until all
        # 45 connections are open, then refused (never by closing its own for them).
        answers = [request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", f"127.0.{i // 250}.{i % 250 + 2}") for i in range(300)]
        served = answers.count(b"HTTP/1.1 401")
        assert 0 < served <= 15 and answers == [b"HTTP/1.1 401"] * served + [b"HTTP/1.1 503"] * (300 - served), answers
        # The other user's new connections from outside are served: an idle one of the flood closed for each.
        assert [request(victim, outside) for _ in range(10)] == [b"HTTP/1.1 200"] * 10
        after = {name: d.metric("workspace_supervisor_frontdoor_limits_total", limit=name) for name in limits}
        assert after["connections"] - limits["connections"] == 20
        assert after["rejected_tokens"] - limits["rejected_tokens"] == 2
        assert after["evicted"] - limits["evicted"] == 10
        assert after["unauthenticated"] == limits["unauthenticated"]  # (the global limit came first)
    finally:
        for sock in held:
            sock.close()
        d.cleanup()
