"""Client-to-server messages: parse a decoded dict into a typed envelope, or explain why not.

Owns the field rules of PROTOCOL.md (types, required fields, ``ref`` echo) and
channel-name validation. Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from ..errors import BadRequest

Ref = Union[int, str, None]
MAX_REF_LENGTH = 256
CLIENT_TYPES = ("subscribe", "unsubscribe", "publish", "ping", "refresh", "presence", "presence_stats")


@dataclass(frozen=True, slots=True)
class Since:
    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    channel: str
    ref: Ref = None
    since: Since | None = None
    #: The subscriber applies JSON Merge Patch deltas (channels with ``delta = true``).
    delta: bool = False


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    channel: str
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Publish:
    channel: str
    data: Any
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Ping:
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Refresh:
    token: str
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Presence:
    """Ask for a channel's members (``presence``) or only their counts (``presence_stats``)."""

    channel: str
    ref: Ref = None
    stats: bool = False


Envelope = Union[Subscribe, Unsubscribe, Publish, Ping, Refresh, Presence]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_ref(message: dict[str, Any]) -> Ref:
    """Return the message's ``ref`` (int or string), or raise BadRequest without a ref."""
    ref = message.get("ref")
    if ref is None or _is_int(ref):
        return ref  # type: ignore[no-any-return]
    if isinstance(ref, str):
        if len(ref) > MAX_REF_LENGTH:
            raise BadRequest(f"ref is {len(ref)} characters long; the limit is {MAX_REF_LENGTH}")
        return ref
    raise BadRequest(f"ref must be an integer or a string, got {type(ref).__name__}")


def validate_channel(channel: Any, max_length: int, ref: Ref = None) -> str:
    """Return ``channel`` when it is a valid channel name, else raise BadRequest.

    A channel name is a string of 1 to ``max_length`` characters with no whitespace
    and no control characters.
    """
    if not isinstance(channel, str):
        kind = "missing" if channel is None else f"a {type(channel).__name__}"
        raise BadRequest(f"channel must be a string, got {kind}", ref=ref)
    if not channel:
        raise BadRequest("channel must not be empty", ref=ref)
    if len(channel) > max_length:
        raise BadRequest(
            f"channel name of {len(channel)} characters exceeds max_channel_length={max_length}",
            ref=ref,
        )
    for ch in channel:
        if ch.isspace() or not ch.isprintable():
            raise BadRequest(
                f"channel name contains {ch!r}; whitespace and control characters are not allowed",
                ref=ref,
            )
    return channel


def _parse_since(value: Any, ref: Ref) -> Since | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest("since must be an object with epoch and offset", ref=ref)
    epoch, offset = value.get("epoch"), value.get("offset")
    if not isinstance(epoch, str):
        raise BadRequest("since.epoch must be a string", ref=ref)
    if not _is_int(offset) or offset < 0:
        raise BadRequest("since.offset must be an integer >= 0", ref=ref)
    return Since(epoch, offset)


def parse(message: dict[str, Any], *, max_channel_length: int = 255) -> Envelope:
    """Turn a decoded client message into an envelope.

    Raises:
        BadRequest: the message is not valid; carries the message's ``ref`` when it
            had a valid one.
    """
    ref = parse_ref(message)
    kind = message.get("type")
    if kind == "publish":
        if "data" not in message:
            raise BadRequest("publish needs a data field", ref=ref)
        channel = validate_channel(message.get("channel"), max_channel_length, ref)
        return Publish(channel, message["data"], ref)
    if kind == "subscribe":
        channel = validate_channel(message.get("channel"), max_channel_length, ref)
        delta = message.get("delta", False)
        if not isinstance(delta, bool):
            raise BadRequest("delta must be true or false", ref=ref)
        return Subscribe(channel, ref, _parse_since(message.get("since"), ref), delta)
    if kind == "unsubscribe":
        return Unsubscribe(validate_channel(message.get("channel"), max_channel_length, ref), ref)
    if kind == "ping":
        return Ping(ref)
    if kind == "presence" or kind == "presence_stats":
        channel = validate_channel(message.get("channel"), max_channel_length, ref)
        return Presence(channel, ref, kind == "presence_stats")
    if kind == "refresh":
        token = message.get("token")
        if not isinstance(token, str) or not token:
            raise BadRequest("refresh needs a token string", ref=ref)
        return Refresh(token, ref)
    if kind is None:
        raise BadRequest("message has no type", ref=ref)
    if not isinstance(kind, str):
        raise BadRequest(f"type must be a string, got {type(kind).__name__}", ref=ref)
    raise BadRequest(
        f"unknown type {kind[:64]!r}; expected one of {', '.join(CLIENT_TYPES)}", ref=ref
    )
