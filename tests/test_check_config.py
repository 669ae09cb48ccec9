"""`workspace-supervisor check-config`: every error in one run, real key files (made here with
cryptography), real programs, the stop deadlines against the grace; and `config-reference`'s
output is a file it accepts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from supervisor import config, configcheck
from supervisor.errors import ConfigError
from tests.conftest import is_root

REPO = Path(__file__).resolve().parent.parent
PROGRAM_KEYS = ("ide.command[0]", "isolation.init", "network.slirp4netns", "network.nft")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WSUP_")}
    return subprocess.run([sys.executable, "-m", "supervisor.daemon", *args], capture_output=True, text=True, cwd=REPO,
                          env={**environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=60)


def problems(raw: Mapping[str, Any], grace: float | None = 60.0) -> list[str]:
    errors: list[ConfigError] = []
    loaded = config.from_dict(raw, errors=errors)
    return [f"error: {e}" for e in errors] + [str(p) for p in configcheck.check(loaded, grace=grace)]


def executable(tmp_path: Path) -> str:
    program = tmp_path / "ide"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    return str(program)


def pem_key(path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    path.chmod(0o644)
    return path


# ---- every error in one run -----------------------------------------------------------------------


def test_every_error_is_reported_in_one_run(tmp_path: Path) -> None:
    file = tmp_path / "config.toml"
    file.write_text(f"""
[pod]
capacity = "lots"
colour = "blue"
[daemon]
drain_deadline = "soon"
[registry]
heartbeat = "20s"
lease = "10s"
[ide]
command = ["{tmp_path}/no-such-ide", "{{workspace}}"]
[auth]
public_key_file = "{tmp_path}/missing.pem"
[tiers.pro]
cpu = "lots"
[bogus]
x = 1
""")
    result = run_cli("check-config", "--config", str(file), "--grace", "60", env={"WSUP_POD_NOPE": "1"})
    assert result.returncode == 2, result.stderr
    for expected in ("pod.capacity", "unknown key pod.colour", "daemon.drain_deadline", "registry.heartbeat (20s)",
                     "tiers.pro.cpu", "unknown section [bogus]", "WSUP_POD_NOPE", "no-such-ide' does not exist",
                     "missing.pem: No such file"):
        assert expected in result.stderr, (expected, result.stderr)
    assert result.stderr.count("workspace-supervisor: error:") == 9
    assert result.stdout.strip() == f"{file}: 9 error(s), 0 warning(s)"


def test_a_file_that_is_not_toml_is_one_error(tmp_path: Path) -> None:
    file = tmp_path / "config.toml"
    file.write_text("[pod\n")
    result = run_cli("check-config", "--config", str(file))
    assert result.returncode == 2 and "not valid TOML" in result.stderr


def test_the_daemon_still_stops_at_the_first_error() -> None:
    with pytest.raises(ConfigError, match="unknown key pod.colour"):
        config.from_dict({"pod": {"capacity": "lots", "colour": "blue"}})


# ---- key files -----------------------------------------------------------------------------------------


def test_good_key_files_pass(tmp_path: Path) -> None:
    key = pem_key(tmp_path / "jwt.pem", rsa.generate_private_key(65537, 2048))
    cookie = tmp_path / "cookie.key"
    cookie.write_text("c" * 64 + "\n")
    cookie.chmod(0o600)
    assert problems({"ide": {"command": [executable(tmp_path)]}, "isolation": {"pid": "off", "network": "off"},
                     "auth": {"public_key_file": str(key), "cookie_secret_file": str(cookie)}}) == []


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("not a key", "is not a PEM public key"),
        ("", "is not a PEM public key"),
    ],
)
def test_a_public_key_file_that_is_not_a_key(tmp_path: Path, content: str, expected: str) -> None:
    key = tmp_path / "jwt.pem"
    key.write_text(content)
    assert any(expected in p for p in problems({"auth": {"public_key_file": str(key)}}))


def test_a_key_no_configured_algorithm_can_verify(tmp_path: Path) -> None:
    key = pem_key(tmp_path / "jwt.pem", ec.generate_private_key(ec.SECP256R1()))
    found = problems({"auth": {"public_key_file": str(key), "algorithms": ["RS256"]}})
    assert any("which none of auth.algorithms" in p for p in found)


def test_jwks_files(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text("{not json")
    assert any("is not a JWKS document" in p for p in problems({"auth": {"jwks_file": str(jwks)}}))
    jwks.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))  # symmetric keys never count
    assert any("holds no signing key" in p for p in problems({"auth": {"jwks_file": str(jwks)}}))
    public = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    jwk = {"kty": "EC", "crv": "P-256", "kid": "k1", "x": _b64(public.x), "y": _b64(public.y)}
    jwks.write_text(json.dumps({"keys": [jwk]}))
    assert not [p for p in problems({"auth": {"jwks_file": str(jwks)}}) if "jwks" in p]


def _b64(number: int) -> str:
    import base64

    return base64.urlsafe_b64encode(number.to_bytes(32, "big")).rstrip(b"=").decode()


def test_secrets_must_be_long_and_private(tmp_path: Path) -> None:
    secret = tmp_path / "hs256.key"
    secret.write_text("short")
    secret.chmod(0o600)
    raw = {"auth": {"hs256_secret_file": str(secret), "algorithms": ["HS256"]}}
    assert any("holds 5 bytes; at least 32" in p for p in problems(raw))
    secret.write_text("s" * 40)
    assert not [p for p in problems(raw) if "hs256" in p]
    secret.chmod(0o644)  # e.g. a Kubernetes Secret volume's default mode
    assert any("readable by every user in the pod (mode 0644)" in p for p in problems(raw))
    secret.chmod(0o620)
    assert any("writable by group or others" in p for p in problems(raw))
    secret.chmod(0o600)
    tmp_path.chmod(0o777)  # anyone may rename another file over it
    assert any("users can replace it in its directory" in p for p in problems(raw))
    tmp_path.chmod(0o1777)  # sticky, like /tmp: only its owner (root) may
    assert not [p for p in problems(raw) if "hs256" in p]
    tmp_path.chmod(0o700)
    secret.unlink()
    assert any("hs256.key: No such file" in p for p in problems(raw))
    secret.mkdir()
    assert any("is not a regular file" in p for p in problems(raw))


@pytest.mark.skipif(not is_root(), reason="needs root to give a file to a user's uid")
def test_a_key_file_a_user_owns_is_refused(tmp_path: Path) -> None:
    key = pem_key(tmp_path / "jwt.pem", rsa.generate_private_key(65537, 2048))
    os.chown(key, 200_001, 200_001)
    assert any("owned by uid 200001, a user's" in p for p in problems({"auth": {"public_key_file": str(key)}}))


# ---- programs --------------------------------------------------------------------------------------------


def test_programs_must_exist_and_be_executable(tmp_path: Path) -> None:
    ide = Path(executable(tmp_path))
    base = {"isolation": {"pid": "auto", "network": "off", "init": str(tmp_path / "tini")}}
    found = problems({**base, "ide": {"command": [str(ide)]}})
    assert found == [f"warning: isolation.init '{tmp_path}/tini' does not exist; install it or fix the path"]
    ide.chmod(0o644)
    assert f"error: ide.command[0] '{ide}' is not executable" in problems({**base, "ide": {"command": [str(ide)]}})
    assert "error: ide.command[0] 'no-such-program-here' is not found in PATH" in problems({"ide": {"command": ["no-such-program-here"]}})
    assert not [p for p in problems({"ide": {"command": ["sh", "-c", "x"]}}) if "ide.command" in p]


# ---- the deadlines against the grace ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grace", "level", "text"),
    [
        (None, "warning", "not checked against the pod's grace: pass --grace"),
        (30.0, "error", "= 45s exceeds the grace of 30s"),
        (47.0, "warning", "leaves under 5s of the grace of 47s"),
        (50.0, None, ""),
    ],
)
def test_drain_and_shutdown_must_fit_the_grace(grace: float | None, level: str | None, text: str) -> None:
    found = list(configcheck.deadlines(config.from_dict({}), grace))
    assert [p.level for p in found] == ([level] if level else [])
    assert all(text in p.message for p in found)


def test_the_cli_exit_codes_follow_the_grace() -> None:
    assert run_cli("check-config", "--grace", "30").returncode == 2
    warned = run_cli("check-config")
    assert warned.returncode == 0 and "warning: daemon.drain_deadline" in warned.stderr


# ---- config-reference ---------------------------------------------------------------------------------------


def test_check_config_accepts_the_reference(tmp_path: Path) -> None:
    reference = run_cli("config-reference")
    assert reference.returncode == 0
    file = tmp_path / "config.toml"
    file.write_text(reference.stdout)
    result = run_cli("check-config", "--config", str(file), "--grace", "50")
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    # The defaults name /usr/bin/node, tini, slirp4netns and nft: on a machine without them, only those fail.
    assert all(any(key in line for key in PROGRAM_KEYS) for line in errors), result.stderr
    assert result.returncode == (2 if errors else 0)
    assert result.stdout.startswith(f"{file}: ")
