"""The pure parts of ``/port/<N>/`` (supervisor/frontdoor/ports.py): the path, the Location of an
answer, the headers sent on, and ``[http] port_range``."""

from __future__ import annotations

import pytest

from supervisor import config as config_module
from supervisor.errors import ConfigError
from supervisor.frontdoor.ports import PortPath, is_port_path, parse_port_path, port_request_headers, rewrite_location


@pytest.mark.parametrize("target, expected", [
    (b"/port/3000/", PortPath(3000, b"/")),
    (b"/port/3000/src/main.ts?import&t=1", PortPath(3000, b"/src/main.ts?import&t=1")),
    (b"/port/8080/a//b/../c", PortPath(8080, b"/a//b/../c")),  # the rest goes on untouched: the server's own path
    (b"/port/65535/?token=abc", PortPath(65535, b"/?token=abc")),
    (b"/port/1/x", PortPath(1, b"/x")),
    (b"/port/3000", PortPath(3000, b"/", redirect=b"/port/3000/")),
    (b"/port/3000?x=1", PortPath(3000, b"/", redirect=b"/port/3000/?x=1")),
])
def test_a_port_path_names_the_port_and_what_the_server_is_asked_for(target: bytes, expected: PortPath) -> None:
    assert is_port_path(target)
    assert parse_port_path(target) == expected


@pytest.mark.parametrize("target", [
    b"/port", b"/port/", b"/port//x", b"/port/0/", b"/port/65536/", b"/port/03000/", b"/port/-1/", b"/port/+80/",
    b"/port/30 00/", b"/port/%33000/", b"/port/3000x/", b"/port/99999999999999999999/", b"/port/\xd9\xa3/",
])
def test_a_malformed_port_is_none(target: bytes) -> None:
    assert is_port_path(target)
    assert parse_port_path(target) is None


@pytest.mark.parametrize("target", [b"/", b"/ports/3000/", b"/portal", b"/x/port/3000/", b"/?p=/port/3000/"])
def test_other_paths_are_not_port_paths(target: bytes) -> None:
    assert not is_port_path(target)


@pytest.mark.parametrize("location, expected", [
    (b"/login", b"/port/3000/login"),
    (b"/", b"/port/3000/"),
    (b"/a?next=/b#top", b"/port/3000/a?next=/b#top"),
    (b"login", b"login"),  # relative: resolves under /port/3000/ already
    (b"../up", b"../up"),
    (b"?page=2", b"?page=2"),
    (b"http://localhost:3000/done", b"/port/3000/done"),
    (b"HTTP://LocalHost:3000/done", b"/port/3000/done"),
    (b"http://127.0.0.1:3000", b"/port/3000/"),
    (b"http://[::1]:3000?q=1", b"/port/3000/?q=1"),
    (b"//localhost:3000/x", b"/port/3000/x"),
    (b"http://localhost:3001/x", b"http://localhost:3001/x"),  # another port: not this server
    (b"http://localhost/x", b"http://localhost/x"),  # port 80
    (b"https://localhost:3000/x", b"https://localhost:3000/x"),
    (b"https://github.com/login/oauth", b"https://github.com/login/oauth"),
    (b"//evil.example/x", b"//evil.example/x"),
    (b"http://localhost:3000@evil.example/", b"http://localhost:3000@evil.example/"),
    (b"javascript:alert(1)", b"javascript:alert(1)"),
])
def test_location_goes_back_under_the_prefix_only_for_the_server_itself(location: bytes, expected: bytes) -> None:
    assert rewrite_location(location, 3000) == expected


def test_port_80_may_name_itself_without_a_port() -> None:
    assert rewrite_location(b"http://localhost/x", 80) == b"/port/80/x"


def test_the_server_is_asked_with_its_own_host_name_and_origin() -> None:
    headers = [(b"host", b"pod.example:8080"), (b"accept", b"*/*"), (b"origin", b"https://pod.example:8080"), (b"host", b"second")]
    assert port_request_headers(headers, 5173) == [
        (b"host", b"localhost:5173"), (b"accept", b"*/*"), (b"origin", b"http://localhost:5173")]
    assert port_request_headers([(b"accept", b"*/*")], 80) == [(b"host", b"localhost:80"), (b"accept", b"*/*")]


@pytest.mark.parametrize("value, bounds", [("1024-65535", (1024, 65535)), (" 3000 - 3999 ", (3000, 3999)), ("8080", (8080, 8080))])
def test_port_range_is_parsed(value: str, bounds: tuple[int, int]) -> None:
    http = config_module.from_dict({"http": {"port_range": value}}).http
    assert http.port_bounds == bounds


def test_port_range_default() -> None:
    assert config_module.from_dict({}).http.port_bounds == (1024, 65535)


@pytest.mark.parametrize("value", ["", "a-b", "0-100", "100-70000", "5000-4000", "1-2-3", "-", 3000])
def test_a_bad_port_range_is_refused_saying_what_is_expected(value: object) -> None:
    with pytest.raises(ConfigError, match=r"http\.port_range.*LOW-HIGH|http\.port_range.*string"):
        config_module.from_dict({"http": {"port_range": value}})


def test_on_a_port_the_cookie_signs_in_and_token_parameters_and_app_bearers_go_on() -> None:
    from supervisor.frontdoor.auth import Credentials
    from supervisor.frontdoor.ports import port_credentials

    with_cookie = Credentials(bearer="app-own", query_tokens=("jupyter",), cookies=("c",), target=b"/port/8888/?token=jupyter")
    assert port_credentials(with_cookie) == Credentials(None, (), ("c",), b"/port/8888/?token=jupyter")
    api_client = Credentials(bearer="jwt", query_tokens=("jupyter",), cookies=(), target=b"/port/8888/")
    assert port_credentials(api_client) == Credentials("jwt", (), (), b"/port/8888/")
