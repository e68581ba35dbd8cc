"""Envelope encoding: one published message serialized and framed, per encoding.

This is the once-per-message cost that encode-once fan-out pays regardless of the
number of subscribers (the frame is then shared by all of them).
"""

from __future__ import annotations

from typing import Any

import pytest

from relay.core.codec import CODECS, Codec

MESSAGE = {
    "type": "message", "channel": "prices.EURUSD", "offset": 123456,
    "data": {"bid": 1.08321, "ask": 1.08324, "ts": 1764268800123, "venue": "LP3"},
}


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_encode_message_frame(benchmark: Any, codec: Codec) -> None:
    """Serialize and frame one price message."""
    benchmark.group = "encode message frame"
    frame = benchmark(codec.frame, MESSAGE)
    assert frame[0] == (0x81 if codec.name == "json" else 0x82)
