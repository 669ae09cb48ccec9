"""The real Eclipse Theia behind the real daemon's front door.

A user with no IDE asks the front door for ``/`` with a token: the daemon cold-starts the built
Theia app (images/theia/app/lib) as the user's uid on the user's Unix socket, and the front door
answers with Theia's workbench HTML and Theia's own ``theia-connection-token`` cookie. Then the
frontend's socket.io WebSocket (``/socket.io/?EIO=4&transport=websocket``, namespace ``/services``)
is opened through the front door with that cookie and an Origin matching Host, as a browser does:
101, and Theia's socket.io "open" packet arrives through the splice.

Needs root, cgroup controllers, node, and a built app (``images/theia/build``); skips otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import is_root, pure_cgroup_v2, v1_controllers_mounted
from tests.frontdoor_client import ISSUER, Client, mint, ws_connect, ws_recv, ws_send
from tests.harness import Daemon, poll

REPO = Path(__file__).resolve().parent.parent
THEIA = REPO / "images" / "theia"
MAIN_JS = THEIA / "app" / "lib" / "backend" / "main.js"
NODE = shutil.which("node")
SECRET = b"front-door-theia-test-secret-0123456789"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MAIN_JS.is_file(), reason=f"Theia app not built ({MAIN_JS.relative_to(REPO)} missing): run images/theia/build"),
    pytest.mark.skipif(NODE is None, reason="node is not on PATH"),
    pytest.mark.skipif(
        not (is_root() and (v1_controllers_mounted() or pure_cgroup_v2())),
        reason="needs root and cgroup controllers (v1 cpu/memory/pids/freezer, or pure v2)",
    ),
]


@pytest.fixture
def theia_daemon() -> Iterator[tuple[Daemon, int]]:
    secret_dir = Path(tempfile.mkdtemp(prefix="wsup-fd-theia-", dir="/tmp"))
    (secret_dir / "hs256.key").write_bytes(SECRET)
    d = Daemon(**{
        "http__listen": "127.0.0.1:0",
        "http__start_timeout": "60s",
        "auth__hs256_secret_file": str(secret_dir / "hs256.key"),
        "auth__issuer": ISSUER,
        "auth__cookie_secure": False,
        "ide__ready_timeout": "60s",
        "ide__env": {},
        "ide__command": [
            NODE, "--expose-gc",
            "--require", str(THEIA / "unix-socket-preload.js"), "--require", str(THEIA / "gc-preload.js"),
            str(MAIN_JS), "{workspace}", "--hostname", "127.0.0.1",
            "--session-preference=security.workspace.trust.enabled=false",
        ],
    })
    try:
        d.start()
        port = int(poll(lambda: (m := re.search(r"front door listening on 127\.0\.0\.1:(\d+)", d.log_text())) and m.group(1), 30, "front door"))
        yield d, port
    finally:
        d.cleanup()
        shutil.rmtree(secret_dir, ignore_errors=True)


def test_theia_workbench_and_its_websocket_through_the_front_door(theia_daemon: tuple[Daemon, int]) -> None:
    d, port = theia_daemon
    browser = Client("127.0.0.1", port, timeout=90)
    token = mint(SECRET, "theia-user", sid="tab-1")
    signed_in = browser.get(f"/?token={token}")
    assert signed_in.status == 303 and signed_in.header("location") == "/"

    began = time.monotonic()
    page = browser.get("/", headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate"})
    cold_start = time.monotonic() - began
    assert page.status == 200, page.body[:500]
    html = page.body.decode(errors="replace")
    assert "<html" in html.lower() and "bundle.js" in html, html[:500]
    assert "theia-connection-token" in browser.cookies, page.headers
    info = d.user("theia-user")
    assert info["state"] == "RUNNING"
    print(f"cold start through the front door to the workbench HTML: {cold_start:.2f}s")

    bundle = browser.get("/bundle.js", keep_body=False)
    assert bundle.status == 200 and bundle.length > 1_000_000  # streamed, not buffered (~12 MB)

    cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    origin = f"http://127.0.0.1:{port}"
    ws = ws_connect("127.0.0.1", port, "/socket.io/?EIO=4&transport=websocket",
                    headers={"Cookie": cookie, "Origin": origin}, timeout=30)
    try:
        assert ws.status == 101, ws.head
        opcode, payload = ws_recv(ws)
        assert opcode == 0x1 and payload.startswith(b"0{"), payload  # engine.io "open"
        assert "sid" in json.loads(payload[1:])
        ws_send(ws, b"40/services,", opcode=0x1)  # socket.io CONNECT to the /services namespace
        opcode, payload = ws_recv(ws)
        assert payload.startswith(b"40/services,"), payload
    finally:
        ws.close()

    no_cookie = ws_connect("127.0.0.1", port, "/socket.io/?EIO=4&transport=websocket",
                           headers={"Cookie": f"wsup_session={browser.cookies['wsup_session']}", "Origin": origin})
    assert no_cookie.status != 101, "Theia accepted an upgrade without its connection cookie"
    no_cookie.close()
    browser.close()
    assert token not in d.log_text()
    assert os.path.isdir(info["workspace"])
