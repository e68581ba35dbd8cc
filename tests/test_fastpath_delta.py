"""Outbox.offer / fanout_into with ``full``: a delta channel's patch is queued while the
subscriber keeps up; what is held (conflated) or replaces an older frame in a tick is the
full value, so a patch never reaches a subscriber that lacks its base."""

from __future__ import annotations

import importlib
import json
from types import ModuleType

from hypothesis import given, settings
from hypothesis import strategies as st

import relay._fastpath_py as _py


def test_a_held_frame_is_the_full_value(impl: ModuleType) -> None:
    box = impl.Outbox(10)
    assert box.offer("ch", b"p1", impl.POLICY_CONFLATE, 1, False, b"FULL-1") == impl.OFFER_QUEUED
    assert box.offer("ch", b"p2-patch", impl.POLICY_CONFLATE, 2, False, b"FULL-2") == impl.OFFER_QUEUED
    # over the limit: held, and what is held is the full value (the size check used the patch)
    assert box.offer("ch", b"p3-patch", impl.POLICY_CONFLATE, 3, False, b"FULL-3") == impl.OFFER_CONFLATED
    assert box.offer("ch", b"p4-patch", impl.POLICY_CONFLATE, 4, False, b"FULL-4") == impl.OFFER_CONFLATED
    assert box.size == 2 + 8 + 6
    assert box.take() == b"p1p2-patchFULL-4"
    box.behind = False  # (the writer, once that was written in full)
    # caught up: patches again
    assert box.offer("ch", b"p5", impl.POLICY_CONFLATE, 5, False, b"FULL-5") == impl.OFFER_QUEUED
    assert box.take() == b"p5"


def test_without_full_the_frame_is_held(impl: ModuleType) -> None:
    box = impl.Outbox(4)
    box.offer("ch", b"abcd", impl.POLICY_CONFLATE, 1)
    assert box.offer("ch", b"ef", impl.POLICY_CONFLATE, 2, False, None) == impl.OFFER_CONFLATED
    assert box.take() == b"abcdef"


def test_a_frame_replacing_an_older_one_in_a_tick_is_the_full_value(impl: ModuleType) -> None:
    box = impl.Outbox(1000)
    box.start_batching()
    frame1 = impl.encode_frame(impl.OP_TEXT, b'{"p":1}')
    frame2 = impl.encode_frame(impl.OP_TEXT, b'{"p":2}')
    full2 = impl.encode_frame(impl.OP_TEXT, b'{"full":2}')
    box.offer("ch", frame1, impl.POLICY_CONFLATE, 1, True, None)
    assert box.offer("ch", frame2, impl.POLICY_CONFLATE, 2, True, full2) == impl.OFFER_QUEUED
    assert box.take() == impl.encode_frame(impl.OP_TEXT, b'[{"full":2}]')


def test_fanout_into_passes_each_member_the_full_value_of_its_encoding(impl: ModuleType) -> None:
    members = impl.Members()
    boxes = [impl.Outbox(3, enc, f"o{enc}") for enc in (impl.ENC_JSON, impl.ENC_MSGPACK)]
    for box in boxes:
        members.add(box)
    dirty: list[object] = []
    impl.fanout_into(members, (b"j1", b"m1"), "ch", impl.POLICY_CONFLATE, 1, dirty, False, (b"J1", b"M1"))
    impl.fanout_into(members, (b"j2", b"m2"), "ch", impl.POLICY_CONFLATE, 2, dirty, False, (b"J2", b"M2"))
    assert [box.take() for box in boxes] == [b"j1J2", b"m1M2"]
    try:
        impl.fanout_into(members, (b"j", b"m"), "ch", impl.POLICY_CONFLATE, 3, dirty, False, (b"J", None))
    except ValueError as exc:
        assert "no frame for encoding 1" in str(exc)
    else:
        raise AssertionError("expected ValueError")
    assert not any(box.pending for box in boxes)  # nothing was offered


# --------------------------------------------------------------------------- hypothesis

try:
    _IMPLS = [_py, importlib.import_module("relay._fastpath")]
except ImportError:  # no compiled module in this checkout: the twin alone
    _IMPLS = [_py]

# Each step: publish (True) or let the writer take what is queued (False); and the limit.
steps = st.lists(st.booleans(), min_size=1, max_size=60)


def _frames_of(impl: ModuleType, data: bytes) -> list[dict[str, object]]:
    """Decode a byte stream of unmasked text frames (batches unpacked)."""
    out: list[dict[str, object]] = []
    i = 0
    while i < len(data):
        n = data[i + 1]
        start = i + 2
        if n == 126:
            n = int.from_bytes(data[i + 2:i + 4], "big")
            start = i + 4
        payload = json.loads(data[start:start + n])
        out.extend(payload if isinstance(payload, list) else [payload])
        i = start + n
    return out


@settings(max_examples=300, deadline=None)
@given(steps=steps, limit=st.integers(20, 200), batched=st.booleans(), policy=st.sampled_from([0, 2]))
def test_a_subscriber_never_gets_a_patch_without_its_base(
        steps: list[bool], limit: int, batched: bool, policy: int) -> None:
    """Any interleaving of publications and writes, any queue bound, with or without ticks:
    what leaves the outbox, applied in order, never has a patch whose base is not the
    offset the subscriber holds; and the last value leaves (conflate policy)."""
    for impl in _IMPLS:
        box = impl.Outbox(limit)
        if batched:
            box.start_batching()
        taken = b""
        offset = 0
        for publish in steps:
            if publish:
                offset += 1
                patch = impl.encode_frame(impl.OP_TEXT, json.dumps({"o": offset, "d": 1}).encode())
                full = impl.encode_frame(impl.OP_TEXT, json.dumps({"o": offset, "f": "x" * 9}).encode())
                if box.offer("ch", patch, policy, offset, batched, full) == impl.OFFER_OVERFLOW:
                    return  # disconnect: the client reconnects and starts from a full value
            else:
                taken += box.take()
        taken += box.take()
        held = 0
        for msg in _frames_of(impl, taken):
            if "d" in msg:
                assert msg["o"] == held + 1, (impl.IMPLEMENTATION, msg, held)
            held = msg["o"]  # type: ignore[assignment]
        assert held == offset
