"""Who is this browser: JWT verification (PyJWT) and the front door's own session cookie.

A browser proves who it is once, with a JWT from the login service, and is then carried by a
session cookie the front door signs itself:

- **Token** (``Authorization: Bearer`` on every request, or a ``token`` query parameter on the
  first page load): signature checked against a PEM public key or a JWKS file (reloaded when the
  file changes, the key chosen by ``kid``), or - development only - an HS256 secret. The
  algorithm allow-list is exact: the token's ``alg`` must be configured *and* fit the key that
  verifies it, so ``none`` never passes, and neither does HS256 "signed" with an RSA public key
  (algorithm confusion). ``exp`` (required) and ``nbf`` are checked with the configured leeway,
  ``iss`` and ``aud`` against the configuration; ``sub`` must be a valid user id; ``tier`` and
  ``sid`` (the browser session) must be non-empty strings.
- **Cookie** ``<name>=1.<payload>.<mac>``: ``payload`` is base64url JSON ``{"u": user, "t": tier,
  "s": sid, "e": exp}`` - no secret and never the token itself - and ``mac`` is HMAC-SHA256 over
  it with a per-daemon key (``[auth] cookie_secret_file``, by default ``<state_dir>/cookie.key``,
  created once so that cookies survive a daemon upgrade). It is refused once the token's ``exp``
  has passed, but the browser keeps it for :data:`REMEMBER` longer: it then still says whose
  session (cached bundles, storage) this browser holds, for the next sign-in to compare.

Every refusal is an :class:`AuthError` carrying a stable ``reason`` (the JSON body's ``reason``
and the ``workspace_supervisor_auth_rejections`` label). Neither the token nor the cookie ever
appears in an error message or a log line.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import unquote_plus

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from supervisor.config import AuthConfig
from supervisor.errors import ConfigError, InvalidUserId, SupervisorError
from supervisor.metrics import AUTH_REJECTIONS
from supervisor.paths import validate_user_id

log = logging.getLogger(__name__)

#: Every reason a request is refused for lack of a valid identity (answered 401).
REASONS = (
    "missing_token",
    "malformed_token",
    "expired",
    "not_yet_valid",
    "bad_signature",
    "bad_issuer",
    "bad_audience",
    "bad_algorithm",
    "unknown_kid",
    "invalid_claims",
    "invalid_user_id",
    "bad_cookie",
    "session_expired",
)
for _reason in REASONS:
    AUTH_REJECTIONS.labels(reason=_reason)

MAX_TOKEN_LENGTH = 16 * 1024
MAX_SID_LENGTH = 256
MIN_SECRET_BYTES = 32
COOKIE_VERSION = "1"
_COOKIE_CONTEXT = b"wsup-session-v1."
_RSA_FAMILY = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_TOKEN_CACHE_SIZE = 4096
#: How long after its token's ``exp`` a browser keeps the (by then refused) session cookie.
REMEMBER = 30 * 86400


class AuthError(SupervisorError):
    """The request carries no valid identity: answered 401 with ``reason``."""

    reason = "unauthorized"
    hint = "sign in again to get a fresh token"


@dataclass(frozen=True)
class Identity:
    """Who a request is from, once authenticated."""

    user: str
    tier: str
    sid: str
    expires: float  # unix time: the token's exp


# ---- keys ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerificationKey:
    """One key and the algorithms it may verify (configured ones that fit its type)."""

    kid: str | None
    key: Any  # a cryptography public key, or the HS256 secret bytes
    algorithms: frozenset[str]


def _algorithms_for(key: Any) -> frozenset[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_FAMILY
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_BY_CURVE.get(key.curve.name)
        return frozenset({alg}) if alg else frozenset()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


def _check_strength(key: Any, where: str) -> None:
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise ConfigError(f"{where}: RSA key of {key.key_size} bits; at least 2048 are required")


def load_pem_key(path: Path, configured: Iterable[str]) -> VerificationKey:
    """The PEM public key at ``path``; raises ConfigError if unreadable or no configured algorithm fits."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read auth.public_key_file {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"auth.public_key_file {path} is not a PEM public key") from None
    _check_strength(key, f"auth.public_key_file {path}")
    algorithms = _algorithms_for(key) & frozenset(configured)
    if not algorithms:
        raise ConfigError(
            f"auth.public_key_file {path} is a {type(key).__name__} key, which none of auth.algorithms "
            f"({', '.join(configured)}) can verify"
        )
    return VerificationKey(kid=None, key=key, algorithms=algorithms)


def parse_jwks(text: str, configured: Iterable[str], where: str = "JWKS") -> list[VerificationKey]:
    """The signing keys of a JWKS document. Keys that are symmetric, not for signatures, or fit
    no configured algorithm are skipped with a warning; a document that is not a JWKS raises
    ValueError."""
    allowed = frozenset(configured)
    document = json.loads(text)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (expected an object with a 'keys' list)")
    keys: list[VerificationKey] = []
    for index, jwk in enumerate(document["keys"]):
        if not isinstance(jwk, dict):
            log.warning("%s key #%d is not an object: skipped", where, index)
            continue
        kid = jwk.get("kid")
        name = f"{where} key #{index} (kid {kid!r})"
        if jwk.get("use", "sig") != "sig":
            continue
        if jwk.get("kty") == "oct":
            log.warning("%s is a symmetric key: skipped (HS* keys never come from a JWKS)", name)
            continue
        try:
            parsed = jwt.PyJWK(jwk)
        except jwt.PyJWTError as exc:
            log.warning("%s cannot be used: %s", name, exc)
            continue
        family = _algorithms_for(parsed.key)
        algorithms = family & ({jwk["alg"]} if isinstance(jwk.get("alg"), str) else family) & allowed
        if not algorithms:
            log.warning("%s fits none of auth.algorithms: skipped", name)
            continue
        try:
            _check_strength(parsed.key, name)
        except ConfigError as exc:
            log.warning("%s: skipped", exc.message)
            continue
        keys.append(VerificationKey(kid=kid if isinstance(kid, str) else None, key=parsed.key, algorithms=algorithms))
    return keys


class KeyStore:
    """Where verification keys come from: a PEM key, an HS256 secret, or a JWKS file that is
    re-read whenever its inode, size or mtime changes (a bad new version keeps the old keys)."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.generation = 0  # bumped whenever the key set changes
        self._keys: list[VerificationKey] = []
        self._jwks_stamp: tuple[int, int, int] | None = None
        self._jwks_bad_stamp: tuple[int, int, int] | None = None
        if config.hs256_secret_file is not None:
            secret = read_secret(config.hs256_secret_file, "auth.hs256_secret_file")
            self._keys = [VerificationKey(kid=None, key=secret, algorithms=frozenset({"HS256"}))]
            log.warning("front door accepts HS256 tokens signed with %s: development only", config.hs256_secret_file)
        elif config.public_key_file is not None:
            self._keys = [load_pem_key(config.public_key_file, config.algorithms)]
        elif config.jwks_file is not None:
            if not self.refresh():
                raise ConfigError(f"cannot load auth.jwks_file {config.jwks_file}; see the log")
        else:
            raise ConfigError("no key configured: set auth.public_key_file, auth.jwks_file or auth.hs256_secret_file")

    @property
    def keyed_by_kid(self) -> bool:
        return self.config.jwks_file is not None

    @property
    def accepted(self) -> frozenset[str]:
        """Every algorithm some current key may verify."""
        return frozenset().union(*(k.algorithms for k in self._keys)) if self._keys else frozenset()

    def refresh(self) -> bool:
        """Re-read the JWKS file if it changed; False if it could not be loaded (old keys kept)."""
        path = self.config.jwks_file
        if path is None:
            return True
        try:
            st = os.stat(path)
        except OSError as exc:
            if self._jwks_bad_stamp != (0, 0, exc.errno or 0):
                log.warning("cannot stat auth.jwks_file %s: %s; keeping %d key(s)", path, exc.strerror, len(self._keys))
                self._jwks_bad_stamp = (0, 0, exc.errno or 0)
            return False
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._jwks_stamp:
            return True
        if stamp == self._jwks_bad_stamp:
            return False
        try:
            keys = parse_jwks(path.read_text(), self.config.algorithms, f"auth.jwks_file {path}")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            log.warning("cannot load auth.jwks_file %s: %s; keeping %d key(s)", path, exc, len(self._keys))
            self._jwks_bad_stamp = stamp
            return False
        self._keys = keys
        self._jwks_stamp = stamp
        self._jwks_bad_stamp = None
        self.generation += 1
        log.info("auth.jwks_file %s loaded: %d key(s), kids %s", path, len(keys), [k.kid for k in keys])
        return True

    def find(self, kid: object) -> VerificationKey:
        """The key for a token's ``kid`` header; raises AuthError(unknown_kid)."""
        if not self.keyed_by_kid:
            return self._keys[0]
        if kid is None:
            if len(self._keys) == 1:
                return self._keys[0]
            raise AuthError(f"the token names no key (kid) and the JWKS has {len(self._keys)}", reason="unknown_kid")
        for key in self._keys:
            if key.kid == kid:
                return key
        raise AuthError("the token's key id (kid) is not in the JWKS", reason="unknown_kid")


def read_secret(path: Path, what: str) -> bytes:
    """A secret from a file (trailing whitespace removed); at least 32 bytes."""
    try:
        secret = path.read_bytes().rstrip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"{what} {path} holds {len(secret)} bytes; at least {MIN_SECRET_BYTES} are required")
    return secret


# ---- tokens ----------------------------------------------------------------------------------


class TokenVerifier:
    """Verifies JWTs into :class:`Identity`; remembers tokens it accepted until they expire."""

    def __init__(self, config: AuthConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.keys = KeyStore(config)
        self.clock = clock
        self._cache: dict[str, Identity] = {}
        self._cache_generation = self.keys.generation
        if not config.issuer:
            log.warning("auth.issuer is empty: tokens from any issuer are accepted")

    def verify(self, token: str) -> Identity:
        """The identity in ``token``; raises :class:`AuthError` with the reason otherwise."""
        self.keys.refresh()
        if self.keys.generation != self._cache_generation:
            self._cache.clear()
            self._cache_generation = self.keys.generation
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires > self.clock() - self.config.leeway:
                return cached
            del self._cache[token]
        identity = self._verify(token)
        if len(self._cache) >= _TOKEN_CACHE_SIZE:
            for old in list(self._cache)[: _TOKEN_CACHE_SIZE // 2]:
                del self._cache[old]
        self._cache[token] = identity
        return identity

    def known(self, token: str) -> bool:
        """True if ``token`` was verified before and has not expired (no signature check needed)."""
        cached = self._cache.get(token)
        return cached is not None and self.keys.generation == self._cache_generation and cached.expires > self.clock() - self.config.leeway

    def _verify(self, token: str) -> Identity:
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("the token is too long", reason="malformed_token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("the token is not a JWT", reason="malformed_token") from None
        alg = header.get("alg")
        configured = frozenset(self.config.algorithms) if self.config.hs256_secret_file is None else frozenset({"HS256"})
        if not isinstance(alg, str) or alg not in configured or alg not in self.keys.accepted:
            raise AuthError(f"algorithm {str(alg)[:16]!r} is not accepted", reason="bad_algorithm")
        key = self.keys.find(header.get("kid"))
        if alg not in key.algorithms:
            raise AuthError(f"algorithm {alg!r} does not fit the key that verifies it", reason="bad_algorithm")
        required = ["exp", "sub", "tier", "sid"]
        if self.config.issuer:
            required.append("iss")
        if self.config.audience:
            required.append("aud")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=sorted(key.algorithms & configured),
                audience=self.config.audience or None,
                issuer=self.config.issuer or None,
                leeway=self.config.leeway,
                options={"require": required, "verify_aud": bool(self.config.audience), "enforce_minimum_key_length": True},
            )
        except jwt.PyJWTError as exc:
            raise _from_pyjwt(exc) from None
        return identity_from_claims(claims)


def _from_pyjwt(exc: jwt.PyJWTError) -> AuthError:
    if isinstance(exc, jwt.InvalidSignatureError):
        return AuthError("the token's signature does not verify", reason="bad_signature")
    if isinstance(exc, jwt.ExpiredSignatureError):
        return AuthError("the token has expired", reason="expired")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return AuthError("the token is not valid yet (nbf/iat in the future)", reason="not_yet_valid")
    if isinstance(exc, jwt.InvalidIssuerError):
        return AuthError("the token's issuer (iss) is not the configured one", reason="bad_issuer")
    if isinstance(exc, jwt.InvalidAudienceError):
        return AuthError("the token's audience (aud) is not this service", reason="bad_audience")
    if isinstance(exc, jwt.MissingRequiredClaimError):
        reason = {"iss": "bad_issuer", "aud": "bad_audience"}.get(exc.claim, "invalid_claims")
        return AuthError(f"the token lacks the required claim {exc.claim!r}", reason=reason)
    if isinstance(exc, (jwt.InvalidAlgorithmError, jwt.InvalidKeyError)):
        return AuthError("the token's algorithm is not accepted for this key", reason="bad_algorithm")
    if isinstance(exc, jwt.DecodeError) and "claim" not in str(exc):
        return AuthError("the token is not a well-formed JWT", reason="malformed_token")
    return AuthError(f"the token's claims are invalid: {type(exc).__name__}", reason="invalid_claims")


def identity_from_claims(claims: dict[str, Any]) -> Identity:
    """Check the claims the front door needs (signature and times already verified)."""
    try:
        user = validate_user_id(claims.get("sub"))
    except InvalidUserId as exc:
        raise AuthError(f"the token's subject is not a valid user id: {exc.message}", reason="invalid_user_id") from None
    tier, sid, exp = claims.get("tier"), claims.get("sid"), claims.get("exp")
    if not isinstance(tier, str) or not tier or len(tier) > 64:
        raise AuthError("the token's tier claim must be a non-empty string", reason="invalid_claims")
    if not isinstance(sid, str) or not sid or len(sid) > MAX_SID_LENGTH:
        raise AuthError(f"the token's sid claim must be a string of 1-{MAX_SID_LENGTH} characters", reason="invalid_claims")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        raise AuthError("the token's exp claim must be a number", reason="invalid_claims")
    return Identity(user=user, tier=tier, sid=sid, expires=float(exp))


# ---- session cookie --------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class CookieSigner:
    """Makes and checks the front door's session cookie (see the module docstring)."""

    def __init__(self, secret: bytes, config: AuthConfig, *, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"the cookie secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        self.name = config.cookie_name
        self.secure = config.cookie_secure
        self.samesite = config.cookie_samesite
        self.clock = clock

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, _COOKIE_CONTEXT + payload.encode(), hashlib.sha256).digest())

    def encode(self, identity: Identity) -> str:
        body = json.dumps(
            {"u": identity.user, "t": identity.tier, "s": identity.sid, "e": int(identity.expires)},
            separators=(",", ":"),
        )
        payload = _b64(body.encode())
        return f"{COOKIE_VERSION}.{payload}.{self._mac(payload)}"

    def decode(self, value: str, *, allow_expired: bool = False) -> Identity:
        """The identity in a cookie value; raises AuthError(bad_cookie | session_expired)
        (not session_expired with ``allow_expired``: whose session a browser last held)."""
        version, _, rest = value.partition(".")
        payload, _, mac = rest.partition(".")
        if version != COOKIE_VERSION or not payload or not mac or len(value) > 4096:
            raise AuthError("the session cookie is not one of ours", reason="bad_cookie")
        if not hmac.compare_digest(self._mac(payload), mac):
            raise AuthError("the session cookie's signature does not verify", reason="bad_cookie")
        try:
            data = json.loads(_unb64(payload))
            identity = Identity(user=validate_user_id(data["u"]), tier=str(data["t"]), sid=str(data["s"]), expires=float(data["e"]))
        except (ValueError, KeyError, TypeError, binascii.Error, SupervisorError):
            raise AuthError("the session cookie is damaged", reason="bad_cookie") from None
        if identity.expires <= self.clock() and not allow_expired:
            raise AuthError("the session has expired", reason="session_expired")
        return identity

    def set_cookie(self, identity: Identity) -> bytes:
        """A ``Set-Cookie`` value carrying ``identity`` (accepted until its token expires, kept
        by the browser :data:`REMEMBER` longer)."""
        max_age = max(0, int(identity.expires - self.clock())) + REMEMBER
        parts = [f"{self.name}={self.encode(identity)}", "Path=/", f"Max-Age={max_age}", "HttpOnly", f"SameSite={self.samesite}"]
        if self.secure:
            parts.append("Secure")
        return "; ".join(parts).encode()


def load_cookie_secret(path: Path | None, state_dir: Path) -> bytes:
    """The cookie HMAC key: ``path`` if configured, else ``<state_dir>/cookie.key`` (made once, 0600)."""
    if path is not None:
        return read_secret(path, "auth.cookie_secret_file")
    default = Path(state_dir) / "cookie.key"
    default.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(default, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        st = os.stat(default, follow_symlinks=False)
        if st.st_mode & 0o077:
            os.chmod(default, 0o600)
        return read_secret(default, "cookie key")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{default} is a symlink; refusing to use it as the cookie key") from None
        raise
    secret = secrets.token_hex(32).encode()
    try:
        os.write(fd, secret + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("created the session cookie key %s", default)
    return secret


# ---- where credentials come from ---------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """What a request presents. ``target`` is the request target with any ``token`` parameter removed."""

    bearer: str | None
    query_tokens: tuple[str, ...]
    cookies: tuple[str, ...]  # every value of our cookie (a browser may hold several: refused)
    target: bytes


def split_token_param(target: bytes) -> tuple[bytes, list[str]]:
    """``target`` without its ``token=`` query parameters, and their (decoded) values.

    Other parameters keep their exact bytes and order."""
    path, sep, query = target.partition(b"?")
    if not sep:
        return target, []
    kept: list[bytes] = []
    tokens: list[str] = []
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if unquote_plus(name.decode("latin-1")) == "token":
            tokens.append(unquote_plus(value.decode("latin-1")))
        else:
            kept.append(part)
    if not tokens:
        return target, []
    return (path + b"?" + b"&".join(kept) if kept else path), tokens


def cookie_values(headers: Iterable[tuple[bytes, bytes]], name: str) -> list[str]:
    """Every value of the cookie ``name`` in the request's Cookie headers."""
    wanted = name.encode()
    found: list[str] = []
    for header, value in headers:
        if header != b"cookie":
            continue
        for pair in value.split(b";"):
            key, sep, val = pair.strip().partition(b"=")
            if sep and key == wanted:
                found.append(val.strip().strip(b'"').decode("latin-1"))
    return found


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for header, value in headers:
        if header == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip().decode("latin-1")
    return None


def credentials(headers: Iterable[tuple[bytes, bytes]], target: bytes, cookie_name: str) -> Credentials:
    headers = list(headers)
    stripped, tokens = split_token_param(target)
    return Credentials(
        bearer=bearer_token(headers),
        query_tokens=tuple(tokens),
        cookies=tuple(cookie_values(headers, cookie_name)),
        target=stripped,
    )


class Authenticator:
    """Turns a request's credentials into an :class:`Identity`: Bearer, then ``?token=``, then cookie."""

    def __init__(self, tokens: TokenVerifier, cookies: CookieSigner) -> None:
        self.tokens = tokens
        self.cookies = cookies

    @classmethod
    def from_config(cls, config: AuthConfig, state_dir: Path) -> Authenticator:
        return cls(TokenVerifier(config), CookieSigner(load_cookie_secret(config.cookie_secret_file, state_dir), config))

    def authenticate(self, creds: Credentials) -> tuple[Identity, str]:
        """The identity and where it came from (``bearer``, ``query`` or ``cookie``).

        Raises :class:`AuthError`. Two different session cookies (one may have been planted from
        a sibling domain) are refused rather than guessed between; a fresh ``?token=`` replaces them."""
        if creds.bearer is not None:
            return self.tokens.verify(creds.bearer), "bearer"
        if creds.query_tokens:
            if len(creds.query_tokens) > 1:
                raise AuthError("the request carries more than one token parameter", reason="malformed_token")
            return self.tokens.verify(creds.query_tokens[0]), "query"
        if creds.cookies:
            if len(set(creds.cookies)) > 1:
                raise AuthError(
                    "the request carries two different session cookies", reason="bad_cookie",
                    hint="clear this site's cookies and sign in again",
                )
            return self.cookies.decode(creds.cookies[0]), "cookie"
        raise AuthError("no token: sign in through the login page", reason="missing_token")

    def cookie_users(self, creds: Credentials) -> set[str]:
        """Every user whose session cookie (ours, expired or not) this browser holds."""
        users = set()
        for value in creds.cookies:
            try:
                users.add(self.cookies.decode(value, allow_expired=True).user)
            except AuthError:
                pass
        return users
