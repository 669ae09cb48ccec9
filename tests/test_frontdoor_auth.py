"""Front-door authentication with real keys generated here (cryptography) and real tokens (PyJWT).

Every rejection reason, ``alg: none``, algorithm confusion (HS256 "signed" with the RSA public key),
wrong and missing ``kid``, JWKS reload when the file changes, invalid user ids in ``sub``, and the
session cookie (signature, expiry, attributes). No daemon, no network.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from supervisor import config as config_module
from supervisor.config import AuthConfig
from supervisor.errors import ConfigError
from supervisor.frontdoor.auth import (
    REMEMBER,
    Authenticator,
    AuthError,
    CookieSigner,
    Identity,
    TokenVerifier,
    credentials,
    load_cookie_secret,
    split_token_param,
)
from supervisor.metrics import AUTH_REJECTIONS
from tests.frontdoor_client import AUDIENCE, ISSUER, mint

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
SECRET = b"a-development-secret-of-enough-length!!"


def pem(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def jwk(key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()) if isinstance(key, rsa.RSAPrivateKey)
                                      else jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    data.update(kid=kid, use="sig", **extra)
    return data


def auth_config(**values: Any) -> AuthConfig:
    raw = {"issuer": ISSUER, "audience": AUDIENCE, **{k: str(v) if isinstance(v, Path) else v for k, v in values.items()}}
    return config_module.from_dict({"auth": raw}).auth


@pytest.fixture
def pem_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwt.pem"
    path.write_bytes(pem(RSA_KEY))
    return path


@pytest.fixture
def verifier(pem_file: Path) -> TokenVerifier:
    return TokenVerifier(auth_config(public_key_file=pem_file))


def reason_of(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthError) as caught:
        verifier.verify(token)
    if len(token) > 8:
        assert token not in str(caught.value) and token not in caught.value.hint
    return caught.value.reason


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], sign: Any = None) -> str:
    """A token built by hand (what an attacker can send regardless of what PyJWT would sign)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64(signature)}"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    payload = {"sub": "alice", "tier": "free", "sid": "s1", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600}
    payload.update(overrides)
    return payload


# ---- accepted tokens ---------------------------------------------------------------------------


def test_rs256_token_against_a_pem_key(verifier: TokenVerifier) -> None:
    identity = verifier.verify(mint(RSA_KEY, "alice", alg="RS256", tier="pro", sid="tab-1"))
    assert (identity.user, identity.tier, identity.sid) == ("alice", "pro", "tab-1")
    assert identity.expires > time.time()


def test_es256_token_against_an_ec_pem_key(tmp_path: Path) -> None:
    path = tmp_path / "ec.pem"
    path.write_bytes(pem(EC_KEY))
    verifier = TokenVerifier(auth_config(public_key_file=path))
    assert verifier.verify(mint(EC_KEY, "bob", alg="ES256")).user == "bob"
    assert reason_of(verifier, mint(RSA_KEY, "bob", alg="RS256")) == "bad_algorithm"  # RS256 does not fit an EC key


def test_leeway_accepts_slightly_expired_and_slightly_early_tokens(verifier: TokenVerifier) -> None:
    now = int(time.time())
    assert verifier.verify(mint(RSA_KEY, alg="RS256", exp=now - 10)).user == "alice"  # leeway 30s
    assert verifier.verify(mint(RSA_KEY, alg="RS256", nbf=now + 10)).user == "alice"


# ---- every rejection reason -----------------------------------------------------------------------


def test_missing_token(tmp_path: Path) -> None:
    auth = Authenticator(TokenVerifier(auth_config(hs256_secret_file=_secret_file(tmp_path))), CookieSigner(SECRET, auth_config()))
    with pytest.raises(AuthError) as caught:
        auth.authenticate(credentials([(b"host", b"x")], b"/", "wsup_session"))
    assert caught.value.reason == "missing_token"


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "a.b", "!!!.???.###", b64(b'{"alg":"RS256"') + ".e30.x", "x" * 20000])
def test_malformed_token(verifier: TokenVerifier, token: str) -> None:
    assert reason_of(verifier, token) == "malformed_token"


def test_malformed_payload(verifier: TokenVerifier) -> None:
    signing_input = f"{b64(json.dumps({'alg': 'RS256', 'typ': 'JWT'}).encode())}.{b64(b'not json')}"
    signature = RSA_KEY.sign(signing_input.encode(), *_pkcs1())
    assert reason_of(verifier, f"{signing_input}.{b64(signature)}") == "malformed_token"


def _pkcs1() -> tuple[Any, Any]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    return padding.PKCS1v15(), hashes.SHA256()


def test_expired(verifier: TokenVerifier) -> None:
    assert reason_of(verifier, mint(RSA_KEY, alg="RS256", exp=int(time.time()) - 120)) == "expired"


def test_not_yet_valid(verifier: TokenVerifier) -> None:
    assert reason_of(verifier, mint(RSA_KEY, alg="RS256", nbf=int(time.time()) + 120)) == "not_yet_valid"
    assert reason_of(verifier, mint(RSA_KEY, alg="RS256", iat=int(time.time()) + 120)) == "not_yet_valid"


def test_bad_signature(verifier: TokenVerifier) -> None:
    assert reason_of(verifier, mint(OTHER_RSA_KEY, alg="RS256")) == "bad_signature"
    good = mint(RSA_KEY, alg="RS256")
    header, payload, signature = good.split(".")
    forged_payload = b64(json.dumps(claims(sub="mallory")).encode())
    assert reason_of(verifier, f"{header}.{forged_payload}.{signature}") == "bad_signature"


def test_bad_issuer(verifier: TokenVerifier) -> None:
    assert reason_of(verifier, mint(RSA_KEY, alg="RS256", iss="https://evil.example")) == "bad_issuer"
    assert reason_of(verifier, mint(RSA_KEY, alg="RS256", iss=None)) == "bad_issuer"


def test_bad_audience(verifier: TokenVerifier) -> None:
    assert reason_of(verifier, mint(RSA_KEY, alg="RS256", aud="billing")) == "bad_audience"
    assert reason_of(verifier, mint(RSA_KEY, alg="RS256", aud=None)) == "bad_audience"


def test_alg_none_is_refused(verifier: TokenVerifier) -> None:
    for alg in ("none", "None", "NONE"):
        assert reason_of(verifier, handmade({"alg": alg, "typ": "JWT"}, claims())) == "bad_algorithm"
    assert reason_of(verifier, handmade({"typ": "JWT"}, claims())) == "bad_algorithm"


def test_algorithm_confusion_hs256_signed_with_the_public_key_is_refused(verifier: TokenVerifier, pem_file: Path) -> None:
    public_pem = pem_file.read_bytes()
    for secret in (public_pem, public_pem.strip()):
        token = handmade({"alg": "HS256", "typ": "JWT"}, claims(),
                         lambda data, s=secret: hmac.new(s, data, hashlib.sha256).digest())
        assert reason_of(verifier, token) == "bad_algorithm"


def test_algorithms_outside_the_allow_list_are_refused(pem_file: Path) -> None:
    verifier = TokenVerifier(auth_config(public_key_file=pem_file, algorithms=["RS256"]))
    assert reason_of(verifier, mint(RSA_KEY, alg="RS384")) == "bad_algorithm"
    assert reason_of(verifier, mint(RSA_KEY, alg="PS256")) == "bad_algorithm"
    assert reason_of(verifier, mint(SECRET, alg="HS256")) == "bad_algorithm"


@pytest.mark.parametrize("missing", ["sub", "tier", "sid", "exp"])
def test_required_claims(verifier: TokenVerifier, missing: str) -> None:
    assert reason_of(verifier, mint(RSA_KEY, alg="RS256", **{missing: None})) == "invalid_claims"


@pytest.mark.parametrize("bad", [{"sid": 7}, {"sid": ""}, {"tier": ["pro"]}, {"tier": ""}, {"exp": "soon"}, {"sid": "x" * 300}])
def test_claims_of_the_wrong_type(verifier: TokenVerifier, bad: dict[str, Any]) -> None:
    assert reason_of(verifier, mint(RSA_KEY, alg="RS256", **bad)) == "invalid_claims"


@pytest.mark.parametrize("sub", ["Alice", "../bob", "a" * 64, "-x", "x-", "al ice", "root/..", "é"])
def test_invalid_user_id_in_sub(verifier: TokenVerifier, sub: str) -> None:
    assert reason_of(verifier, mint(RSA_KEY, alg="RS256", sub=sub)) == "invalid_user_id"


def test_sub_that_is_not_a_string(verifier: TokenVerifier) -> None:
    assert reason_of(verifier, mint(RSA_KEY, alg="RS256", sub=42)) in ("invalid_claims", "invalid_user_id")


# ---- JWKS: kid, rotation, reload --------------------------------------------------------------------


def write_jwks(path: Path, *keys: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": list(keys)}))
    os.replace(tmp, path)


def test_jwks_picks_the_key_by_kid(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, jwk(RSA_KEY, "k1"), jwk(EC_KEY, "k2"), {"kty": "oct", "k": b64(SECRET), "kid": "k3"})
    verifier = TokenVerifier(auth_config(jwks_file=path))
    assert verifier.verify(mint(RSA_KEY, "alice", alg="RS256", headers={"kid": "k1"})).user == "alice"
    assert verifier.verify(mint(EC_KEY, "bob", alg="ES256", headers={"kid": "k2"})).user == "bob"
    assert reason_of(verifier, mint(RSA_KEY, alg="RS256", headers={"kid": "nope"})) == "unknown_kid"
    assert reason_of(verifier, mint(RSA_KEY, alg="RS256")) == "unknown_kid"  # two keys, no kid: no guessing
    assert reason_of(verifier, mint(RSA_KEY, alg="RS256", headers={"kid": "k2"})) == "bad_algorithm"  # RS256 on the EC key
    assert reason_of(verifier, mint(OTHER_RSA_KEY, alg="RS256", headers={"kid": "k1"})) == "bad_signature"
    # The symmetric JWK was skipped: an HS256 token naming it is refused.
    assert reason_of(verifier, mint(SECRET, alg="HS256", headers={"kid": "k3"})) == "bad_algorithm"


def test_jwks_key_alg_member_limits_its_algorithms(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, jwk(RSA_KEY, "k1", alg="RS256"))
    verifier = TokenVerifier(auth_config(jwks_file=path, algorithms=["RS256", "RS512"]))
    assert verifier.verify(mint(RSA_KEY, alg="RS256")).user == "alice"  # one key: kid may be omitted
    assert reason_of(verifier, mint(RSA_KEY, alg="RS512")) == "bad_algorithm"


def test_jwks_is_reloaded_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, jwk(RSA_KEY, "old"))
    verifier = TokenVerifier(auth_config(jwks_file=path))
    old_token = mint(RSA_KEY, alg="RS256", headers={"kid": "old"})
    assert verifier.verify(old_token).user == "alice"
    new_token = mint(OTHER_RSA_KEY, "bob", alg="RS256", headers={"kid": "new"})
    assert reason_of(verifier, new_token) == "unknown_kid"

    write_jwks(path, jwk(RSA_KEY, "old"), jwk(OTHER_RSA_KEY, "new"))  # rotation: both published
    assert verifier.verify(new_token).user == "bob"
    assert verifier.verify(old_token).user == "alice"

    write_jwks(path, jwk(OTHER_RSA_KEY, "new"))  # the old key retired: even a remembered token fails
    assert reason_of(verifier, old_token) == "unknown_kid"
    assert verifier.verify(new_token).user == "bob"

    path.write_text('{"keys": [')  # a half-written file keeps the last good keys
    assert verifier.verify(new_token).user == "bob"
    path.unlink()
    assert verifier.verify(new_token).user == "bob"


def test_jwks_file_that_is_not_a_jwks_fails_at_start(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text("[]")
    with pytest.raises(ConfigError):
        TokenVerifier(auth_config(jwks_file=path))


# ---- HS256 development mode and configuration ---------------------------------------------------------


def _secret_file(where: Path, secret: bytes = SECRET) -> Path:
    path = where / f"secret-{len(secret)}"
    path.write_bytes(secret + b"\n")
    return path


def test_hs256_only_with_a_development_secret(tmp_path: Path) -> None:
    verifier = TokenVerifier(auth_config(hs256_secret_file=_secret_file(tmp_path)))
    assert verifier.verify(mint(SECRET, "carol")).user == "carol"
    assert reason_of(verifier, mint(RSA_KEY, alg="RS256")) == "bad_algorithm"
    assert reason_of(verifier, mint(SECRET * 2, alg="HS512")) == "bad_algorithm"
    assert reason_of(verifier, mint(b"another-secret-of-sufficient-length!!", alg="HS256")) == "bad_signature"


def test_short_hs256_secret_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 32"):
        TokenVerifier(auth_config(hs256_secret_file=_secret_file(tmp_path, b"short")))


@pytest.mark.parametrize("raw, message", [
    ({"algorithms": ["none"]}, "'none'"),
    ({"algorithms": ["HS256"]}, "hs256_secret_file"),
    ({"algorithms": []}, "at least one"),
    ({"hs256_secret_file": "/x", "public_key_file": "/y"}, "cannot be combined"),
    ({"public_key_file": "/x", "jwks_file": "/y"}, "only one"),
])
def test_auth_configuration_is_checked(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_module.from_dict({"auth": raw})


def test_weak_rsa_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weak.pem"
    path.write_bytes(pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    with pytest.raises(ConfigError, match="2048"):
        TokenVerifier(auth_config(public_key_file=path))


def test_key_that_fits_no_configured_algorithm(tmp_path: Path) -> None:
    path = tmp_path / "ec.pem"
    path.write_bytes(pem(EC_KEY))
    with pytest.raises(ConfigError, match="none of auth.algorithms"):
        TokenVerifier(auth_config(public_key_file=path, algorithms=["RS256"]))


# ---- session cookie ---------------------------------------------------------------------------------------


def test_cookie_round_trip_and_attributes() -> None:
    signer = CookieSigner(SECRET, auth_config(cookie_secure=True, cookie_samesite="Strict"))
    identity = Identity("alice", "pro", "tab-1", time.time() + 600)
    header = signer.set_cookie(identity).decode()
    name, _, rest = header.partition("=")
    value = rest.split(";", 1)[0]
    assert name == "wsup_session"
    attributes = [a.strip() for a in rest.split(";")[1:]]
    assert {"Path=/", "HttpOnly", "SameSite=Strict", "Secure"} <= set(attributes)
    max_age = int(next(a for a in attributes if a.startswith("Max-Age=")).split("=")[1])
    assert 595 + REMEMBER <= max_age <= 600 + REMEMBER  # kept past exp: whose data this browser holds
    decoded = signer.decode(value)
    assert (decoded.user, decoded.tier, decoded.sid, int(decoded.expires)) == ("alice", "pro", "tab-1", int(identity.expires))
    lax = CookieSigner(SECRET, auth_config(cookie_secure=False))
    assert "Secure" not in lax.set_cookie(identity).decode() and "SameSite=Lax" in lax.set_cookie(identity).decode()


def test_cookie_tampering_expiry_and_foreign_secrets() -> None:
    signer = CookieSigner(SECRET, auth_config())
    value = signer.encode(Identity("alice", "free", "s", time.time() + 600))
    version, payload, mac = value.split(".")
    forged = b64(json.dumps({"u": "bob", "t": "free", "s": "s", "e": int(time.time()) + 600}).encode())
    for bad in (f"{version}.{forged}.{mac}", f"2.{payload}.{mac}", f"{version}.{payload}.{mac[:-2]}AA", "garbage", "",
                CookieSigner(b"x" * 40, auth_config()).encode(Identity("alice", "free", "s", time.time() + 600))):
        with pytest.raises(AuthError) as caught:
            signer.decode(bad)
        assert caught.value.reason == "bad_cookie"
    with pytest.raises(AuthError) as caught:
        signer.decode(signer.encode(Identity("alice", "free", "s", time.time() - 1)))
    assert caught.value.reason == "session_expired"


def test_an_expired_cookie_still_names_whose_session_the_browser_held(tmp_path: Path) -> None:
    config = auth_config(hs256_secret_file=_secret_file(tmp_path))
    auth = Authenticator(TokenVerifier(config), CookieSigner(SECRET, config))
    expired = auth.cookies.encode(Identity("alice", "free", "s", time.time() - 3600))
    assert auth.cookies.decode(expired, allow_expired=True).user == "alice"
    live = auth.cookies.encode(Identity("bob", "free", "s", time.time() + 60))
    foreign = CookieSigner(b"x" * 40, config).encode(Identity("mallory", "free", "s", time.time() + 60))
    headers = [(b"cookie", f"wsup_session={expired}; wsup_session={live}; wsup_session={foreign}".encode())]
    assert auth.cookie_users(credentials(headers, b"/", "wsup_session")) == {"alice", "bob"}  # never an unsigned one
    assert auth.cookie_users(credentials([], b"/", "wsup_session")) == set()


def test_cookie_secret_is_created_once_private(tmp_path: Path) -> None:
    first = load_cookie_secret(None, tmp_path / "state")
    path = tmp_path / "state" / "cookie.key"
    assert path.stat().st_mode & 0o777 == 0o600 and len(first) >= 32
    assert load_cookie_secret(None, tmp_path / "state") == first
    with pytest.raises(ConfigError):
        load_cookie_secret(_secret_file(tmp_path, b"short"), tmp_path)


# ---- where the credentials come from ---------------------------------------------------------------


def test_token_parameter_is_split_off_and_other_parameters_kept() -> None:
    assert split_token_param(b"/a/b?x=1&token=abc.def.ghi&y=%20z") == (b"/a/b?x=1&y=%20z", ["abc.def.ghi"])
    assert split_token_param(b"/?token=t") == (b"/", ["t"])
    assert split_token_param(b"/?tokens=1&xtoken=2") == (b"/?tokens=1&xtoken=2", [])
    assert split_token_param(b"/plain") == (b"/plain", [])


def test_precedence_bearer_then_query_then_cookie(tmp_path: Path) -> None:
    config = auth_config(hs256_secret_file=_secret_file(tmp_path))
    auth = Authenticator(TokenVerifier(config), CookieSigner(SECRET, config))
    cookie = auth.cookies.encode(Identity("carol", "free", "c", time.time() + 60))
    bearer, query = mint(SECRET, "alice"), mint(SECRET, "bob")
    headers = [(b"authorization", b"Bearer " + bearer.encode()), (b"cookie", b"a=1; wsup_session=" + cookie.encode())]
    assert auth.authenticate(credentials(headers, b"/?token=" + query.encode(), "wsup_session")) == (auth.tokens.verify(bearer), "bearer")
    assert auth.authenticate(credentials(headers[1:], b"/?token=" + query.encode(), "wsup_session"))[0].user == "bob"
    assert auth.authenticate(credentials(headers[1:], b"/", "wsup_session"))[0].user == "carol"
    two = [(b"cookie", b"wsup_session=" + cookie.encode()), (b"cookie", b"wsup_session=other")]
    with pytest.raises(AuthError) as caught:
        auth.authenticate(credentials(two, b"/", "wsup_session"))
    assert caught.value.reason == "bad_cookie"
    with pytest.raises(AuthError) as caught:
        auth.authenticate(credentials([], b"/?token=a&token=b", "wsup_session"))
    assert caught.value.reason == "malformed_token"


def test_every_reason_has_a_metric_label() -> None:
    from supervisor.frontdoor.auth import REASONS

    exported = {s.labels["reason"] for m in AUTH_REJECTIONS.collect() for s in m.samples}
    assert set(REASONS) <= exported


def test_devtoken_mints_a_token_the_front_door_accepts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from supervisor.frontdoor import devtoken

    secret = _secret_file(tmp_path)
    config = tmp_path / "config.toml"
    config.write_text(f'[http]\nlisten = "0.0.0.0:8080"\n[auth]\nhs256_secret_file = "{secret}"\nissuer = "{ISSUER}"\n')
    assert devtoken.main(["--config", str(config), "alice", "--tier", "pro", "--ttl", "1h"]) == 0
    url = capsys.readouterr().out.strip()
    assert url.startswith("http://localhost:8080/?token=")
    identity = TokenVerifier(auth_config(hs256_secret_file=secret)).verify(url.split("token=", 1)[1])
    assert (identity.user, identity.tier) == ("alice", "pro") and 3500 < identity.expires - time.time() <= 3600
    assert devtoken.main(["--config", str(config), "Not Valid"]) == 2
    config.write_text("")
    assert devtoken.main(["--config", str(config), "alice"]) == 2
