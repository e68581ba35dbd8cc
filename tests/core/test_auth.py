"""Tests for relay.core.auth: token verification, refusal reasons and channel permissions."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from relay.core.auth import (
    ANONYMOUS,
    MAX_TOKEN_LENGTH,
    Identity,
    Permissions,
    TokenVerifier,
    load_jwks,
    load_public_key,
    verify_refresh,
)
from relay.errors import PeerError, Unauthorized

NOW = 1_800_000_000.0
SECRET = b"s" * 32
OTHER_SECRET = b"t" * 32


def _pem(private: Any) -> bytes:
    return private.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "exp": NOW + 60}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def hs(**extra: Any) -> str:
    return jwt.encode(claims(**extra), SECRET, algorithm="HS256")


def b64(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def hmac_signed(header: dict[str, Any], key: bytes = SECRET) -> str:
    """A token with any header, signed with HMAC-SHA256 by hand (as an attacker would)."""
    signing_input = f"{b64(header)}.{b64(claims())}"
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"


def reason(verifier: TokenVerifier, token: str, now: float = NOW) -> str:
    with pytest.raises(Unauthorized) as info:
        verifier.verify(token, now)
    assert info.value.code == "unauthorized"
    assert not token or token not in info.value.message  # never echo a token
    return info.value.reason


# --------------------------------------------------------------------------- HS256


def test_valid_hs256_token_gives_identity_and_permissions() -> None:
    v = TokenVerifier(secret=SECRET)
    identity = v.verify(hs(channels=["chat.*"], publish=["chat.lobby"]), NOW)
    assert identity == Identity("alice", NOW + 60, Permissions(("chat.*",), ("chat.lobby",)))
    assert v.algorithms == ("HS256", "HS384", "HS512")


@pytest.mark.parametrize(
    ("token_of", "expected"),
    [
        (lambda: "", "missing"),
        (lambda: "not-a-jwt", "malformed"),
        (lambda: "a.b.c", "malformed"),
        (lambda: "x" * (MAX_TOKEN_LENGTH + 1), "malformed"),
        (lambda: jwt.encode(claims(), OTHER_SECRET, algorithm="HS256"), "bad_signature"),
        (lambda: hs()[:-4] + ("AAAA" if not hs().endswith("AAAA") else "BBBB"), "bad_signature"),
        (lambda: hs(exp=NOW - 1), "expired"),
        (lambda: hs(exp=NOW), "expired"),
        (lambda: hs(nbf=NOW + 30), "not_yet_valid"),
        (lambda: hs(exp=None), "missing_claim"),
        (lambda: hs(sub=None), "missing_claim"),
        (lambda: hs(sub=""), "missing_claim"),
        (lambda: hs(aud="other-service"), "wrong_audience"),
        (lambda: hs(exp="tomorrow"), "bad_claims"),
        (lambda: hs(channels="chat.*"), "bad_claims"),
        (lambda: hs(channels=[""]), "bad_claims"),
        (lambda: hs(publish=[1, 2]), "bad_claims"),
        (lambda: hs(channels=["c"] * 257), "bad_claims"),
        (lambda: hs(sub=42), "bad_claims"),
        (lambda: f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}.", "alg_none"),
        (lambda: f"{b64({'alg': 'None'})}.{b64(claims())}.", "alg_none"),
        (lambda: f"{b64({'typ': 'JWT'})}.{b64(claims())}.sig", "malformed"),
        (lambda: hmac_signed({"alg": "XX999"}), "algorithm_not_allowed"),
    ],
    ids=[
        "empty", "garbage", "three-dots", "too-long", "other-secret", "tampered-signature",
        "expired", "expires-now", "not-before", "no-exp", "no-sub", "empty-sub", "audience",
        "exp-not-number", "channels-not-list", "empty-pattern", "publish-not-strings",
        "too-many-patterns", "sub-not-string", "alg-none", "alg-None", "no-alg", "unknown-alg",
    ],
)
def test_hs256_refusals_name_the_reason(token_of: Any, expected: str) -> None:
    assert reason(TokenVerifier(secret=SECRET), token_of()) == expected


def test_leeway_tolerates_small_clock_skew() -> None:
    v = TokenVerifier(secret=SECRET, leeway=5)
    assert v.verify(hs(exp=NOW - 3), NOW).user == "alice"
    assert v.verify(hs(nbf=NOW + 3), NOW).user == "alice"
    assert reason(v, hs(exp=NOW - 6)) == "expired"


def test_audience_and_issuer_when_configured() -> None:
    v = TokenVerifier(secret=SECRET, audience="relay", issuer="https://auth.example.com")
    good = hs(aud="relay", iss="https://auth.example.com")
    assert v.verify(good, NOW).user == "alice"
    assert reason(v, hs(aud="other", iss="https://auth.example.com")) == "wrong_audience"
    assert reason(v, hs(iss="https://auth.example.com")) == "missing_claim"  # no aud at all
    assert reason(v, hs(aud="relay", iss="https://evil.example.com")) == "wrong_issuer"


def test_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        TokenVerifier(secret=b"short")


def test_no_key_is_refused() -> None:
    with pytest.raises(ValueError, match="no key"):
        TokenVerifier()


# --------------------------------------------------------------------------- RS256, ES256, JWKS


def test_rs256_with_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    v = TokenVerifier(public_key=_pem(rsa_key))
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert v.verify(token, NOW).user == "alice"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert reason(v, jwt.encode(claims(), other, algorithm="RS256")) == "bad_signature"


def test_hs_rs_confusion_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    """A token "signed" with HMAC keyed by the server's public key must not verify."""
    public_pem = _pem(rsa_key)
    v = TokenVerifier(public_key=public_pem)
    forged = hmac_signed({"alg": "HS256", "typ": "JWT"}, key=public_pem)
    assert reason(v, forged) == "algorithm_not_allowed"


def test_es256_with_public_key(ec_key: ec.EllipticCurvePrivateKey) -> None:
    v = TokenVerifier(public_key=_pem(ec_key))
    assert v.algorithms == ("ES256",)
    assert v.verify(jwt.encode(claims(), ec_key, algorithm="ES256"), NOW).user == "alice"
    assert reason(v, hs()) == "algorithm_not_allowed"


def test_secret_and_public_key_each_verify_their_own_family(rsa_key: rsa.RSAPrivateKey) -> None:
    v = TokenVerifier(secret=SECRET, public_key=_pem(rsa_key))
    assert v.verify(hs(), NOW).user == "alice"
    assert v.verify(jwt.encode(claims(), rsa_key, algorithm="RS256"), NOW).user == "alice"
    # An RS256 header with an HMAC signature is checked as RSA, so it fails.
    assert reason(v, hmac_signed({"alg": "RS256"})) == "bad_signature"


def _jwks(*entries: tuple[Any, str, str | None]) -> bytes:
    keys = []
    for private, kid, alg in entries:
        jwk_json = jwt.algorithms.get_default_algorithms()[alg or "RS256"].to_jwk(private.public_key(), as_dict=True)
        jwk_json["kid"] = kid
        if alg is not None:
            jwk_json["alg"] = alg
        keys.append(jwk_json)
    return json.dumps({"keys": keys}).encode()


def test_jwks_picks_the_key_by_kid(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    v = TokenVerifier(jwks=_jwks((rsa_key, "r1", "RS256"), (ec_key, "e1", "ES256")))
    rs = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "r1"})
    es = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "e1"})
    assert v.verify(rs, NOW).user == "alice"
    assert v.verify(es, NOW).user == "alice"
    assert reason(v, jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "nope"})) == "unknown_key"
    # the right algorithm but the other key's kid: that key cannot verify it
    assert reason(v, jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "e1"})) == "unknown_key"
    assert reason(v, hs()) == "algorithm_not_allowed"


def test_jwks_without_kid_uses_the_only_candidate(rsa_key: rsa.RSAPrivateKey) -> None:
    v = TokenVerifier(jwks=_jwks((rsa_key, "r1", None)))
    assert v.verify(jwt.encode(claims(), rsa_key, algorithm="RS256"), NOW).user == "alice"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b"not json", "not valid JSON"),
        (b"{}", "at least one key"),
        (b'{"keys": []}', "at least one key"),
        (b'{"keys": [1]}', "not an object"),
        (b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "symmetric"),
        (b'{"keys": [{"kty": "RSA", "n": "x"}]}', "not a usable key"),
    ],
    ids=["not-json", "no-keys", "empty-keys", "not-object", "oct", "broken-rsa"],
)
def test_bad_jwks_documents(text: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_jwks(text)


def test_jwks_with_private_key_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    private = jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key, as_dict=True)
    with pytest.raises(ValueError, match="private key"):
        load_jwks(json.dumps({"keys": [private]}).encode())


def test_bad_public_keys() -> None:
    with pytest.raises(ValueError, match="not a PEM public key"):
        load_public_key(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="at least 2048"):
        load_public_key(_pem(small))


# --------------------------------------------------------------------------- refresh


def test_refresh_needs_the_same_user() -> None:
    v = TokenVerifier(secret=SECRET)
    current = v.verify(hs(), NOW)
    renewed = verify_refresh(v, current, hs(exp=NOW + 600), NOW + 30)
    assert renewed.expires == NOW + 600
    with pytest.raises(Unauthorized) as info:
        verify_refresh(v, current, hs(sub="mallory", exp=NOW + 600), NOW)
    assert info.value.reason == "wrong_user"
    with pytest.raises(Unauthorized) as info:
        verify_refresh(v, current, hs(exp=NOW - 1), NOW)
    assert info.value.reason == "expired"


def test_unauthorized_is_a_peer_error_with_a_ref() -> None:
    exc = Unauthorized("no", reason="missing", ref=7)
    assert isinstance(exc, PeerError) and exc.ref == 7 and exc.code == "unauthorized"


# --------------------------------------------------------------------------- permissions


@pytest.mark.parametrize(
    ("permissions", "channel", "subscribe", "publish"),
    [
        (Permissions(), "anything", True, True),
        (Permissions((), ()), "anything", False, False),
        (Permissions(("chat.*",), ("chat.lobby",)), "chat.lobby", True, True),
        (Permissions(("chat.*",), ("chat.lobby",)), "chat.room.1", True, False),
        (Permissions(("chat.*",), ("chat.lobby",)), "chat", False, False),
        (Permissions(("chat.*",), None), "prices.x", False, True),
        (Permissions(("user.42", "user.42.*"),), "user.420", False, True),
        (Permissions(("Chat.*",),), "chat.x", False, True),
        (Permissions(("room.[ab]",),), "room.b", True, True),
        (Permissions(("room.[ab]",),), "room.c", False, True),
        (Permissions(("room.?",),), "room.1", True, True),
        (Permissions(("a.*", "b.*"),), "b.1", True, True),
    ],
    ids=[
        "unrestricted", "empty-lists", "publish-match", "publish-other", "prefix-only",
        "no-publish-claim", "no-prefix-confusion", "case-sensitive", "set-in", "set-out",
        "one-char", "second-pattern",
    ],
)
def test_permissions(permissions: Permissions, channel: str, subscribe: bool, publish: bool) -> None:
    assert permissions.may_subscribe(channel) is subscribe
    assert permissions.may_publish(channel) is publish


def test_anonymous_may_do_anything() -> None:
    assert ANONYMOUS.user == "" and ANONYMOUS.expires is None
    assert ANONYMOUS.permissions.may_subscribe("x") and ANONYMOUS.permissions.may_publish("x")
