"""The pure sign-in decisions (issue #11 finding 5): which requests a ``?token=`` may sign in,
when a browser must confirm a change of user, origin and host matching, the service-worker and
IDE-header refusals, and the post-sign-in redirect (property-tested: never another host)."""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import config as config_module
from supervisor.config import normal_origin
from supervisor.errors import ConfigError
from supervisor.frontdoor.answers import same_origin_path
from supervisor.frontdoor.proxy import client_response_headers
from supervisor.frontdoor.signin import (
    REASONS,
    SIGN_IN_PATH,
    BrowserPolicy,
    confirm_page,
    host_name,
    read_form,
    refused_before_auth,
    sign_in_step,
    token_use,
)
from supervisor.metrics import AUTH_REJECTIONS

NAVIGATE = [(b"sec-fetch-site", b"cross-site"), (b"sec-fetch-mode", b"navigate"), (b"sec-fetch-dest", b"document")]


def fetch(mode: bytes, dest: bytes, site: bytes = b"cross-site") -> list[tuple[bytes, bytes]]:
    return [(b"sec-fetch-site", site), (b"sec-fetch-mode", mode), (b"sec-fetch-dest", dest)]


# ---- which requests a ?token= may sign in --------------------------------------------------------


def test_only_a_top_level_navigation_signs_in() -> None:
    assert token_use(b"GET", NAVIGATE, upgrade=False) == "sign_in"
    assert token_use(b"HEAD", fetch(b"navigate", b"document", b"none"), upgrade=False) == "sign_in"  # typed in the address bar
    for mode, dest in [(b"navigate", b"iframe"), (b"navigate", b"frame"), (b"navigate", b"embed"), (b"no-cors", b"image"),
                       (b"no-cors", b"script"), (b"cors", b"empty"), (b"same-origin", b"empty"), (b"websocket", b"websocket"),
                       (b"navigate", b"object")]:
        assert token_use(b"GET", fetch(mode, dest), upgrade=dest == b"websocket") == "refuse", (mode, dest)
    assert token_use(b"POST", NAVIGATE, upgrade=False) == "refuse"  # a form posted at ?token=
    assert token_use(b"GET", [(b"sec-fetch-site", b"cross-site")], upgrade=False) == "refuse"  # partial metadata: a browser


def test_without_fetch_metadata_a_get_signs_in_and_anything_else_is_served_with_the_token() -> None:
    assert token_use(b"GET", [(b"accept", b"text/html")], upgrade=False) == "sign_in"
    assert token_use(b"GET", [], upgrade=True) == "request"
    assert token_use(b"POST", [], upgrade=False) == "request"


def test_a_browser_holding_another_users_session_must_confirm() -> None:
    assert sign_in_step("bob", []) == "fresh"
    assert sign_in_step("bob", ["bob"]) == "refresh"
    assert sign_in_step("bob", ["alice"]) == "confirm"
    assert sign_in_step("bob", ["bob", "alice"]) == "confirm"


# ---- origins and hosts ---------------------------------------------------------------------------------


def test_origins_are_normalised_like_browsers_send_them() -> None:
    assert normal_origin("HTTPS://IDE.Example.com:443") == "https://ide.example.com"
    assert normal_origin("http://ide.example.com:80") == "http://ide.example.com"
    assert normal_origin("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert normal_origin("https://[::1]:8443") == "https://[::1]:8443"
    for bad in ("null", "", "ide.example.com", "https://ide.example.com/", "https://u@ide.example.com", "ftp://x",
                "https://ide.example.com?x", "https://x:99999", "javascript:alert(1)"):
        assert normal_origin(bad) is None, bad


def test_default_origin_is_the_requests_own_host_with_the_deployments_scheme() -> None:
    https, http = BrowserPolicy(scheme="https"), BrowserPolicy(scheme="http")
    host = [(b"host", b"ide.example.com")]
    assert https.origin_allowed([*host, (b"origin", b"https://ide.example.com")], required=True)
    assert https.origin_allowed([(b"host", b"ide.example.com:443"), (b"origin", b"https://ide.example.com")], required=True)
    assert not https.origin_allowed([*host, (b"origin", b"http://ide.example.com")], required=True)  # another scheme
    assert http.origin_allowed([(b"host", b"127.0.0.1:8080"), (b"origin", b"http://127.0.0.1:8080")], required=True)
    for origin in (b"https://evil.example", b"https://bob.ide.example.com", b"https://ide.example.com.evil", b"null",
                   b"https://ide.example.com:8443"):
        assert not https.origin_allowed([*host, (b"origin", origin)], required=False), origin
    assert https.origin_allowed(host, required=False) and not https.origin_allowed(host, required=True)
    assert not https.origin_allowed([(b"origin", b"https://ide.example.com")], required=True)  # no Host: nothing matches


def test_configured_public_origins_replace_the_default() -> None:
    policy = BrowserPolicy(frozenset({"https://ide.example.com"}))
    assert policy.origin_allowed([(b"host", b"10.0.0.7:8080"), (b"origin", b"https://IDE.example.com")], required=True)
    assert not policy.origin_allowed([(b"host", b"10.0.0.7:8080"), (b"origin", b"https://10.0.0.7:8080")], required=True)


def test_cookie_requests_from_other_origins_and_cookie_websockets_without_origin_get_bad_origin() -> None:
    policy = BrowserPolicy(scheme="http")
    own = [(b"host", b"ide:8080"), (b"origin", b"http://ide:8080")]
    assert policy.cookie_refusal(own, upgrade=True) is None
    assert policy.cookie_refusal([(b"host", b"ide:8080")], upgrade=False) is None  # a plain GET carries no Origin
    for headers, upgrade in [([(b"host", b"ide:8080")], True), ([(b"host", b"ide:8080"), (b"origin", b"http://evil")], False)]:
        answer = policy.cookie_refusal(headers, upgrade)
        assert answer is not None and (answer.status, answer.reason) == (403, "bad_origin")


def test_a_confirmation_must_be_posted_by_the_sites_own_page() -> None:
    policy = BrowserPolicy(scheme="https")
    own = [(b"host", b"ide.example.com"), (b"origin", b"https://ide.example.com")]
    assert policy.confirm_refusal(own) is None
    assert policy.confirm_refusal([*own, (b"sec-fetch-site", b"same-origin")]) is None
    assert policy.confirm_refusal([*own, (b"sec-fetch-site", b"same-site")]) is not None  # a sibling host
    assert policy.confirm_refusal([(b"host", b"ide.example.com")]) is not None
    assert policy.confirm_refusal([(b"host", b"ide.example.com"), (b"origin", b"https://evil.example")]) is not None


def test_user_host_names_each_users_own_host() -> None:
    policy = BrowserPolicy(user_host="{user}.ide.example.com")
    assert policy.host_for("alice") == "alice.ide.example.com"
    assert policy.host_refusal([(b"host", b"Alice.IDE.example.com:443")], "alice") is None
    for host in (b"bob.ide.example.com", b"ide.example.com", b"alice.ide.example.com.evil", b"x.alice.ide.example.com"):
        answer = policy.host_refusal([(b"host", host)], "alice")
        assert answer is not None and (answer.status, answer.reason) == (403, "wrong_host"), host
    assert policy.host_refusal([], "alice") is not None
    assert BrowserPolicy().host_refusal([(b"host", b"anything")], "alice") is None  # not configured
    assert (host_name(b"[::1]:8080"), host_name(b"h:1"), host_name(b"H"), host_name(None)) == ("[::1]", "h", "h", "")


def test_config_keys_validate_origins_and_user_host() -> None:
    config = config_module.from_dict({"http": {"public_origins": ["https://IDE.example.com:443"], "user_host": "{user}.IDE.example.com"}})
    assert config.http.public_origins == ["https://ide.example.com"] and config.http.user_host == "{user}.ide.example.com"
    for http in ({"public_origins": ["https://ide.example.com/path"]}, {"public_origins": "https://x"}, {"user_host": "ide.example.com"},
                 {"user_host": "https://{user}.ide.example.com"}, {"user_host": "{user}.{user}.x"}, {"user_host": "{user}.x:8443"}):
        with pytest.raises(ConfigError):
            config_module.from_dict({"http": http})


# ---- refusals before anything else -----------------------------------------------------------------------


def test_service_worker_scripts_are_refused_and_the_ide_cannot_widen_scope_or_clear_site_data() -> None:
    answer = refused_before_auth([(b"service-worker", b"script")])
    assert answer is not None and (answer.status, answer.reason) == (403, "service_worker_refused")
    assert refused_before_auth([(b"accept", b"*/*")]) is None
    passed = client_response_headers([
        (b"content-length", b"0"), (b"service-worker-allowed", b"/"), (b"clear-site-data", b'"cookies"'), (b"x-ide", b"1"),
    ], cookie_name="wsup_session")
    assert passed == [(b"content-length", b"0"), (b"x-ide", b"1")]


def test_every_new_reason_has_a_metric_label() -> None:
    exported = {s.labels["reason"] for m in AUTH_REJECTIONS.collect() for s in m.samples}
    assert set(REASONS) <= exported


# ---- the confirmation page and its form -------------------------------------------------------------------


def test_the_confirmation_page_posts_the_token_in_its_body_and_cannot_be_framed() -> None:
    page = confirm_page("alice", "bob", "tok.en<x>", b"//evil.example/?a=1&b=2")
    body = page.body.decode()
    assert page.status == 200 and page.reason == "confirm_switch"
    assert f'action="{SIGN_IN_PATH.decode()}"' in body and 'method="post"' in body
    assert 'name="token" value="tok.en&lt;x&gt;"' in body and "<x>" not in body
    assert 'name="next" value="/evil.example/?a=1&amp;b=2"' in body
    assert "alice" in body and "bob" in body
    head = dict(page.head())
    assert b"frame-ancestors 'none'" in head[b"content-security-policy"] and head[b"x-frame-options"] == b"DENY"
    assert head[b"cache-control"] == b"no-store" and head[b"referrer-policy"] == b"strict-origin"


def test_the_posted_form_is_read_strictly() -> None:
    assert read_form(b"token=abc.def&next=%2Ffiles%3Fx%3D1") == ("abc.def", b"/files?x=1")
    assert read_form(b"token=abc&next=%2F%2Fevil.example") == ("abc", b"/evil.example")
    assert read_form(b"token=abc") == ("abc", b"/")
    for bad in (b"", b"next=/", b"token=a&token=b", b"token=a&x=1&y=2&z=3&w=4", b"\xff", b"token"):
        assert read_form(bad) is None, bad


# ---- the redirect after sign-in never leaves the origin ------------------------------------------------------


def test_redirect_targets_are_made_paths_on_this_origin() -> None:
    cases = {
        b"/files/a.txt?x=1&y=2": b"/files/a.txt?x=1&y=2",
        b"//evil.example/": b"/evil.example/",
        b"///evil.example": b"/evil.example",
        b"/\\evil.example": b"/%5Cevil.example",
        b"\\\\evil.example": b"/",
        b"http://evil.example/path?q": b"/path?q",
        b"https://evil.example": b"/",
        b"evil.example:443": b"/",
        b"*": b"/",
        b"/%2F%2Fevil.example": b"/%2F%2Fevil.example",
        b"/\t/evil.example": b"/%09/evil.example",
    }
    for target, location in cases.items():
        assert same_origin_path(target) == location, target


BROWSER_IGNORED = "\t\n\r"


def _resolve(location: str) -> tuple[str, str]:
    """Where a browser goes with this Location on https://ide.example.com/a/b (it drops tabs and
    newlines, and reads a backslash as a slash)."""
    cleaned = "".join(c for c in location if c not in BROWSER_IGNORED).replace("\\", "/")
    url = urlsplit(urljoin("https://ide.example.com/a/b", cleaned))
    return url.scheme, url.netloc


@settings(max_examples=500, deadline=None)
@given(st.one_of(
    st.binary(max_size=64),
    st.lists(st.sampled_from([b"/", b"\\", b"//", b"evil.example", b":", b"http:", b"https://", b"@", b"\t", b"\n", b"%2F", b"?", b"#",
                              b".", b"..", b" ", b"\x00", b"\xc3\xbc"]), max_size=10).map(b"".join),
))
def test_no_target_redirects_off_the_origin(target: bytes) -> None:
    location = same_origin_path(target)
    text = location.decode("ascii")  # only ASCII goes out
    assert text.startswith("/") and text[1:2] not in ("/", "\\")
    assert all(0x21 <= ord(c) <= 0x7E for c in text) and "\\" not in text
    assert _resolve(text) == ("https", "ide.example.com")
    assert same_origin_path(location) == location  # already safe: unchanged


@settings(max_examples=200, deadline=None)
@given(st.from_regex(rb"\A/[a-zA-Z0-9._~!$&'()*+,;=:@%-][a-zA-Z0-9._~!$&'()*+,;=:@%/?-]*\Z"))
def test_ordinary_paths_are_kept_byte_for_byte(target: bytes) -> None:
    assert same_origin_path(target) == target
