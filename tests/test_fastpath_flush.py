"""Direct sends: hold/release, dirty marking, fanout_into and flush, on every implementation.

Real socketpairs stand in for client connections; the peer end reads what ``flush``
wrote. Both implementations must behave the same (the outputs are compared per
implementation against the same expectations).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import ModuleType

import pytest


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.settimeout(5)
    with a, b:
        yield a, b


def _box(impl: ModuleType, fd: int = -1, owner: object = "o", limit: int = 1 << 20) -> object:
    box = impl.Outbox(limit, impl.ENC_JSON, owner)
    box.fd = fd
    return box


def test_hold_release_counts_and_refuses_unmatched_release(impl: ModuleType) -> None:
    box = _box(impl)
    assert box.holds == 0
    box.hold()
    box.hold()
    assert box.holds == 2
    box.release()
    box.release()
    with pytest.raises(ValueError, match="release\\(\\) without a matching hold\\(\\)"):
        box.release()


def test_mark_dirty_appends_once_until_flushed(impl: ModuleType) -> None:
    box, dirty = _box(impl), []
    assert box.mark_dirty(dirty) is True
    assert box.mark_dirty(dirty) is False
    assert dirty == [box]
    assert impl.flush(dirty) == ([], 0)  # nothing pending: nothing to do
    assert dirty == [] and box.mark_dirty(dirty) is True


def test_fanout_into_marks_dirty_once_and_reports_overflow(impl: ModuleType) -> None:
    members = impl.Members()
    a, b = _box(impl, owner="a"), _box(impl, owner="b", limit=5)
    members.add(a)
    members.add(b)
    dirty: list[object] = []
    frame = b"\x81\x03abc"
    assert impl.fanout_into(members, (frame, None), "k", impl.POLICY_DISCONNECT, 1, dirty) == []
    assert impl.fanout_into(members, (frame, None), "k", impl.POLICY_DISCONNECT, 2, dirty) == ["b"]
    assert dirty == [a, b]
    with pytest.raises(ValueError, match="no frame for encoding 0"):
        impl.fanout_into(members, (None, frame), "k", impl.POLICY_DISCONNECT, 3, dirty)
    assert a.size == 2 * len(frame)  # the failed call offered nothing


def test_flush_writes_everything_queued_in_one_send(impl: ModuleType, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    box, dirty = _box(impl, a.fileno()), []
    box.put(b"one")
    box.offer("k", b"two", impl.POLICY_CONFLATE, 1)
    box.mark_dirty(dirty)
    assert impl.flush(dirty) == ([], 6)
    assert b.recv(100) == b"onetwo"
    assert not box.pending and box.size == 0


@pytest.mark.parametrize("why", ["no-socket", "held", "gap"])
def test_flush_leaves_to_the_writer(impl: ModuleType, pair: tuple[socket.socket, socket.socket], why: str) -> None:
    a, b = pair
    box, dirty = _box(impl, -1 if why == "no-socket" else a.fileno(), limit=4), []
    box.put(b"ctl")
    if why == "held":
        box.hold()
    if why == "gap":
        box.offer("k", b"toolarge", impl.POLICY_DROP, 7)
    box.mark_dirty(dirty)
    assert impl.flush(dirty) == (["o"], 0)
    assert box.take() == b"ctl"  # untouched, for the writer
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(100)


def test_partial_send_keeps_the_rest_first_in_line(impl: ModuleType, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    box, dirty = _box(impl, a.fileno()), []
    payload = bytes(range(256)) * 4096  # 1 MiB: more than the socket takes at once
    box.put(payload)
    box.mark_dirty(dirty)
    wake, sent = impl.flush(dirty)
    assert wake == ["o"] and 0 < sent < len(payload)
    assert box.size == len(payload) - sent
    box.put(b"after")
    rest = box.take()
    assert rest == payload[sent:] + b"after"
    received = bytearray()
    while len(received) < sent:
        received += b.recv(1 << 20)
    assert bytes(received) == payload[:sent]


def test_flush_to_a_closed_peer_keeps_the_bytes_for_the_writer(impl: ModuleType) -> None:
    a, b = socket.socketpair()
    with a:
        a.setblocking(False)
        b.close()
        box, dirty = _box(impl, a.fileno()), []
        box.put(b"lost?")
        box.mark_dirty(dirty)
        assert impl.flush(dirty) == (["o"], 0)
        assert box.take() == b"lost?"


def test_rest_of_a_partial_send_survives_close_and_is_taken_first(impl: ModuleType, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    box, dirty = _box(impl, a.fileno()), []
    payload = b"z" * (1 << 20)
    box.put(payload)
    box.mark_dirty(dirty)
    _, sent = impl.flush(dirty)
    rest = payload[sent:]
    box.put(b"queued-later")
    box.close()  # e.g. a 4002 overflow: queued frames go, half a frame on the wire does not
    assert box.pending and box.size == len(rest)
    assert box.take_rest() == rest and box.size == 0 and box.take_rest() == b""
    assert box.take() == b""


def test_flush_tallies_the_bytes_written_per_encoding(impl: ModuleType) -> None:
    """``flush(dirty, by_encoding)`` adds what it wrote to each outbox's encoding entry
    (what a full socket did not take is not counted)."""
    (j1, j2), (m1, m2), (f1, f2) = socket.socketpair(), socket.socketpair(), socket.socketpair()
    with j1, j2, m1, m2, f1, f2:
        for s in (j1, m1, f1):
            s.setblocking(False)
        f1.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        json_box = _box(impl, fd=j1.fileno(), owner="j")
        msgpack_box = impl.Outbox(1 << 22, impl.ENC_MSGPACK, "m")
        msgpack_box.fd = m1.fileno()
        full_box = _box(impl, fd=f1.fileno(), owner="f", limit=1 << 22)
        json_box.put(b"\x81\x03abc")
        msgpack_box.put(b"\x82\x02\x01\x02")
        big = b"\x82\x7f" + (1 << 20).to_bytes(8, "big") + b"x" * (1 << 20)
        full_box.put(big)  # a JSON outbox whose socket takes only part of it
        dirty = [json_box, msgpack_box, full_box]
        tally = [100, 7]
        wake, sent = impl.flush(dirty, tally)
        assert wake == ["f"]
        partial = len(big) - full_box.size
        assert 0 < partial < len(big)
        assert tally == [100 + 5 + partial, 7 + 4]
        assert sent == 5 + 4 + partial
        assert m2.recv(16) == b"\x82\x02\x01\x02" and j2.recv(16) == b"\x81\x03abc"


def test_oldest_is_the_stamp_of_the_oldest_waiting_frame(impl: ModuleType, pair: tuple[socket.socket, socket.socket]) -> None:
    """``oldest``: the stamp given with the oldest channel frame still waiting (queued or
    held), 0.0 when none; a partial direct send keeps it, a complete one clears it."""
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    box = _box(impl, fd=a.fileno(), limit=64)
    assert box.oldest == 0.0 and box.depth == 0
    box.put(b"control")  # answers and control frames carry no stamp
    assert box.oldest == 0.0 and box.depth == 1
    assert box.offer("k", b"x" * 10, impl.POLICY_CONFLATE, 1, False, stamp=5.0) == impl.OFFER_QUEUED
    assert box.offer("k", b"y" * 10, impl.POLICY_CONFLATE, 2, False, stamp=7.0) == impl.OFFER_QUEUED
    assert box.oldest == 5.0 and box.depth == 3
    # over the limit: held by conflation, the oldest stays the oldest
    assert box.offer("k", b"z" * 60, impl.POLICY_CONFLATE, 3, False, stamp=9.0) == impl.OFFER_CONFLATED
    assert box.oldest == 5.0 and box.depth == 4
    box.take()
    assert box.oldest == 0.0 and box.depth == 0
    # dropped frames do not wait: no stamp
    assert box.offer("d", b"w" * 100, impl.POLICY_DROP, 4, False, stamp=11.0) == impl.OFFER_DROPPED
    assert box.oldest == 0.0
    box.take_gaps()
    # a complete direct send clears it; a partial one keeps it until the rest is written
    dirty: list[object] = []
    members = impl.Members()
    members.add(box)
    box.limit = 1 << 22
    impl.fanout_into(members, (b"s" * 100, None), "k", impl.POLICY_DISCONNECT, 5, dirty, False, stamp=13.0)
    assert box.oldest == 13.0
    impl.flush(dirty)
    assert box.oldest == 0.0 and b.recv(1000) == b"s" * 100
    impl.fanout_into(members, (b"L" * (1 << 21), None), "k", impl.POLICY_DISCONNECT, 6, dirty, False, stamp=17.0)
    wake, sent = impl.flush(dirty)
    assert wake == ["o"] and 0 < sent < 1 << 21
    assert box.oldest == 17.0 and box.depth == 0 and box.pending
    box.take_rest()
    assert box.oldest == 0.0
