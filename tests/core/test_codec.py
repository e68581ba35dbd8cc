"""Encodings and subprotocol negotiation."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest

from relay.core import codec as c
from relay.errors import BadRequest


@pytest.mark.parametrize(("offered", "expected"), [
    ((), c.JSON),
    (("relay.v1.json",), c.JSON),
    (("relay.v1.msgpack",), c.MSGPACK),
    (("chat", "relay.v1.msgpack", "relay.v1.json"), c.MSGPACK),
    (("relay.v1.json", "relay.v1.msgpack"), c.JSON),
    (("chat.v9",), None),
    (("relay.v2.json", "x"), None),
], ids=["none", "json", "msgpack", "first-known-wins", "client-order", "unknown", "unknown-2"])
def test_negotiate(offered: tuple[str, ...], expected: c.Codec | None) -> None:
    assert c.negotiate(offered) is expected


@pytest.mark.parametrize(("codec", "payload", "fragment"), [
    (c.JSON, b"{}", "binary frame"),
    (c.JSON, "nope", "invalid JSON"),
    (c.JSON, "[1]", "must be a JSON object"),
    (c.JSON, '{"a": NaN}', "NaN is not valid JSON"),
    (c.JSON, "[" * 100000, "invalid JSON"),
    (c.MSGPACK, "{}", "text frame"),
    (c.MSGPACK, b"\xc1", "invalid MessagePack"),
    (c.MSGPACK, msgpack.packb([1]), "must be a MessagePack map"),
    (c.MSGPACK, b"\x81\xa1a\xa2\xff\xfe", "invalid UTF-8"),
    (c.MSGPACK, msgpack.packb({"a": 1}) + b"\x00", "invalid MessagePack"),
    (c.MSGPACK, b"\x81\xa1a\xd4\x05\x00", "extension type 5"),
], ids=["json-binary", "json-invalid", "json-array", "json-nan", "json-deep", "mp-text", "mp-invalid",
        "mp-array", "mp-bad-utf8", "mp-extra", "mp-ext"])
def test_decode_errors(codec: c.Codec, payload: Any, fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        codec.decode(payload)
    assert fragment in info.value.message


def test_roundtrip_and_frames() -> None:
    msg = {"type": "message", "channel": "ä", "offset": 1, "data": {"x": [1.5, None]}}
    assert c.JSON.decode(c.JSON.encode(msg).decode()) == msg
    assert c.MSGPACK.decode(c.MSGPACK.encode(msg)) == msg
    frame = c.JSON.frame(msg)
    assert frame[0] == 0x81 and frame[2:] == c.JSON.encode(msg)
    assert c.MSGPACK.frame(msg)[0] == 0x82
    assert json.loads(c.dumps_json(msg)) == msg


@pytest.mark.parametrize("value", [
    None, 1, -2**63, 2**64 - 1, 1.5, "s", True, [1, [2, {"a": None}]], {"k": {"k": []}},
], ids=["none", "int", "min-int", "max-int", "float", "str", "bool", "nested-list", "nested-map"])
def test_json_compatible_accepts(value: Any) -> None:
    c.check_json_compatible(value)


@pytest.mark.parametrize(("value", "fragment"), [
    (b"x", "type bytes"),
    (2**64, "64-bit range"),
    ({"a": [-(2**63) - 1]}, "64-bit range"),
    ({1: "a"}, "map key of type int"),
    ({"a": [float("nan")]}, "non-finite"),
    (float("inf"), "non-finite"),
    ([[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
     "nested deeper"),
], ids=["bytes", "too-big-int", "too-small-int", "int-key", "nan", "inf", "deep"])
def test_json_compatible_refuses(value: Any, fragment: str) -> None:
    with pytest.raises(BadRequest, match=fragment):
        c.check_json_compatible(value)
