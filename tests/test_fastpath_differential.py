"""Differential tests: the compiled fast path behaves exactly like its Python twin.

Hypothesis feeds ``relay._fastpath`` and ``relay._fastpath_py`` the same inputs
(edge sizes, huge and negative lengths, bad opcodes, non-bytes payloads, random
operation sequences on Outbox, Members and fanout) and asserts equal results,
equal state and equal exceptions (type and message).

When the compiled module is missing these tests skip, unless
``RELAY_REQUIRE_COMPILED=1`` (CI), where they fail.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import relay._fastpath_py as py

REQUIRE_COMPILED = os.environ.get("RELAY_REQUIRE_COMPILED", "") not in ("", "0")

try:
    cy: ModuleType | None = importlib.import_module("relay._fastpath")
    IMPORT_ERROR = ""
except ImportError as exc:  # not built; see compiled() below
    cy = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def compiled() -> ModuleType:
    """Return the compiled module, or fail (RELAY_REQUIRE_COMPILED=1) / skip without it."""
    if cy is not None:
        return cy
    reason = f"relay._fastpath is not importable ({IMPORT_ERROR})"
    if REQUIRE_COMPILED:
        pytest.fail(f"{reason}, but RELAY_REQUIRE_COMPILED=1")
    pytest.skip(reason)


def test_compiled_module_present() -> None:
    assert compiled().IMPLEMENTATION == "cython"


SETTINGS = settings(max_examples=300, deadline=None)

EDGE_SIZES = [0, 1, 125, 126, 127, 65535, 65536, 2**32, 2**63 - 1]
EDGE_INTS = EDGE_SIZES + [
    -1, -125, -126, 2**63, 2**64, 2**64 + 1, -(2**63), -(2**63) - 1, 2**100, -(2**100),
]
ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-300, 70_000), st.integers())
opcodes = st.one_of(st.integers(-2, 17), st.sampled_from([2**63, 2**64, -(2**70)]), st.booleans())


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


# --------------------------------------------------------------------------- framing


ALL_OPCODES = [*range(-2, 18), True, False, 2**63, 2**64, -(2**70)]


def test_frame_header_every_edge() -> None:
    """Every opcode against every edge length, not left to chance."""
    c = compiled()
    for opcode in ALL_OPCODES:
        for length in EDGE_INTS:
            for delta in (-1, 0, 1):
                same(c.frame_header, py.frame_header, opcode, length + delta)


def test_encode_frame_every_edge_size() -> None:
    c = compiled()
    for size in [0, 1, 124, 125, 126, 127, 65534, 65535, 65536, 65537]:
        payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
        for opcode in ALL_OPCODES:
            same(c.encode_frame, py.encode_frame, opcode, payload)


@SETTINGS
@given(opcode=opcodes, length=ints)
def test_frame_header(opcode: int, length: int) -> None:
    c = compiled()
    same(c.frame_header, py.frame_header, opcode, length)


sized_payloads = st.sampled_from([0, 1, 125, 126, 127, 65535, 65536]).map(lambda n: b"\xa5" * n)
payloads = st.one_of(
    st.binary(max_size=300),  # includes invalid UTF-8: framing does not care
    sized_payloads,
    st.text(max_size=5),
    st.builds(bytearray, st.binary(max_size=5)),
    st.builds(memoryview, st.binary(max_size=5)),
    st.none(),
    st.integers(),
)


@SETTINGS
@given(opcode=opcodes, payload=payloads)
def test_encode_frame(opcode: int, payload: Any) -> None:
    c = compiled()
    same(c.encode_frame, py.encode_frame, opcode, payload)


@SETTINGS
@given(limit=st.one_of(st.integers(-3, 5), st.sampled_from([2**63, 2**100, -(2**70)])),
       encoding=st.one_of(st.integers(-3, 4), st.sampled_from([2**64, -(2**64)])))
def test_outbox_init(limit: int, encoding: int) -> None:
    c = compiled()

    def attrs(mod: ModuleType) -> Callable[[], tuple[Any, ...]]:
        def make() -> tuple[Any, ...]:
            box = mod.Outbox(limit, encoding, "o")
            return (box.limit, box.encoding, box.owner, box.size, box.closed, box.pending)
        return make

    same(attrs(c), attrs(py))


# --------------------------------------------------------------------------- Outbox

keys = st.sampled_from(["a", "b", "c", 1, ("t", 2)])
frames = st.one_of(st.binary(max_size=24), st.sampled_from([b"", b"x" * 64]), st.none())
policies = st.one_of(
    st.sampled_from([py.POLICY_DISCONNECT, py.POLICY_DROP, py.POLICY_CONFLATE]),
    st.sampled_from([3, -1, 2**70, True, "drop"]),
)
weights_policies = st.one_of(st.sampled_from([0, 1, 2]), policies)  # mostly valid
offsets = st.integers(0, 10_000)
stamps = st.sampled_from([0.0, 1.5, 2.25, 1e9])

outbox_ops = st.one_of(
    st.tuples(st.just("put"), frames),
    st.tuples(st.just("offer"), keys, frames, weights_policies, offsets),
    st.tuples(st.just("offer"), keys, frames, weights_policies, offsets),
    st.tuples(st.just("offer"), st.just(["unhashable"]), frames, weights_policies, offsets),
    # latest (a state channel on a ticked outbox), a delta channel's full value (kept when
    # the patch would be conflated) and the stamp that becomes ``oldest``
    st.tuples(st.just("offer"), keys, frames, weights_policies, offsets, st.booleans(),
              st.one_of(st.none(), st.binary(max_size=40)), stamps),
    st.tuples(st.just("start_batching")),
    st.tuples(st.just("take_rest")),
    st.tuples(st.just("written")),
    st.tuples(st.just("take")),
    st.tuples(st.just("take_gaps")),
    st.tuples(st.just("close")),
    st.tuples(st.just("set_limit"), st.integers(1, 80)),
)


def outbox_state(box: Any) -> tuple[Any, ...]:
    return (box.limit, box.encoding, box.owner, box.size, box.closed, box.pending,
            box.dropped, box.conflated, box.queued, box.batched, box.superseded, box.oldest,
            box.depth, box.behind)


def apply_outbox(box: Any, op: tuple[Any, ...]) -> Any:
    name, *args = op
    if name == "set_limit":
        box.limit = args[0]
        return None
    return getattr(box, name)(*args)


@SETTINGS
@given(limit=st.integers(1, 80), encoding=st.integers(0, 1),
       ops=st.lists(outbox_ops, max_size=40))
def test_outbox_operations(limit: int, encoding: int, ops: list[tuple[Any, ...]]) -> None:
    c = compiled()
    cbox, pbox = c.Outbox(limit, encoding, "owner"), py.Outbox(limit, encoding, "owner")
    for op in ops:
        same(lambda: apply_outbox(cbox, op), lambda: apply_outbox(pbox, op))
        assert outbox_state(cbox) == outbox_state(pbox), f"after {op!r}"


@SETTINGS
@given(size=st.sampled_from(EDGE_SIZES[:7]), limit=st.sampled_from(EDGE_SIZES[1:7]),
       policy=st.sampled_from([0, 1, 2]))
def test_outbox_edge_sizes(size: int, limit: int, policy: int) -> None:
    c = compiled()
    frame = b"f" * size
    cbox, pbox = c.Outbox(limit), py.Outbox(limit)
    for i in range(3):
        same(cbox.offer, pbox.offer, "k", frame, policy, i)
        assert outbox_state(cbox) == outbox_state(pbox)
    same(cbox.take, pbox.take)
    same(cbox.take_gaps, pbox.take_gaps)


# --------------------------------------------------------------------------- Members + fanout

N_BOXES = 6
frame_tuples = st.one_of(
    st.tuples(st.binary(max_size=12), st.binary(max_size=12)),
    st.tuples(st.one_of(st.none(), st.binary(max_size=12)), st.one_of(st.none(), st.binary(max_size=12))),
    st.tuples(st.binary(max_size=12)),
    st.just(()),
)
box_index = st.integers(0, N_BOXES - 1)
members_ops = st.one_of(
    st.tuples(st.just("add"), box_index),
    st.tuples(st.just("add"), box_index),
    st.tuples(st.just("remove"), box_index),
    st.tuples(st.just("remove_foreign"), st.sampled_from(["x", 3, None])),
    st.tuples(st.just("contains"), box_index),
    st.tuples(st.just("len")),
    st.tuples(st.just("count"), st.one_of(st.integers(-3, 3), st.just(2**70), st.just("json"))),
    st.tuples(st.just("iter")),
    st.tuples(st.just("fanout"), frame_tuples, keys, weights_policies, offsets),
    st.tuples(st.just("fanout"), frame_tuples, keys, weights_policies, offsets),
    st.tuples(st.just("fanout"), frame_tuples, keys, weights_policies, offsets),
    st.tuples(st.just("fanout_into"), frame_tuples, keys, weights_policies, offsets, st.booleans(),
              st.one_of(st.none(), frame_tuples), stamps),
    st.tuples(st.just("take"), box_index),
    st.tuples(st.just("take_gaps"), box_index),
    st.tuples(st.just("close"), box_index),
    st.tuples(st.just("put"), box_index, frames),
)


def apply_members(mod: ModuleType, members: Any, boxes: list[Any], op: tuple[Any, ...]) -> Any:
    name, *args = op
    if name == "add":
        return members.add(boxes[args[0]])
    if name == "remove":
        return members.remove(boxes[args[0]])
    if name == "remove_foreign":
        return members.remove(args[0])
    if name == "contains":
        return boxes[args[0]] in members
    if name == "len":
        return len(members)
    if name == "count":
        return members.count(args[0])
    if name == "iter":
        return [box.owner for box in members]
    if name == "fanout":
        return mod.fanout(members, *args)
    if name == "fanout_into":
        dirty: list[Any] = []
        result = mod.fanout_into(members, *args[:4], dirty, *args[4:])
        return result, [box.owner for box in dirty]
    if name == "put":
        return boxes[args[0]].put(args[1])
    return getattr(boxes[args[0]], name)()


@SETTINGS
@given(
    specs=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 1)),
                   min_size=N_BOXES, max_size=N_BOXES),
    ops=st.lists(members_ops, max_size=50),
)
def test_members_and_fanout(specs: list[tuple[int, int]], ops: list[tuple[Any, ...]]) -> None:
    c = compiled()
    state = {}
    for mod in (c, py):
        boxes = [mod.Outbox(limit, enc, f"o{i}") for i, (limit, enc) in enumerate(specs)]
        state[mod] = (mod.Members(), boxes)
    for op in ops:
        (cm, cboxes), (pm, pboxes) = state[c], state[py]
        same(lambda: apply_members(c, cm, cboxes, op), lambda: apply_members(py, pm, pboxes, op))
        assert [outbox_state(b) for b in cboxes] == [outbox_state(b) for b in pboxes], f"after {op!r}"
        assert (len(cm), cm.count(0), cm.count(1)) == (len(pm), pm.count(0), pm.count(1))
