"""Unit tests of the fast path, run on every available implementation (``impl``).

Table-driven: each table row is one case with an id. Constants in the tables come
from the reference twin; ``test_constants`` checks that both modules agree on them.
"""

from __future__ import annotations

import ast
import inspect
import os
import pathlib
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest

import relay._fastpath_py as ref
from relay import fastpath

STUB = pathlib.Path(ref.__file__).with_name("_fastpath.pyi")

TEXT, BINARY, CONT = ref.OP_TEXT, ref.OP_BINARY, ref.OP_CONTINUATION
CLOSE, PING, PONG = ref.OP_CLOSE, ref.OP_PING, ref.OP_PONG
JSON, MSGPACK = ref.ENC_JSON, ref.ENC_MSGPACK
DISC, DROP, CONF = ref.POLICY_DISCONNECT, ref.POLICY_DROP, ref.POLICY_CONFLATE
QUEUED, DROPPED, CONFLATED = ref.OFFER_QUEUED, ref.OFFER_DROPPED, ref.OFFER_CONFLATED
OVERFLOW, CLOSED = ref.OFFER_OVERFLOW, ref.OFFER_CLOSED


# --------------------------------------------------------------------------- contract


def _stub_tree() -> ast.Module:
    return ast.parse(STUB.read_text(), filename=str(STUB))


def _stub_public_names() -> set[str]:
    names: set[str] = set()
    for node in _stub_tree().body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _stub_signatures() -> dict[str, list[str]]:
    """Map "func" and "Class.method" to the stub's parameter names (self excluded)."""
    sigs: dict[str, list[str]] = {}

    def params(fn: ast.FunctionDef) -> list[str]:
        return [a.arg for a in fn.args.args if a.arg != "self"]

    for node in _stub_tree().body:
        if isinstance(node, ast.FunctionDef):
            sigs[node.name] = params(node)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                is_property = isinstance(item, ast.FunctionDef) and any(
                    isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list
                )
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("__") and not is_property:
                    sigs[f"{node.name}.{item.name}"] = params(item)
                elif isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    sigs[node.name] = params(item)
    return sigs


def _resolve(module: ModuleType, dotted: str) -> Any:
    obj: Any = module
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _public_names(module: ModuleType) -> set[str]:
    # The twin's typing imports are not part of the API.
    return {n for n in vars(module) if not n.startswith("_")} - {"Any", "Iterator", "annotations"}


def test_public_names_match_stub(impl: ModuleType) -> None:
    assert _public_names(impl) == _stub_public_names()


@pytest.mark.parametrize("name", sorted(_stub_signatures()))
def test_signature_matches_stub_and_twin(impl: ModuleType, name: str) -> None:
    sig = inspect.signature(_resolve(impl, name))
    ref_sig = inspect.signature(_resolve(ref, name))
    params = [p for p in sig.parameters if p != "self"]
    assert params == _stub_signatures()[name]
    assert [(p.name, p.kind, p.default) for p in sig.parameters.values()] == [
        (p.name, p.kind, p.default) for p in ref_sig.parameters.values()
    ]


@pytest.mark.parametrize(
    "name",
    [n for n in sorted(_stub_public_names()) if n.isupper() and n != "IMPLEMENTATION"],
)
def test_constants(impl: ModuleType, name: str) -> None:
    assert getattr(impl, name) == getattr(ref, name)
    assert type(getattr(impl, name)) is int


def test_implementation_name(impl: ModuleType) -> None:
    expected = "python" if impl.__name__ == "relay._fastpath_py" else "cython"
    assert impl.IMPLEMENTATION == expected


def test_selected_implementation() -> None:
    """relay.fastpath picks what the environment asks for (CI sets these)."""
    if os.environ.get("RELAY_PURE_PYTHON", "") not in ("", "0"):
        assert fastpath.IMPLEMENTATION == "python"
    elif os.environ.get("RELAY_REQUIRE_COMPILED", "") not in ("", "0"):
        assert fastpath.IMPLEMENTATION == "cython"
    else:
        assert fastpath.IMPLEMENTATION in ("python", "cython")
    assert fastpath.frame_header.__module__ == f"relay._fastpath{'_py' if fastpath.IMPLEMENTATION == 'python' else ''}"


@pytest.mark.parametrize(
    ("pure", "expected"),
    [pytest.param("1", "python", id="pure-1"), pytest.param("0", None, id="pure-0")],
)
def test_selector_reads_env(pure: str, expected: str | None) -> None:
    env = dict(os.environ, RELAY_PURE_PYTHON=pure)
    out = subprocess.run(
        [sys.executable, "-c", "import relay.fastpath as f; print(f.IMPLEMENTATION)"],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()
    if expected is None:  # whatever was built is used
        try:
            import relay._fastpath  # noqa: F401
        except ImportError:
            expected = "python"
        else:
            expected = "cython"
    assert out == expected


# --------------------------------------------------------------------------- framing


def _long(n: int) -> bytes:
    return n.to_bytes(8, "big")


HEADER_CASES = [
    pytest.param(TEXT, 0, b"\x81\x00", id="text-0"),
    pytest.param(TEXT, 1, b"\x81\x01", id="text-1"),
    pytest.param(TEXT, 125, b"\x81\x7d", id="text-125-last-7bit"),
    pytest.param(TEXT, 126, b"\x81\x7e\x00\x7e", id="text-126-first-16bit"),
    pytest.param(BINARY, 65535, b"\x82\x7e\xff\xff", id="binary-65535-last-16bit"),
    pytest.param(BINARY, 65536, b"\x82\x7f" + _long(65536), id="binary-65536-first-64bit"),
    pytest.param(BINARY, 2**32, b"\x82\x7f" + _long(2**32), id="binary-2**32"),
    pytest.param(TEXT, 2**63 - 1, b"\x81\x7f" + _long(2**63 - 1), id="text-max-length"),
    pytest.param(CONT, 5, b"\x80\x05", id="continuation"),
    pytest.param(CLOSE, 0, b"\x88\x00", id="close-0"),
    pytest.param(CLOSE, 2, b"\x88\x02", id="close-code"),
    pytest.param(PING, 125, b"\x89\x7d", id="ping-125-control-limit"),
    pytest.param(PONG, 0, b"\x8a\x00", id="pong-0"),
    pytest.param(True, 3, b"\x81\x03", id="bool-opcode-is-int"),
]


@pytest.mark.parametrize(("opcode", "length", "expected"), HEADER_CASES)
def test_frame_header(impl: ModuleType, opcode: int, length: int, expected: bytes) -> None:
    header = impl.frame_header(opcode, length)
    assert type(header) is bytes
    assert header == expected


HEADER_ERRORS = [
    pytest.param(CLOSE, 126, "control frame payload of 126 bytes exceeds 125", id="close-126"),
    pytest.param(PING, 65536, "control frame payload of 65536 bytes exceeds 125", id="ping-65536"),
    pytest.param(PONG, -1, "control frame payload of -1 bytes exceeds 125", id="pong-negative"),
    pytest.param(PING, 2**70, f"control frame payload of {2**70} bytes exceeds 125", id="ping-huge"),
    pytest.param(3, 0, "unknown opcode 3", id="reserved-3"),
    pytest.param(7, 0, "unknown opcode 7", id="reserved-7"),
    pytest.param(0xB, 0, "unknown opcode 11", id="reserved-0xB"),
    pytest.param(0xF, 0, "unknown opcode 15", id="reserved-0xF"),
    pytest.param(16, 0, "unknown opcode 16", id="opcode-16"),
    pytest.param(-1, 0, "unknown opcode -1", id="opcode-negative"),
    pytest.param(2**64, 0, f"unknown opcode {2**64}", id="opcode-huge"),
    pytest.param(3, -1, "unknown opcode 3", id="opcode-checked-before-length"),
    pytest.param(TEXT, -1, "invalid payload length -1", id="negative-length"),
    pytest.param(TEXT, -(2**70), f"invalid payload length {-(2**70)}", id="huge-negative-length"),
    pytest.param(TEXT, 2**63, f"invalid payload length {2**63}", id="length-2**63"),
    pytest.param(BINARY, 2**64, f"invalid payload length {2**64}", id="length-2**64"),
]


@pytest.mark.parametrize(("opcode", "length", "message"), HEADER_ERRORS)
def test_frame_header_errors(impl: ModuleType, opcode: int, length: int, message: str) -> None:
    with pytest.raises(ValueError) as info:
        impl.frame_header(opcode, length)
    assert str(info.value) == message


class _Bytes(bytes):
    pass


ENCODE_CASES = [
    pytest.param(TEXT, b"", b"\x81\x00", id="empty"),
    pytest.param(TEXT, b'{"a":1}', b"\x81\x07" + b'{"a":1}', id="json"),
    pytest.param(BINARY, b"\xff\xfe\x00", b"\x82\x03\xff\xfe\x00", id="binary-not-utf8"),
    pytest.param(TEXT, b"x" * 125, b"\x81\x7d" + b"x" * 125, id="125"),
    pytest.param(TEXT, b"x" * 126, b"\x81\x7e\x00\x7e" + b"x" * 126, id="126"),
    pytest.param(BINARY, b"y" * 65535, b"\x82\x7e\xff\xff" + b"y" * 65535, id="65535"),
    pytest.param(BINARY, b"z" * 65536, b"\x82\x7f" + _long(65536) + b"z" * 65536, id="65536"),
    pytest.param(PING, b"p" * 125, b"\x89\x7d" + b"p" * 125, id="ping-125"),
    pytest.param(CLOSE, b"\x03\xe8", b"\x88\x02\x03\xe8", id="close-1000"),
    pytest.param(TEXT, _Bytes(b"sub"), b"\x81\x03sub", id="bytes-subclass"),
]


@pytest.mark.parametrize(("opcode", "payload", "expected"), ENCODE_CASES)
def test_encode_frame(impl: ModuleType, opcode: int, payload: bytes, expected: bytes) -> None:
    frame = impl.encode_frame(opcode, payload)
    assert type(frame) is bytes
    assert frame == expected
    assert frame == impl.frame_header(opcode, len(payload)) + payload


ENCODE_ERRORS = [
    pytest.param(TEXT, "text", TypeError, "payload must be bytes, not str", id="str"),
    pytest.param(TEXT, bytearray(b"x"), TypeError, "payload must be bytes, not bytearray", id="bytearray"),
    pytest.param(TEXT, memoryview(b"x"), TypeError, "payload must be bytes, not memoryview", id="memoryview"),
    pytest.param(TEXT, None, TypeError, "payload must be bytes, not NoneType", id="none"),
    pytest.param(TEXT, 5, TypeError, "payload must be bytes, not int", id="int"),
    pytest.param(99, "text", TypeError, "payload must be bytes, not str", id="type-checked-first"),
    pytest.param(PING, b"p" * 126, ValueError, "control frame payload of 126 bytes exceeds 125", id="ping-126"),
    pytest.param(4, b"", ValueError, "unknown opcode 4", id="bad-opcode"),
    pytest.param(2**65, b"", ValueError, f"unknown opcode {2**65}", id="huge-opcode"),
]


@pytest.mark.parametrize(("opcode", "payload", "exc", "message"), ENCODE_ERRORS)
def test_encode_frame_errors(
    impl: ModuleType, opcode: int, payload: Any, exc: type[Exception], message: str
) -> None:
    with pytest.raises(exc) as info:
        impl.encode_frame(opcode, payload)
    assert type(info.value) is exc
    assert str(info.value) == message


# --------------------------------------------------------------------------- Outbox


def test_outbox_defaults(impl: ModuleType) -> None:
    box = impl.Outbox(10)
    assert (box.limit, box.encoding, box.owner) == (10, JSON, None)
    assert (box.size, box.closed, box.pending) == (0, False, False)
    assert (box.dropped, box.conflated, box.queued) == (0, 0, 0)
    assert box.take() == b""
    assert box.take_gaps() == []


def test_outbox_attributes(impl: ModuleType) -> None:
    owner = object()
    box = impl.Outbox(2**70, MSGPACK, owner)
    assert box.limit == 2**70
    assert box.encoding == MSGPACK
    assert box.owner is owner
    box.owner = "other"
    box.limit = 3
    assert (box.owner, box.limit) == ("other", 3)
    assert box.offer("k", b"abcd", DISC, 1) == OVERFLOW  # the new limit applies


def test_outbox_keyword_arguments(impl: ModuleType) -> None:
    box = impl.Outbox(limit=5, encoding=MSGPACK, owner="o")
    assert (box.limit, box.encoding, box.owner) == (5, MSGPACK, "o")


@pytest.mark.parametrize(
    ("limit", "encoding", "message"),
    [
        pytest.param(0, JSON, "outbox limit must be > 0, got 0", id="limit-0"),
        pytest.param(-5, JSON, "outbox limit must be > 0, got -5", id="limit-negative"),
        pytest.param(1, -1, "unknown encoding -1", id="encoding-negative"),
        pytest.param(1, 2, "unknown encoding 2", id="encoding-2"),
        pytest.param(1, 2**80, f"unknown encoding {2**80}", id="encoding-huge"),
        pytest.param(0, 9, "outbox limit must be > 0, got 0", id="limit-checked-first"),
    ],
)
def test_outbox_init_errors(impl: ModuleType, limit: int, encoding: int, message: str) -> None:
    with pytest.raises(ValueError) as info:
        impl.Outbox(limit, encoding)
    assert str(info.value) == message


def test_outbox_identity_hash(impl: ModuleType) -> None:
    a, b = impl.Outbox(10), impl.Outbox(10)
    assert a != b
    assert a == a
    table = {a: "a", b: "b"}
    assert table[a] == "a" and table[b] == "b"
    assert hash(a) == hash(a)


# An Outbox scenario is a list of (operation, expected result) pairs, run in order
# on Outbox(limit). Operations:
#   ("put", frame) -> None             ("offer", key, frame, policy, offset) -> OFFER_*
#   ("take",) -> bytes                 ("gaps",) -> list of (key, from, to)
#   ("close",) -> None                 ("state",) -> (size, pending, closed)
#   ("counters",) -> (queued, dropped, conflated)
Op = tuple[Any, ...]


def _run(box: Any, op: Op) -> Any:
    name, *args = op
    if name == "put":
        return box.put(*args)
    if name == "offer":
        return box.offer(*args)
    if name == "take":
        return box.take()
    if name == "gaps":
        return box.take_gaps()
    if name == "close":
        return box.close()
    if name == "state":
        return (box.size, box.pending, box.closed)
    if name == "counters":
        return (box.queued, box.dropped, box.conflated)
    if name == "behind":
        return box.behind
    if name == "written":  # what the writer or flush() does once a write completed
        return box.written()
    raise AssertionError(f"unknown op {name}")


OUTBOX_SCENARIOS = [
    pytest.param(
        100,
        [
            (("offer", "a", b"a1", DISC, 1), QUEUED),
            (("offer", "b", b"b1", DROP, 1), QUEUED),
            (("put", b"P"), None),
            (("offer", "c", b"c1", CONF, 1), QUEUED),
            (("offer", "a", b"a2", DISC, 2), QUEUED),
            (("state",), (9, True, False)),
            (("take",), b"a1b1Pc1a2"),
            (("state",), (0, False, False)),
            (("counters",), (5, 0, 0)),
            (("take",), b""),
        ],
        id="order-preserved-all-policies",
    ),
    pytest.param(
        4,
        [
            (("offer", "a", b"aa", DISC, 1), QUEUED),
            (("offer", "a", b"bb", DISC, 2), QUEUED),  # size == limit still fits
            (("state",), (4, True, False)),
            (("offer", "a", b"c", DISC, 3), OVERFLOW),
            (("state",), (0, False, True)),  # closed and emptied
            (("take",), b""),
            (("offer", "a", b"d", DISC, 4), CLOSED),
            (("offer", "a", b"d", DROP, 4), CLOSED),
            (("offer", "a", b"d", CONF, 4), CLOSED),
            (("put", b"P"), None),  # ignored once closed
            (("state",), (0, False, True)),
            (("counters",), (2, 0, 0)),
        ],
        id="disconnect-overflow-closes-and-empties",
    ),
    pytest.param(
        3,
        [
            (("offer", "a", b"abcd", DISC, 1), OVERFLOW),
            (("state",), (0, False, True)),
        ],
        id="disconnect-frame-over-limit-on-empty-outbox",
    ),
    pytest.param(
        5,
        [
            (("put", b"12345"), None),
            (("put", b"6789"), None),  # put ignores the limit
            (("state",), (9, True, False)),
            (("offer", "a", b"x", DISC, 1), OVERFLOW),
        ],
        id="put-never-dropped-but-counts",
    ),
    pytest.param(
        4,
        [
            (("offer", "a", b"aaa", DROP, 1), QUEUED),
            (("offer", "a", b"bb", DROP, 2), DROPPED),  # does not fit: gap starts
            (("offer", "a", b"c", DROP, 3), DROPPED),  # would fit, but the gap is open
            (("offer", "z", b"z", DROP, 9), QUEUED),  # other channels are unaffected
            (("offer", "a", b"d", DROP, 4), DROPPED),
            (("state",), (4, True, False)),
            (("take",), b"aaaz"),
            (("state",), (0, True, False)),  # the gap is still pending
            (("offer", "a", b"e", DROP, 5), DROPPED),  # dropped until take_gaps()
            (("gaps",), [("a", 2, 5)]),
            (("state",), (0, False, False)),
            (("offer", "a", b"f", DROP, 6), QUEUED),
            (("gaps",), []),
            (("take",), b"f"),
            (("counters",), (3, 4, 0)),
        ],
        id="drop-gap-contiguous-until-take_gaps",
    ),
    pytest.param(
        2,
        [
            (("offer", "a", b"aaa", DROP, 10), DROPPED),
            (("offer", "b", b"bbb", DROP, 20), DROPPED),
            (("offer", "a", b"a", DROP, 11), DROPPED),
            (("offer", "b", b"b", DROP, 21), DROPPED),
            (("offer", "a", b"a", DROP, 12), DROPPED),
            (("state",), (0, True, False)),
            (("gaps",), [("a", 10, 12), ("b", 20, 21)]),
            (("gaps",), []),
        ],
        id="drop-gaps-per-channel-in-first-drop-order",
    ),
    pytest.param(
        4,
        [
            (("offer", "a", b"aaa", CONF, 1), QUEUED),
            (("offer", "a", b"bb", CONF, 2), CONFLATED),  # does not fit: held
            (("state",), (5, True, False)),
            (("offer", "a", b"c", CONF, 3), CONFLATED),  # replaces the held value
            (("state",), (4, True, False)),
            (("offer", "a", b"dddd", CONF, 4), CONFLATED),
            (("state",), (7, True, False)),
            (("put", b"P"), None),
            (("take",), b"aaaPdddd"),  # queued frames first, then held values
            (("state",), (0, False, False)),
            (("behind",), True),
            # still behind until a write drained everything: newest value only
            (("offer", "a", b"e", CONF, 5), CONFLATED),
            (("offer", "a", b"f", CONF, 6), CONFLATED),
            (("take",), b"f"),
            (("written",), None),
            (("offer", "a", b"g", CONF, 7), QUEUED),  # conflation ends once it keeps up
            (("take",), b"g"),
            (("counters",), (3, 0, 5)),
        ],
        id="conflate-until-written",
    ),
    pytest.param(
        3,
        [
            (("offer", "x", b"xxx", CONF, 1), QUEUED),
            (("offer", "b", b"b1", CONF, 1), CONFLATED),
            (("offer", "a", b"a1", CONF, 1), CONFLATED),
            (("offer", "b", b"b2", CONF, 2), CONFLATED),
            (("offer", "a", b"a2", CONF, 2), CONFLATED),
            (("take",), b"xxxb2a2"),
        ],
        id="conflate-held-values-in-first-conflation-order",
    ),
    pytest.param(
        2,
        [
            (("offer", "a", b"aaaa", CONF, 1), CONFLATED),  # over limit on an empty outbox
            (("state",), (4, True, False)),
            (("take",), b"aaaa"),
        ],
        id="conflate-frame-over-limit-is-held",
    ),
    pytest.param(
        3,
        [
            (("offer", "a", b"aaa", DISC, 1), QUEUED),
            (("offer", "c", b"c", CONF, 1), CONFLATED),
            (("offer", "d", b"d", DROP, 7), DROPPED),
            (("close",), None),
            (("state",), (0, False, True)),
            (("take",), b""),
            (("gaps",), []),
            (("counters",), (1, 1, 1)),  # counters survive close
        ],
        id="close-discards-everything",
    ),
    pytest.param(
        10,
        [
            (("offer", "a", b"", DISC, 1), QUEUED),  # an empty frame still counts as queued
            (("state",), (0, True, False)),
            (("take",), b""),
        ],
        id="empty-frame",
    ),
    pytest.param(
        10,
        [
            (("offer", ("t", 1), b"t", CONF, 1), QUEUED),
            (("offer", 7, b"i", DROP, 1), QUEUED),
            (("take",), b"ti"),
        ],
        id="any-hashable-key",
    ),
]


@pytest.mark.parametrize(("limit", "steps"), OUTBOX_SCENARIOS)
def test_outbox_scenario(impl: ModuleType, limit: int, steps: list[tuple[Op, Any]]) -> None:
    box = impl.Outbox(limit, JSON, "owner")
    for i, (op, expected) in enumerate(steps):
        assert _run(box, op) == expected, f"step {i}: {op}"


def test_take_single_frame_not_copied(impl: ModuleType) -> None:
    frame = b"x" * 1000
    box = impl.Outbox(10_000)
    box.offer("k", frame, DISC, 1)
    assert box.take() is frame


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        pytest.param(3, "unknown slow-consumer policy 3", id="3"),
        pytest.param(-1, "unknown slow-consumer policy -1", id="negative"),
        pytest.param(2**70, f"unknown slow-consumer policy {2**70}", id="huge"),
        pytest.param("drop", "unknown slow-consumer policy drop", id="str"),
    ],
)
def test_offer_unknown_policy(impl: ModuleType, policy: Any, message: str) -> None:
    box = impl.Outbox(10)
    with pytest.raises(ValueError) as info:
        box.offer("k", b"x", policy, 1)
    assert str(info.value) == message
    assert (box.size, box.pending, box.queued) == (0, False, 0)
    box.close()
    assert box.offer("k", b"x", policy, 1) == CLOSED  # closed wins over a bad policy


def test_offer_policy_compared_by_value(impl: ModuleType) -> None:
    box = impl.Outbox(1)
    assert box.offer("k", b"xx", True, 5) == DROPPED  # True == POLICY_DROP
    assert box.take_gaps() == [("k", 5, 5)]


# --------------------------------------------------------------------------- Members


def _owners(members: Any) -> list[Any]:
    return [box.owner for box in members]


def test_members_add_remove_contains(impl: ModuleType) -> None:
    m = impl.Members()
    a, b = impl.Outbox(10, JSON, "a"), impl.Outbox(10, MSGPACK, "b")
    assert (len(m), a in m, m.count(JSON), m.count(MSGPACK)) == (0, False, 0, 0)
    assert m.add(a) is True
    assert m.add(a) is False
    assert m.add(b) is True
    assert (len(m), a in m, b in m) == (2, True, True)
    assert (m.count(JSON), m.count(MSGPACK)) == (1, 1)
    assert m.remove(a) is True
    assert m.remove(a) is False
    assert (len(m), a in m, b in m, m.count(JSON), m.count(MSGPACK)) == (1, False, True, 0, 1)
    assert "not an outbox" not in m
    assert m.remove("not an outbox") is False


SWAP_REMOVE_CASES = [
    pytest.param(["a", "b", "c", "d"], ["a"], ["d", "b", "c"], id="first-swaps-with-last"),
    pytest.param(["a", "b", "c", "d"], ["b"], ["a", "d", "c"], id="middle-swaps-with-last"),
    pytest.param(["a", "b", "c", "d"], ["d"], ["a", "b", "c"], id="last-just-pops"),
    pytest.param(["a"], ["a"], [], id="only-member"),
    pytest.param(["a", "b", "c"], ["a", "c", "b"], [], id="all"),
    pytest.param(["a", "b", "c", "d"], ["a", "d"], ["c", "b"], id="twice"),
]


@pytest.mark.parametrize(("added", "removed", "remaining"), SWAP_REMOVE_CASES)
def test_members_swap_remove(
    impl: ModuleType, added: list[str], removed: list[str], remaining: list[str]
) -> None:
    boxes = {name: impl.Outbox(10, JSON, name) for name in added}
    m = impl.Members()
    for name in added:
        m.add(boxes[name])
    for name in removed:
        assert m.remove(boxes[name]) is True
    assert _owners(m) == remaining
    assert len(m) == len(remaining) == m.count(JSON)
    for name in remaining:  # the index stays right after swaps
        assert boxes[name] in m
        assert m.remove(boxes[name]) is True
    assert len(m) == 0


def test_members_iter_is_a_snapshot(impl: ModuleType) -> None:
    m = impl.Members()
    boxes = [impl.Outbox(10, JSON, i) for i in range(3)]
    for box in boxes:
        m.add(box)
    seen = []
    for box in m:
        seen.append(box.owner)
        m.remove(box)
    assert seen == [0, 1, 2]
    assert len(m) == 0


@pytest.mark.parametrize(
    ("encodings", "counts"),
    [
        pytest.param([], (0, 0), id="empty"),
        pytest.param([JSON, JSON, MSGPACK], (2, 1), id="mixed"),
        pytest.param([MSGPACK] * 3, (0, 3), id="msgpack-only"),
    ],
)
def test_members_count(impl: ModuleType, encodings: list[int], counts: tuple[int, int]) -> None:
    m = impl.Members()
    for enc in encodings:
        m.add(impl.Outbox(10, enc))
    assert (m.count(JSON), m.count(MSGPACK)) == counts


def test_members_count_bad_encoding(impl: ModuleType) -> None:
    with pytest.raises(IndexError):
        impl.Members().count(5)


def test_members_hashable(impl: ModuleType) -> None:
    a, b = impl.Members(), impl.Members()
    assert a != b
    assert {a: 1, b: 2}[a] == 1


# --------------------------------------------------------------------------- fanout


def _members(impl: ModuleType, specs: list[tuple[str, int, int]]) -> tuple[Any, dict[str, Any]]:
    """Members of Outbox(limit, encoding, owner=name) for each (name, encoding, limit)."""
    m = impl.Members()
    boxes = {}
    for name, enc, limit in specs:
        boxes[name] = impl.Outbox(limit, enc, name)
        m.add(boxes[name])
    return m, boxes


def test_fanout_frame_per_encoding(impl: ModuleType) -> None:
    m, boxes = _members(impl, [("j1", JSON, 100), ("m1", MSGPACK, 100), ("j2", JSON, 100)])
    woken, overflowed = impl.fanout(m, (b"J", b"M"), "ch", DISC, 1)
    assert (woken, overflowed) == (["j1", "m1", "j2"], [])
    assert [boxes[n].take() for n in ("j1", "m1", "j2")] == [b"J", b"M", b"J"]


FANOUT_CASES = [
    # (members as (name, encoding, limit), prefill {name: bytes put first}, closed names,
    #  policy, frame, expected (woken, overflowed))
    pytest.param(
        [("a", JSON, 10), ("b", JSON, 10)], {"b": b"x"}, [], DISC, b"f",
        (["a"], []), id="already-pending-not-woken",
    ),
    pytest.param(
        [("a", JSON, 2), ("b", JSON, 10), ("c", JSON, 2)], {"c": b"cc"}, [], DISC, b"fff",
        (["b"], ["a", "c"]), id="overflow-not-woken",
    ),
    pytest.param(
        [("a", JSON, 10), ("b", JSON, 10)], {}, ["a"], DISC, b"f",
        (["b"], []), id="closed-neither",
    ),
    pytest.param(
        [("a", JSON, 2), ("b", JSON, 2)], {"b": b"b"}, [], DROP, b"fff",
        (["a"], []), id="drop-on-empty-outbox-wakes",
    ),
    pytest.param(
        [("a", JSON, 2), ("b", MSGPACK, 2)], {"a": b"a"}, [], CONF, b"fff",
        (["b"], []), id="conflate-on-empty-outbox-wakes",
    ),
    pytest.param([], {}, [], DISC, b"f", ([], []), id="no-members"),
]


@pytest.mark.parametrize(("specs", "prefill", "closed", "policy", "frame", "expected"), FANOUT_CASES)
def test_fanout(
    impl: ModuleType,
    specs: list[tuple[str, int, int]],
    prefill: dict[str, bytes],
    closed: list[str],
    policy: int,
    frame: bytes,
    expected: tuple[list[str], list[str]],
) -> None:
    m, boxes = _members(impl, specs)
    for name, data in prefill.items():
        boxes[name].put(data)
    for name in closed:
        boxes[name].close()
    assert impl.fanout(m, (frame, frame), "ch", policy, 7) == expected


def test_fanout_result_per_policy(impl: ModuleType) -> None:
    m, boxes = _members(impl, [("a", JSON, 3)])
    assert impl.fanout(m, (b"xx", None), "ch", DROP, 1) == (["a"], [])
    assert impl.fanout(m, (b"xx", None), "ch", DROP, 2) == ([], [])  # gap opened
    assert impl.fanout(m, (b"y", None), "ch", DROP, 3) == ([], [])
    assert boxes["a"].take() == b"xx"
    assert boxes["a"].take_gaps() == [("ch", 2, 3)]
    assert boxes["a"].dropped == 2


def test_fanout_unused_encoding_may_be_none(impl: ModuleType) -> None:
    m, boxes = _members(impl, [("a", MSGPACK, 10)])
    assert impl.fanout(m, (None, b"M"), "ch", DISC, 1) == (["a"], [])
    assert boxes["a"].take() == b"M"


@pytest.mark.parametrize(
    ("specs", "frames", "exc", "message"),
    [
        pytest.param([("a", JSON, 1), ("b", MSGPACK, 9)], (b"jj", None), ValueError,
                     "no frame for encoding 1", id="msgpack-none"),
        pytest.param([("b", MSGPACK, 9), ("a", JSON, 1)], (None, b"m"), ValueError,
                     "no frame for encoding 0", id="json-none"),
        pytest.param([("a", JSON, 1), ("b", MSGPACK, 9)], (b"jj",), IndexError,
                     "tuple index out of range", id="frames-too-short"),
    ],
)
def test_fanout_missing_frame_leaves_outboxes_untouched(
    impl: ModuleType,
    specs: list[tuple[str, int, int]],
    frames: tuple[bytes | None, ...],
    exc: type[Exception],
    message: str,
) -> None:
    m, boxes = _members(impl, specs)
    with pytest.raises(exc) as info:
        impl.fanout(m, frames, "ch", DISC, 1)
    assert str(info.value) == message
    for box in boxes.values():  # checked before any offer: nothing queued, nothing closed
        assert (box.pending, box.closed, box.queued) == (False, False, 0)


def test_fanout_unknown_policy(impl: ModuleType) -> None:
    m, boxes = _members(impl, [("a", JSON, 10), ("b", JSON, 10)])
    boxes["a"].close()
    with pytest.raises(ValueError, match="^unknown slow-consumer policy 9$"):
        impl.fanout(m, (b"x", None), "ch", 9, 1)
    assert boxes["b"].pending is False


def test_fanout_after_remove(impl: ModuleType) -> None:
    m, boxes = _members(impl, [("a", JSON, 10), ("b", JSON, 10), ("c", JSON, 10)])
    m.remove(boxes["a"])
    assert impl.fanout(m, (b"x", None), "ch", DISC, 1) == (["c", "b"], [])
    assert boxes["a"].pending is False
