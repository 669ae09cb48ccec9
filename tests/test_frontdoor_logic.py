"""Pure parts of the front door: live-session accounting, the cold-start gate, header filtering and
the front door's own answers."""

from __future__ import annotations

import json

import h11

from supervisor.frontdoor.admission import ColdStarts, SessionTable
from supervisor.frontdoor.answers import redirect, starting_page, unauthorized, wants_html
from supervisor.frontdoor.proxy import client_response_headers, strip_cookie, upgrade_of, upstream_request_headers


def test_a_sid_is_live_while_connected_and_for_the_linger_after() -> None:
    table = SessionTable(linger=30)
    assert table.open("alice", "s1", now=0) is True
    assert table.open("alice", "s1", now=1) is False  # a second connection of the same session
    assert not table.admits("alice", "s2", limit=1, now=2)
    assert table.admits("alice", "s1", limit=1, now=2)  # its own session always passes
    assert table.admits("bob", "s9", limit=1, now=2)  # per user
    table.close("alice", "s1", now=100)
    assert table.live("alice", now=100) == {"s1"}  # one connection still open
    table.close("alice", "s1", now=100)
    assert table.live("alice", now=129) == {"s1"}  # lingering (reload, redirect -> WebSocket)
    assert not table.admits("alice", "s2", limit=1, now=129)
    assert table.live("alice", now=130) == set()
    assert table.admits("alice", "s2", limit=1, now=130)
    assert table.prune(now=130) == [("alice", "s1")]
    assert table.total(now=130) == 0


def test_touch_counts_a_session_from_its_sign_in() -> None:
    table = SessionTable(linger=5)
    assert table.touch("alice", "s1", now=0) is True
    assert not table.admits("alice", "s2", limit=1, now=4)
    assert table.open("alice", "s1", now=4) is False
    assert table.counts(now=4) == {"alice": 1}


def test_cold_start_gate_joins_and_refuses() -> None:
    gate = ColdStarts(limit=2)
    assert gate.begin("a") == "begin"
    assert gate.begin("a") == "join"
    assert gate.begin("b") == "begin"
    assert gate.begin("c") == "refuse"
    gate.end("a")
    assert gate.begin("c") == "begin"


def test_request_headers_keep_host_and_other_cookies_but_not_ours_or_the_bearer() -> None:
    headers = [
        (b"host", b"pod-3.example:8080"), (b"cookie", b"theia-connection-token=abc; wsup_session=SECRET; other=1"),
        (b"authorization", b"Bearer TOKEN"), (b"connection", b"keep-alive, x-hop"), (b"x-hop", b"1"),
        (b"keep-alive", b"timeout=5"), (b"accept", b"*/*"), (b"proxy-authorization", b"Basic x"),
    ]
    out = upstream_request_headers(headers, cookie_name="wsup_session", drop_bearer=True, upgrade=None)
    assert out == [(b"host", b"pod-3.example:8080"), (b"cookie", b"theia-connection-token=abc; other=1"), (b"accept", b"*/*")]
    only_ours = upstream_request_headers([(b"host", b"h"), (b"cookie", b"wsup_session=x")], cookie_name="wsup_session",
                                         drop_bearer=False, upgrade=None)
    assert only_ours == [(b"host", b"h")]
    basic = upstream_request_headers([(b"authorization", b"Basic abc")], cookie_name="c", drop_bearer=True, upgrade=None)
    assert basic == [(b"authorization", b"Basic abc")]


def test_upgrade_headers_are_rebuilt() -> None:
    request = h11.Request(method="GET", target="/ws", headers=[
        ("Host", "h"), ("Connection", "keep-alive, Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Key", "k"),
    ])
    assert upgrade_of(request) == b"websocket"
    out = upstream_request_headers(request.headers, cookie_name="c", drop_bearer=True, upgrade=b"websocket")
    assert (b"connection", b"upgrade") in out and (b"upgrade", b"websocket") in out and (b"sec-websocket-key", b"k") in out
    assert upgrade_of(h11.Request(method="GET", target="/", headers=[("Host", "h"), ("Upgrade", "websocket")])) is None


def test_chunked_requests_keep_their_framing() -> None:
    out = upstream_request_headers([(b"transfer-encoding", b"chunked"), (b"content-length", b"5")], cookie_name="c",
                                   drop_bearer=True, upgrade=None)
    assert out == [(b"transfer-encoding", b"chunked")]


def test_response_headers_pass_the_ides_cookies_but_never_ours() -> None:
    headers = [
        (b"content-length", b"5"), (b"set-cookie", b"theia-connection-token=t; HttpOnly"),
        (b"set-cookie", b"wsup_session=evil; Path=/"), (b"connection", b"close"), (b"x-ide", b"1"),
    ]
    assert client_response_headers(headers, cookie_name="wsup_session") == [
        (b"content-length", b"5"), (b"set-cookie", b"theia-connection-token=t; HttpOnly"), (b"x-ide", b"1"),
    ]
    switching = client_response_headers([(b"upgrade", b"websocket"), (b"sec-websocket-accept", b"a")], cookie_name="c", switching=True)
    assert switching == [(b"sec-websocket-accept", b"a"), (b"connection", b"upgrade"), (b"upgrade", b"websocket")]


def test_strip_cookie() -> None:
    assert strip_cookie(b"a=1;wsup_session=2; b=3", "wsup_session") == b"a=1; b=3"
    assert strip_cookie(b"wsup_session=2", "wsup_session") == b""
    assert strip_cookie(b"wsup_sessionx=2", "wsup_session") == b"wsup_sessionx=2"


def test_answers() -> None:
    answer = unauthorized("expired", "the token has expired", "sign in again")
    assert answer.status == 401 and json.loads(answer.body)["reason"] == "expired"
    assert dict(answer.head())[b"www-authenticate"].startswith(b"Bearer")
    page = starting_page(5)
    assert page.status == 503 and b"http-equiv=\"refresh\"" in page.body and dict(page.head())[b"retry-after"] == b"2"
    moved = redirect(b"/x?y=1", b"wsup_session=v; HttpOnly")
    assert moved.status == 303 and dict(moved.head())[b"location"] == b"/x?y=1"
    assert wants_html(b"GET", [(b"sec-fetch-mode", b"navigate")])
    assert not wants_html(b"GET", [(b"sec-fetch-mode", b"websocket"), (b"accept", b"text/html")])
    assert wants_html(b"GET", [(b"accept", b"text/html,application/xhtml+xml")])
    assert not wants_html(b"POST", [(b"accept", b"text/html")])
