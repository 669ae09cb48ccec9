"""Another network namespace a test makes, standing for "the internet" (never an outside address):
a veth pair to the pod's namespace with one address of an ordinary range (``allowed``) and one of a
denied private range (``denied``), an HTTP server answering ``outside-ok`` on port 8080 of both."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Iterator

import pytest

from tests.harness import poll

SERVER = "import http.server as h, sys; h.HTTPServer((sys.argv[1], int(sys.argv[2])), type('H', (h.BaseHTTPRequestHandler,), " \
         "{'do_GET': lambda s: (s.send_response(200), s.end_headers(), s.wfile.write(sys.argv[3].encode()))})).serve_forever()"


@pytest.fixture(scope="module")
def outside() -> Iterator[dict[str, str]]:
    with outside_namespace() as addresses:
        yield addresses


@contextlib.contextmanager
def outside_namespace(server: str = SERVER, args: tuple[str, ...] = ("0.0.0.0", "8080", "outside-ok")) -> Iterator[dict[str, str]]:
    """The namespace, its veth pair and ``server`` (python -c, with ``args``) running in it;
    yields its ``allowed`` and ``denied`` addresses and ``ns``, its name."""
    tag = os.urandom(3).hex()
    ns, host_if, peer_if = f"wsup-out-{tag}", f"wsh{tag}", f"wsp{tag}"
    allowed, denied = "198.18.77.2", "172.31.77.2"

    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True)

    run("ip", "netns", "add", ns)
    server_proc = None
    try:
        run("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        run("ip", "link", "set", peer_if, "netns", ns)
        for address in ("198.18.77.1/24", "172.31.77.1/24"):
            run("ip", "addr", "add", address, "dev", host_if)
        run("ip", "link", "set", host_if, "up")
        for address in (f"{allowed}/24", f"{denied}/24"):
            run("ip", "netns", "exec", ns, "ip", "addr", "add", address, "dev", peer_if)
        run("ip", "netns", "exec", ns, "ip", "link", "set", peer_if, "up")
        server_proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", server, *args])
        if server == SERVER:
            poll(lambda: subprocess.run(["curl", "-s", "-m", "1", f"http://{allowed}:8080/"], capture_output=True, text=True).stdout == "outside-ok",
                 10, "the outside server")
        yield {"allowed": allowed, "denied": denied, "ns": ns}
    finally:
        if server_proc is not None:
            server_proc.kill()
            server_proc.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
