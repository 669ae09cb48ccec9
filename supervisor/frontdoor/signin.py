"""Who may sign a browser in, from which pages the session cookie may be used, and for which host
(issue #11: no login CSRF, no cross-user poisoning). Pure: headers in, decisions and answers out.

- **``?token=`` signs in only on a top-level navigation** (:func:`token_use`): a browser says so in
  ``Sec-Fetch-Mode: navigate`` and ``Sec-Fetch-Dest: document``; any other Fetch Metadata (an
  iframe, an image, a fetch, a WebSocket, a form POST) never signs in and is refused
  (``token_not_navigation``). A request without Fetch Metadata is not from a current browser (every
  one sends it): a ``GET`` signs in, anything else is served with the token for that request only.
- **A browser holding another user's session is never switched silently** (:func:`sign_in_step`):
  it gets :func:`confirm_page`, whose button is a same-origin ``POST`` to :data:`SIGN_IN_PATH` with
  the token in the body; the answer sets the new cookie with ``Clear-Site-Data: "cache",
  "storage"``. So does a sign-in into a browser that holds no session cookie of ours (nothing says
  whose data it holds); the same user's fresh token only refreshes the cookie.
- **Origins** (:class:`BrowserPolicy`): a request authenticated by the cookie that carries an
  ``Origin`` (browsers send one with every WebSocket, POST and CORS request) must come from one of
  ``[http] public_origins`` - by default the request's own, ``https://<Host>`` (``http://`` when
  ``[auth] cookie_secure = false``); a cookie WebSocket upgrade without ``Origin`` is refused too
  (``bad_origin``). Bearer requests need none (no browser attaches that header by itself).
- **One host per user** (``[http] user_host``): every request's ``Host`` must be its user's.
- **Service workers**: a request with ``Service-Worker: script`` (a registration fetching its
  script) is refused, so no user's IDE can install one on the shared origin.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence
from urllib.parse import parse_qs

from supervisor.config import AuthConfig, HttpConfig, normal_origin
from supervisor.frontdoor.answers import Answer, header, json_answer, same_origin_path
from supervisor.metrics import AUTH_REJECTIONS

HeaderSeq = Sequence[tuple[bytes, bytes]]

#: The front door's own endpoint: the confirm button of :func:`confirm_page` posts here.
SIGN_IN_PATH = b"/.wsup/sign-in"
#: Sent with every sign-in that may follow another user's session in this browser.
CLEAR_SITE_DATA = (b"clear-site-data", b'"cache", "storage"')
MAX_FORM_BYTES = 32 * 1024
REASONS = ("token_not_navigation", "bad_origin", "wrong_host", "service_worker_refused", "bad_sign_in")
for _reason in REASONS:
    AUTH_REJECTIONS.labels(reason=_reason)

TokenUse = Literal["sign_in", "request", "refuse"]
SignInStep = Literal["refresh", "fresh", "confirm"]


def token_use(method: bytes, headers: HeaderSeq, upgrade: bool) -> TokenUse:
    """What a ``?token=`` may do for this request (see the module docstring)."""
    mode, dest = header(headers, b"sec-fetch-mode"), header(headers, b"sec-fetch-dest")
    get = method in (b"GET", b"HEAD") and not upgrade
    if mode is None and dest is None and header(headers, b"sec-fetch-site") is None:
        return "sign_in" if get else "request"
    return "sign_in" if get and mode == b"navigate" and dest == b"document" else "refuse"


def sign_in_step(user: str, cookie_users: Iterable[str]) -> SignInStep:
    """``confirm`` if the browser holds another user's session cookie, ``refresh`` if only this
    user's, ``fresh`` if none (sign in, clearing whatever the origin holds)."""
    held = set(cookie_users)
    if held - {user}:
        return "confirm"
    return "refresh" if held else "fresh"


def host_name(value: bytes | None) -> str:
    """A ``Host`` header's host, lower-case, without port."""
    text = (value or b"").decode("latin-1").strip().lower()
    if text.startswith("["):
        return text.partition("]")[0] + "]"
    return text.rpartition(":")[0] if text.count(":") == 1 else text


@dataclass(frozen=True)
class BrowserPolicy:
    """The origin and host rules of ``[http] public_origins`` and ``[http] user_host``."""

    public_origins: frozenset[str] = frozenset()
    scheme: str = "https"
    user_host: str = ""

    @classmethod
    def from_config(cls, http: HttpConfig, auth: AuthConfig) -> BrowserPolicy:
        return cls(frozenset(http.public_origins), "https" if auth.cookie_secure else "http", http.user_host)

    def allowed_origins(self, headers: HeaderSeq) -> frozenset[str]:
        if self.public_origins:
            return self.public_origins
        host = header(headers, b"host")
        own = normal_origin(f"{self.scheme}://{host.decode('latin-1')}") if host else None
        return frozenset({own}) if own else frozenset()

    def origin_allowed(self, headers: HeaderSeq, *, required: bool) -> bool:
        origin = header(headers, b"origin")
        if origin is None:
            return not required
        return normal_origin(origin.decode("latin-1")) in self.allowed_origins(headers)

    def cookie_refusal(self, headers: HeaderSeq, upgrade: bool) -> Answer | None:
        """403 ``bad_origin`` for a cookie-authenticated request from another page's origin."""
        if self.origin_allowed(headers, required=upgrade):
            return None
        return _bad_origin("the session cookie is only accepted from this site's own pages")

    def confirm_refusal(self, headers: HeaderSeq) -> Answer | None:
        """403 ``bad_origin`` unless a sign-in confirmation was posted by this site's own page."""
        site = header(headers, b"sec-fetch-site")
        if self.origin_allowed(headers, required=True) and site in (None, b"same-origin"):
            return None
        return _bad_origin("a sign-in can only be confirmed from this site's own page")

    def host_for(self, user: str) -> str | None:
        return self.user_host.replace("{user}", user) if self.user_host else None

    def host_refusal(self, headers: HeaderSeq, user: str) -> Answer | None:
        """403 ``wrong_host`` when ``[http] user_host`` is set and the request is not at the user's host."""
        own = self.host_for(user)
        if own is None or host_name(header(headers, b"host")) == own:
            return None
        return json_answer(403, "wrong_host", f"this is not the workspace address of {user}", f"open https://{own}/")


def _bad_origin(message: str) -> Answer:
    return json_answer(403, "bad_origin", message, "open the workspace from its own address (see [http] public_origins)")


def refused_before_auth(headers: HeaderSeq) -> Answer | None:
    """403 ``service_worker_refused`` for a service worker's script fetch."""
    if header(headers, b"service-worker") == b"script":
        return json_answer(403, "service_worker_refused", "service workers are not allowed on this site")
    return None


def token_not_navigation() -> Answer:
    return json_answer(
        403, "token_not_navigation", "a sign-in link only works as a page opened in the address bar",
        "open the sign-in link itself, not from inside another page",
    )


def read_form(body: bytes) -> tuple[str, bytes] | None:
    """The token and the path to go to next from a posted confirmation; None if malformed."""
    try:
        fields = parse_qs(body.decode("ascii"), strict_parsing=True, max_num_fields=4)
    except (UnicodeDecodeError, ValueError):
        return None
    token, after = fields.get("token", []), fields.get("next", ["/"])
    if len(token) != 1 or len(after) != 1:
        return None
    return token[0], same_origin_path(after[0].encode("latin-1", "replace"))


def confirm_page(current: str, new: str, token: str, after: bytes) -> Answer:
    """The interstitial: "signed in as CURRENT; continue as NEW?" with a same-origin POST form."""
    after = same_origin_path(after)
    e = html.escape
    body = (
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Switch workspace user?</title>"
        "<style>body{font:16px system-ui,sans-serif;margin:20vh auto;max-width:36em;color:#333}"
        "button{font:inherit;padding:.4em 1em}</style></head><body>"
        f"<h1>Switch user?</h1><p>This browser is signed in as <b id=\"current\">{e(current)}</b>. "
        f"The link you opened signs in as <b id=\"new\">{e(new)}</b>.</p>"
        "<p>Only continue if you meant to use that account: everything this site stored in this "
        "browser is cleared.</p>"
        f"<form method=\"post\" action=\"{e(SIGN_IN_PATH.decode())}\">"
        f"<input type=\"hidden\" name=\"token\" value=\"{e(token)}\">"
        f"<input type=\"hidden\" name=\"next\" value=\"{e(after.decode('latin-1'))}\">"
        f"<button id=\"continue\" type=\"submit\">Continue as {e(new)}</button> "
        f"<a id=\"stay\" href=\"{e(after.decode('latin-1'))}\">Stay signed in as {e(current)}</a></form>"
        "<p><code>confirm_switch</code></p></body></html>\n"
    )
    headers = (
        (b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"strict-origin"),  # not no-referrer: the form's POST would carry Origin: null
    )
    return Answer(200, body.encode(), b"text/html; charset=utf-8", headers, "confirm_switch")
