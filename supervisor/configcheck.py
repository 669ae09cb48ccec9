"""`workspace-supervisor check-config`: every problem of a configuration in one run.

Beyond what loading validates (:func:`supervisor.config.from_dict`, every error collected), it
looks at the world the configuration names: the ``[auth]`` key files exist, are readable, parse as
what they claim and cannot be changed (or, for secrets, read) by the pod's users; the programs the
daemon runs exist and are executable; ``drain_deadline + shutdown_deadline`` fits the grace the
pod gives a stopping daemon (``--grace``: Kubernetes' terminationGracePeriodSeconds, systemd's
TimeoutStopSec). Errors make the exit code 2; warnings do not.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

from supervisor.config import Config, load
from supervisor.errors import ConfigError

#: What a drain and shutdown leave of the grace for withdrawing from the registry and exiting.
GRACE_MARGIN = 5.0


@dataclass(frozen=True)
class Problem:
    level: str  # "error" or "warning"
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


def run(path: Path | None, environ: Mapping[str, str], grace: float | None) -> int:
    """Print every problem (stderr) and a verdict (stdout); the exit code: 2 if any is an error."""
    errors: list[ConfigError] = []
    try:
        config: Config | None = load(path, environ, errors=errors)
    except ConfigError as exc:  # unreadable, or not TOML: nothing more to check
        errors, config = [exc], None
    problems = [Problem("error", str(exc)) for exc in errors] + (check(config, grace=grace) if config else [])
    for problem in problems:
        print(f"workspace-supervisor: {problem}", file=sys.stderr)
    failed = sum(p.level == "error" for p in problems)
    warned = len(problems) - failed
    verdict = f"{failed} error(s), {warned} warning(s)" if failed else "ok" + (f" ({warned} warning(s))" if warned else "")
    print(f"{path or 'built-in defaults'}: {verdict}")
    return 2 if failed else 0


def check(config: Config, *, grace: float | None) -> list[Problem]:
    """The problems ``config`` has in this machine (beyond its parsing)."""
    return [*key_files(config), *programs(config), *deadlines(config, grace)]


# ---- the stop deadlines against the grace (pure) ---------------------------------------------------


def deadlines(config: Config, grace: float | None) -> Iterator[Problem]:
    d = config.daemon
    total = d.drain_deadline + d.shutdown_deadline
    spelled = f"daemon.drain_deadline ({d.drain_deadline:g}s) + daemon.shutdown_deadline ({d.shutdown_deadline:g}s) = {total:g}s"
    if grace is None:
        yield Problem("warning", f"{spelled} not checked against the pod's grace: pass --grace SECONDS "
                                 "(Kubernetes terminationGracePeriodSeconds, systemd TimeoutStopSec)")
    elif total > grace:
        yield Problem("error", f"{spelled} exceeds the grace of {grace:g}s: the pod is killed before its users are "
                               f"stopped; raise the grace to at least {total + GRACE_MARGIN:g}s or lower the deadlines")
    elif total + GRACE_MARGIN > grace:
        yield Problem("warning", f"{spelled} leaves under {GRACE_MARGIN:g}s of the grace of {grace:g}s to withdraw "
                                 f"from the registry and exit; a grace of {total + GRACE_MARGIN:g}s is safer")


# ---- key files ------------------------------------------------------------------------------------


def key_files(config: Config) -> Iterator[Problem]:
    # Imported here: PyJWT and cryptography (as the daemon does for the front door).
    from supervisor.frontdoor.auth import load_pem_key, parse_jwks, read_secret

    auth = config.auth
    tenants = range(config.users.uid_min, config.users.uid_max + 1)

    def jwks(path: Path) -> None:
        try:
            keys = parse_jwks(path.read_text(), auth.algorithms, f"auth.jwks_file {path}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"auth.jwks_file {path} is not a JWKS document: {exc}") from None
        if not keys:
            raise ConfigError(f"auth.jwks_file {path} holds no signing key usable with auth.algorithms ({', '.join(auth.algorithms)})")

    files: list[tuple[str, Path | None, Callable[[Path], object], bool]] = [
        ("auth.public_key_file", auth.public_key_file, lambda p: load_pem_key(p, auth.algorithms), False),
        ("auth.jwks_file", auth.jwks_file, jwks, False),
        ("auth.hs256_secret_file", auth.hs256_secret_file, lambda p: read_secret(p, "auth.hs256_secret_file"), True),
        ("auth.cookie_secret_file", auth.cookie_secret_file, lambda p: read_secret(p, "auth.cookie_secret_file"), True),
    ]
    for key, path, parse, is_secret in files:
        if path is None:
            continue
        try:
            st = os.stat(path)
        except OSError as exc:
            yield Problem("error", f"{key} {path}: {exc.strerror}; create it or fix the path")
            continue
        if not stat.S_ISREG(st.st_mode):
            yield Problem("error", f"{key} {path} is not a regular file")
            continue
        yield from _exposure(key, path, st, tenants, is_secret)
        try:
            parse(path)
        except ConfigError as exc:
            yield Problem("error", exc.message)


def _exposure(key: str, path: Path, st: os.stat_result, tenants: range, is_secret: bool) -> Iterator[Problem]:
    """Every user has a shell in the pod: a key file they can change lets them sign their own
    tokens; a secret they can read lets them forge tokens or session cookies."""
    if st.st_uid in tenants:
        yield Problem("error", f"{key} {path} is owned by uid {st.st_uid}, a user's: make it root's")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        yield Problem("error", f"{key} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): chmod go-w")
    try:
        parent = os.stat(path.parent)
    except OSError:
        parent = None
    if parent is not None and (parent.st_uid in tenants or (parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
                                                            and not parent.st_mode & stat.S_ISVTX)):
        yield Problem("error", f"{key} {path}: users can replace it in its directory {path.parent} (owner uid "
                               f"{parent.st_uid}, mode {stat.S_IMODE(parent.st_mode):04o}): make it root's and chmod go-w")
    if is_secret and st.st_mode & stat.S_IROTH:
        yield Problem("error", f"{key} {path} is readable by every user in the pod (mode {stat.S_IMODE(st.st_mode):04o}): "
                               "chmod 0400 (Kubernetes: the Secret volume's defaultMode: 0400)")


# ---- programs -----------------------------------------------------------------------------------------


def programs(config: Config) -> Iterator[Problem]:
    """The IDE's binary always; the users' namespace init and network stack when their mechanism is
    asked for (an error when "on", a warning when "auto")."""
    iso = config.isolation
    wanted: list[tuple[str, str, str]] = [("ide.command[0]", config.ide.command[0], "on")]
    if iso.pid != "off":
        wanted.append(("isolation.init", str(iso.init), iso.pid))
    if iso.network != "off":
        wanted += [("network.slirp4netns", str(config.network.slirp4netns), iso.network),
                   ("network.nft", str(config.network.nft), iso.network)]
    for key, program, mode in wanted:
        why = _not_runnable(program)
        if why:
            yield Problem("error" if mode == "on" else "warning", f"{key} {program!r} {why}")


def _not_runnable(program: str) -> str | None:
    """Why ``program`` (a path, or a name looked up in PATH) cannot be executed, or None (also
    when it has a placeholder: it is only known per user)."""
    if "{" in program:
        return None
    if "/" not in program:
        return None if shutil.which(program) else "is not found in PATH"
    path = Path(program)
    if not path.exists():
        return "does not exist; install it or fix the path"
    if not path.is_file():
        return "is not a file"
    if not os.access(path, os.X_OK):
        return "is not executable"
    return None
