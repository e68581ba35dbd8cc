"""Every error relay raises, and what each one puts on the wire.

::

    RelayError                      base of everything below
    ├── ConfigError                 bad configuration (names the key, the source, what is allowed)
    └── PeerError                   the peer did something wrong; carries the wire answer
        ├── BadRequest              malformed or invalid message      -> error code "bad_request"
        ├── Forbidden               not allowed                       -> error code "forbidden"
        └── TooLarge                message over a size limit         -> error code "too_large"

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


class Forbidden(PeerError):
    """The client may not do this (``forbidden``)."""

    code = "forbidden"


class TooLarge(PeerError):
    """The message is over a size limit (``too_large``)."""

    code = "too_large"


__all__ = ["RelayError", "ConfigError", "PeerError", "BadRequest", "Forbidden", "TooLarge"]
