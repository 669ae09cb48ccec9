"""Sign-in through the in-process front door with real HTTP clients and stub IDE processes (the
fixtures of test_frontdoor_server): login CSRF refused, a change of user confirmed by a same-origin
POST that clears the site's data, cookie requests only from the site's own origin, service-worker
scripts refused, the redirect kept on the origin, and one host per user."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import urlencode

import pytest
import trio

from supervisor.frontdoor.signin import SIGN_IN_PATH
from tests.frontdoor_client import Client, Response
from tests.test_frontdoor_server import Door, FakeIdes, bearer, ides, in_thread, open_door, token  # noqa: F401 - ides: a fixture

NAVIGATE = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document", "Accept": "text/html"}
CLEARED = '"cache", "storage"'


@pytest.fixture
async def door(nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes) -> AsyncIterator[Door]:  # noqa: F811
    yield await open_door(nursery, tmp_path, ides)


def origin(door: Door) -> str:
    return f"http://{door.host}:{door.port}"  # cookie_secure = false in these tests: the site is http


async def signed_in(door: Door, user: str, **claims: Any) -> Client:
    browser = door.client()
    answer = await in_thread(lambda: browser.get("/?token=" + token(user, **claims), headers=NAVIGATE))
    assert answer.status == 303, answer.body
    return browser


async def whose(browser: Client) -> bytes:
    """Which user's IDE this browser's session reaches."""
    page = await in_thread(lambda: browser.get("/"))
    assert page.status == 200, page.body
    return page.body.split(b" ")[1]


def form_of(page: Response) -> dict[str, str]:
    return dict(re.findall(r'name="(\w+)" value="([^"]*)"', page.body.decode()))


async def confirm(browser: Client, form: dict[str, str], headers: dict[str, str]) -> Response:
    body = urlencode(form).encode()
    return await in_thread(lambda: browser.request("POST", SIGN_IN_PATH.decode(), body=body, headers={
        "Content-Type": "application/x-www-form-urlencoded", **headers}))


async def test_a_token_signs_in_only_on_a_top_level_navigation(door: Door) -> None:
    for fetch in ({"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"}, {"Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"},
                  {"Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"}):
        client = door.client()
        answer = await in_thread(lambda: client.get("/?token=" + token("alice"), headers={"Sec-Fetch-Site": "cross-site", **fetch}))
        assert (answer.status, answer.json()["reason"]) == (403, "token_not_navigation"), fetch
        assert answer.header("set-cookie") is None and "wsup_session" not in client.cookies
    assert door.ides.starts == []
    browser = door.client()
    first = await in_thread(lambda: browser.get("/files?x=1&token=" + token("alice"), headers=NAVIGATE))
    assert first.status == 303 and first.header("location") == "/files?x=1"
    assert first.header("clear-site-data") == CLEARED  # nothing says whose data this browser held
    assert await whose(browser) == b"user=alice"
    # Without Fetch Metadata (not a current browser): a GET still signs in, as documented.
    plain = door.client()
    assert (await in_thread(lambda: plain.get("/?token=" + token("alice")))).status == 303


async def test_another_users_link_asks_before_switching_and_the_confirmation_clears_the_site(door: Door) -> None:
    browser = await signed_in(door, "alice")
    alice_cookie = browser.cookies["wsup_session"]
    bobs = token("bob")
    page = await in_thread(lambda: browser.get(f"/files/x?y=1&token={bobs}", headers=NAVIGATE))
    assert page.status == 200 and page.header("set-cookie") is None
    assert b"signed in as <b id=\"current\">alice</b>" in page.body and b"bob" in page.body
    assert "frame-ancestors 'none'" in (page.header("content-security-policy") or "")
    form = form_of(page)
    assert form == {"token": bobs, "next": "/files/x?y=1"}
    assert browser.cookies["wsup_session"] == alice_cookie and await whose(browser) == b"user=alice"
    assert door.ides.starts == ["alice"]

    # Posted from anywhere but this site's own page: refused, still alice.
    for headers in ({"Origin": "http://evil.example"}, {}, {"Origin": origin(door), "Sec-Fetch-Site": "same-site"}):
        refused = await confirm(browser, form, headers)
        assert (refused.status, refused.json()["reason"]) == (403, "bad_origin"), headers
    tampered = await confirm(browser, {**form, "token": bobs[:-4] + "AAAA"}, {"Origin": origin(door)})
    assert (tampered.status, tampered.json()["reason"]) == (401, "bad_signature")
    malformed = await confirm(browser, {"next": "/"}, {"Origin": origin(door)})
    assert (malformed.status, malformed.json()["reason"]) == (400, "bad_sign_in")
    assert await whose(browser) == b"user=alice"

    switched = await confirm(browser, form, {"Origin": origin(door), "Sec-Fetch-Site": "same-origin"})
    assert switched.status == 303 and switched.header("location") == "/files/x?y=1"
    assert switched.header("clear-site-data") == CLEARED
    assert (switched.header("set-cookie") or "").startswith("wsup_session=")
    assert await whose(browser) == b"user=bob"


async def test_the_same_users_fresh_token_refreshes_silently(door: Door) -> None:
    browser = await signed_in(door, "alice", sid="tab-1")
    again = await in_thread(lambda: browser.get("/?token=" + token("alice", sid="tab-1"), headers=NAVIGATE))
    assert again.status == 303 and again.header("clear-site-data") is None and again.header("set-cookie")


async def test_cookie_websockets_and_requests_only_from_the_sites_own_origin(door: Door) -> None:
    browser = await signed_in(door, "alice")
    await whose(browser)  # the stub's own cookie too
    cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    for headers in ({"Cookie": cookie, "Origin": "http://evil.example"}, {"Cookie": cookie, "Origin": ""},
                    {"Cookie": cookie, "Origin": f"https://{door.host}:{door.port}"}):
        ws = await in_thread(lambda: door.ws("/ws", headers=headers))
        assert ws.status == 403 and b'"bad_origin"' in (bytes(ws.pending) or ws.sock.recv(4096)), headers
    assert (await in_thread(lambda: door.ws("/ws", headers={"Cookie": cookie}))).status == 101  # Origin: the page's own
    stub = f"theia-connection-token={browser.cookies['theia-connection-token']}"
    assert (await in_thread(lambda: door.ws("/ws", headers={**bearer("alice"), "Cookie": stub, "Origin": ""}))).status == 101  # no browser
    post = await in_thread(lambda: browser.request("POST", "/echo", body=b"x", headers={"Origin": "http://bob.example"}))
    assert (post.status, post.json()["reason"]) == (403, "bad_origin")
    own = await in_thread(lambda: browser.request("POST", "/echo", body=b"x", headers={"Origin": origin(door)}))
    assert own.status == 200 and own.body == b"x"


async def test_configured_public_origins_are_the_only_ones(nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes) -> None:  # noqa: F811
    door = await open_door(nursery, tmp_path, ides, public_origins=["https://ide.example.com"])
    browser = await signed_in(door, "alice")
    await whose(browser)
    cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    assert (await in_thread(lambda: door.ws("/ws", headers={"Cookie": cookie, "Origin": "https://ide.example.com"}))).status == 101
    assert (await in_thread(lambda: door.ws("/ws", headers={"Cookie": cookie}))).status == 403  # its Host is not listed


async def test_service_worker_scripts_are_refused_even_signed_in(door: Door) -> None:
    browser = await signed_in(door, "alice")
    answer = await in_thread(lambda: browser.get("/sw.js", headers={"Service-Worker": "script"}))
    assert (answer.status, answer.json()["reason"]) == (403, "service_worker_refused")
    assert (await in_thread(lambda: browser.get("/sw.js"))).status == 200


async def test_the_redirect_after_sign_in_stays_on_this_origin(door: Door) -> None:
    for target, location in [("//evil.example/", "/evil.example/"), ("/\\evil.example/", "/%5Cevil.example/"),
                             ("http://evil.example/x", "/x")]:
        client = door.client()
        answer = await in_thread(lambda: client.get(f"{target}?token={token('alice')}", headers=NAVIGATE))
        assert answer.status == 303 and answer.header("location") == location, target


async def test_one_host_per_user(nursery: trio.Nursery, tmp_path: Path, ides: FakeIdes) -> None:  # noqa: F811
    door = await open_door(nursery, tmp_path, ides, user_host="{user}.ide.test")
    alice = door.client(host_header=f"alice.ide.test:{door.port}")
    assert (await in_thread(lambda: alice.get("/?token=" + token("alice"), headers=NAVIGATE))).status == 303
    assert await whose(alice) == b"user=alice"
    ws = await in_thread(lambda: door.ws("/ws", headers={
        "Host": f"alice.ide.test:{door.port}", "Origin": f"http://alice.ide.test:{door.port}",
        "Cookie": "; ".join(f"{k}={v}" for k, v in alice.cookies.items())}))
    assert ws.status == 101
    # Bob's link at Alice's host, Alice's cookie at Bob's host, any user at the bare host: refused.
    for host, user, cookie in [("alice.ide.test", "bob", None), ("bob.ide.test", None, alice.cookies["wsup_session"]),
                               ("ide.test", "alice", None)]:
        client = door.client(host_header=f"{host}:{door.port}")
        target = f"/?token={token(user)}" if user else "/"
        answer = await in_thread(lambda: client.get(target, headers={**NAVIGATE, **({"Cookie": f"wsup_session={cookie}"} if cookie else {})}))
        assert (answer.status, answer.json()["reason"]) == (403, "wrong_host"), host
        assert answer.header("set-cookie") is None
    assert door.ides.starts == ["alice"]


async def test_a_refusal_before_the_body_arrived_says_connection_close(door: Door) -> None:
    """A keep-alive client whose request is refused before its body arrived is told the connection
    ends (it must not send its next request on it; found as a broken pipe under load)."""
    browser = await signed_in(door, "alice")
    cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())

    def refused_head_only() -> bytes:
        with socket.create_connection((door.host, door.port), timeout=10) as sock:
            sock.sendall(f"POST /echo HTTP/1.1\r\nHost: {door.host}:{door.port}\r\nCookie: {cookie}\r\n"
                         "Origin: http://bob.example\r\nContent-Length: 5\r\n\r\n".encode())  # the body never comes
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(4096)
            return answer.split(b"\r\n\r\n", 1)[0].lower()

    head = await in_thread(refused_head_only)
    assert head.startswith(b"http/1.1 403") and b"\r\nconnection: close" in head, head
