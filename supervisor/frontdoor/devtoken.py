"""Mint a development token and print the sign-in URL (development setups only).

    python -m supervisor.frontdoor.devtoken [--config FILE] USER [--tier T] [--sid S] [--ttl 8h] [--url URL]

Signs with the daemon's ``[auth] hs256_secret_file`` (so it only works where the front door is in
its HS256 development mode), with the configured ``iss`` and ``aud``, and prints
``URL?token=...``: opening it signs the browser in (the front door swaps the token for its
session cookie and removes it from the address bar). ``--token-only`` prints just the token (for
``Authorization: Bearer``). Exit codes: 0 ok, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

import jwt

from supervisor import config as config_module
from supervisor.errors import SupervisorError
from supervisor.frontdoor.auth import read_secret
from supervisor.paths import validate_user_id
from supervisor.units import parse_duration


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supervisor.frontdoor.devtoken", description=__doc__.split("\n\n")[0])
    parser.add_argument("user")
    parser.add_argument("--config", type=Path, default=None, help="daemon config (default: $WSUP_CONFIG or the default path)")
    parser.add_argument("--tier", default="free")
    parser.add_argument("--sid", default=None, help="browser session id (default: a fresh one)")
    parser.add_argument("--ttl", default="8h", help="lifetime, e.g. 30m, 8h (default 8h)")
    parser.add_argument("--url", default=None, help="front door URL (default: http://localhost:<[http] listen port>/)")
    parser.add_argument("--token-only", action="store_true")
    args = parser.parse_args(argv)
    try:
        path = args.config or (Path(os.environ["WSUP_CONFIG"]) if os.environ.get("WSUP_CONFIG") else None)
        if path is None and config_module.DEFAULT_CONFIG_PATH.exists():
            path = config_module.DEFAULT_CONFIG_PATH
        config = config_module.load(path)
        if config.auth.hs256_secret_file is None:
            raise SupervisorError("[auth] hs256_secret_file is not set: the front door is not in development mode",
                                  hint="development tokens need an HS256 secret; production tokens come from the login service")
        secret = read_secret(config.auth.hs256_secret_file, "auth.hs256_secret_file")
        user = validate_user_id(args.user)
        ttl = parse_duration(args.ttl)
    except (SupervisorError, ValueError) as exc:
        print(f"devtoken: {exc}", file=sys.stderr)
        return 2
    now = int(time.time())
    claims = {"sub": user, "tier": args.tier, "sid": args.sid or uuid.uuid4().hex, "iat": now, "exp": now + int(ttl)}
    if config.auth.issuer:
        claims["iss"] = config.auth.issuer
    if config.auth.audience:
        claims["aud"] = config.auth.audience
    token = jwt.encode(claims, secret, algorithm="HS256")
    if args.token_only:
        print(token)
        return 0
    url = args.url or f"http://localhost:{config.http.listen.rpartition(':')[2]}/"
    print(f"{url}{'&' if '?' in url else '?'}token={token}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
