"""Configuration: the operators' file loads as is, overrides, units, and errors that name the key."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from supervisor import config
from supervisor.errors import ConfigError, UnknownTier
from supervisor.units import format_duration, parse_cpu, parse_duration, parse_percent, parse_size

OPERATORS_FILE = """
[pod]
id = "workspace-pod-3"        # default: the host name
capacity = 100
[workspace]
root = "/workspace"
shards = 10
[ide]
command = ["/usr/bin/node", "/opt/theia/lib/backend/main.js", "{workspace}"]
[tiers.free]
cpu = "200m"
memory = "512Mi"
storage = "10Gi"
sessions = 1
[control]
socket = "/run/workspace-supervisor/control.sock"
"""


def test_operators_file_loads_as_is(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(OPERATORS_FILE)
    c = config.load(path, environ={})
    assert c.pod_id == "workspace-pod-3" and c.pod.capacity == 100
    assert c.workspace.root == Path("/workspace") and c.workspace.shards == 10
    assert c.ide.command == ["/usr/bin/node", "/opt/theia/lib/backend/main.js", "{workspace}"]
    assert c.control.socket == Path("/run/workspace-supervisor/control.sock")


def test_defaults_match_the_product_plan() -> None:
    c = config.from_dict({}, environ={})
    assert c.pod.capacity == 100 and c.workspace.shards == 10 and c.workspace.root == Path("/workspace")
    expected = {
        "free": (200, 512 * 2**20, 10 * 2**30, 1),
        "starter": (500, 2**30, 50 * 2**30, 5),
        "pro": (1000, 2 * 2**30, 100 * 2**30, 10),
    }
    for name, (cpu, memory, storage, sessions) in expected.items():
        tier = c.tier(name)
        assert (tier.cpu, tier.memory, tier.storage, tier.sessions) == (cpu, memory, storage, sessions)
    with pytest.raises(UnknownTier):
        c.tier("platinum")


def test_environment_overrides_every_kind_of_key() -> None:
    c = config.from_dict({}, environ={
        "WSUP_POD_CAPACITY": "50",
        "WSUP_CONTROL_SOCKET": "/tmp/x.sock",
        "WSUP_TIERS_PRO_CPU": "1.5",
        "WSUP_IDE_COMMAND": '["/bin/echo", "{user}"]',
        "WSUP_RESTART_BACKOFF_MAX": "2m",
        "PATH": "/usr/bin",
    })
    assert c.pod.capacity == 50
    assert c.control.socket == Path("/tmp/x.sock")
    assert c.tier("pro").cpu == 1500
    assert c.ide.command == ["/bin/echo", "{user}"]
    assert c.restart.backoff_max == 120


def test_custom_tier_gets_defaults_and_can_be_overridden_by_env() -> None:
    c = config.from_dict({"tiers": {"team": {"cpu": "2", "memory": "4Gi"}}}, environ={"WSUP_TIERS_TEAM_SESSIONS": "20"})
    team = c.tier("team")
    assert (team.cpu, team.memory, team.sessions) == (2000, 4 * 2**30, 20)


@pytest.mark.parametrize(
    ("raw", "environ", "expected"),
    [
        ({"pod": {"capacity": "lots"}}, {}, ["pod.capacity", "'lots'", "whole number"]),
        ({"pod": {"capacity": 0}}, {}, ["pod.capacity", "from 1"]),
        ({"pod": {"address": "10.0.0.5"}}, {}, ["pod.address", "HOST:PORT"]),
        ({"pod": {"address": ":8080"}}, {}, ["pod.address", "other machines can reach"]),
        ({}, {"WSUP_POD_ADDRESS": "10.0.0.5:0"}, ["pod.address", "10.4.2.17:8080"]),
        ({"tiers": {"free": {"memory": "512 potatoes"}}}, {}, ["tiers.free.memory", "512Mi"]),
        ({"tiers": {"free": {"cpu": "-1"}}}, {}, ["tiers.free.cpu", "200m"]),
        ({"restart": {"backoff_max": "soon"}}, {}, ["restart.backoff_max", "90s"]),
        ({"pod": {"capcity": 3}}, {}, ["unknown key pod.capcity", "capacity"]),
        ({"pods": {}}, {}, ["unknown section [pods]"]),
        ({}, {"WSUP_POD_CAPCITY": "3"}, ["WSUP_POD_CAPCITY"]),
        ({"ide": {"command": []}}, {}, ["ide.command", "non-empty"]),
        ({"ide": {"command": ["x", "{usr}"]}}, {}, ["{usr}", "{user}"]),
        ({"ide": {"command": ["x", "--socket={socket}"]}}, {}, ["{socket}", "fd 3", "LISTEN_FDS=1"]),
        ({"ide": {"env": {"WSUP_IDE_SOCKET": "{socket}"}}}, {}, ["{socket}", "fd 3"]),
        ({"workspace": {"root": "relative/path"}}, {}, ["workspace.root", "absolute"]),
        ({"users": {"uid_min": 5000, "uid_max": 4000}}, {}, ["uid_min", "uid_max"]),
        ({"http": {"listen": "8080"}}, {}, ["http.listen", "HOST:PORT"]),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(raw: dict, environ: dict, expected: list[str]) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as info:
        config.from_dict(raw, environ=environ)
    text = str(info.value)
    for part in expected:
        assert part in text, text


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[pod\ncapacity = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(broken, environ={})


def test_reference_is_toml_that_gives_the_defaults_back() -> None:
    text = config.describe()
    parsed = tomllib.loads(text)
    assert set(parsed) == {f.name for f in dataclasses.fields(config.Config)}  # every section, tiers included
    assert set(parsed["tiers"]) == {"free", "starter", "pro"}
    assert config.from_dict(parsed) == config.from_dict({})
    assert "PosixPath" not in text and "None" not in text and "True" not in text
    assert parsed["tiers"]["free"]["cpu"] == "200m" and parsed["daemon"]["drain_deadline"] == "15s"
    assert parsed["daemon"]["state_dir"] == "/var/lib/workspace-supervisor"
    assert "auth" in parsed and "public_key_file" not in parsed["auth"]  # unset: commented out
    assert '# public_key_file = ""' in text


def test_the_references_commented_examples_are_valid_too() -> None:
    """Uncommenting the unset keys and the [tiers.<name>.idle] example still loads."""
    text = "\n".join(line[2:] if line.startswith(("# public_key_file", "# [tiers.free.idle]", "# stop_after")) else line
                     for line in config.describe().splitlines())
    loaded = config.from_dict(tomllib.loads(text))
    assert loaded.auth.public_key_file is None
    assert loaded.idle_for("free").stop_after == 1800.0 and loaded.idle_for("pro").stop_after == 3600.0


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("2m", 120), ("1h30m", 5400), ("250ms", 0.25), (5, 5), ("3", 3)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "2 minutes", "-1s", "1x", True, None])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(("text", "size"), [("512Mi", 512 * 2**20), ("2Gi", 2 * 2**30), ("10G", 10**10), ("4096", 4096), (100, 100), ("1.5Gi", int(1.5 * 2**30))])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(("text", "millicores"), [("200m", 200), ("1.5", 1500), (2, 2000), ("0.25", 250)])
def test_cpu(text: object, millicores: int) -> None:
    assert parse_cpu(text) == millicores


@pytest.mark.parametrize("bad", ["0m", "fast", "-1", False])
def test_bad_cpu(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_cpu(bad)


def test_percent_and_formatting() -> None:
    assert parse_percent("5%") == 0.05
    with pytest.raises(ValueError):
        parse_percent("150%")
    assert format_duration(312) == "5m12s"
