"""Server configuration: the :class:`Config` dataclass and how it is loaded.

:func:`load_config` merges four layers, highest first: flags (the command line), the
environment (``RELAY_<FIELD>``), a TOML file, and the defaults written on the dataclasses.
Every value is checked as it is read, so a :class:`~relay.errors.ConfigError` names the key,
where the value came from (``file relay.toml``, ``environment variable RELAY_PORT``,
``flag --port``), the value and what is allowed.

This module is pure: it reads one file when asked to and nothing else; no trio, no sockets,
no clock. ``docs/configuration.md`` is the user-facing reference and must stay true to it.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
import secrets
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from .errors import ConfigError

MODES = ("stream", "state", "poke")
SLOW_CONSUMER_POLICIES = ("disconnect", "drop", "conflate")
DEFAULT_SLOW_CONSUMER = {"stream": "disconnect", "state": "conflate", "poke": "conflate"}
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
REDIS_SCHEMES = ("redis", "rediss")
#: ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/MASTER[/db]``: the
#: master named MASTER, found by asking those Sentinels (``rediss+`` for TLS to both;
#: ``?sentinel_password=...`` and ``sentinel_username`` when the Sentinels want a login).
REDIS_SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
_SENTINEL_PREFIXES = tuple(scheme + "://" for scheme in REDIS_SENTINEL_SCHEMES)
SENTINEL_PORT = 26379

ENV_PREFIX = "RELAY_"
CONFIG_PATH_ENV = "RELAY_CONFIG"
CHANNELS_ENV = "RELAY_CHANNELS"

MAX_PORT = 65535
#: The tick intervals allowed (``?tick_ms=`` and the channel option ``tick_ms``), in ms.
MIN_TICK_MS = 10
MAX_TICK_MS = 1000
MAX_MESSAGE_SIZE_BYTES = 16 * 1024 * 1024
MAX_CHANNEL_LENGTH_LIMIT = 1024
CHANNEL_CACHE_ENTRIES = 10_000

_NODE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: An allowed_origins entry: "*", "null", or scheme://host[:port] where host and port may use *.
_ORIGIN_PATTERN_RE = re.compile(r"\*|null|[A-Za-z][A-Za-z0-9+.-]*://[A-Za-z0-9*._-]+(?::(?:[0-9]+|\*))?")
#: Shortest jwt_secret accepted (HS256 needs at least the hash size, RFC 7518 section 3.2).
MIN_JWT_SECRET_BYTES = 32
#: Shortest API key accepted.
MIN_API_KEY_LENGTH = 16


@dataclass(frozen=True)
class ChannelOptions:
    """How channels whose name matches ``pattern`` behave.

    ``slow_consumer`` defaults to ``DEFAULT_SLOW_CONSUMER[mode]`` when omitted (or
    given as ``""``), whether read by :func:`load_config` or built directly; with a
    ``conflate_key`` it is ``conflate``.

    ``conflate_key`` names a field of the message data (``"symbol"``): a subscriber whose
    send queue is full keeps only the newest message per value of that field, instead
    of the newest message of the whole channel.
    """

    pattern: str = "*"
    mode: str = "stream"
    history_size: int = 100
    history_ttl: float = 300.0
    client_publish: bool = True
    slow_consumer: str = ""
    conflate_key: str = ""
    #: Presence (docs/protocol.md): members can be listed (``presence``) and counted
    #: (``presence_stats``); with ``join_leave`` subscribers get ``join`` / ``leave``, or
    #: with ``join_leave_interval`` > 0 one ``presence_diff`` per channel per interval;
    #: none while the channel has more than ``join_leave_max_members`` members (0: no cap).
    presence: bool = False
    join_leave: bool = False
    join_leave_interval: float = 0.0
    join_leave_max_members: int = 1000
    #: State channels only: subscribers that ask for it get JSON Merge Patch deltas.
    delta: bool = False
    #: > 0: the channel's messages are delivered once per tick, as one frame holding the
    #: array of the tick's messages (only the newest on a state channel), built once.
    tick_ms: int = 0

    def __post_init__(self) -> None:
        if not self.slow_consumer:
            default = "conflate" if self.conflate_key else DEFAULT_SLOW_CONSUMER.get(self.mode, "disconnect")
            object.__setattr__(self, "slow_consumer", default)


@dataclass(frozen=True)
class AuthConfig:
    """The ``[auth]`` table: who may connect and publish.

    Secrets (``jwt_secret``, ``api_keys``) are left out of ``repr`` so they never reach
    a log line or a traceback.
    """

    jwt_secret: str = field(default="", repr=False)
    jwt_secret_file: str = ""
    jwt_public_key_file: str = ""
    jwks_file: str = ""
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_leeway: float = 0.0
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    api_keys_file: str = ""
    allowed_origins: tuple[str, ...] = ()

    @property
    def jwt_configured(self) -> bool:
        """Whether WebSocket clients need a token (some JWT key is configured)."""
        return bool(self.jwt_secret or self.jwt_secret_file or self.jwt_public_key_file or self.jwks_file)


@dataclass(frozen=True)
class LimitsConfig:
    """The ``[limits]`` table: what one client, one address and the whole server may use.

    A limit of 0 is off (no limit).
    """

    messages_per_second: float = 100.0
    messages_burst: int = 200
    bytes_per_second: int = 1048576
    bytes_burst: int = 2097152
    rate_limit_strikes: int = 10
    max_subscriptions: int = 128
    max_connections_per_ip: int = 1000
    max_connections: int = 100000
    max_pending_connections: int = 4096


@dataclass(frozen=True)
class TlsConfig:
    """The ``[tls]`` table: certificate chain and private key files (PEM); both or neither."""

    cert: str = ""
    key: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert)


@dataclass(frozen=True)
class Config:
    """The server's settings. Build it with :func:`load_config`, which validates every field.

    Constructing it directly (tests, embedding) skips validation.
    """

    host: str = "127.0.0.1"
    port: int = 8765
    node_id: str = ""
    log_level: str = "info"
    heartbeat: float = 25.0
    heartbeat_timeout: float = 10.0
    handshake_timeout: float = 5.0
    http_idle_timeout: float = 30.0
    poll_timeout: float = 25.0
    max_message_size: int = 65536
    send_queue_size: int = 1048576
    max_channel_length: int = 255
    drain_timeout: float = 10.0
    drain_window: float = 5.0
    insecure: bool = False
    #: Reverse proxies (addresses or CIDR networks) whose X-Forwarded-For names the client.
    trusted_proxies: tuple[str, ...] = ()
    log_format: str = "text"
    #: Redis servers (``redis://``, ``rediss://`` or ``redis+sentinel://`` URLs); empty: the
    #: in-memory broker. Several URLs shard channels over them (consistent hashing of the
    #: channel name).
    redis_url: tuple[str, ...] = field(default=(), repr=False)
    #: ``redis_url`` names seed nodes of a Redis Cluster: channels follow its hash slots and
    #: messages go through sharded pub/sub (SPUBLISH / SSUBSCRIBE, Redis 7+).
    redis_cluster: bool = False
    #: With Redis: presence members of a node that stopped refreshing them (it died) are
    #: dropped this many seconds after its last refresh (a node refreshes every third of it).
    presence_ttl: float = 30.0
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    tls: TlsConfig = TlsConfig()
    channels: tuple[ChannelOptions, ...] = ()
    _channel_cache: dict[str, ChannelOptions] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def channel_options(self, channel: str) -> ChannelOptions:
        """Return the options of the first ``[[channels]]`` table whose pattern matches.

        Patterns are matched case-sensitively with :func:`fnmatch.fnmatchcase`. A channel
        no pattern matches gets ``ChannelOptions()``. Results are cached because this is
        called for every new channel; the cache is cleared when it grows past
        ``CHANNEL_CACHE_ENTRIES`` so it stays bounded.

        Args:
            channel: the channel name.

        Returns:
            The matching :class:`ChannelOptions`.
        """
        cache = self._channel_cache
        found = cache.get(channel)
        if found is not None:
            return found
        found = _DEFAULT_CHANNEL
        for options in self.channels:
            if fnmatchcase(channel, options.pattern):
                found = options
                break
        if len(cache) >= CHANNEL_CACHE_ENTRIES:
            cache.clear()
        cache[channel] = found
        return found


_DEFAULT_CHANNEL = ChannelOptions()


def generate_node_id() -> str:
    """Return a fresh random node id: ``"n"`` and 6 hex digits, e.g. ``"n3fa9c1"``."""
    return "n" + secrets.token_hex(3)


def effective_node_id(cfg: Config) -> str:
    """Return ``cfg.node_id``, or a freshly generated one when it is empty.

    Call it once at start and keep the answer: each call with an empty ``node_id``
    generates a different id.
    """
    return cfg.node_id or generate_node_id()


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (for logs and error messages):
    the login's, and a ``sentinel_password`` query option's."""
    parts = urlsplit(url)
    if "sentinel_password=" in parts.query:
        parts = parts._replace(query=re.sub(r"(^|&)(sentinel_password=)[^&]*", r"\1\2***", parts.query))
    if parts.password is None:
        return urlunsplit(parts)
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@dataclass(frozen=True)
class SentinelUrl:
    """A ``redis+sentinel://`` URL: the Sentinels to ask, the master's name, and the login,
    database and TLS to use on the master."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int
    username: str | None
    password: str | None
    tls: bool
    #: The Sentinels' own login (``?sentinel_username=...&sentinel_password=...``; None: none).
    sentinel_username: str | None = None
    sentinel_password: str | None = None


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse a ``redis+sentinel://`` or ``rediss+sentinel://`` URL.

    Raises:
        ValueError: what is wrong with it (the password is not in the message).
    """
    parts = urlsplit(url)
    if parts.scheme not in REDIS_SENTINEL_SCHEMES:
        raise ValueError(f"not a sentinel URL ({parts.scheme}://)")
    if parts.fragment:
        raise ValueError("fragments are not supported")
    options = parse_qs(parts.query, keep_blank_values=True) if parts.query else {}
    for key, values in options.items():
        if key not in ("sentinel_username", "sentinel_password"):
            raise ValueError(f"query option {key!r} is not supported (only sentinel_username and sentinel_password)")
        if len(values) > 1:
            raise ValueError(f"query option {key!r} is given twice")
    sentinels = []
    for item in parts.netloc.rpartition("@")[2].split(","):
        one = urlsplit("//" + item.strip())
        if not one.hostname:
            raise ValueError(f"no host in the sentinel address {item.strip()!r}")
        port = one.port
        if port == 0:
            raise ValueError("port 0 is not a Sentinel port")
        sentinels.append((one.hostname, port or SENTINEL_PORT))
    path = parts.path.strip("/").split("/") if parts.path.strip("/") else []
    if not path or len(path) > 2:
        raise ValueError("the path must be /MASTER (the name the Sentinels monitor) or /MASTER/db")
    db = path[1] if len(path) == 2 else "0"
    if not (db.isdigit() and int(db) < 2**31):
        raise ValueError(f"the database must be a number such as /{path[0]}/0, not /{db}")
    return SentinelUrl(tuple(sentinels), unquote(path[0]), int(db),
                       unquote(parts.username) if parts.username else None,
                       unquote(parts.password) if parts.password is not None else None,
                       parts.scheme == "rediss+sentinel",
                       options.get("sentinel_username", [None])[0], options.get("sentinel_password", [None])[0])


def _join_sentinel_hosts(urls: tuple[str, ...]) -> tuple[str, ...]:
    """Undo the comma split of a list given as text (``RELAY_REDIS_URL``) inside a sentinel
    URL: a piece without a scheme continues the sentinel URL before it."""
    joined: list[str] = []
    for url in urls:
        if joined and "://" not in url and joined[-1].startswith(_SENTINEL_PREFIXES):
            joined[-1] += "," + url
        else:
            joined.append(url)
    return tuple(joined)


def redis_url_problem(url: str) -> str | None:
    """Say what is wrong with one Redis URL, or return None when relay can use it."""
    shown = redact_url(url)
    if url.startswith(_SENTINEL_PREFIXES):
        try:
            parse_sentinel_url(url)
        except ValueError as exc:
            return f"{shown!r}: {exc}"
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"{shown!r}: {exc}"
    if parts.scheme not in REDIS_SCHEMES:
        return (f"{shown!r}: the scheme must be redis://, rediss:// (TLS) or redis+sentinel://, "
                f"not {parts.scheme + '://' if parts.scheme else 'missing'}")
    if not parts.hostname:
        return f"{shown!r}: no host"
    if port == 0:
        return f"{shown!r}: port 0 is not a Redis port"
    db = parts.path.lstrip("/")
    if db and not (db.isdigit() and int(db) < 2**31):
        return f"{shown!r}: the path must be a database number such as /0, not /{db}"
    if parts.query or parts.fragment:
        return f"{shown!r}: query options and fragments are not supported"
    return None


def _redis_urls_problem(urls: tuple[str, ...]) -> str | None:
    return next(filter(None, map(redis_url_problem, urls)), None) or (
        "the same URL is given twice" if len(set(urls)) != len(urls) else None)


# --------------------------------------------------------------------------- field specs


@dataclass(frozen=True)
class _Spec:
    """What one key accepts: its Python type, a range check and how to say what is allowed."""

    kind: type
    expected: str
    check: Callable[[Any], bool] = lambda value: True
    normalize: Callable[[Any], Any] = lambda value: value
    #: Never show the value in an error message (it is a secret).
    secret: bool = False
    #: A list key that also takes one string (TOML ``redis_url = "redis://..."``).
    single: bool = False
    #: Says what is wrong with a value, with secrets masked (None: it is fine).
    problem: Callable[[Any], str | None] | None = None


def _int_range(low: int, high: int | None = None) -> _Spec:
    if high is None:
        return _Spec(int, f"an integer >= {low}", lambda v: v >= low)
    return _Spec(int, f"an integer from {low} to {high}", lambda v: low <= v <= high)


def _positive_seconds() -> _Spec:
    return _Spec(float, "a number of seconds > 0", lambda v: v > 0)


def _non_negative_seconds() -> _Spec:
    return _Spec(float, "a number of seconds >= 0", lambda v: v >= 0)


def _path() -> _Spec:
    return _Spec(str, "a file path, or an empty string for none", lambda v: v == v.strip())


def _limit(kind: type = int) -> _Spec:
    noun = "an integer" if kind is int else "a number"
    return _Spec(kind, f"{noun} >= 0 (0 turns the limit off)", lambda v: v >= 0)


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def _strings(expected: str, item_ok: Callable[[str], bool], *, secret: bool = False) -> _Spec:
    """A list of strings: a TOML array, or comma-separated text in the environment."""
    return _Spec(tuple, expected, lambda v: all(item_ok(item) for item in v), secret=secret)


def _one_of(choices: Sequence[str], *, fold_case: bool = False) -> _Spec:
    expected = "one of " + ", ".join(choices)
    if fold_case:
        return _Spec(str, expected, lambda v: v.lower() in choices, lambda v: v.lower())
    return _Spec(str, expected, lambda v: v in choices)


_CONFIG_SPECS: dict[str, _Spec] = {
    "host": _Spec(str, "a non-empty host name or IP address", lambda v: v.strip() != "" and v == v.strip()),
    "port": _int_range(0, MAX_PORT),
    "node_id": _Spec(
        str,
        "an empty string (generate one at start) or 1 to 64 characters of A-Z a-z 0-9 . _ -",
        lambda v: v == "" or _NODE_ID_RE.fullmatch(v) is not None,
    ),
    "log_level": _one_of(LOG_LEVELS, fold_case=True),
    "heartbeat": _positive_seconds(),
    "heartbeat_timeout": _positive_seconds(),
    "handshake_timeout": _positive_seconds(),
    "http_idle_timeout": _positive_seconds(),
    "poll_timeout": _positive_seconds(),
    "max_message_size": _int_range(1, MAX_MESSAGE_SIZE_BYTES),
    "send_queue_size": _int_range(1),
    "max_channel_length": _int_range(1, MAX_CHANNEL_LENGTH_LIMIT),
    "trusted_proxies": _strings(
        "a list of IP addresses or CIDR networks such as '10.0.0.0/8' or '::1'", _is_network),
    "drain_timeout": _non_negative_seconds(),
    "drain_window": _non_negative_seconds(),
    "insecure": _Spec(bool, "true or false"),
    "log_format": _one_of(LOG_FORMATS, fold_case=True),
    "redis_url": _Spec(
        tuple,
        "redis://[[user]:password@]host[:port][/db] or rediss:// (TLS) URLs, or "
        "redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/MASTER[/db][?sentinel_password=...]; "
        "several of them (a TOML array, or comma-separated) shard the channels",
        single=True,
        problem=lambda urls: _redis_urls_problem(_join_sentinel_hosts(urls)),
        normalize=_join_sentinel_hosts,
    ),
    "redis_cluster": _Spec(bool, "true or false"),
    "presence_ttl": _positive_seconds(),
}

_AUTH_SPECS: dict[str, _Spec] = {
    "jwt_secret": _Spec(
        str, f"a secret of at least {MIN_JWT_SECRET_BYTES} bytes (generate one with: openssl rand -hex 32)",
        lambda v: len(v.encode()) >= MIN_JWT_SECRET_BYTES, secret=True),
    "jwt_secret_file": _path(),
    "jwt_public_key_file": _path(),
    "jwks_file": _path(),
    "jwt_audience": _Spec(str, "a string (empty: tokens must have no aud claim)"),
    "jwt_issuer": _Spec(str, "a string (empty: any iss)"),
    "jwt_leeway": _non_negative_seconds(),
    "api_keys": _strings(
        f"a list of API keys of at least {MIN_API_KEY_LENGTH} characters, without spaces or commas",
        lambda k: len(k) >= MIN_API_KEY_LENGTH and k.isprintable() and not any(c.isspace() or c == "," for c in k),
        secret=True),
    "api_keys_file": _path(),
    "allowed_origins": _strings(
        "a list of origins such as 'https://game.example.com', 'https://*.example.com', "
        "'http://localhost:*', 'null' or '*' (any origin)",
        lambda o: _ORIGIN_PATTERN_RE.fullmatch(o) is not None),
}

_LIMITS_SPECS: dict[str, _Spec] = {
    "messages_per_second": _limit(float),
    "messages_burst": _int_range(1),
    "bytes_per_second": _limit(),
    "bytes_burst": _int_range(1),
    "rate_limit_strikes": _int_range(1),
    "max_subscriptions": _limit(),
    "max_connections_per_ip": _limit(),
    "max_connections": _limit(),
    "max_pending_connections": _limit(),
}

_TLS_SPECS: dict[str, _Spec] = {
    "cert": _path(),
    "key": _path(),
}

#: The tables of the config file: name -> (dataclass, specs of its keys).
_TABLES: dict[str, tuple[type, dict[str, _Spec]]] = {
    "auth": (AuthConfig, _AUTH_SPECS),
    "limits": (LimitsConfig, _LIMITS_SPECS),
    "tls": (TlsConfig, _TLS_SPECS),
}
#: Keys that hold secrets: refused as flags (other users see flags in ps).
SECRET_KEYS = ("auth.jwt_secret", "auth.api_keys")

_CHANNEL_SPECS: dict[str, _Spec] = {
    "pattern": _Spec(str, "a glob such as 'chat.*'"),  # checked further by _pattern_problem
    "mode": _one_of(MODES),
    "history_size": _int_range(0),
    "history_ttl": _positive_seconds(),
    "client_publish": _Spec(bool, "true or false"),
    "slow_consumer": _one_of(SLOW_CONSUMER_POLICIES),
    "conflate_key": _Spec(str, "a field name of the message data, such as 'symbol'"),
    "presence": _Spec(bool, "true or false"),
    "join_leave": _Spec(bool, "true or false"),
    "join_leave_interval": _non_negative_seconds(),
    "join_leave_max_members": _limit(),
    "tick_ms": _Spec(int, f"0 (no ticks) or an integer from {MIN_TICK_MS} to {MAX_TICK_MS} (milliseconds "
                     "between deliveries)", lambda v: v == 0 or MIN_TICK_MS <= v <= MAX_TICK_MS),
    "delta": _Spec(bool, "true or false"),
}

CONFIG_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Config) if f.init)
CHANNEL_KEYS: tuple[str, ...] = tuple(f.name for f in fields(ChannelOptions))
#: Table name -> its keys, in declaration order.
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    name: tuple(f.name for f in fields(cls)) for name, (cls, _specs) in _TABLES.items()
}

assert set(CONFIG_KEYS) == set(_CONFIG_SPECS) | {"channels"} | set(_TABLES)
assert set(CHANNEL_KEYS) == set(_CHANNEL_SPECS)
assert all(set(TABLE_KEYS[name]) == set(specs) for name, (_cls, specs) in _TABLES.items())


# --------------------------------------------------------------------------- errors


class _Hidden:
    """Stands in for a secret in error messages."""

    def __repr__(self) -> str:
        return "(hidden)"


_HIDDEN = _Hidden()
_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")


def _show(value: object) -> str:
    """Render a bad value the way the user wrote it (TOML/JSON spelling for booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return text


def _not_allowed(source: str, key: str, value: object, expected: str) -> ConfigError:
    return ConfigError(
        f"{source}: {key} = {_show(value)} is not allowed; expected {expected}",
        key=key,
        source=source,
    )


def _unknown_key(source: str, where: str, key: str, allowed: Sequence[str]) -> ConfigError:
    full_key = f"{where}.{key}" if where else key
    hint = ""
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        hint = f" (did you mean {close[0]!r}?)"
    place = f" in {where}" if where else ""
    return ConfigError(
        f"{source}: unknown key {key!r}{place}{hint}; allowed keys: {', '.join(allowed)}",
        key=full_key,
        source=source,
    )


# --------------------------------------------------------------------------- value checks


def _coerce(spec: _Spec, value: object, *, source: str, key: str, from_text: bool) -> Any:
    """Turn one raw value into the field's type and check it, or raise ConfigError.

    ``from_text`` values (environment variables, string flags) are parsed from strings;
    others (TOML, JSON, typed flags) must already have the right type. ``bool`` is refused
    where a number is expected even though it is an ``int`` subclass. A list (``tuple``
    kind) is a TOML array of strings, or comma-separated text. A secret's value is never
    shown in the error.
    """
    if spec.secret:
        shown: object = _HIDDEN
        try:
            return _coerce_value(spec, value, source=source, key=key, from_text=from_text)
        except ConfigError:
            raise _not_allowed(source, key, shown, spec.expected) from None
    return _coerce_value(spec, value, source=source, key=key, from_text=from_text)


def _coerce_value(spec: _Spec, value: object, *, source: str, key: str, from_text: bool) -> Any:
    result: Any
    if spec.kind is str:
        if not isinstance(value, str):
            raise _not_allowed(source, key, value, spec.expected)
        result = value
    elif spec.kind is bool:
        if isinstance(value, bool):
            result = value
        elif from_text and isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
            result = value.strip().lower() in _TRUE_WORDS
        else:
            raise _not_allowed(source, key, value, spec.expected)
    elif spec.kind is tuple:
        if from_text and isinstance(value, str):
            result = tuple(item.strip() for item in value.split(",")) if value.strip() else ()
        elif isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
            result = tuple(value)
        elif spec.single and isinstance(value, str):
            result = (value,)
        else:
            raise _not_allowed(source, key, value, spec.expected)
    elif spec.kind is int:
        if from_text and isinstance(value, str):
            try:
                result = int(value.strip())
            except ValueError:
                raise _not_allowed(source, key, value, spec.expected) from None
        elif isinstance(value, int) and not isinstance(value, bool):
            result = value
        else:
            raise _not_allowed(source, key, value, spec.expected)
    elif spec.kind is float:
        if from_text and isinstance(value, str):
            try:
                result = float(value.strip())
            except ValueError:
                raise _not_allowed(source, key, value, spec.expected) from None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            result = float(value)
        else:
            raise _not_allowed(source, key, value, spec.expected)
        if not math.isfinite(result):
            raise _not_allowed(source, key, value, spec.expected)
    else:  # pragma: no cover - the spec tables only use the four kinds above
        raise TypeError(f"unsupported kind {spec.kind!r}")
    if not spec.check(result):
        raise _not_allowed(source, key, value, spec.expected)
    if spec.problem is not None and (problem := spec.problem(result)) is not None:
        raise ConfigError(f"{source}: {key} is not allowed: {problem}; expected {spec.expected}",
                          key=key, source=source)
    return spec.normalize(result)


def _pattern_problem(pattern: str) -> str | None:
    """Say why ``pattern`` is not a usable glob, or return None when it is fine."""
    if pattern == "":
        return "it is empty"
    if any(not ch.isprintable() for ch in pattern):
        return "it contains a control character"
    i = 0
    while i < len(pattern):
        if pattern[i] == "[":
            # A "]" right after "[" or "[!" is a literal member of the set (fnmatch rules).
            j = i + 1
            if j < len(pattern) and pattern[j] == "!":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1
            end = pattern.find("]", j)
            if end < 0:
                return f"the '[' at position {i} is never closed"
            i = end + 1
        else:
            i += 1
    return None


_PATTERN_EXPECTED = (
    "a non-empty glob over channel names: * matches anything, ? one character, [abc] / [!abc] a set (every '[' closed)"
)


def _parse_channel(raw: object, index: int, source: str) -> ChannelOptions:
    where = f"channels[{index}]"
    if not isinstance(raw, dict):
        raise _not_allowed(source, where, raw, f"a table with the keys {', '.join(CHANNEL_KEYS)}")
    for key in raw:
        if key not in _CHANNEL_SPECS:
            raise _unknown_key(source, where, str(key), CHANNEL_KEYS)
    if "pattern" not in raw:
        raise ConfigError(
            f"{source}: {where}.pattern is missing; every channel table needs a pattern, a glob such as 'chat.*'",
            key=f"{where}.pattern",
            source=source,
        )
    values: dict[str, Any] = {}
    for key, value in raw.items():
        values[key] = _coerce(_CHANNEL_SPECS[key], value, source=source, key=f"{where}.{key}", from_text=False)
    problem = _pattern_problem(values["pattern"])
    if problem is not None:
        raise _not_allowed(source, f"{where}.pattern", values["pattern"], f"{_PATTERN_EXPECTED}; {problem}")
    if "slow_consumer" not in values:
        values["slow_consumer"] = (
            "conflate" if values.get("conflate_key") else DEFAULT_SLOW_CONSUMER[values.get("mode", "stream")])
    if values.get("tick_ms"):
        for other, why in (("conflate_key", "a tick's frame holds every symbol of the tick"),
                           ("delta", "patches need their base in the same frame stream")):
            if values.get(other):
                raise _not_allowed(source, f"{where}.tick_ms", values["tick_ms"],
                                   f"0 on a channel with {other} (not supported together: {why})")
        if values["slow_consumer"] == "drop":
            raise _not_allowed(source, f"{where}.tick_ms", values["tick_ms"],
                               '0 with slow_consumer = "drop" (a tick is delivered or conflated '
                               "whole; use disconnect or conflate)")
    if values.get("join_leave") and not values.get("presence"):
        raise _not_allowed(source, f"{where}.join_leave", True,
                           "false, or presence = true in the same table (join and leave "
                           "announce presence members)")
    if values.get("conflate_key"):
        if values.get("mode", "stream") != "stream":
            raise _not_allowed(source, f"{where}.conflate_key", values["conflate_key"],
                               'unset, or a channel with mode = "stream" (keyed conflation '
                               "of state and poke channels is not supported)")
        if values["slow_consumer"] != "conflate":
            raise _not_allowed(source, f"{where}.conflate_key", values["conflate_key"],
                               f'unset, or slow_consumer = "conflate" (this table has '
                               f'slow_consumer = "{values["slow_consumer"]}")')
    if values.get("delta") and values.get("mode", "stream") != "state":
        raise _not_allowed(source, f"{where}.delta", values["delta"],
                           f'false, or a channel with mode = "state" (this table has '
                           f'mode = "{values.get("mode", "stream")}")')
    return ChannelOptions(**values)


def _parse_channels(raw: object, source: str) -> tuple[ChannelOptions, ...]:
    if not isinstance(raw, (list, tuple)):
        raise _not_allowed(
            source, "channels", raw, "an array of channel tables ([[channels]] in TOML, a JSON array in RELAY_CHANNELS)"
        )
    result = tuple(_parse_channel(item, i, source) for i, item in enumerate(raw))
    first_index: dict[str, int] = {}
    for i, options in enumerate(result):
        earlier = first_index.setdefault(options.pattern, i)
        if earlier != i:
            raise _not_allowed(
                source,
                f"channels[{i}].pattern",
                options.pattern,
                f"a pattern not already used by channels[{earlier}] "
                "(the first match wins, so this table would never apply)",
            )
    return result


# --------------------------------------------------------------------------- layers

# One layer: field name -> (checked value, source description).
_Layer = dict[str, tuple[Any, str]]


def _read_file(path: str, *, named_by_env: bool) -> dict[str, Any]:
    source = f"file {path}"
    origin = f" (named by environment variable {CONFIG_PATH_ENV})" if named_by_env else ""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"{source}{origin}: cannot read the config file: {reason}", source=source) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}", source=source) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: the file is not UTF-8 ({exc.reason})", source=source) from exc


def _file_layer(path: str, *, named_by_env: bool) -> _Layer:
    source = f"file {path}"
    data = _read_file(path, named_by_env=named_by_env)
    layer: _Layer = {}
    for key, value in data.items():
        if key == "channels":
            layer[key] = (_parse_channels(value, source), source)
        elif key in _TABLES:
            _, specs = _TABLES[key]
            if not isinstance(value, dict):
                raise _not_allowed(source, key, value, f"a table ([{key}] in TOML) with the keys {', '.join(TABLE_KEYS[key])}")
            for sub, sub_value in value.items():
                if sub not in specs:
                    raise _unknown_key(source, key, str(sub), TABLE_KEYS[key])
                full = f"{key}.{sub}"
                layer[full] = (_coerce(specs[sub], sub_value, source=source, key=full, from_text=False), source)
        elif key in _CONFIG_SPECS:
            layer[key] = (_coerce(_CONFIG_SPECS[key], value, source=source, key=key, from_text=False), source)
        else:
            raise _unknown_key(source, "", key, CONFIG_KEYS)
    return layer


def _env_layer(env: Mapping[str, str]) -> _Layer:
    layer: _Layer = {}
    for table, (_cls, specs) in _TABLES.items():
        for sub, spec in specs.items():
            name = f"{ENV_PREFIX}{table.upper()}_{sub.upper()}"
            if name in env:
                full = f"{table}.{sub}"
                source = f"environment variable {name}"
                layer[full] = (_coerce(spec, env[name], source=source, key=full, from_text=True), source)
    for key in CONFIG_KEYS:
        if key in _TABLES:
            continue
        name = ENV_PREFIX + key.upper()
        if name not in env:
            continue
        source = f"environment variable {name}"
        text = env[name]
        if key == "channels":
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{source}: invalid JSON: {exc}; expected a JSON array of channel tables, "
                    'e.g. [{"pattern": "chat.*", "mode": "stream"}]',
                    key="channels",
                    source=source,
                ) from exc
            layer[key] = (_parse_channels(raw, source), source)
        else:
            layer[key] = (_coerce(_CONFIG_SPECS[key], text, source=source, key=key, from_text=True), source)
    return layer


def _flag_spec(key: str) -> _Spec | None:
    """Return the spec of a flag's key (``port``, or ``tls.cert`` for a table key), or None."""
    table, dot, sub = key.partition(".")
    if dot:
        return _TABLES[table][1].get(sub) if table in _TABLES else None
    return _CONFIG_SPECS.get(key)


def _flag_layer(flags: Mapping[str, object]) -> _Layer:
    """Check flag values; keys are field names, ``table.key`` for table keys (``tls.cert``
    is the flag ``--tls-cert``). Secrets are refused: flags show in ``ps``."""
    layer: _Layer = {}
    for key, value in flags.items():
        if value is None:
            continue
        source = f"flag --{key.replace('_', '-').replace('.', '-')}"
        if key in SECRET_KEYS:
            env_name = ENV_PREFIX + key.replace(".", "_").upper()
            raise ConfigError(
                f"{source}: {key} cannot be given as a flag (other users can read flags with ps); "
                f"use the config file, the environment variable {env_name} or {key}_file",
                key=key,
                source=source,
            )
        spec = _flag_spec(key)
        if key == "channels":
            layer[key] = (_parse_channels(value, source), source)
        elif spec is not None:
            from_text = isinstance(value, str) and spec.kind is not str
            layer[key] = (_coerce(spec, value, source=source, key=key, from_text=from_text), source)
        else:
            raise _unknown_key(source, "", key, CONFIG_KEYS)
    return layer


def _check_pairs(merged: _Layer) -> None:
    """Check keys that exclude or need each other."""
    def given(key: str) -> tuple[Any, str] | None:
        found = merged.get(key)
        return found if found is not None and found[0] not in ("", ()) else None

    for one, other in (("auth.jwt_secret", "auth.jwt_secret_file"), ("auth.api_keys", "auth.api_keys_file")):
        a, b = given(one), given(other)
        if a is not None and b is not None:
            raise ConfigError(
                f"{b[1]}: {other} is not allowed together with {one} (from {a[1]}); set only one of them",
                key=other,
                source=b[1],
            )
    cluster = merged.get("redis_cluster")
    if cluster is not None and cluster[0] and given("redis_url") is None:
        raise ConfigError(
            f"{cluster[1]}: redis_cluster = true needs redis_url (one or more of the cluster's nodes)",
            key="redis_cluster", source=cluster[1])
    urls = given("redis_url")
    if cluster is not None and cluster[0] and urls is not None and any(
            u.startswith(_SENTINEL_PREFIXES) for u in urls[0]):
        raise ConfigError(
            f"{cluster[1]}: redis_cluster = true does not go with a redis+sentinel:// URL (from {urls[1]}): "
            "a Redis Cluster fails over by itself", key="redis_cluster", source=cluster[1])
    cert, key = given("tls.cert"), given("tls.key")
    if (cert is None) != (key is None):
        missing, present = ("tls.key", cert) if key is None else ("tls.cert", key)
        assert present is not None
        have = "tls.cert" if key is None else "tls.key"
        raise ConfigError(
            f"{present[1]}: {have} is set but {missing} is not; TLS needs both the certificate "
            "chain and its private key (PEM files)",
            key=missing,
            source=present[1],
        )


def _check_send_queue(merged: _Layer) -> None:
    """Check send_queue_size >= 2 * max_message_size, blaming whichever was set by the user.

    A send queue must hold at least two of the largest messages, or one big message could
    trip the slow-consumer policy on its own.
    """
    max_message, message_source = merged.get("max_message_size", (Config.max_message_size, "default"))
    queue, queue_source = merged.get("send_queue_size", (Config.send_queue_size, "default"))
    if queue >= 2 * max_message:
        return
    if queue_source != "default":
        raise ConfigError(
            f"{queue_source}: send_queue_size = {queue} is not allowed; expected at least "
            f"2 * max_message_size = {2 * max_message} (max_message_size = {max_message} "
            f"from {message_source})",
            key="send_queue_size",
            source=queue_source,
        )
    raise ConfigError(
        f"{message_source}: max_message_size = {max_message} is not allowed; expected at most "
        f"send_queue_size / 2 = {queue // 2} (send_queue_size = {queue} from default); "
        "raise send_queue_size as well",
        key="max_message_size",
        source=message_source,
    )


def load_config(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
) -> Config:
    """Build a validated :class:`Config` from flags, environment, a TOML file and defaults.

    Flags beat the environment, which beats the file, which beats the defaults; each key
    is decided on its own (``channels`` as a whole list). Every layer is checked in full,
    even values a higher layer overrides.

    Args:
        path: TOML file to read; when None, ``env["RELAY_CONFIG"]`` is used if present.
        env: environment variables (typically ``os.environ``); only ``RELAY_<FIELD>`` names
            of known fields are read, other ``RELAY_*`` names are ignored.
        flags: field name -> value from the command line; None values mean "not given".
            String values for numeric fields are parsed as in the environment.

    Returns:
        The merged configuration.

    Raises:
        ConfigError: a value, key or file is invalid; the message names the key, the
            source, the value and what is allowed, and ``key``/``source`` are set.
    """
    env = {} if env is None else env
    named_by_env = False
    if path is None and CONFIG_PATH_ENV in env:
        path = env[CONFIG_PATH_ENV]
        named_by_env = True
    layers: list[_Layer] = []
    if path is not None:
        layers.append(_file_layer(path, named_by_env=named_by_env))
    layers.append(_env_layer(env))
    if flags is not None:
        layers.append(_flag_layer(flags))

    merged: _Layer = {}
    for layer in layers:  # lowest first, so later layers win
        merged.update(layer)

    _check_send_queue(merged)
    _check_pairs(merged)
    values: dict[str, Any] = {key: value for key, (value, _source) in merged.items() if "." not in key}
    for table, (cls, _specs) in _TABLES.items():
        prefix = table + "."
        sub_values = {key[len(prefix):]: value for key, (value, _s) in merged.items() if key.startswith(prefix)}
        if sub_values:
            values[table] = cls(**sub_values)
    return Config(**values)


__all__ = [
    "CHANNEL_KEYS",
    "CONFIG_KEYS",
    "SECRET_KEYS",
    "TABLE_KEYS",
    "AuthConfig",
    "LimitsConfig",
    "TlsConfig",
    "DEFAULT_SLOW_CONSUMER",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MODES",
    "SLOW_CONSUMER_POLICIES",
    "ChannelOptions",
    "Config",
    "effective_node_id",
    "generate_node_id",
    "load_config",
    "parse_sentinel_url",
    "redact_url",
    "redis_url_problem",
]
