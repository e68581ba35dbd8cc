"""Who a client is and what it may do: JWT verification and channel permissions.

:class:`TokenVerifier` checks a token against the keys the operator configured and
turns its claims into an :class:`Identity`: the user (``sub``), the expiry (``exp``)
and :class:`Permissions` (``channels`` and ``publish``, lists of channel-name globs).
A refused token raises :class:`~relay.errors.Unauthorized` whose ``reason`` says which
check failed; the shell puts it in the HTTP 401 body.

Which algorithm a key verifies is decided by the key, never by the token: a shared
secret verifies HS256/384/512 only, an RSA public key RS256/384/512, an EC key the
ES algorithm of its curve, a JWKS key its own ``alg``. So a token that claims
``alg: none``, or HS256 "signed" with the server's public key (HS/RS confusion), is
refused before any signature is computed.

Pure: it reads no file (the shell passes key bytes), never looks at the clock (``now``,
unix seconds, is an argument) and knows nothing of HTTP or trio.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ..errors import Unauthorized
from .presence import check_info

#: Tokens longer than this are refused without parsing (``malformed``).
MAX_TOKEN_LENGTH = 8192
#: Most patterns one ``channels`` or ``publish`` claim may list.
MAX_CLAIM_PATTERNS = 256
#: Longest pattern in a claim.
MAX_PATTERN_LENGTH = 1024
#: Shortest shared secret accepted for HS256 (RFC 7518 section 3.2: at least the hash size).
MIN_SECRET_BYTES = 32
#: Smallest RSA key accepted.
MIN_RSA_BITS = 2048

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512")
_EC_ALGORITHM_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


# --------------------------------------------------------------------------- permissions


@functools.lru_cache(maxsize=1024)
def _matcher(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """Return a function telling whether a channel name matches any of ``patterns``."""
    if not patterns:
        return lambda channel: False
    regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
    match = regex.match
    return lambda channel: match(channel) is not None


@dataclass(frozen=True)
class Permissions:
    """What a client may subscribe to and publish to, as channel-name globs.

    ``None`` means no restriction (the claim was absent, or no authentication is
    configured); an empty tuple allows nothing. Globs follow the ``[[channels]]``
    patterns: ``*`` matches any run of characters (dots included), ``?`` one
    character, ``[abc]`` one of a set; matching is case-sensitive.
    """

    subscribe: tuple[str, ...] | None = None
    publish: tuple[str, ...] | None = None

    def may_subscribe(self, channel: str) -> bool:
        """Return whether ``channel`` may be subscribed to."""
        return self.subscribe is None or _matcher(self.subscribe)(channel)

    def may_publish(self, channel: str) -> bool:
        """Return whether a client may publish to ``channel``."""
        return self.publish is None or _matcher(self.publish)(channel)


@dataclass(frozen=True)
class Identity:
    """An authenticated client: ``user`` is the token's ``sub`` ("" when anonymous),
    ``expires`` its ``exp`` in unix seconds (None: never), ``info`` its ``info`` claim
    (any JSON, shown with the client's presence; None when absent)."""

    user: str
    expires: float | None
    permissions: Permissions
    info: Any = None


#: The identity of every client when no authentication is configured.
ANONYMOUS = Identity("", None, Permissions())


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class _Key:
    """One verification key and the algorithms it may verify."""

    key: Any
    algorithms: tuple[str, ...]
    kid: str | None = None


def _public_key_algorithms(key: Any) -> tuple[str, ...]:
    """Return the algorithms a public key verifies, or raise ValueError."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"the RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} are required")
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGORITHM_BY_CURVE.get(key.curve.name)
        if alg is None:
            raise ValueError(f"EC curve {key.curve.name} is not supported; use P-256, P-384 or P-521")
        return (alg,)
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return ("EdDSA",)
    raise ValueError(f"{type(key).__name__} keys are not supported; use an RSA, EC or Ed25519 public key")


def load_public_key(pem: bytes) -> _Key:
    """Parse a PEM public key; raise ValueError saying why it cannot be used."""
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a PEM public key ({exc})") from None
    except Exception as exc:  # cryptography raises UnsupportedAlgorithm for odd keys
        raise ValueError(f"not a usable PEM public key ({type(exc).__name__}: {exc})") from None
    return _Key(key, _public_key_algorithms(key))


def load_jwks(text: bytes) -> tuple[_Key, ...]:
    """Parse a JWKS document (``{"keys": [...]}``); raise ValueError saying why it cannot be used.

    Symmetric (``oct``) keys are refused: a JWKS file holds public keys.
    """
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list) or not doc["keys"]:
        raise ValueError('expected a JSON object {"keys": [...]} with at least one key')
    keys = []
    for i, entry in enumerate(doc["keys"]):
        if not isinstance(entry, dict):
            raise ValueError(f"keys[{i}] is not an object")
        if entry.get("kty") == "oct":
            raise ValueError(f"keys[{i}] is a symmetric (oct) key; a JWKS file must hold public keys only")
        if "d" in entry:
            raise ValueError(f"keys[{i}] is a private key; publish only the public part")
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWTError as exc:
            raise ValueError(f"keys[{i}] is not a usable key ({exc})") from None
        algorithms = _public_key_algorithms(jwk.key)
        if entry.get("alg") is not None:
            if jwk.algorithm_name not in algorithms:
                raise ValueError(f"keys[{i}] says alg {jwk.algorithm_name} but is a {entry.get('kty')} key")
            algorithms = (jwk.algorithm_name,)
        kid = entry.get("kid")
        keys.append(_Key(jwk.key, algorithms, kid if isinstance(kid, str) else None))
    return tuple(keys)


# --------------------------------------------------------------------------- claims


def _refuse(reason: str, message: str) -> Unauthorized:
    return Unauthorized(message, reason=reason)


def _number_claim(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _refuse("bad_claims", f"the {name} claim must be a number of unix seconds")
    return float(value)


def _patterns_claim(claims: dict[str, Any], name: str) -> tuple[str, ...] | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, list):
        raise _refuse("bad_claims", f"the {name} claim must be a list of channel patterns")
    if len(value) > MAX_CLAIM_PATTERNS:
        raise _refuse("bad_claims", f"the {name} claim lists {len(value)} patterns; the limit is {MAX_CLAIM_PATTERNS}")
    for item in value:
        if (not isinstance(item, str) or not item or len(item) > MAX_PATTERN_LENGTH
                or not item.isprintable()):
            raise _refuse("bad_claims", f"the {name} claim must list non-empty printable strings")
    return tuple(value)


def _time_problem(claims: dict[str, Any], now: float, leeway: float) -> Unauthorized | None:
    expires = _number_claim(claims, "exp")
    if expires is None:
        return _refuse("missing_claim", "the token has no exp claim; relay requires tokens that expire")
    if now >= expires + leeway:
        return _refuse("expired", f"the token expired {now - expires:.0f} s ago")
    not_before = _number_claim(claims, "nbf")
    if not_before is not None and now + leeway < not_before:
        return _refuse("not_yet_valid", f"the token is not valid for another {not_before - now:.0f} s (nbf)")
    return None


# --------------------------------------------------------------------------- verifier


class TokenVerifier:
    """Verify JWTs with the configured keys.

    Args:
        secret: shared secret for HS256/HS384/HS512, or None.
        public_key: PEM public key (RSA: RS256/384/512; EC: ES256/384/512 by curve), or None.
        jwks: a JWKS document's bytes (public keys chosen by ``kid``), or None.
        audience: when set, tokens must carry this ``aud``; when None, tokens with an
            ``aud`` are refused (they were minted for another service).
        issuer: when set, tokens must carry this ``iss``.
        leeway: seconds of clock skew tolerated on ``exp`` and ``nbf``.

    Raises:
        ValueError: the key material cannot be used (the message says why).
    """

    def __init__(self, *, secret: bytes | None = None, public_key: bytes | None = None,
                 jwks: bytes | None = None, audience: str | None = None,
                 issuer: str | None = None, leeway: float = 0.0) -> None:
        if secret is not None and len(secret) < MIN_SECRET_BYTES:
            raise ValueError(
                f"the secret is {len(secret)} bytes long; HS256 needs at least {MIN_SECRET_BYTES} "
                "(generate one with: openssl rand -hex 32)")
        self._secret = secret
        keys: list[_Key] = []
        if public_key is not None:
            keys.append(load_public_key(public_key))
        if jwks is not None:
            keys.extend(load_jwks(jwks))
        self._keys = tuple(keys)
        if secret is None and not keys:
            raise ValueError("no key: give a secret, a public key or a JWKS document")
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway
        algorithms = set(HMAC_ALGORITHMS if secret is not None else ())
        for k in keys:
            algorithms.update(k.algorithms)
        #: Every algorithm some configured key verifies, sorted.
        self.algorithms: tuple[str, ...] = tuple(sorted(algorithms))

    def _key_for(self, header: dict[str, Any]) -> tuple[Any, str]:
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise _refuse("malformed", "the token header has no alg")
        if alg.lower() == "none":
            raise _refuse("alg_none", "unsigned tokens (alg none) are refused")
        if alg in HMAC_ALGORITHMS:
            if self._secret is None:
                raise _refuse(
                    "algorithm_not_allowed",
                    f"the token is signed with {alg} (a shared secret) but this server verifies "
                    f"{', '.join(self.algorithms)} with public keys; HMAC tokens are refused")
            return self._secret, alg
        candidates = [k for k in self._keys if alg in k.algorithms]
        if not candidates:
            raise _refuse(
                "algorithm_not_allowed",
                f"the token is signed with {alg[:16]!r}; this server accepts {', '.join(self.algorithms)}")
        kid = header.get("kid")
        if kid is not None and any(k.kid is not None for k in candidates):
            with_kid = [k for k in candidates if k.kid == kid]
            if not with_kid:
                shown = kid[:64] if isinstance(kid, str) else type(kid).__name__
                raise _refuse("unknown_key", f"no configured key has kid {shown!r}")
            candidates = with_kid
        elif len(candidates) > 1:
            raise _refuse("unknown_key", "the token has no kid and several keys could verify it")
        return candidates[0].key, alg

    def verify(self, token: str, now: float) -> Identity:
        """Return the identity a token proves, or raise Unauthorized saying why not.

        Args:
            token: the compact JWT.
            now: the current time in unix seconds.

        Raises:
            Unauthorized: the token is refused; ``reason`` names the failed check.
        """
        if not token:
            raise _refuse("missing", "no token")
        if len(token) > MAX_TOKEN_LENGTH:
            raise _refuse("malformed", f"token of {len(token):,} characters exceeds {MAX_TOKEN_LENGTH:,}")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _refuse("malformed", "the token is not a JWT (expected three base64url parts)") from None
        key, alg = self._key_for(header)
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=[alg], audience=self._audience, issuer=self._issuer,
                options={
                    # Time is checked below against ``now`` (this module never reads the clock).
                    "verify_exp": False, "verify_nbf": False, "verify_iat": False,
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.InvalidSignatureError:
            raise _refuse("bad_signature", "the token's signature does not verify") from None
        except jwt.InvalidAudienceError:
            expected = f"aud {self._audience!r}" if self._audience else "no aud claim"
            raise _refuse("wrong_audience", f"the token's audience does not match; this server expects {expected}") from None
        except jwt.InvalidIssuerError:
            raise _refuse("wrong_issuer", f"the token's issuer is not {self._issuer!r}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _refuse("missing_claim", f"the token has no {exc.claim} claim") from None
        except jwt.InvalidAlgorithmError:
            raise _refuse("algorithm_not_allowed", f"the token's algorithm {alg} is not allowed") from None
        except jwt.DecodeError:
            raise _refuse("malformed", "the token cannot be decoded") from None
        except jwt.PyJWTError as exc:
            raise _refuse("bad_claims", f"the token's claims are invalid ({exc})") from None
        problem = _time_problem(claims, now, self._leeway)
        if problem is not None:
            raise problem
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise _refuse("missing_claim", "the token has no sub claim (the user id)")
        info = claims.get("info")
        if info is not None:
            info_problem = check_info(info)
            if info_problem is not None:
                raise _refuse("bad_claims", info_problem)
        return Identity(
            sub,
            _number_claim(claims, "exp"),
            Permissions(_patterns_claim(claims, "channels"), _patterns_claim(claims, "publish")),
            info,
        )


def verify_refresh(verifier: TokenVerifier, current: Identity, token: str, now: float) -> Identity:
    """Verify a ``refresh`` token for a connection whose identity is ``current``.

    Raises:
        Unauthorized: the new token is invalid, or is for another user
            (``reason`` ``wrong_user``).
    """
    identity = verifier.verify(token, now)
    if identity.user != current.user:
        raise _refuse("wrong_user", "the new token is for another user (sub differs)")
    return identity


__all__ = [
    "ANONYMOUS",
    "HMAC_ALGORITHMS",
    "MAX_TOKEN_LENGTH",
    "MIN_SECRET_BYTES",
    "Identity",
    "Permissions",
    "TokenVerifier",
    "load_jwks",
    "load_public_key",
    "verify_refresh",
]
