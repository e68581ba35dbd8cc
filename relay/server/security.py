"""Who may connect and what they may use: the server's checks before and around the core.

:class:`Security` is built once from the configuration (:func:`build_security`, which
reads the secret and key files and refuses unsafe settings) and answers:

- at a WebSocket upgrade, :meth:`Security.check_upgrade`: the origin allow-list (403),
  the token from ``Authorization: Bearer`` or ``?token=`` (401, with a body naming the
  failed check), then a slot under the connection caps (503);
- for ``POST /api/publish``, :meth:`Security.check_api_key` (``Authorization: apikey``);
- for the history endpoint, :meth:`Security.check_reader` (an API key, or a token whose
  ``channels`` claim covers the channel).

Token checks themselves live in :mod:`relay.core.auth`, rate limits in
:mod:`relay.core.ratelimit`; this module only reads files, headers and addresses.
It never logs a token, a secret or an API key.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, urlsplit

import trio

from .. import fastpath
from ..config import MIN_API_KEY_LENGTH, Config
from ..core.auth import ANONYMOUS, Identity, TokenVerifier, load_jwks, load_public_key, verify_refresh
from ..core.codec import Codec
from ..core.envelope import Ref, parse_ref
from ..core.ratelimit import MessageLimiter, RateLimits, Verdict
from ..errors import BadRequest, ConfigError, Forbidden, PeerError, Unauthorized
from .http_api import Response, json_response
from .hub import with_ref

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger("relay.security")

Headers = Iterable[tuple[bytes, bytes]]

#: Close codes (PROTOCOL.md): the token expired; rate limited too often.
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_RATE_LIMITED = 4003
#: Seconds a client refused for capacity is asked to wait (``Retry-After``).
RETRY_AFTER_SECONDS = 5
_LOOPBACK_NAMES = ("localhost", "localhost.", "ip6-localhost")


# --------------------------------------------------------------------------- helpers


def header(headers: Headers, name: bytes) -> bytes | None:
    """Return the first value of header ``name`` (lower-case), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def peer_ip(peer: str) -> str:
    """Return the address part of ``"1.2.3.4:5"``, ``"[::1]:5"``, or of an address given
    without a port (``"1.2.3.4"``, ``"[::1]"``: a client address forwarded by a proxy)."""
    if peer.startswith("[") and "]" in peer:
        return peer[1:peer.index("]")]
    if peer.count(":") == 1:
        return peer.rpartition(":")[0]
    return peer


def is_loopback(host: str) -> bool:
    """Return whether listening on ``host`` is reachable only from this machine."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume it resolves to something reachable


def _unauthorized(reason: str, message: str) -> Response:
    response = json_response(401, {"error": "unauthorized", "reason": reason, "message": message})
    # RFC 6750 section 3; the description is ours, never the token.
    response.headers.append(("WWW-Authenticate", f'Bearer error="invalid_token", error_description="{reason}"'))
    return response


def _forbidden(reason: str, message: str) -> Response:
    return json_response(403, {"error": "forbidden", "reason": reason, "message": message})


def _over_capacity(message: str) -> Response:
    response = json_response(503, {"error": "over_capacity", "message": message})
    response.headers.append(("Retry-After", str(RETRY_AFTER_SECONDS)))
    return response


# --------------------------------------------------------------------------- origins


def _origin_regex(pattern: str) -> str:
    """Turn one allowed_origins entry into a regex; ``*`` stays inside a host or a port."""
    if pattern == "*":
        return r".*"
    scheme, sep, rest = pattern.partition("://")
    if not sep:
        return re.escape(pattern)
    host, colon, port = rest.partition(":")
    host_re = re.escape(host).replace(r"\*", r"[a-z0-9-]+(?:\.[a-z0-9-]+)*")
    port_re = (":" + re.escape(port).replace(r"\*", r"[0-9]+")) if colon else ""
    return re.escape(scheme.lower()) + "://" + host_re + port_re


class OriginPolicy:
    """Decide which browser origins may open a WebSocket (cross-site WebSocket hijacking).

    With no patterns, only the same origin is allowed: the ``Origin`` header's host and
    port must equal the ``Host`` header. Requests without ``Origin`` (not from a browser)
    are always allowed; the token is what protects them.
    """

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self._regex = (re.compile("|".join(f"(?:{_origin_regex(p)})" for p in patterns), re.IGNORECASE)
                       if patterns else None)

    def allows(self, origin: str, host: str | None) -> bool:
        if self._regex is None:
            netloc = urlsplit(origin).netloc if "://" in origin else None
            return netloc is not None and host is not None and netloc.lower() == host.lower()
        return self._regex.fullmatch(origin) is not None


# --------------------------------------------------------------------------- caps


class ConnectionCaps:
    """Count WebSocket connections per client address and in total; refuse past the caps.

    A slot is taken by :meth:`reserve` before the upgrade (so concurrent handshakes
    cannot overshoot) and given back by :meth:`release` when the connection ends.
    """

    def __init__(self, per_ip: int, total: int) -> None:
        self.per_ip = per_ip
        self.total = total
        self.count = 0
        self._by_ip: dict[str, int] = {}

    def reserve(self, ip: str) -> Response | None:
        """Take a slot for ``ip`` and return None, or return the 503 to send instead."""
        if self.total and self.count >= self.total:
            return _over_capacity(f"the server is full (max_connections={self.total:,}); retry later")
        held = self._by_ip.get(ip, 0)
        if self.per_ip and held >= self.per_ip:
            return _over_capacity(
                f"too many connections from your address (max_connections_per_ip={self.per_ip:,})")
        self._by_ip[ip] = held + 1
        self.count += 1
        return None

    def release(self, ip: str) -> None:
        held = self._by_ip.get(ip, 0)
        if held <= 1:
            self._by_ip.pop(ip, None)
        else:
            self._by_ip[ip] = held - 1
        self.count = max(0, self.count - 1)

    def addresses(self) -> int:
        """Return how many client addresses hold a connection."""
        return len(self._by_ip)


# --------------------------------------------------------------------------- security


@dataclass(frozen=True)
class Admission:
    """A WebSocket upgrade that passed every check: who it is and which slot it holds."""

    identity: Identity
    ip: str


class Security:
    """The authentication, origin and capacity rules of one server."""

    def __init__(self, config: Config, verifier: TokenVerifier | None, api_keys: tuple[bytes, ...]) -> None:
        auth, limits = config.auth, config.limits
        self.verifier = verifier
        self._api_keys = api_keys
        self.origins = OriginPolicy(auth.allowed_origins)
        self.caps = ConnectionCaps(limits.max_connections_per_ip, limits.max_connections)
        self.rate_limits = RateLimits(
            limits.messages_per_second, limits.messages_burst, limits.bytes_per_second,
            limits.bytes_burst, limits.rate_limit_strikes)
        self.max_subscriptions = limits.max_subscriptions
        #: Bytes of WebSocket messages received (counted by :meth:`Guard.admit`).
        self.bytes_received = 0
        #: The same, per encoding (``fastpath.ENC_JSON``, ``ENC_MSGPACK``).
        self.bytes_received_by_encoding = [0] * fastpath.N_ENCODINGS
        #: Whether HTTP publish needs an API key: when keys exist, or when clients need
        #: tokens (a server that authenticates sockets must not publish for anyone).
        self.api_key_required = bool(api_keys) or verifier is not None

    # -- WebSocket upgrade ---------------------------------------------------------------

    def check_origin(self, headers: Headers) -> Response | None:
        """Return a 403 when the request comes from a browser page of another origin."""
        raw = header(headers, b"origin")
        if raw is None:
            return None
        origin = raw.decode("latin-1")
        host = header(headers, b"host")
        if self.origins.allows(origin, host.decode("latin-1") if host is not None else None):
            return None
        rule = ("allowed_origins" if self.origins.patterns
                else "the same origin (no auth.allowed_origins configured)")
        return _forbidden("origin", f"origin {origin[:200]!r} is not allowed; this server accepts {rule}")

    def authenticate(self, headers: Headers, target: bytes, now: float) -> Identity:
        """Return the identity of an upgrade request, or raise Unauthorized.

        The token comes from ``Authorization: Bearer <token>``, else from the
        ``token`` query parameter (browsers cannot set headers on a WebSocket).
        """
        if self.verifier is None:
            return ANONYMOUS
        token = _bearer_token(headers, target)
        if token is None:
            raise Unauthorized(
                "no token: send Authorization: Bearer <token> or ?token=<token>", reason="missing")
        return self.verifier.verify(token, now)

    def check_upgrade(self, headers: Headers, target: bytes, peer: str,
                      metrics: Metrics) -> Admission | Response:
        """Run every check of a WebSocket upgrade, in order: origin, token, capacity.

        Returns the admission (the caller must :meth:`release` it when the connection
        ends), or the HTTP response to refuse with.
        """
        refusal = self.check_origin(headers)
        if refusal is not None:
            metrics.handshakes_refused.labels("origin").inc()
            return refusal
        try:
            identity = self.authenticate(headers, target, time.time())
        except Unauthorized as exc:
            metrics.handshakes_refused.labels(f"auth_{exc.reason}").inc()
            return _unauthorized(exc.reason, exc.message)
        ip = peer_ip(peer)
        refusal = self.caps.reserve(ip)
        if refusal is not None:
            metrics.handshakes_refused.labels("over_capacity").inc()
            return refusal
        return Admission(identity, ip)

    def release(self, admission: Admission) -> None:
        """Give back the connection slot of an admission."""
        self.caps.release(admission.ip)

    # -- HTTP API ------------------------------------------------------------------------

    def check_api_key(self, headers: Headers) -> Response | None:
        """Return a 401 unless the request carries a valid ``Authorization: apikey <key>``
        (or no key is required)."""
        if not self.api_key_required:
            return None
        key = _api_key(headers)
        if key is None:
            if not self._api_keys:
                return _unauthorized("missing", "HTTP publishing needs an API key and none is configured (auth.api_keys)")
            return _unauthorized("missing", "send Authorization: apikey <key>")
        if not self._key_matches(key):
            return _unauthorized("bad_api_key", "the API key is not valid")
        return None

    def check_reader(self, headers: Headers, target: str, channel: str) -> Response | None:
        """Return a 401/403 unless the request may read ``channel``'s history: an API key,
        or a token (header or ``?token=``) whose ``channels`` claim covers it."""
        if not self.api_key_required:
            return None
        key = _api_key(headers)
        if key is not None:
            return None if self._key_matches(key) else _unauthorized("bad_api_key", "the API key is not valid")
        if self.verifier is None:
            return _unauthorized("missing", "send Authorization: apikey <key>")
        try:
            identity = self.authenticate(headers, target.encode("latin-1", "replace"), time.time())
        except Unauthorized as exc:
            return _unauthorized(exc.reason, exc.message)
        if not identity.permissions.may_subscribe(channel):
            return _forbidden("channel", f"the token does not allow reading {channel!r}")
        return None

    def _key_matches(self, key: bytes) -> bool:
        found = False
        for candidate in self._api_keys:  # compare with every key, in constant time each
            found |= hmac.compare_digest(candidate, key)
        return found


def _bearer_token(headers: Headers, target: bytes) -> str | None:
    value = header(headers, b"authorization")
    if value is not None:
        scheme, _, token = value.decode("latin-1").strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    query = urlsplit(target.decode("latin-1")).query
    if query:
        tokens = parse_qs(query).get("token")
        if tokens:
            return tokens[-1]
    return None


def _api_key(headers: Headers) -> bytes | None:
    value = header(headers, b"authorization")
    if value is None:
        return None
    scheme, _, key = value.strip().partition(b" ")
    if scheme.lower() != b"apikey" or not key.strip():
        return None
    return key.strip()


# --------------------------------------------------------------------------- connections


class _Conn(Protocol):
    """What a :class:`Guard` needs from its connection (``relay.server.ws.Connection``)."""

    codec: Codec
    subscriptions: set[str]

    def send(self, message: dict[str, Any]) -> None: ...
    def send_error(self, code: str, message: str, ref: Ref = None) -> None: ...
    def kick(self, code: int, reason: str) -> None: ...


def _ref_of(codec: Codec, raw: str | bytes) -> Ref:
    """Return the ``ref`` of a message that will not be handled, if it has a valid one."""
    try:
        return parse_ref(codec.decode(raw))
    except PeerError:
        return None


class Guard:
    """One connection's identity, rate limits and token expiry.

    The connection calls :meth:`admit` for every message before handling it, the
    ``check_*`` methods before subscribing or publishing, and :meth:`refresh` for a
    ``refresh`` message; its nursery runs :meth:`watch_expiry`.
    """

    __slots__ = ("security", "identity", "limiter", "expired", "_expiry_scope", "_closing")

    def __init__(self, security: Security, identity: Identity, now: float) -> None:
        self.security = security
        self.identity = identity
        self.limiter = MessageLimiter(security.rate_limits, now)
        #: Set once the token expired and the connection was told to close.
        self.expired = False
        self._expiry_scope: trio.CancelScope | None = None
        self._closing = False

    def admit(self, conn: _Conn, raw: str | bytes) -> bool:
        """Return whether to handle one message; answer ``rate_limited`` or close 4003 if not.

        The size counted is ``len(raw)``: bytes for binary frames, characters for text.
        """
        if self._closing:
            return False
        size = len(raw)
        self.security.bytes_received += size
        self.security.bytes_received_by_encoding[conn.codec.encoding] += size
        verdict = self.limiter.admit(size, trio.current_time())
        if verdict is Verdict.ALLOW:
            return True
        limits = self.security.rate_limits
        if verdict is Verdict.CLOSE:
            self._closing = True
            log.info("closing a connection of %r with %d: rate limited %d times",
                     self.identity.user, CLOSE_RATE_LIMITED, self.limiter.refused)
            conn.kick(CLOSE_RATE_LIMITED, "rate limited too often")
            return False
        conn.send_error(
            "rate_limited",
            f"message dropped: over messages_per_second={limits.messages_per_second:g} "
            f"(burst {limits.messages_burst}) or bytes_per_second={limits.bytes_per_second:,} "
            f"(burst {limits.bytes_burst:,}); slow down or be disconnected with {CLOSE_RATE_LIMITED}",
            _ref_of(conn.codec, raw))
        return False

    def check_subscribe(self, channel: str, subscriptions: set[str], ref: Ref) -> None:
        """Raise Forbidden unless the token allows ``channel`` and a subscription is free."""
        if not self.identity.permissions.may_subscribe(channel):
            raise Forbidden(f"your token does not allow subscribing to {channel!r}", ref=ref)
        cap = self.security.max_subscriptions
        if cap and channel not in subscriptions and len(subscriptions) >= cap:
            raise Forbidden(
                f"subscription limit reached: {len(subscriptions)} subscriptions, max_subscriptions={cap}; "
                "unsubscribe from something first", ref=ref)

    def check_publish(self, channel: str, ref: Ref) -> None:
        """Raise Forbidden unless the token allows publishing to ``channel``."""
        if not self.identity.permissions.may_publish(channel):
            raise Forbidden(f"your token does not allow publishing to {channel!r}", ref=ref)

    def refresh(self, conn: _Conn, token: str, ref: Ref,
                unsubscribe: Callable[[str], None]) -> None:
        """Replace the connection's token: answer ``refreshed`` with the new expiry.

        The new token must be valid and for the same user (``sub``). Subscriptions its
        ``channels`` claim no longer covers are ended (each gets ``unsubscribed``).

        Raises:
            BadRequest: no authentication is configured.
            Unauthorized: the token is invalid, for another user, or came too late.
        """
        verifier = self.security.verifier
        if verifier is None:
            raise BadRequest(
                "token refresh is not available: this server has no authentication configured", ref=ref)
        if self.expired:
            raise Unauthorized("the token already expired; reconnect with a new one", reason="expired", ref=ref)
        try:
            identity = verify_refresh(verifier, self.identity, token, time.time())
        except Unauthorized as exc:
            exc.ref = ref
            raise
        self.identity = identity
        if self._expiry_scope is not None:
            self._expiry_scope.deadline = _deadline(identity)
        for channel in sorted(conn.subscriptions):
            if not identity.permissions.may_subscribe(channel):
                unsubscribe(channel)
                conn.send({"type": "unsubscribed", "channel": channel})
        expires = identity.expires
        assert expires is not None  # verified tokens always expire
        conn.send(with_ref({"type": "refreshed", "expires": int(expires) if expires.is_integer() else expires}, ref))

    async def watch_expiry(self, conn: _Conn) -> None:
        """Close ``conn`` with 4001 when its token expires; a refresh moves the deadline.

        Runs in the connection's nursery; cancelled with it, it does nothing more.
        """
        if self.identity.expires is None:
            return
        with trio.CancelScope(deadline=_deadline(self.identity)) as scope:
            self._expiry_scope = scope
            await trio.sleep_forever()
        self._expiry_scope = None
        self.expired = True
        conn.kick(CLOSE_TOKEN_EXPIRED, "token expired")


def _deadline(identity: Identity) -> float:
    """Turn a token's unix expiry into a trio deadline."""
    assert identity.expires is not None
    return trio.current_time() + (identity.expires - time.time())


# --------------------------------------------------------------------------- building


def _read(path: str, key: str) -> bytes:
    source = f"file {path}"
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{key} = {path!r}: cannot read the file: {exc.strerror or exc}",
                          key=key, source=source) from exc


def _read_api_keys(path: str) -> tuple[str, ...]:
    """One key per line; blank lines and lines starting with # are skipped."""
    text = _read(path, "auth.api_keys_file").decode("utf-8", "replace")
    keys = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    for number, key in enumerate(keys, 1):
        if len(key) < MIN_API_KEY_LENGTH or any(c.isspace() for c in key):
            raise ConfigError(
                f"auth.api_keys_file = {path!r}: key {number} is not allowed; expected keys of at least "
                f"{MIN_API_KEY_LENGTH} characters without spaces, one per line",
                key="auth.api_keys_file", source=f"file {path}")
    return keys


def build_verifier(config: Config) -> TokenVerifier | None:
    """Read the configured keys and return the token verifier (None: no JWT configured).

    Raises:
        ConfigError: a key file cannot be read or its key cannot be used.
    """
    auth = config.auth
    if not auth.jwt_configured:
        return None
    secret: bytes | None = auth.jwt_secret.encode() if auth.jwt_secret else None
    if auth.jwt_secret_file:
        # A trailing newline (echo "..." > file) is not part of the secret.
        secret = _read(auth.jwt_secret_file, "auth.jwt_secret_file").rstrip(b"\r\n")
    public_key = _read(auth.jwt_public_key_file, "auth.jwt_public_key_file") if auth.jwt_public_key_file else None
    jwks = _read(auth.jwks_file, "auth.jwks_file") if auth.jwks_file else None
    # Check each key on its own first, so the error names the key that is wrong.
    checks: list[tuple[str, Callable[[], object]]] = []
    if secret is not None:
        checks.append(("auth.jwt_secret_file" if auth.jwt_secret_file else "auth.jwt_secret",
                       lambda: TokenVerifier(secret=secret)))
    if public_key is not None:
        checks.append(("auth.jwt_public_key_file", lambda: load_public_key(public_key)))
    if jwks is not None:
        checks.append(("auth.jwks_file", lambda: load_jwks(jwks)))
    for key, check in checks:
        try:
            check()
        except ValueError as exc:
            raise ConfigError(f"{key}: the key cannot be used: {exc}", key=key) from None
    return TokenVerifier(secret=secret, public_key=public_key, jwks=jwks,
                         audience=auth.jwt_audience or None, issuer=auth.jwt_issuer or None,
                         leeway=auth.jwt_leeway)


def build_security(config: Config) -> Security:
    """Build the server's :class:`Security` from its configuration.

    Refuses to serve anonymous clients on an address other than loopback unless
    ``insecure`` is set, and logs a warning when it is.

    Raises:
        ConfigError: unreadable key files, unusable keys, or an unsafe combination.
    """
    verifier = build_verifier(config)
    auth = config.auth
    keys = auth.api_keys or (_read_api_keys(auth.api_keys_file) if auth.api_keys_file else ())
    if verifier is None and not is_loopback(config.host):
        if not config.insecure:
            raise ConfigError(
                f"host = {config.host!r} is not a loopback address and no authentication is configured; "
                "set auth.jwt_secret (or jwt_secret_file, jwt_public_key_file, jwks_file), "
                "or pass --insecure to accept anonymous clients from the network",
                key="host")
        log.warning("insecure: anonymous clients accepted on %s (no authentication configured)", config.host)
    return Security(config, verifier, tuple(k.encode() for k in keys))


def build_ssl_context(config: Config) -> ssl.SSLContext | None:
    """Return the server's TLS context (None when TLS is off).

    Raises:
        ConfigError: the certificate or key cannot be loaded.
    """
    tls = config.tls
    if not tls.enabled:
        return None
    _read(tls.cert, "tls.cert")  # a clear error for a missing or unreadable file
    _read(tls.key, "tls.key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"tls.cert = {tls.cert!r}, tls.key = {tls.key!r}: cannot load the certificate and key: {exc}",
            key="tls.cert") from None
    return context


__all__ = [
    "CLOSE_RATE_LIMITED",
    "CLOSE_TOKEN_EXPIRED",
    "Admission",
    "Guard",
    "ConnectionCaps",
    "OriginPolicy",
    "Security",
    "build_security",
    "build_ssl_context",
    "build_verifier",
    "is_loopback",
    "peer_ip",
]
