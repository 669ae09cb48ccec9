"""Helpers for tests of the probe port, the metrics and the registry of a real daemon."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Daemon

PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "promtool is not installed (Debian package 'prometheus'; tests/run installs it)"


def probes_address(d: Daemon) -> str:
    address: str = d.ctl_json("pod")["pod"]["probes"]
    return address


def get(address: str, path: str, *, method: str = "GET", timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One real HTTP request to ``host:port``; (status, lower-cased headers, body)."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def get_json(address: str, path: str) -> tuple[int, dict[str, Any]]:
    status, _, body = get(address, path)
    data: dict[str, Any] = json.loads(body)
    return status, data


def scrape(d: Daemon) -> str:
    status, headers, body = get(probes_address(d), "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=")
    return body.decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by (name, labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    """The sample ``name{labels}``; fails when it is missing."""
    key = (name, frozenset(labels.items()))
    found = samples(text)
    assert key in found, f"no sample {name}{labels}; have: {sorted(n for n, _ in found if n.startswith(name))}"
    return found[key]


def promtool(*args: str, cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, input=stdin, timeout=60)
