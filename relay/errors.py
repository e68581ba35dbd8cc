"""Every error relay raises, and what each one puts on the wire.

::

    RelayError                      base of everything below
    ├── ConfigError                 bad configuration (names the key, the source, what is allowed)
    ├── Unavailable                 a broker (Redis) cannot take the request now
    │                               -> error code "unavailable" (HTTP 503)
    └── PeerError                   the peer did something wrong; carries the wire answer
        ├── BadRequest              malformed or invalid message      -> error code "bad_request"
        ├── Unauthorized            missing or invalid token          -> error code "unauthorized"
        │                           (at the handshake: HTTP 401 whose body names the ``reason``)
        ├── Forbidden               not allowed                       -> error code "forbidden"
        ├── TooLarge                message over a size limit         -> error code "too_large"
        └── RateLimited             over a rate limit                 -> error code "rate_limited"

A :class:`PeerError` carries the protocol ``code`` and the request's ``ref`` so the
shell can answer without guessing. This module imports nothing from trio.
"""

from __future__ import annotations

from typing import Any


class RelayError(Exception):
    """Base class of every error relay raises."""


class ConfigError(RelayError):
    """The configuration is invalid.

    The message names the key, where it came from (file, environment or flag) and
    what is allowed.
    """

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.source = source


class Unavailable(RelayError):
    """The broker relay needs (Redis) is unreachable, too slow or overloaded (``unavailable``).

    Not the peer's fault: a publish that gets it may be retried later. Like a
    :class:`PeerError` it carries the wire ``code`` and the request's ``ref``.
    """

    code = "unavailable"

    def __init__(self, message: str, *, ref: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.ref = ref


class PeerError(RelayError):
    """An error caused by the peer; answered with an ``error`` message."""

    code = "internal"

    def __init__(self, message: str, *, ref: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.ref = ref


class BadRequest(PeerError):
    """The message is malformed or invalid (``bad_request``)."""

    code = "bad_request"


class Unauthorized(PeerError):
    """The token is missing or invalid (``unauthorized``).

    ``reason`` says which check failed, as one word the HTTP 401 body carries:
    ``missing``, ``malformed``, ``alg_none``, ``algorithm_not_allowed``, ``unknown_key``,
    ``bad_signature``, ``expired``, ``not_yet_valid``, ``wrong_audience``, ``wrong_issuer``,
    ``missing_claim``, ``bad_claims`` or (on ``refresh``) ``wrong_user``.
    """

    code = "unauthorized"

    def __init__(self, message: str, *, reason: str, ref: Any = None) -> None:
        super().__init__(message, ref=ref)
        self.reason = reason


class Forbidden(PeerError):
    """The client may not do this (``forbidden``)."""

    code = "forbidden"


class TooLarge(PeerError):
    """The message is over a size limit (``too_large``)."""

    code = "too_large"


class RateLimited(PeerError):
    """The client sends faster than its limits allow (``rate_limited``)."""

    code = "rate_limited"


__all__ = [
    "RelayError", "ConfigError", "PeerError", "BadRequest", "Unauthorized", "Forbidden",
    "TooLarge", "RateLimited", "Unavailable",
]
