"""JSON Merge Patch (RFC 7386): diff and apply, by table and by hypothesis."""

from __future__ import annotations

import copy as _copy
import json
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core import mergepatch as mp

# RFC 7386 appendix A: (target, patch, result).
RFC_EXAMPLES = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "result"), RFC_EXAMPLES,
                         ids=[f"rfc-{i}" for i in range(len(RFC_EXAMPLES))])
def test_apply_rfc_examples(target: Any, patch: Any, result: Any) -> None:
    before = _copy.deepcopy(target)
    assert mp.apply(target, patch) == result
    assert target == before  # untouched


@pytest.mark.parametrize(("old", "new", "patch"), [
    ({"a": 1}, {"a": 1}, {}),
    ({"a": 1}, {"a": 2}, {"a": 2}),
    ({"a": 1, "b": 2}, {"a": 1}, {"b": None}),
    ({"a": {"x": 1, "y": 2}}, {"a": {"x": 1, "y": 3}}, {"a": {"y": 3}}),
    ({"a": [1, 2]}, {"a": [1, 3]}, {"a": [1, 3]}),
    ({"a": 1}, {"a": 1.0}, {"a": 1.0}),
    ({"a": 1}, {"a": True}, {"a": True}),
    ({"a": 0.0}, {"a": -0.0}, {"a": -0.0}),
    ({"a": 1}, [1], [1]),
    ({"a": 1}, None, None),
    (3, {"a": 1}, {"a": 1}),
    ({"a": 1}, {"a": 1, "b": [None]}, {"b": [None]}),
    ({"a": 1}, {"a": 1, "b": [{"c": None}]}, {"b": [{"c": None}]}),
], ids=["equal", "change", "remove", "nested", "array-whole", "int-float", "int-bool", "neg-zero",
        "to-array", "to-null", "from-scalar", "null-in-array", "object-in-array"])
def test_diff(old: Any, new: Any, patch: Any) -> None:
    got = mp.diff(old, new)
    assert mp.same(got, patch)
    assert mp.same(mp.apply(old, got), new)


@pytest.mark.parametrize(("old", "new"), [
    ({"a": 1}, {"a": None}),
    ({}, {"a": None}),
    ({"a": {"b": 1}}, {"a": {"b": None}}),
    ({"a": 1}, {"a": {"b": None}}),
    ("x", {"a": None}),
    ({"a": {"b": 1}}, {"a": {"b": 2, "c": {"d": None}}}),
], ids=["member-null", "new-member-null", "nested-null", "object-with-null", "scalar-to-null-member",
        "deep-null"])
def test_diff_no_patch(old: Any, new: Any) -> None:
    assert mp.diff(old, new) is mp.NO_PATCH
    assert repr(mp.NO_PATCH) == "NO_PATCH"


def test_unchanged_null_member_needs_no_patch() -> None:
    # A null member that stays is left out of the patch, so the value is reachable.
    assert mp.diff({"a": None, "b": 1}, {"a": None, "b": 2}) == {"b": 2}


def test_same_and_copy() -> None:
    assert mp.same({"a": [1, {"b": 2}]}, {"a": [1, {"b": 2}]})
    assert not mp.same({"a": 1}, {"b": 1})
    assert not mp.same({"a": 1}, {"a": 1, "b": 2})
    assert not mp.same([1], [1, 2])
    value = {"a": [1, {"b": 2}]}
    dup = mp.copy(value)
    assert dup == value and dup is not value and dup["a"] is not value["a"]
    assert dup["a"][1] is not value["a"][1]


json_scalars = (st.none() | st.booleans() | st.integers(-2**53, 2**53)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["a", "b", "c", "é", "键", "😀", ""]) | st.text(max_size=3), inner, max_size=4),
    max_leaves=20,
)


def _wire(value: Any) -> Any:
    """What a client decodes from ``value`` sent as JSON (a patch crosses the wire)."""
    return json.loads(json.dumps(value))


@settings(max_examples=300, deadline=None)
@given(st.lists(json_values, min_size=1, max_size=8))
def test_client_state_follows_server_state(values: list[Any]) -> None:
    """Any sequence: the client applying each patch (or taking the full value when there
    is none) holds exactly the server's value after every step, also across msgpack."""
    state = _wire(values[0])
    state_mp = msgpack.unpackb(msgpack.packb(values[0]), raw=False)
    prev = values[0]
    for new in values[1:]:
        before = _copy.deepcopy(prev)
        patch = mp.diff(prev, new)
        assert mp.same(prev, before)  # diff does not touch its arguments
        if patch is mp.NO_PATCH:
            state, state_mp = _wire(new), msgpack.unpackb(msgpack.packb(new), raw=False)
        else:
            held, old = _copy.deepcopy(state), state
            state = mp.apply(state, _wire(patch))
            assert mp.same(old, held)  # apply does not touch the client's previous value
            state_mp = mp.apply(state_mp, msgpack.unpackb(msgpack.packb(patch), raw=False))
        assert mp.same(state, _wire(new))
        assert mp.same(state_mp, msgpack.unpackb(msgpack.packb(new), raw=False))
        prev = new


def _has_null_member(value: Any) -> bool:
    if isinstance(value, dict):
        return any(v is None or _has_null_member(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_null_member(v) for v in value)
    return False


@settings(max_examples=200, deadline=None)
@given(json_values, json_values)
def test_patch_exists_without_null_members(old: Any, new: Any) -> None:
    """NO_PATCH only ever comes from a null member in the new value."""
    patch = mp.diff(old, new)
    if not _has_null_member(new):
        assert patch is not mp.NO_PATCH
    if patch is not mp.NO_PATCH:
        target = _copy.deepcopy(old)
        assert mp.same(mp.apply(target, patch), new)
        assert mp.same(target, old)
