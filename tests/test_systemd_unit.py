"""The shipped unit (systemd/workspace-supervisor.service): `systemd-analyze verify` finds nothing
to say about it, its exposure stays where the sandboxing put it, and the directives the daemon's
restart and drain semantics rest on are there (README: "On a host (systemd)")."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config import DaemonConfig

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "workspace-supervisor.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is missing (Debian: apt-get install systemd; tests/run does)")


def service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser["Service"]


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    # verify checks that every command exists: the install links the venv's command to
    # /usr/local/bin; here the venv's own stands in for it.
    command = Path(sys.executable).parent / "workspace-supervisor"
    assert command.exists(), command
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/workspace-supervisor", str(command)))
    result = subprocess.run([str(ANALYZE), "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_analyze
def test_a_broken_unit_is_not_clean(tmp_path: Path) -> None:
    """verify exits 0 on a directive it ignores: the check above is on its output too."""
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("KillMode=process", "KillMode=bogus"))
    result = subprocess.run([str(ANALYZE), "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "kill mode" in result.stderr


@needs_analyze
def test_security_exposure_stays_medium() -> None:
    # 9.6 before the sandboxing, 6.3 with it; --threshold is the exposure times ten.
    result = subprocess.run([str(ANALYZE), "security", "--offline=true", "--threshold=65", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-400:]


def test_restart_drain_and_notify_semantics() -> None:
    unit = service()
    assert (unit["Type"], unit["NotifyAccess"], unit["KillMode"], unit["Restart"]) == ("notify", "main", "process", "always")
    assert unit["ExecStart"].split()[1:3] == ["init", "--"]  # the init is the main process
    assert unit["ExecReload"] == "/bin/kill -USR2 $MAINPID"
    assert unit["Delegate"] == "yes" and "RestrictNamespaces" not in unit and "PrivateTmp" not in unit
    defaults = DaemonConfig()
    assert int(unit["TimeoutStopSec"].rstrip("s")) >= defaults.drain_deadline + defaults.shutdown_deadline
