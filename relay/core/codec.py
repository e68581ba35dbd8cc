"""The two wire encodings (JSON text frames, MessagePack binary frames) behind one interface.

Owns subprotocol negotiation and turning a frame's payload into a message dict
(or a :class:`~relay.errors.BadRequest` that says what is wrong). It never
touches a socket.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import msgpack

from ..errors import BadRequest
from ..fastpath import ENC_JSON, ENC_MSGPACK, OP_BINARY, OP_TEXT, encode_frame

SUBPROTOCOL_JSON = "relay.v1.json"
SUBPROTOCOL_MSGPACK = "relay.v1.msgpack"
MAX_NESTING = 64
MIN_INT = -(2**63)
MAX_INT = 2**64 - 1


def loads_json(text: str | bytes) -> Any:
    """Parse JSON text, refusing the non-standard ``NaN`` and ``Infinity`` literals.

    Raises:
        ValueError: the text is not valid JSON.
        RecursionError: it is nested too deeply to parse.
    """
    return json.loads(text, parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not supported")


class Codec(ABC):
    """One encoding: how to decode a client's payload and encode a server message."""

    name: str
    subprotocol: str
    encoding: int
    opcode: int

    @abstractmethod
    def decode(self, payload: str | bytes) -> dict[str, Any]:
        """Return the message in ``payload``, or raise BadRequest saying what is wrong."""

    @abstractmethod
    def encode(self, message: dict[str, Any]) -> bytes:
        """Return ``message`` as this encoding's bytes."""

    def frame(self, message: dict[str, Any]) -> bytes:
        """Encode ``message`` and wrap it in one WebSocket frame."""
        return encode_frame(self.opcode, self.encode(message))


class JsonCodec(Codec):
    name = "json"
    subprotocol = SUBPROTOCOL_JSON
    encoding = ENC_JSON
    opcode = OP_TEXT

    def decode(self, payload: str | bytes) -> dict[str, Any]:
        if not isinstance(payload, str):
            raise BadRequest(
                f"binary frame on a {SUBPROTOCOL_JSON} connection; send JSON in text frames"
            )
        try:
            obj = loads_json(payload)
        except RecursionError:
            raise BadRequest("invalid JSON: nested too deeply") from None
        except ValueError as exc:
            raise BadRequest(f"invalid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise BadRequest(f"a message must be a JSON object, got {type(obj).__name__}")
        return obj

    def encode(self, message: dict[str, Any]) -> bytes:
        return dumps_json(message)


class MsgpackCodec(Codec):
    name = "msgpack"
    subprotocol = SUBPROTOCOL_MSGPACK
    encoding = ENC_MSGPACK
    opcode = OP_BINARY

    def decode(self, payload: str | bytes) -> dict[str, Any]:
        if not isinstance(payload, bytes):
            raise BadRequest(
                f"text frame on a {SUBPROTOCOL_MSGPACK} connection; send MessagePack in binary frames"
            )
        try:
            obj = msgpack.unpackb(payload, raw=False, ext_hook=_reject_ext, strict_map_key=False)
        except UnicodeDecodeError as exc:
            raise BadRequest(f"invalid UTF-8 in a MessagePack string: {exc.reason}") from None
        except (ValueError, msgpack.UnpackException, msgpack.ExtraData) as exc:
            raise BadRequest(f"invalid MessagePack: {exc}") from None
        except RecursionError:
            raise BadRequest("invalid MessagePack: nested too deeply") from None
        if not isinstance(obj, dict):
            raise BadRequest(f"a message must be a MessagePack map, got {type(obj).__name__}")
        return obj

    def encode(self, message: dict[str, Any]) -> bytes:
        return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]


JSON = JsonCodec()
MSGPACK = MsgpackCodec()
CODECS: tuple[Codec, ...] = (JSON, MSGPACK)  # indexed by encoding
BY_SUBPROTOCOL = {c.subprotocol: c for c in CODECS}
SUPPORTED_SUBPROTOCOLS = tuple(BY_SUBPROTOCOL)


def dumps_json(obj: Any) -> bytes:
    """Encode ``obj`` as compact UTF-8 JSON (no NaN or infinities)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def negotiate(offered: Sequence[str]) -> Codec | None:
    """Pick the codec for the subprotocols a client offered, in the client's order.

    No offer at all means JSON; offers that name only unknown subprotocols give None
    (the server refuses the handshake with HTTP 400).
    """
    if not offered:
        return JSON
    for name in offered:
        codec = BY_SUBPROTOCOL.get(name)
        if codec is not None:
            return codec
    return None


def check_json_compatible(value: Any, what: str = "data") -> None:
    """Raise BadRequest unless ``value`` can be sent to every subscriber in every encoding.

    Data must be representable in both encodings: maps with string keys, lists,
    strings, finite numbers, integers within MessagePack's 64-bit range, booleans and
    null. Bytes, non-string keys, non-finite floats (a JSON ``1e400`` parses as
    infinity) and wider integers are refused, so a publish never gets an offset for
    something some subscriber could not receive.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_NESTING:
            raise BadRequest(f"{what} is nested deeper than {MAX_NESTING} levels")
        if v is None or isinstance(v, (str, bool)):
            continue
        if isinstance(v, int):
            if not MIN_INT <= v <= MAX_INT:
                raise BadRequest(
                    f"{what} holds the integer {str(v)[:24]}..., outside the 64-bit range "
                    f"MessagePack subscribers can receive")
            continue
        if isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                raise BadRequest(f"{what} holds a non-finite number, which JSON cannot carry")
            continue
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise BadRequest(
                        f"{what} holds a map key of type {type(k).__name__}; keys must be strings"
                    )
                stack.append((item, depth + 1))
            continue
        if isinstance(v, (list, tuple)):
            stack.extend((item, depth + 1) for item in v)
            continue
        raise BadRequest(
            f"{what} holds a value of type {type(v).__name__}, which JSON subscribers cannot receive"
        )
