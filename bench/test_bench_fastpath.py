"""Micro-benchmarks of the fast path, Cython and Python side by side.

Run: ``python -m pytest bench --benchmark-only --benchmark-group-by=group``.
Groups are "<behaviour>" and each row is one implementation (the ``impl`` id), so
compiled and twin sit next to each other; ``benchmark.extra_info`` records which.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest


def _setup(benchmark: Any, impl: ModuleType, group: str) -> None:
    benchmark.group = group
    benchmark.extra_info["implementation"] = impl.IMPLEMENTATION


@pytest.mark.parametrize("size", [64, 1024], ids=["64B", "1KiB"])
def test_encode_frame(benchmark: Any, impl: ModuleType, size: int) -> None:
    """Frame one text payload."""
    _setup(benchmark, impl, f"encode_frame {size} B")
    payload = b"x" * size
    frame = benchmark(impl.encode_frame, impl.OP_TEXT, payload)
    assert len(frame) == size + (2 if size < 126 else 4)


def test_outbox_offer_take(benchmark: Any, impl: ModuleType) -> None:
    """Offer ten 64 B frames to an outbox, then take them as one buffer."""
    _setup(benchmark, impl, "outbox offer x10 + take")
    box = impl.Outbox(1 << 20)
    frame = impl.encode_frame(impl.OP_TEXT, b"x" * 64)
    offer, take, policy = box.offer, box.take, impl.POLICY_DISCONNECT

    def run() -> bytes:
        for offset in range(10):
            offer("ch", frame, policy, offset)
        return take()

    assert len(benchmark(run)) == 10 * len(frame)


@pytest.mark.parametrize("n", [100, 1000])
def test_fanout(benchmark: Any, impl: ModuleType, n: int) -> None:
    """Fan one frame out to n members (mixed encodings), every outbox empty before."""
    _setup(benchmark, impl, f"fanout to {n} members")
    members = impl.Members()
    boxes = [impl.Outbox(1 << 20, i % impl.N_ENCODINGS, i) for i in range(n)]
    for box in boxes:
        members.add(box)
    frames = (impl.encode_frame(impl.OP_TEXT, b"j" * 64), impl.encode_frame(impl.OP_BINARY, b"m" * 48))

    def drain() -> None:  # untimed: each round starts empty, so every member is woken
        for box in boxes:
            box.take()

    woken, overflowed = benchmark.pedantic(
        impl.fanout, args=(members, frames, "ch", impl.POLICY_DISCONNECT, 1),
        setup=drain, rounds=200_000 // n, warmup_rounds=10,
    )
    assert (len(woken), overflowed) == (n, [])


@pytest.mark.parametrize("n", [10, 1000, 100_000], ids=["10", "1k", "100k"])
def test_members_churn(benchmark: Any, impl: ModuleType, n: int) -> None:
    """Remove one member of a channel of n and add it back (O(1) each)."""
    _setup(benchmark, impl, f"members remove+add at {n}")
    members = impl.Members()
    boxes = [impl.Outbox(1 << 16, i % impl.N_ENCODINGS, i) for i in range(n)]
    for box in boxes:
        members.add(box)
    victim = boxes[n // 2]
    remove, add = members.remove, members.add

    def run() -> None:
        remove(victim)
        add(victim)

    benchmark(run)
    assert len(members) == n and victim in members


@pytest.mark.parametrize("n", [10, 1000, 100_000], ids=["10", "1k", "100k"])
def test_members_iterate(benchmark: Any, impl: ModuleType, n: int) -> None:
    """Iterate over every member of a channel of n."""
    _setup(benchmark, impl, f"members iterate {n}")
    members = impl.Members()
    for i in range(n):
        members.add(impl.Outbox(1 << 16, i % impl.N_ENCODINGS, i))
    assert benchmark(lambda: sum(1 for _ in members)) == n


def _masked_text_frame(payload: bytes, mask: bytes = b"\x1f\x2e\x3d\x4c") -> bytes:
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


PUBLISH = b'{"type":"publish","channel":"bench.0","ref":1,"data":{"seq":1,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}'


def test_scan_client_frames(benchmark: Any, impl: ModuleType) -> None:
    """Read 100 masked publish frames from one buffer (the reader's fast path)."""
    _setup(benchmark, impl, "scan 100 client frames")
    data = _masked_text_frame(PUBLISH) * 100
    frames, used, stop = benchmark(impl.scan_client_frames, data, 1 << 20)
    assert (len(frames), used, stop) == (100, len(data), impl.SCAN_MORE)
    assert frames[-1] == (impl.OP_TEXT, PUBLISH.decode())


def test_wsproto_client_frames(benchmark: Any) -> None:
    """The same 100 frames parsed by wsproto (what the reader did before the fast path;
    a reference row, not checked by CI)."""
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import TextMessage

    benchmark.group = "scan 100 client frames"
    benchmark.extra_info["reference"] = "wsproto"
    data = _masked_text_frame(PUBLISH) * 100

    def run() -> list[object]:
        conn = Connection(ConnectionType.SERVER)
        conn.receive_data(data)
        return list(conn.events())

    events = benchmark(run)
    assert len(events) == 100 and isinstance(events[-1], TextMessage) and events[-1].data == PUBLISH.decode()
