"""Ticks in the fast path: batch frames (``encode_batch``), batched outboxes, ``flush_tick``.

Differential part: hypothesis feeds ``relay._fastpath`` and ``relay._fastpath_py`` the
same inputs and asserts byte-identical outputs and equal exceptions. Model part: on every
implementation, decoding what a batched outbox sends gives exactly the envelopes queued,
in order, with only the newest of each state ("latest") key in each batch.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import relay._fastpath_py as py

REQUIRE_COMPILED = os.environ.get("RELAY_REQUIRE_COMPILED", "") not in ("", "0")
try:
    cy: ModuleType | None = importlib.import_module("relay._fastpath")
except ImportError:
    cy = None

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def compiled() -> ModuleType:
    """Return the compiled module, or fail (RELAY_REQUIRE_COMPILED=1) / skip without it."""
    if cy is not None:
        return cy
    if REQUIRE_COMPILED:
        pytest.fail("relay._fastpath is not importable, but RELAY_REQUIRE_COMPILED=1")
    pytest.skip("relay._fastpath is not importable")


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    """Call ``fn`` and return ("ok", result) or ("raised", type, message)."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # compared, not swallowed: the caller asserts equality
        return ("raised", type(exc), str(exc))


def same(cy_fn: Callable[..., Any], py_fn: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    got, want = outcome(cy_fn, *args), outcome(py_fn, *args)
    assert got == want, f"args={args!r}"
    if got[0] == "ok":
        assert type(got[1]) is type(want[1])
    return got


def outbox_state(box: Any) -> tuple[Any, ...]:
    return (box.limit, box.encoding, box.owner, box.size, box.closed, box.pending,
            box.dropped, box.conflated, box.queued)

JSON, MSGPACK = py.ENC_JSON, py.ENC_MSGPACK
OPCODE = {JSON: py.OP_TEXT, MSGPACK: py.OP_BINARY}
PING = py.encode_frame(py.OP_PING, b"relay")


def frames_of(data: bytes) -> list[tuple[int, bytes]]:
    """Split server bytes into (opcode, payload) frames; every frame must be final and unmasked."""
    out = []
    i = 0
    while i < len(data):
        first, second = data[i], data[i + 1]
        assert first & 0xF0 == 0x80, f"not a final frame without extension bits: {first:#x}"
        assert not second & 0x80, "server frames are not masked"
        n, i = second & 0x7F, i + 2
        if n == 126:
            n, i = int.from_bytes(data[i:i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i:i + 8], "big"), i + 8
        out.append((first & 0x0F, data[i:i + n]))
        i += n
    assert i == len(data), "trailing bytes"
    return out


def encode(encoding: int, message: Any) -> bytes:
    if encoding == JSON:
        payload = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    else:
        payload = msgpack.packb(message, use_bin_type=True)
    return py.encode_frame(OPCODE[encoding], payload)


def decode(encoding: int, payload: bytes) -> Any:
    if encoding == JSON:
        return json.loads(payload.decode())
    return msgpack.unpackb(payload, raw=False)


# Values of both encodings' types; texts reach the 125/126/65535/65536 frame-size edges.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
EDGE_PAYLOADS = [0, 1, 114, 115, 116, 117, 125, 126, 127, 65524, 65525, 65535, 65536, 70_000]
edge_text = st.sampled_from(EDGE_PAYLOADS).map(lambda n: "x" * n)
unicode_text = st.text(alphabet=st.characters(min_codepoint=0x80, max_codepoint=0x10FFFF,
                                              blacklist_categories=("Cs",)), max_size=30)
envelopes = st.builds(
    lambda kind, data: {"type": kind, "channel": "c", "offset": 1, "data": data},
    st.sampled_from(["message", "ack", "error"]),
    st.one_of(values, edge_text, unicode_text),
)


# --------------------------------------------------------------------------- encode_batch


@SETTINGS
@given(encoding=st.sampled_from([JSON, MSGPACK]), messages=st.lists(envelopes, max_size=20))
def test_encode_batch_identical_and_decodes_to_the_envelopes(encoding: int, messages: list[Any]) -> None:
    c = compiled()
    frames = [encode(encoding, m) for m in messages]
    got = same(c.encode_batch, py.encode_batch, encoding, frames)
    [(opcode, payload)] = frames_of(got[1])
    assert opcode == OPCODE[encoding]
    assert decode(encoding, payload) == [decode(encoding, frames_of(f)[0][1]) for f in frames]


@pytest.mark.parametrize("count", [0, 1, 15, 16, 65535, 65536], ids=lambda n: f"{n}-frames")
@pytest.mark.parametrize("encoding", [JSON, MSGPACK], ids=["json", "msgpack"])
def test_encode_batch_array_header_sizes(encoding: int, count: int) -> None:
    c = compiled()
    frames = [encode(encoding, i) for i in range(count)]
    got = c.encode_batch(encoding, frames)
    assert got == py.encode_batch(encoding, frames)
    [(_, payload)] = frames_of(got)
    assert decode(encoding, payload) == list(range(count))


@pytest.mark.parametrize("size", EDGE_PAYLOADS, ids=lambda n: f"{n}-bytes")
def test_encode_batch_frame_size_edges(size: int) -> None:
    """Batch frames whose payload is right at the 125/126/65535/65536 length edges."""
    c = compiled()
    for encoding in (JSON, MSGPACK):
        frames = [py.encode_frame(OPCODE[encoding], b"7" * size)]
        got = same(c.encode_batch, py.encode_batch, encoding, frames)[1]
        [(_, payload)] = frames_of(got)
        assert payload == (b"[" + b"7" * size + b"]" if encoding == JSON else b"\x91" + b"7" * size)


bad_frames = st.one_of(
    st.binary(max_size=12),
    st.sampled_from([
        b"\x81\x05abc",             # short
        b"\x81\x02abc",             # long
        b"\x01\x01a",               # not final
        b"\xc1\x01a",               # extension bit
        b"\x81\x81abcd",            # masked
        b"\x81\x7e\x00",            # 16-bit length cut
        b"\x81\x7f\x00\x00",        # 64-bit length cut
        b"\x81\x7e\x00\x01a",       # 16-bit length, right size
        b"\x81\x7f" + (1).to_bytes(8, "big") + b"a",
        b"\x89\x01a",               # ping
        b"\x82\x01\x01",            # binary
    ]),
    st.builds(bytearray, st.just(b"\x81\x01a")),
    st.sampled_from([None, "text", 3]),
)


@SETTINGS
@given(encoding=st.one_of(st.sampled_from([JSON, MSGPACK, 2, -1, True, 1.0, 2**70, "json"])),
       frames=st.one_of(st.lists(st.one_of(bad_frames, envelopes.map(lambda m: encode(JSON, m))),
                                 max_size=5),
                        st.tuples(st.just(b"\x81\x01a")), st.none(), st.just(b"\x81\x01a")))
def test_encode_batch_refuses_the_same_way(encoding: Any, frames: Any) -> None:
    c = compiled()
    same(c.encode_batch, py.encode_batch, encoding, frames)


# --------------------------------------------------------------------------- batched outboxes

keys = st.sampled_from(["s1", "s2", "t", ("k", 1)])
data_frames = st.builds(lambda e, n: (e, n), st.sampled_from([0, 1]), st.integers(0, 300))
batch_ops = st.one_of(
    st.tuples(st.just("offer"), keys, st.integers(0, 300), st.sampled_from([0, 1, 2]),
              st.integers(0, 99), st.booleans()),
    st.tuples(st.just("offer"), keys, st.integers(0, 300), st.sampled_from([0, 1, 2]),
              st.integers(0, 99), st.booleans()),
    st.tuples(st.just("put"), st.integers(0, 200), st.one_of(st.none(), keys)),
    st.tuples(st.just("ping")),
    st.tuples(st.just("raw"), st.binary(max_size=8)),
    st.tuples(st.just("take")),
    st.tuples(st.just("take_gaps")),
    st.tuples(st.just("close")),
    st.tuples(st.just("start_batching")),
)


def apply_batch_op(box: Any, op: tuple[Any, ...], counter: list[int]) -> Any:
    name, *args = op
    counter[0] += 1
    seq = counter[0]
    opcode = OPCODE[box.encoding]
    if name == "offer":
        key, size, policy, offset, latest = args
        frame = py.encode_frame(opcode, (b'"%d:' % seq) + b"u" * size + b'"')
        return box.offer(key, frame, policy, offset, latest)
    if name == "put":
        size, latest = args
        return box.put(py.encode_frame(opcode, (b'"%d:' % seq) + b"a" * size + b'"'), latest)
    if name == "ping":
        return box.put(PING)
    if name == "raw":
        return box.put(args[0])
    return getattr(box, name)()


def batch_state(box: Any) -> tuple[Any, ...]:
    return (*outbox_state(box), box.batched, box.superseded)


@SETTINGS
@given(limit=st.integers(1, 2000), encoding=st.integers(0, 1), batched=st.booleans(),
       ops=st.lists(batch_ops, max_size=40))
def test_batched_outbox_operations_identical(limit: int, encoding: int, batched: bool,
                                             ops: list[tuple[Any, ...]]) -> None:
    c = compiled()
    cbox, pbox = c.Outbox(limit, encoding, "owner"), py.Outbox(limit, encoding, "owner")
    if batched:
        cbox.start_batching()
        pbox.start_batching()
    ccount, pcount = [0], [0]
    for op in ops:
        same(lambda: apply_batch_op(cbox, op, ccount), lambda: apply_batch_op(pbox, op, pcount))
        assert batch_state(cbox) == batch_state(pbox), f"after {op!r}"


model_ops = st.lists(st.one_of(
    st.tuples(st.just("offer"), st.sampled_from(["state.a", "state.b", "stream.x", "stream.y"])),
    st.tuples(st.just("answer")),
    st.tuples(st.just("snapshot"), st.sampled_from(["state.a", "state.b"])),
    st.tuples(st.just("ping")),
    st.tuples(st.just("tick")),
), max_size=60)


@SETTINGS
@given(encoding=st.integers(0, 1), ops=model_ops)
def test_batches_decode_to_the_queued_envelopes_with_state_conflation(
        impl: ModuleType, encoding: int, ops: list[tuple[Any, ...]]) -> None:
    """What a batched outbox sends decodes to what was queued, in order, the older value of a
    state channel taken out of its tick, pings outside the arrays and in order."""
    box = impl.Outbox(1 << 30, encoding, "o")
    welcome = encode(encoding, {"type": "welcome"})
    box.put(welcome)
    box.start_batching()
    expected: list[Any] = [("frame", {"type": "welcome"})]
    tick: list[Any] = []  # what this tick should send: envelopes, and "ping"
    got: list[Any] = []

    def close_tick() -> None:
        run: list[Any] = []
        for item in tick:
            if item == "ping":
                if run:
                    expected.append(("array", run))
                    run = []
                expected.append(("ping",))
            else:
                run.append(item)
        if run:
            expected.append(("array", run))
        tick.clear()
        for opcode, payload in frames_of(box.take()):
            if opcode == impl.OP_PING:
                assert payload == b"relay"
                got.append(("ping",))
                continue
            assert opcode == OPCODE[encoding]
            value = decode(encoding, payload)
            if not got:  # queued before start_batching: as it was
                got.append(("frame", value))
            else:
                assert isinstance(value, list), f"a data frame that is not an array: {value!r}"
                got.append(("array", value))

    for n, op in enumerate(ops):
        kind = op[0]
        if kind == "offer":
            channel = op[1]
            msg = {"type": "message", "channel": channel, "offset": n, "data": "é" * (n % 7)}
            state = channel.startswith("state")
            if state:
                tick[:] = [m for m in tick if m == "ping" or m.get("channel") != channel]
            tick.append(msg)
            policy = impl.POLICY_CONFLATE if state else impl.POLICY_DISCONNECT
            assert box.offer(channel, encode(encoding, msg), policy, n, state) == impl.OFFER_QUEUED
        elif kind == "snapshot":
            msg = {"type": "message", "channel": op[1], "offset": n, "data": None}
            tick[:] = [m for m in tick if m == "ping" or m.get("channel") != op[1]]
            tick.append(msg)
            box.put(encode(encoding, msg), op[1])
        elif kind == "answer":
            msg = {"type": "ack", "ref": n}
            tick.append(msg)
            box.put(encode(encoding, msg))
        elif kind == "ping":
            tick.append("ping")
            box.put(PING)
        else:
            close_tick()
            assert not box.pending
    close_tick()
    assert got == expected
    assert box.take() == b""  # a tick with nothing queued sends nothing


def test_latest_only_on_batched_outboxes(impl: ModuleType) -> None:
    """Without start_batching, ``latest`` changes nothing: every frame is sent as it is."""
    box = impl.Outbox(1 << 20, impl.ENC_JSON)
    a, b = encode(JSON, {"v": 1}), encode(JSON, {"v": 2})
    box.offer("s", a, impl.POLICY_CONFLATE, 1, True)
    box.offer("s", b, impl.POLICY_CONFLATE, 2, True)
    assert box.take() == a + b
    assert box.superseded == 0


def test_slow_consumer_conflation_never_leaves_two_values_of_a_state_channel(impl: ModuleType) -> None:
    """A state value queued in the tick, then a newer one held by the slow-consumer policy:
    only the held (newest) one is sent."""
    frames = [encode(JSON, {"v": i, "pad": "p" * 40}) for i in range(4)]
    box = impl.Outbox(len(frames[0]) + 10, impl.ENC_JSON)
    box.start_batching()
    assert box.offer("s", frames[0], impl.POLICY_CONFLATE, 0, True) == impl.OFFER_QUEUED
    # The newer value replaces the older one: it fits in the bytes that frees.
    assert box.offer("s", frames[1], impl.POLICY_CONFLATE, 1, True) == impl.OFFER_QUEUED
    assert box.offer("t", frames[2], impl.POLICY_CONFLATE, 0, True) == impl.OFFER_CONFLATED
    # Now "s" no longer fits: held by the policy, and its queued value leaves the batch.
    assert box.offer("s", frames[3], impl.POLICY_CONFLATE, 2, True) == impl.OFFER_CONFLATED
    [(_, payload)] = frames_of(box.take())
    assert [m["v"] for m in json.loads(payload)] == [2, 3]
    assert box.superseded == 2 and box.conflated == 2 and box.size == 0


def test_disconnect_policy_counts_the_bytes_the_newer_value_frees(impl: ModuleType) -> None:
    a = encode(JSON, {"v": "a" * 50})
    box = impl.Outbox(len(a) + 5, impl.ENC_JSON)
    box.start_batching()
    assert box.offer("s", a, impl.POLICY_DISCONNECT, 0, True) == impl.OFFER_QUEUED
    # Replacing the state value fits; a stream message of that size would not.
    assert box.offer("s", a, impl.POLICY_DISCONNECT, 1, True) == impl.OFFER_QUEUED
    assert box.size == len(a)
    assert box.offer("x", a, impl.POLICY_DISCONNECT, 0, False) == impl.OFFER_OVERFLOW
    assert box.closed


# --------------------------------------------------------------------------- flush and flush_tick


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.settimeout(5)
    with a, b:
        yield a, b


def test_flush_leaves_batched_outboxes_to_their_tick(impl: ModuleType, pair: Any) -> None:
    a, b = pair
    box = impl.Outbox(1 << 20, impl.ENC_JSON, "owner")
    box.fd = a.fileno()
    box.start_batching()
    dirty: list[Any] = []
    assert box.mark_dirty(dirty) is False  # never joins a dirty list
    members = impl.Members()
    members.add(box)
    frames = [encode(JSON, {"n": i}) for i in range(5)]
    for i, frame in enumerate(frames):
        assert impl.fanout_into(members, (frame, None), "c", impl.POLICY_DISCONNECT, i, dirty) == []
    assert dirty == []
    other = impl.Outbox(1 << 20, impl.ENC_JSON, "other")
    other.put(frames[0])
    other.mark_dirty(dirty)
    dirty.insert(0, box)  # even when put there by hand, flush leaves it alone
    assert impl.flush(dirty) == (["other"], 0)  # "other" has no socket
    assert box.pending and dirty == []
    by_encoding = [0, 0]
    wake, sent = impl.flush_tick(members, by_encoding)
    assert wake == []
    got = b.recv(1 << 16)
    assert sent == len(got) == by_encoding[0]
    [(opcode, payload)] = frames_of(got)
    assert opcode == impl.OP_TEXT and json.loads(payload) == [{"n": i} for i in range(5)]
    assert not box.pending and len(members) == 1
    assert impl.flush_tick(members) == ([], 0)  # nothing queued: nothing sent


def test_flush_tick_wakes_the_writer_when_it_cannot_send(impl: ModuleType, pair: Any) -> None:
    a, b = pair
    members = impl.Members()
    held = impl.Outbox(1 << 20, impl.ENC_JSON, "held")
    held.fd = a.fileno()
    held.hold()
    nofd = impl.Outbox(1 << 20, impl.ENC_JSON, "nofd")
    gap = impl.Outbox(10, impl.ENC_JSON, "gap")
    gap.fd = a.fileno()
    idle = impl.Outbox(10, impl.ENC_JSON, "idle")
    for box in (held, nofd, gap, idle):
        box.start_batching()
        members.add(box)
    held.put(encode(JSON, 1))
    nofd.put(encode(JSON, 2))
    gap.offer("c", encode(JSON, "x" * 20), impl.POLICY_DROP, 7)
    assert sorted(impl.flush_tick(members)[0]) == ["gap", "held", "nofd"]
    assert held.pending and nofd.pending and gap.take_gaps() == [("c", 7, 7)]


def test_flush_tick_keeps_what_the_kernel_did_not_take(impl: ModuleType, pair: Any) -> None:
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    box = impl.Outbox(1 << 30, impl.ENC_MSGPACK, "o")
    box.fd = a.fileno()
    box.start_batching()
    members = impl.Members()
    members.add(box)
    messages = [{"i": i, "pad": "z" * 1000} for i in range(3000)]
    for i, m in enumerate(messages):
        box.offer("c", encode(MSGPACK, m), impl.POLICY_DISCONNECT, i)
    wake, sent = impl.flush_tick(members)
    assert wake == ["o"] and 0 < sent
    rest = box.take()  # the writer task would send this
    assert box.take() == b""
    received = bytearray()
    b.settimeout(0.5)
    while len(received) < sent:
        received += b.recv(1 << 20)
    [(opcode, payload)] = frames_of(bytes(received) + rest)
    assert opcode == impl.OP_BINARY and msgpack.unpackb(payload) == messages


def test_every_implementation_has_the_tick_api() -> None:
    for name in ("relay._fastpath_py", "relay._fastpath"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for attr in ("encode_batch", "flush_tick"):
            assert callable(getattr(mod, attr))
        box = mod.Outbox(10)
        assert box.batched is False and box.superseded == 0
