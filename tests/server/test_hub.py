"""The hub without sockets: encode-once fan-out, slow-consumer policies, recovery joins."""

from __future__ import annotations

import json
from typing import Any

import pytest

from relay import fastpath
from relay.config import ChannelOptions, Config
from relay.core.codec import CODECS, JSON, MSGPACK, Codec
from relay.core.envelope import Since
from relay.server.hub import Hub

from .conftest import pop_ts


class FakeSub:
    def __init__(self, codec: Codec = JSON, limit: int = 1 << 20) -> None:
        self.codec = codec
        self.outbox = fastpath.Outbox(limit, codec.encoding, self)
        self.subscriptions: set[str] = set()
        self.woken = 0
        self.kicked: list[tuple[int, str]] = []

    def wake(self) -> None:
        self.woken += 1

    def kick(self, code: int, reason: str) -> None:
        self.kicked.append((code, reason))

    def messages(self) -> list[dict[str, Any]]:
        data = self.outbox.take()
        out = []
        while data:
            n = data[1] & 0x7F
            start = 2
            if n == 126:
                n, start = int.from_bytes(data[2:4], "big"), 4
            elif n == 127:
                n, start = int.from_bytes(data[2:10], "big"), 10
            payload, data = data[start:start + n], data[start + n:]
            out.append(pop_ts(self.codec.decode(payload.decode() if self.codec is JSON else payload)))
        return out


def hub(*channels: ChannelOptions) -> Hub:
    return Hub(Config(channels=channels))


def test_each_encoding_is_encoded_once_and_shared() -> None:
    h = hub()
    subs = [FakeSub(JSON) for _ in range(3)] + [FakeSub(MSGPACK) for _ in range(2)]
    for s in subs:
        h.subscribe(s, "c", None, None, 0.0)
        s.outbox.take()
    ch, pub = h.publish("c", {"x": 1}, 1.0)
    frames = [s.outbox.take() for s in subs]
    assert frames[0] is frames[1] is frames[2] is pub.frames[fastpath.ENC_JSON]
    assert frames[3] is frames[4] is pub.frames[fastpath.ENC_MSGPACK]


def test_unused_encoding_is_never_built() -> None:
    h = hub()
    s = FakeSub(JSON)
    h.subscribe(s, "c", None, None, 0.0)
    _, pub = h.publish("c", 1, 1.0)
    assert pub.frames[fastpath.ENC_MSGPACK] is None and pub.frames[fastpath.ENC_JSON] is not None


def test_disconnect_policy_kicks_with_4002_and_spares_others() -> None:
    h = hub()
    slow, fast = FakeSub(limit=200), FakeSub()
    for s in (slow, fast):
        h.subscribe(s, "c", None, None, 0.0)
    for i in range(20):
        h.publish("c", "x" * 20, float(i))
        fast.outbox.take()
    assert slow.kicked == [(4002, "slow consumer: send queue overflowed")]
    assert slow.outbox.closed and not fast.kicked


def test_drop_policy_records_a_contiguous_gap() -> None:
    h = hub(ChannelOptions(pattern="*", slow_consumer="drop"))
    s = FakeSub(limit=150)
    h.subscribe(s, "c", None, None, 0.0)
    s.outbox.take()
    for i in range(10):
        h.publish("c", "y" * 20, float(i))
    got = [m["offset"] for m in s.messages()]
    gaps = s.outbox.take_gaps()
    assert len(gaps) == 1
    _, lo, hi = gaps[0]
    assert got + list(range(lo, hi + 1)) == list(range(1, 11))
    assert not s.kicked


def test_conflate_policy_keeps_latest_and_never_goes_back() -> None:
    h = hub(ChannelOptions(pattern="*", mode="state"))
    s = FakeSub(limit=150)
    h.subscribe(s, "p", None, None, 0.0)
    s.outbox.take()
    for i in range(1, 21):
        h.publish("p", i, float(i))
    offsets = [m["offset"] for m in s.messages()]
    assert offsets == sorted(offsets) and offsets[-1] == 20 and len(offsets) < 20


def test_subscribe_recovers_then_joins_live_without_gap() -> None:
    h = hub()
    p = FakeSub()
    for i in range(5):
        h.publish("c", i, float(i))
    epoch = h.get("c").log.epoch  # type: ignore[union-attr]
    s = FakeSub(MSGPACK)
    h.subscribe(s, "c", Since(epoch, 2), 7, 5.0)
    h.publish("c", 5, 6.0)
    msgs = s.messages()
    assert msgs[0] == {"type": "subscribed", "channel": "c", "epoch": epoch, "offset": 5,
                       "recovered": True, "ref": 7}
    assert [m["offset"] for m in msgs[1:]] == [3, 4, 5, 6]
    assert p.outbox.size == 0


def test_sweep_forgets_idle_expired_channels_only() -> None:
    h = hub(ChannelOptions(pattern="*", history_ttl=10.0))
    s = FakeSub()
    h.subscribe(s, "kept", None, None, 0.0)
    h.publish("gone", 1, 0.0)
    assert h.sweep(5.0) == 0
    assert h.sweep(20.0) == 1
    assert h.get("gone") is None and h.get("kept") is not None


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_poke_frames_carry_offset_only(codec: Codec) -> None:
    h = hub(ChannelOptions(pattern="*", mode="poke"))
    s = FakeSub(codec)
    h.subscribe(s, "o", None, None, 0.0)
    s.outbox.take()
    h.publish("o", {"big": "payload"}, 1.0)
    assert s.messages() == [{"type": "poke", "channel": "o", "offset": 1}]
    assert json.dumps(h.get("o").log.latest.data)  # type: ignore[union-attr]


def test_publish_marks_each_outbox_dirty_once_and_wakes_the_flusher() -> None:
    h = hub()
    wakes: list[int] = []
    h.wake_flusher = lambda: wakes.append(1)
    subs = [FakeSub() for _ in range(3)]
    for s in subs:
        h.subscribe(s, "c", None, None, 0.0)
        s.outbox.take()
    for i in range(4):
        h.publish("c", i, float(i))
    assert h.dirty == [s.outbox for s in subs] and len(wakes) == 4
    assert all(len(s.messages()) == 4 for s in subs)


def test_flush_writes_each_dirty_outbox_in_one_send_and_keeps_what_did_not_fit() -> None:
    import socket

    h = hub()
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s = FakeSub()
        s.outbox.fd = a.fileno()
        h.subscribe(s, "c", None, None, 0.0)
        h.dirty.clear()
        s.outbox.take()
        for i in range(3):
            h.publish("c", i, float(i))
        wake, sent = fastpath.flush(h.dirty)
        assert wake == [] and h.dirty == []
        got = b.recv(65536)
        assert sent == len(got) and got.count(b'"type":"message"') == 3
        # a held outbox is left to its writer
        s.outbox.hold()
        h.publish("c", "x", 4.0)
        assert fastpath.flush(h.dirty) == ([s], 0)
        s.outbox.release()
        s.outbox.take()
        # the kernel takes part of a big burst: the rest stays queued, first in line
        frames = []
        for i in range(200):
            _, pub = h.publish("c", "y" * 1000, 5.0 + i)
            frames.append(pub.frames[fastpath.ENC_JSON])
        wake, sent = fastpath.flush(h.dirty)
        assert wake == [s] and 0 < sent and s.outbox.size > 0
        rest = s.outbox.take()
        received = bytearray()
        while len(received) < sent:
            received += b.recv(65536)
        assert bytes(received) + rest == b"".join(frames)  # type: ignore[arg-type]
