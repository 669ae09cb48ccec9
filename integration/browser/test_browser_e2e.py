"""Browser end-to-end: two users, real Chromium, the real daemon's front door, real Theia.

The real daemon runs as root with its front door on a free 127.0.0.1 port, RS256 tokens (a key pair
made here; the daemon gets only the public key) and the Theia app built by ``images/theia/build``
and installed with ``--prefix`` into a temporary directory, run exactly as the README's
``[ide] command``. Two users' workspaces are prepared as the daemon would (their stable uid, 0700)
and seeded with a file of their own. Then ``e2e.mjs`` drives Debian's ``/usr/bin/chromium`` with
playwright-core, one browser context (cookie jar) per user, concurrently: each signs in with its own
token (``/?token=`` on the first load), sees the workbench with its own file (and not the other's),
opens it in the editor, opens a terminal and runs ``id -u > whoami.txt; pwd >> whoami.txt``.
Then bob's sign-in link is opened in alice's browser: the front door asks first (alice's session
cookie unchanged), and only the confirmation (a same-origin POST) switches it, with
``Clear-Site-Data`` (a localStorage marker alice's page left is gone) to bob's workbench.
Screenshots: ``artifacts/browser-e2e/``.

Checked from here afterwards: the file written by each terminal is owned by the user's uid and says
the user's uid and workspace; the token left the address bar; and with each browser's cookies, over
plain HTTP, that a session cookie only ever reaches its own user's Theia: Theia re-issues its
per-process random ``theia-connection-token`` cookie to a request without one, so the value names
the backend that answered - A's session gets A's token whatever the URL or Host says, never B's;
A's session with B's Theia cookie is refused by A's Theia (403 for files, no WebSocket 101); A's
Theia cannot read B's workspace (the kernel: another uid, 0700); a tampered or forged session
cookie gets 401 ``bad_cookie`` from the front door.

Needs root and cgroup controllers, node, Debian's chromium, ``npm ci`` in this directory and a
built Theia app; skips with the reason otherwise (``tests/run`` provides all of them).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from supervisor.paths import ensure_user_dirs, resolve_uid, user_paths  # noqa: E402
from tests.conftest import is_root, pure_cgroup_v2, v1_controllers_mounted  # noqa: E402
from tests.frontdoor_client import AUDIENCE, ISSUER, Client, mint, ws_connect  # noqa: E402
from tests.harness import Daemon, isolation_available, poll  # noqa: E402

HERE = Path(__file__).resolve().parent
#: Every [isolation] mechanism this machine can give, on (CI: all of them).
ISOLATION, ISOLATION_MISSING = isolation_available()
THEIA = REPO / "images" / "theia"
BUILT = THEIA / "app" / "lib" / "backend" / "main.js"
CHROMIUM = Path("/usr/bin/chromium")
NODE = shutil.which("node")
PLAYWRIGHT = HERE / "node_modules" / "playwright-core" / "package.json"
ARTIFACTS = REPO / "artifacts" / "browser-e2e"
USERS = ("e2e-alice", "e2e-bob")
TIER = "pro"  # 1 CPU: Theia's start and the workbench load are CPU-bound (free is 0.2 CPU)
#: Port of the dev server each user starts in their terminal: the same for both, each on their
#: own loopback ([isolation] network), reached through the front door's /port/<N>/.
DEV_PORT = 8765
#: Typed into each user's terminal: who and where (read from disk), the prompt as bash renders
#: it, and a dev server in the background serving the workspace.
COMMAND = (f"(python3 -m http.server {DEV_PORT} --bind 127.0.0.1 >/dev/null 2>&1 &); "
           "printf '%s\\n' \"${PS1@P}\" > prompt.txt; id -u > whoami.txt; pwd >> whoami.txt; cat whoami.txt")
#: Set to an installed prefix (e.g. /opt/theia) to use it instead of installing the checkout's build.
THEIA_PREFIX_ENV = "BROWSER_E2E_THEIA"

#: tests/run sets it: then a missing prerequisite fails the test instead of skipping it.
REQUIRED_ENV = "BROWSER_E2E_REQUIRED"


def missing() -> list[str]:
    """Why this test cannot run here (empty when it can)."""
    reasons = []
    if not (is_root() and (v1_controllers_mounted() or pure_cgroup_v2())):
        reasons.append("needs root and cgroup controllers (v1 cpu/memory/pids/freezer, or pure v2)")
    if NODE is None:
        reasons.append("node is not on PATH")
    if not CHROMIUM.is_file():
        reasons.append("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
    if not PLAYWRIGHT.is_file():
        reasons.append("playwright-core is not installed: run `npm ci` in integration/browser")
    if not (BUILT.is_file() or os.environ.get(THEIA_PREFIX_ENV)):
        reasons.append(f"Theia app not built ({BUILT.relative_to(REPO)} missing): run images/theia/build")
    return reasons


MISSING = missing()
pytestmark = [pytest.mark.slow]
if MISSING and os.environ.get(REQUIRED_ENV) != "1":
    pytestmark.append(pytest.mark.skip(reason="; ".join(MISSING)))


@pytest.fixture(scope="module")
def theia_prefix() -> Iterator[Path]:
    """A self-contained Theia install (lib/ + preloads), readable by every user's uid."""
    if MISSING:
        pytest.fail(f"{REQUIRED_ENV}=1 but this test cannot run: " + "; ".join(MISSING))
    given = os.environ.get(THEIA_PREFIX_ENV)
    if given:
        yield Path(given)
        return
    # Not below /tmp: a user's own view has a private /tmp ([isolation] mount).
    prefix = Path(tempfile.mkdtemp(prefix="wsup-e2e-theia-", dir="/opt"))
    os.chmod(prefix, 0o755)
    try:
        done = subprocess.run([str(THEIA / "build"), "--no-apt", "--prefix", str(prefix)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        assert (prefix / "lib" / "backend" / "main.js").is_file()
        yield prefix
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


class Setup:
    def __init__(self, daemon: Daemon, port: int, private_key: Any) -> None:
        self.daemon = daemon
        self.port = port
        self.private_key = private_key
        self.root = daemon.base / "workspace"
        self.tokens: dict[str, str] = {}
        self.uids: dict[str, int] = {}
        self.workspaces: dict[str, Path] = {}

    def token(self, user: str) -> str:
        value = mint(self.private_key, user, alg="RS256", tier=TIER, sid=f"{user}-browser", headers={"kid": "e2e"})
        self.tokens[user] = value
        return value


@pytest.fixture
def setup(theia_prefix: Path) -> Iterator[Setup]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    keys = Path(tempfile.mkdtemp(prefix="wsup-e2e-keys-", dir="/tmp"))
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (keys / "jwt.pem").write_bytes(private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    daemon = Daemon(**{
        "http__listen": "127.0.0.1:0",
        "http__start_timeout": "90s",
        "auth__algorithms": ["RS256"],
        "auth__public_key_file": str(keys / "jwt.pem"),
        "auth__issuer": ISSUER,
        "auth__audience": AUDIENCE,
        "auth__cookie_secure": False,  # plain http on loopback: a Secure cookie would not be sent back
        "ide__ready_timeout": "90s",
        "ide__stop_grace": "5s",
        "ide__env": {},
        # The README's [ide] command, with the temporary prefix for /opt/theia.
        "ide__command": [
            NODE, "--expose-gc",
            "--require", str(theia_prefix / "unix-socket-preload.js"), "--require", str(theia_prefix / "gc-preload.js"),
            str(theia_prefix / "lib" / "backend" / "main.js"), "{workspace}", "--hostname", "127.0.0.1",
            "--session-preference=security.workspace.trust.enabled=false",
        ],
        "restart__healthy_after": "5s",
        **ISOLATION,
    })
    try:
        s = Setup(daemon, 0, private_key)
        # Each workspace made as the daemon makes it (stable uid, 0700, owned by the user), then
        # seeded with a file of the user's own; the daemon adopts it on the cold start.
        for user in USERS:
            paths = user_paths(s.root, 4, user)
            uid = resolve_uid(s.root, 4, user, 200_000, 999_999_999)
            ensure_user_dirs(paths, s.root, uid, uid)
            seed = paths.workspace / f"{user}-notes.txt"
            seed.write_text(f"notes of {user}: marker-{user}-{uid}\n")
            os.chown(seed, uid, uid)
            s.uids[user], s.workspaces[user] = uid, paths.workspace
        daemon.start()
        s.port = int(poll(lambda: (m := re.search(r"front door listening on 127\.0\.0\.1:(\d+)", daemon.log_text())) and m.group(1),
                          15, "front door"))
        yield s
    finally:
        daemon.cleanup()
        shutil.rmtree(keys, ignore_errors=True)


def session_user(cookie: str) -> str:
    """The user a session cookie names (its payload; the signature is the front door's business)."""
    payload = cookie.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["u"])


def drive_browsers(s: Setup, work: Path) -> dict[str, Any]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    plan = {
        "executable": str(CHROMIUM),
        "base": f"http://127.0.0.1:{s.port}",
        "artifacts": str(ARTIFACTS),
        "timeout_ms": 90_000,
        "users": [
            {"name": user, "token": s.token(user), "file": f"{user}-notes.txt", "marker": f"marker-{user}-{s.uids[user]}",
             "whoami": str(s.workspaces[user] / "whoami.txt"), "command": COMMAND,
             "port_path": f"/port/{DEV_PORT}/{user}-notes.txt" if ISOLATION["isolation__network"] == "on" else None}
            for user in USERS
        ],
    }
    (work / "plan.json").write_text(json.dumps(plan))
    os.chmod(work / "plan.json", 0o600)
    driver = subprocess.Popen([NODE, str(HERE / "e2e.mjs"), str(work / "plan.json"), str(work / "result.json")],
                              cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = driver.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        # Chromium runs in a process group of its own: end the driver's whole tree, not just node.
        for child in psutil.Process(driver.pid).children(recursive=True):
            child.kill()
        driver.kill()
        _, stderr = driver.communicate()
        pytest.fail(f"the browser driver did not finish within 300 s:\n{stderr[-4000:]}")
    sys.stderr.write(stderr)
    result: dict[str, Any] = json.loads((work / "result.json").read_text())
    (ARTIFACTS / "result.json").write_text(json.dumps(result, indent=2))
    assert driver.returncode == 0 and result["ok"], (
        f"browser run failed (exit {driver.returncode}): {result.get('error')}\n"
        + "\n".join(f"{u['name']}: {u.get('error')}\n{u.get('body_text', '')[:500]}" for u in result["users"] if not u.get("ok"))
        + (f"\nswitch: {result['switch'].get('error')}\n{result['switch'].get('body_text', '')[:500]}" if result.get("switch") else "")
        + f"\n--- daemon log tail ---\n{s.daemon.log_text()[-4000:]}"
    )
    return result


def test_two_users_in_real_browsers_each_reach_only_their_own_theia(setup: Setup, tmp_path: Path) -> None:
    s = setup
    began = time.monotonic()
    result = drive_browsers(s, tmp_path)
    browsers = {u["name"]: u for u in result["users"]}
    alice, bob = USERS

    # --- what each browser saw ---------------------------------------------------------------------
    for user in USERS:
        seen = browsers[user]
        other = bob if user == alice else alice
        assert seen["first_status"] == 200, seen
        assert "token=" not in seen["url_after_sign_in"], seen["url_after_sign_in"]  # 303 took it out
        assert seen["url_after_sign_in"] == f"http://127.0.0.1:{s.port}/"
        assert any(f"{user}-notes.txt" in entry for entry in seen["explorer"]), seen["explorer"]
        assert not any(other in entry for entry in seen["explorer"]), seen["explorer"]
        assert f"marker-{user}-{s.uids[user]}" in seen["editor_text"], seen["editor_text"]
        assert set(seen["cookies"]) >= {"wsup_session", "theia-connection-token"}, seen["cookies"]
        assert seen["cookie_flags"]["wsup_session"]["httpOnly"] is True
        assert not seen["page_errors"], seen["page_errors"]
        assert all(p for p in seen["screenshots"]), seen["screenshots"]

        # --- the terminal ran as the user, in the user's workspace (read from disk) -------------
        whoami = s.workspaces[user] / "whoami.txt"
        lines = whoami.read_text().split()
        assert lines == [str(s.uids[user]), str(s.workspaces[user])], lines
        assert whoami.stat().st_uid == s.uids[user]
        assert (s.workspaces[user] / ".e2e-terminal-ready").stat().st_uid == s.uids[user]  # the driver's probe
        # --- the prompt names the user and their host ([isolation] identity and uts) ---------------
        prompt = (s.workspaces[user] / "prompt.txt").read_text().strip()
        if ISOLATION["isolation__identity"] == "on" and ISOLATION["isolation__uts"] == "on":
            assert prompt.startswith(f"{user}@{user}:"), prompt
        assert "I have no name!" not in prompt, prompt
        # --- the dev server started in the terminal, in the browser through /port/<N>/ ------------
        if ISOLATION["isolation__network"] == "on":
            assert seen["port_status"] == 200, seen
            assert f"marker-{user}-{s.uids[user]}" in seen["port_text"], seen["port_text"]
            assert f"marker-{other}" not in seen["port_text"]
        info = s.daemon.user(user)
        assert info["state"] == "RUNNING" and info["tier"] == TIER, info
        assert Path(info["workspace"]) == s.workspaces[user]

    tokens = {u: browsers[u]["cookies"]["theia-connection-token"] for u in USERS}
    sessions = {u: browsers[u]["cookies"]["wsup_session"] for u in USERS}
    assert tokens[alice] != tokens[bob]  # two backends, each with its own random connection token

    # --- a session cookie only ever reaches its own user's Theia -----------------------------------
    def theia_token_issued(session: str, target: str = "/", host: str | None = None) -> str | None:
        """Ask with only the front door's cookie: the backend that answers issues its own token."""
        client = Client("127.0.0.1", s.port, timeout=30, host_header=host)
        try:
            page = client.get(target, headers={"Cookie": f"wsup_session={session}", "Accept": "text/html"}, use_cookies=False)
            assert page.status == 200 or target != "/", (target, page.status, page.body[:300])
            assert page.status < 500, (target, page.status, page.body[:300])
            for value in page.all("set-cookie"):
                if value.startswith("theia-connection-token="):
                    return value.split(";", 1)[0].partition("=")[2]
            return None
        finally:
            client.close()

    def request(session: str, theia: str | None, target: str) -> tuple[int, bytes]:
        client = Client("127.0.0.1", s.port, timeout=30)
        cookie = f"wsup_session={session}" + (f"; theia-connection-token={theia}" if theia else "")
        try:
            answer = client.get(target, headers={"Cookie": cookie}, use_cookies=False)
            return answer.status, answer.body
        finally:
            client.close()

    for user in USERS:
        other = bob if user == alice else alice
        own_file = s.workspaces[user] / f"{user}-notes.txt"
        other_file = s.workspaces[other] / f"{other}-notes.txt"
        # Whatever the URL or Host names, the answer comes from the session's own backend.
        for target, host in [("/", None), (f"/?user={other}", None), (f"/{other}/", None), ("/", f"{other}.127.0.0.1:{s.port}")]:
            issued = theia_token_issued(sessions[user], target, host)
            assert issued == tokens[user], (user, target, host, issued)
        # Its own file through Theia's file endpoint, with its own Theia cookie.
        status, body = request(sessions[user], tokens[user], f"/file?{own_file.as_uri()}")
        assert status == 200 and f"marker-{user}-" in body.decode(), (status, body[:200])
        # The other user's Theia cookie with this session: refused by this user's Theia.
        status, body = request(sessions[user], tokens[other], f"/file?{other_file.as_uri()}")
        assert status == 403 and f"marker-{other}" not in body.decode(errors="replace"), (status, body[:200])
        # Its own cookies naming the other's file: this user's Theia runs as this uid, and the
        # other workspace is another uid's 0700 directory - nothing of it comes back.
        status, body = request(sessions[user], tokens[user], f"/file?{other_file.as_uri()}")
        assert status >= 400 and f"marker-{other}" not in body.decode(errors="replace"), (status, body[:200])
        # A WebSocket with this session and the other's Theia cookie is refused by this one's Theia.
        ws = ws_connect("127.0.0.1", s.port, "/socket.io/?EIO=4&transport=websocket",
                        headers={"Cookie": f"wsup_session={sessions[user]}; theia-connection-token={tokens[other]}",
                                 "Origin": f"http://127.0.0.1:{s.port}"}, timeout=30)
        try:
            assert ws.status != 101, ws.head
        finally:
            ws.close()
        # ...while with its own Theia cookie the same upgrade is accepted.
        ws = ws_connect("127.0.0.1", s.port, "/socket.io/?EIO=4&transport=websocket",
                        headers={"Cookie": f"wsup_session={sessions[user]}; theia-connection-token={tokens[user]}",
                                 "Origin": f"http://127.0.0.1:{s.port}"}, timeout=30)
        try:
            assert ws.status == 101, ws.head
        finally:
            ws.close()

    # --- tampered and forged session cookies: 401 from the front door, no IDE reached ---------------
    version, payload, signature = sessions[alice].split(".")
    assert session_user(sessions[alice]) == alice
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["u"] == alice
    forged_payload = base64.urlsafe_b64encode(json.dumps({**claims, "u": bob}).encode()).rstrip(b"=").decode()
    for bad in (f"{version}.{payload}.{flipped}", f"{version}.{forged_payload}.{signature}", "garbage"):
        client = Client("127.0.0.1", s.port, timeout=30)
        try:
            answer = client.get("/", headers={"Cookie": f"wsup_session={bad}; theia-connection-token={tokens[bob]}"}, use_cookies=False)
        finally:
            client.close()
        assert answer.status == 401, (bad, answer.status)
        assert answer.json()["reason"] == "bad_cookie", answer.body
        assert not any(v.startswith("theia-connection-token=") for v in answer.all("set-cookie")), answer.headers

    # --- bob's sign-in link opened in alice's browser: asked, never switched silently -----------------
    switch = result["switch"]
    assert switch["interstitial_status"] == 200, switch
    assert f"signed in as {alice}" in switch["interstitial_text"] and bob in switch["interstitial_text"], switch["interstitial_text"]
    assert switch["session_before"] == sessions[alice] and switch["session_while_asked"] == sessions[alice]  # still alice's
    assert switch["confirm_status"] == 303 and switch["confirm_headers"].get("clear-site-data") == '"cache", "storage"', switch
    assert switch["marker_after"] is None, "alice's page's localStorage survived the switch"
    assert session_user(switch["session_after"]) == bob
    assert switch["url_after"].partition("#")[0] == f"http://127.0.0.1:{s.port}/"  # Theia adds #<workspace>
    assert any(f"{bob}-notes.txt" in entry for entry in switch["explorer"]) and not any(alice in e for e in switch["explorer"]), switch

    log = s.daemon.log_text()
    assert not any(t in log for t in s.tokens.values()), "a token reached the daemon's log"
    assert "Traceback" not in log, log[-4000:]
    steps = {u: browsers[u]["steps"] for u in USERS}
    print(f"\nbrowser e2e: chromium {result['browser_version']}, browsers {result['seconds']:.1f}s, "
          f"test body {time.monotonic() - began:.1f}s; per user (s from first load): {json.dumps(steps)}")
    print(f"screenshots: {ARTIFACTS}")
