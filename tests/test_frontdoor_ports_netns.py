"""``/port/<N>/`` for real: users' dev servers in network namespaces of their own (``unshare
--net``, loopback up), a server of the host's own on 127.0.0.1:N, and the in-process front door
in front of them with :class:`~supervisor.frontdoor.server.ManagerIdes` - the daemon's own
``lookup``/``open_port`` - over a stand-in manager that holds each user's state and pidfd.

alice: a dev server on 127.0.0.1:N in her namespace; carol: one on [::1]:N only (Node >= 17's
``localhost``); bob: a namespace with nothing listening; dave: an IDE without a namespace of its
own; erin: an IDE that is not running. N is the port of the host's server, so any leak out of a
namespace would reach it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, cast

import pytest
import trio

from supervisor.frontdoor.auth import Authenticator
from supervisor.frontdoor.server import FrontDoor, ManagerIdes
from supervisor.manager import SessionManager
from supervisor.metrics import PROXY_CONNECTIONS
from supervisor.sessions import State
from tests.frontdoor_client import Client, ws_connect, ws_recv, ws_send
from tests.test_frontdoor_server import bearer, in_thread, make_config, token

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces: unshare --net)"),
    pytest.mark.skipif(not (shutil.which("unshare") and shutil.which("ip")), reason="needs unshare (util-linux) and ip (iproute2)"),
]

DEV_SERVER = Path(__file__).parent / "fixtures" / "dev_server.py"


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else b''!r}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.01)  # polling a file the child writes, with a deadline
    return path.read_text()


@dataclass
class Machine:
    """The processes of the test: the host's server and each user's namespace."""

    port: int
    pidfds: dict[str, int] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)


def in_namespace(argv: list[str]) -> list[str]:
    """``argv`` run in a new network namespace whose loopback is up (the process itself is in
    it: unshare and sh exec, the pid stays)."""
    return ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    base = tmp_path_factory.mktemp("ports")
    found = Machine(0)
    procs = found.procs

    def start(name: str, argv: list[str]) -> tuple[subprocess.Popen[bytes], str]:
        ready = base / f"{name}.ready"
        proc = subprocess.Popen([*argv, str(ready)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        return proc, wait_for_file(ready, proc)

    def server(name: str, host: str, port: int) -> list[str]:
        return [sys.executable, "-I", "-S", str(DEV_SERVER), name, host, str(port)]

    try:
        _, port_text = start("host", server("host", "127.0.0.1", 0))
        port = found.port = int(port_text)
        for user, argv in (("alice", server("alice", "127.0.0.1", port)), ("carol", server("carol", "::1", port))):
            proc, _ = start(user, in_namespace(argv))
            found.pidfds[user] = os.pidfd_open(proc.pid)
        bob = subprocess.Popen(in_namespace(["sh", "-c", 'echo up > "$0" && exec sleep 600', str(base / "bob.ready")]),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(bob)
        wait_for_file(base / "bob.ready", bob)
        found.pidfds["bob"] = os.pidfd_open(bob.pid)
        own = os.readlink("/proc/self/ns/net")
        for proc in procs[1:]:
            assert os.readlink(f"/proc/{proc.pid}/ns/net") != own, "a user's process is in the host's network namespace"
        yield found
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        for fd in found.pidfds.values():
            os.close(fd)


@dataclass
class _Session:
    state: State
    tier: str = "free"
    reason: str = ""


@dataclass
class _Runtime:
    session: _Session
    pidfd: int | None
    socket_path: Path = Path("/nonexistent/ide.sock")
    uid: int = 0


@dataclass
class StandIn:
    """What ManagerIdes reads of the session manager: runtimes (state, pidfd) and the config."""

    config: Any
    runtimes: dict[str, _Runtime]


@dataclass
class Door:
    front: FrontDoor
    ides: ManagerIdes
    inputs: list[str]
    port: int
    woken: list[str]
    clients: list[Client] = field(default_factory=list)

    def client(self) -> Client:
        host, port = self.front.addresses[0]
        self.clients.append(Client(host, port))
        return self.clients[-1]


@pytest.fixture
async def door(nursery: trio.Nursery, tmp_path: Path, machine: Machine) -> AsyncIterator[Door]:
    config = make_config(tmp_path)
    runtimes = {user: _Runtime(_Session(State.RUNNING), pidfd) for user, pidfd in machine.pidfds.items()}
    runtimes["erin"] = _Runtime(_Session(State.STOPPED), None)
    runtimes["paul"] = _Runtime(_Session(State.PAUSED), None)
    ides = ManagerIdes(cast(SessionManager, StandIn(config, runtimes)), netns=True)
    inputs: list[str] = []
    woken: list[str] = []

    async def wake(user: str) -> None:
        woken.append(user)

    front = FrontDoor(config, ides, Authenticator.from_config(config.auth, config.daemon.state_dir), on_input=inputs.append, wake=wake)
    await nursery.start(front.serve)
    door = Door(front, ides, inputs, machine.port, woken)
    yield door
    for client in door.clients:
        client.close()


def port_count() -> float:
    return PROXY_CONNECTIONS.labels(kind="port")._value.get()


async def test_a_user_reaches_their_own_server_not_the_hosts(door: Door, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    n, before = door.port, port_count()
    browser = door.client()
    signed_in = await in_thread(lambda: browser.get("/?token=" + token("alice")))
    assert signed_in.status == 303 and "wsup_session" in browser.cookies
    page = await in_thread(lambda: browser.get(f"/port/{n}/src/main.ts?token=vite-own&x=1"))
    assert page.status == 200, page.body
    # the token parameter is the server's own: passed on, never taken for credentials
    assert page.body == f"dev-server alice path=/src/main.ts?token=vite-own&x=1\n".encode()
    cookie = f"wsup_session={browser.cookies['wsup_session']}; app=1"
    headers = dict((k.lower(), v) for k, v in (await in_thread(lambda: browser.get(
        f"/port/{n}/headers", headers={"Cookie": cookie, "Authorization": "Bearer app-own"}))).json())
    assert headers["host"] == f"localhost:{n}"
    assert headers["cookie"] == "app=1", "the front door's cookie reached the user's server"
    assert headers["authorization"] == "Bearer app-own"  # the app's own: the cookie signed the request in
    logged = [record.getMessage() for record in caplog.records]
    assert any(f"/port/{n}/src/main.ts?x=1 -> 200" in line for line in logged), logged
    assert all("vite-own" not in line for line in logged), "the server's token reached the log"
    assert port_count() == before + 1, "two requests on one keep-alive connection: one upstream connection"
    assert "alice" in door.inputs and "alice" in door.woken  # activity, and an idle-frozen tree thawed first


async def test_a_websocket_reaches_the_users_own_server(door: Door) -> None:
    ws = await in_thread(lambda: ws_connect("127.0.0.1", door.front.addresses[0][1], f"/port/{door.port}/ws", headers=bearer("alice")))
    try:
        assert ws.status == 101, ws.head
        await in_thread(lambda: ws_send(ws, b"hmr ping"))
        assert await in_thread(lambda: ws_recv(ws)) == (0x2, b"alice: hmr ping")
    finally:
        ws.close()


async def test_ipv6_only_localhost_server_is_reached(door: Door) -> None:
    page = await in_thread(lambda: door.client().get(f"/port/{door.port}/", headers=bearer("carol")))
    assert page.status == 200 and page.body == b"dev-server carol path=/\n"


async def test_another_user_with_their_own_token_gets_their_own_empty_namespace(door: Door) -> None:
    n = door.port
    page = await in_thread(lambda: door.client().get(f"/port/{n}/", headers={**bearer("bob"), "Accept": "text/html"}))
    assert page.status == 502 and (page.header("content-type") or "").startswith("text/html")
    assert f"Nothing listens on port {n}".encode() in page.body and b"start your server" in page.body
    api = await in_thread(lambda: door.client().get(f"/port/{n}/api", headers=bearer("bob")))
    assert api.status == 502 and api.json()["reason"] == "nothing_listens"
    ws = await in_thread(lambda: ws_connect("127.0.0.1", door.front.addresses[0][1], f"/port/{n}/ws", headers=bearer("bob")))
    ws.close()
    assert ws.status == 502
    assert b"dev-server" not in page.body + api.body + ws.head  # neither alice's nor the host's
    assert "alice" not in door.woken + door.inputs


async def test_without_credentials_401_and_a_token_parameter_is_not_credentials(door: Door) -> None:
    n = door.port
    missing = await in_thread(lambda: door.client().get(f"/port/{n}/"))
    assert missing.status == 401 and missing.json()["reason"] == "missing_token"
    with_param = await in_thread(lambda: door.client().get(f"/port/{n}/?token=" + token("alice")))
    assert with_param.status == 401 and with_param.json()["reason"] == "missing_token"


async def test_ports_outside_the_range_malformed_ports_and_the_missing_slash(door: Door) -> None:
    client = door.client()
    for port in (80, 1023):
        refused = await in_thread(lambda: client.get(f"/port/{port}/", headers=bearer("alice")))
        assert refused.status == 403 and refused.json()["reason"] == "port_not_allowed"
        assert "1024-65535" in refused.json()["message"]
    for bad in ("/port/abc/", "/port/99999/", "/port/", "/port/03000/"):
        missing = await in_thread(lambda: client.get(bad, headers=bearer("alice")))
        assert missing.status == 404 and missing.json()["reason"] == "bad_port_path", bad
    moved = await in_thread(lambda: client.get(f"/port/{door.port}?a=1", headers=bearer("alice")))
    assert moved.status == 307 and moved.header("location") == f"/port/{door.port}/?a=1"


async def test_location_of_an_answer_goes_back_under_the_prefix(door: Door) -> None:
    n, client = door.port, door.client()
    for to, expected in (("/landing", f"/port/{n}/landing"), (f"http://localhost:{n}/x?y=1", f"/port/{n}/x?y=1"),
                         ("next", "next"), ("https://example.com/", "https://example.com/")):
        answer = await in_thread(lambda: client.get(f"/port/{n}/redirect?to={to}", headers=bearer("alice")))
        assert answer.status == 302 and answer.header("location") == expected, to


async def test_no_namespace_of_its_own_404_and_not_running_502_without_starting(door: Door) -> None:
    n = door.port
    door.ides.netns = False
    off = await in_thread(lambda: door.client().get(f"/port/{n}/", headers=bearer("alice")))
    assert off.status == 404 and off.json()["reason"] == "ports_not_served"
    door.ides.netns = True
    for user in ("erin", "frank"):  # stopped; never started
        page = await in_thread(lambda: door.client().get(f"/port/{n}/", headers=bearer(user)))
        assert page.status == 502 and page.json()["reason"] == "workspace_not_running"
    paused = await in_thread(lambda: door.client().get(f"/port/{n}/", headers=bearer("paul")))
    assert paused.status == 503 and paused.json()["reason"] == "paused"
    assert "frank" not in door.ides.manager.runtimes  # nothing was started
