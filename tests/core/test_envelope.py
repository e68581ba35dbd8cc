"""Parsing client messages: every field rule of PROTOCOL.md, table-driven."""

from __future__ import annotations

from typing import Any

import pytest

from relay.core import envelope as e
from relay.errors import BadRequest

GOOD = [
    ({"type": "ping"}, e.Ping(None)),
    ({"type": "ping", "ref": 7}, e.Ping(7)),
    ({"type": "ping", "ref": "a"}, e.Ping("a")),
    ({"type": "subscribe", "channel": "a"}, e.Subscribe("a")),
    ({"type": "subscribe", "channel": "a", "since": {"epoch": "e", "offset": 3}, "ref": 1},
     e.Subscribe("a", 1, e.Since("e", 3))),
    ({"type": "subscribe", "channel": "a", "since": None}, e.Subscribe("a")),
    ({"type": "unsubscribe", "channel": "a.b:c"}, e.Unsubscribe("a.b:c")),
    ({"type": "publish", "channel": "a", "data": None}, e.Publish("a", None)),
    ({"type": "publish", "channel": "a", "data": {"x": [1]}, "ref": "r"}, e.Publish("a", {"x": [1]}, "r")),
    ({"type": "refresh", "token": "t"}, e.Refresh("t")),
    ({"type": "ping", "extra": "ignored"}, e.Ping(None)),
]


@pytest.mark.parametrize(("msg", "expected"), GOOD, ids=[str(i) for i in range(len(GOOD))])
def test_parse_valid(msg: dict[str, Any], expected: e.Envelope) -> None:
    assert e.parse(msg) == expected


BAD = [
    ({}, "no type", None),
    ({"type": 5, "ref": 1}, "type must be a string", 1),
    ({"type": "nope", "ref": "r"}, "unknown type 'nope'", "r"),
    ({"type": "ping", "ref": 1.5}, "ref must be an integer or a string", None),
    ({"type": "ping", "ref": True}, "ref must be an integer or a string", None),
    ({"type": "ping", "ref": [1]}, "ref must be an integer or a string", None),
    ({"type": "ping", "ref": "x" * 257}, "the limit is 256", None),
    ({"type": "subscribe", "ref": 2}, "channel must be a string, got missing", 2),
    ({"type": "subscribe", "channel": 5, "ref": 2}, "channel must be a string, got a int", 2),
    ({"type": "subscribe", "channel": ""}, "must not be empty", None),
    ({"type": "subscribe", "channel": "x" * 256}, "exceeds max_channel_length=255", None),
    ({"type": "subscribe", "channel": "a\x00"}, "control characters", None),
    ({"type": "subscribe", "channel": "a\nb"}, "whitespace", None),
    ({"type": "subscribe", "channel": "a b"}, "whitespace", None),
    ({"type": "subscribe", "channel": "a\x7f"}, "control characters", None),
    ({"type": "subscribe", "channel": "a", "since": 3, "ref": 4}, "since must be an object", 4),
    ({"type": "subscribe", "channel": "a", "since": {"offset": 1}}, "since.epoch", None),
    ({"type": "subscribe", "channel": "a", "since": {"epoch": "e", "offset": -1}}, "since.offset", None),
    ({"type": "subscribe", "channel": "a", "since": {"epoch": "e", "offset": "1"}}, "since.offset", None),
    ({"type": "subscribe", "channel": "a", "since": {"epoch": "e", "offset": True}}, "since.offset", None),
    ({"type": "publish", "channel": "a", "ref": 3}, "publish needs a data field", 3),
    ({"type": "publish", "data": 1}, "channel must be a string", None),
    ({"type": "unsubscribe"}, "channel must be a string", None),
    ({"type": "refresh"}, "refresh needs a token", None),
    ({"type": "refresh", "token": ""}, "refresh needs a token", None),
]


@pytest.mark.parametrize(("msg", "fragment", "ref"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_parse_invalid(msg: dict[str, Any], fragment: str, ref: Any) -> None:
    with pytest.raises(BadRequest) as info:
        e.parse(msg)
    assert fragment in info.value.message
    assert info.value.ref == ref
    assert info.value.code == "bad_request"


def test_channel_length_limit_is_configurable() -> None:
    assert e.parse({"type": "subscribe", "channel": "abcd"}, max_channel_length=4).channel == "abcd"
    with pytest.raises(BadRequest, match="max_channel_length=3"):
        e.parse({"type": "subscribe", "channel": "abcd"}, max_channel_length=3)


def test_unicode_channel_names_are_allowed() -> None:
    assert e.validate_channel("чат.комната", 255) == "чат.комната"
