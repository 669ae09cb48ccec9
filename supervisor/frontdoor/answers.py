"""The front door's own answers (errors, redirects, the "starting" page). Pure: bytes in, bytes out.

Every refusal carries a stable ``reason``: JSON bodies are ``{"reason", "message", "hint"}``
(the shape of :meth:`SupervisorError.to_dict`); browsers navigating to a page get a small HTML page
instead where that helps a person (starting, failed), with the same reason in it.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from typing import Sequence

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class Answer:
    """A complete response the front door makes itself."""

    status: int
    body: bytes
    content_type: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()
    reason: str = ""  # machine-readable, for logs and metrics

    def head(self) -> Headers:
        return [
            (b"content-type", self.content_type),
            (b"content-length", str(len(self.body)).encode()),
            (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
            *self.headers,
        ]


def retry_after_header(seconds: float) -> tuple[bytes, bytes]:
    return (b"retry-after", str(max(1, math.ceil(seconds))).encode())


def json_answer(
    status: int, reason: str, message: str, hint: str = "", *, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> Answer:
    body = json.dumps({"reason": reason, "message": message, "hint": hint}).encode() + b"\n"
    return Answer(status, body, b"application/json", headers, reason)


def unauthorized(reason: str, message: str, hint: str) -> Answer:
    challenge = f'Bearer error="invalid_token", error_description="{reason}"'.encode()
    return json_answer(401, reason, message, hint, headers=((b"www-authenticate", challenge),))


def retry_later(status: int, reason: str, message: str, hint: str, retry_after: float) -> Answer:
    return json_answer(status, reason, message, hint, headers=(retry_after_header(retry_after),))


def html_page(status: int, reason: str, title: str, message: str, *, refresh: float | None = None,
              headers: tuple[tuple[bytes, bytes], ...] = ()) -> Answer:
    meta = f'<meta http-equiv="refresh" content="{max(1, math.ceil(refresh))}">' if refresh is not None else ""
    text = (
        "<!doctype html><html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>{meta}"
        "<style>body{font:16px system-ui,sans-serif;margin:20vh auto;max-width:36em;color:#333}"
        "code{color:#888}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>"
        f"<p><code>{html.escape(reason)}</code></p></body></html>\n"
    )
    return Answer(status, text.encode(), b"text/html; charset=utf-8", headers, reason)


def starting_page(retry_after: float) -> Answer:
    """Served when a cold start outlasts the hold time: the page reloads itself until the IDE is up."""
    return html_page(
        503, "starting", "Starting your IDE\u2026",
        "Your workspace is starting. This page reloads by itself.",
        refresh=min(retry_after, 2.0), headers=(retry_after_header(min(retry_after, 2.0)),),
    )


def same_origin_path(target: bytes) -> bytes:
    """``target`` as a Location that stays on this origin: a path (an absolute-form target keeps
    only its path), one leading ``/`` (``//host`` would name another host), every backslash and
    every byte a browser would strip or re-read (controls, space, non-ASCII) percent-encoded."""
    if not target.startswith(b"/"):
        scheme, sep, rest = target.partition(b"://")
        target = b"/" + rest.partition(b"/")[2] if sep and scheme.isalpha() else b"/"
    encoded = b"".join(b"%%%02X" % byte if byte <= 0x20 or byte >= 0x7F or byte == 0x5C else bytes((byte,)) for byte in target)
    return b"/" + encoded.lstrip(b"/")


def redirect(location: bytes, set_cookie: bytes, *, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Answer:
    """303 to ``location`` (made a path on this origin), setting the session cookie."""
    return Answer(
        303, b"", b"text/plain; charset=utf-8",
        ((b"location", same_origin_path(location)), (b"set-cookie", set_cookie), (b"referrer-policy", b"no-referrer"), *headers),
        "login",
    )


def header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def wants_html(method: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """True for a browser navigating to a page (where an HTML answer helps a person)."""
    if method not in (b"GET", b"HEAD"):
        return False
    if (mode := header(headers, b"sec-fetch-mode")) is not None:
        return mode == b"navigate"
    accept = header(headers, b"accept")
    return accept is not None and b"text/html" in accept
