"""Presence bookkeeping (relay.core.presence): joins, leaves, batching, announcements."""

from __future__ import annotations

from typing import Any

import pytest

from relay.core import envelope as e
from relay.core.presence import (
    MAX_INFO_BYTES,
    Change,
    Member,
    PresenceBook,
    PresenceStats,
    announcements,
    check_info,
    stats_of,
)

A = Member("alice", "c1", 1.5, {"name": "Alice"})
B = Member("bob", "c2", 2.0)
A2 = Member("alice", "c3", 3.0)


def test_member_wire_form() -> None:
    assert A.to_wire() == {"user": "alice", "conn": "c1", "joined": 1.5, "info": {"name": "Alice"}}
    assert B.to_wire() == {"user": "bob", "conn": "c2", "joined": 2.0}
    assert B.to_json() == '{"user":"bob","conn":"c2","joined":2.0}'


def test_stats_count_connections_and_distinct_users() -> None:
    assert stats_of([]) == PresenceStats(0, 0)
    assert stats_of(m.to_wire() for m in (A, B, A2)) == PresenceStats(3, 2)


def test_immediate_joins_and_leaves() -> None:
    book = PresenceBook()
    assert book.join("ch", A, 0, now=0) == Change("ch", (A,), ())
    assert book.join("ch", A, 0, now=0) is None  # already a member
    assert book.join("ch", B, 0, now=0) == Change("ch", (B,), ())
    assert book.members("ch") == [A, B] and book.count("ch") == 2 and "ch" in book
    assert book.leave("ch", "c1", 0, now=1) == Change("ch", (), (A,))
    assert book.leave("ch", "c1", 0, now=1) is None
    assert book.leave("nope", "c1", 0, now=1) is None
    assert book.leave("ch", "c2", 0, now=1) == Change("ch", (), (B,))
    assert "ch" not in book and book.channels() == [] and book.members("ch") == [] and book.count("ch") == 0


def test_batched_changes_wait_for_their_interval_and_cancel_out() -> None:
    book = PresenceBook()
    assert book.join("ch", A, 1.0, now=10) is None
    assert book.join("ch", B, 1.0, now=10.5) is None
    assert book.leave("ch", "c2", 1.0, now=10.6) is None  # joined and left: nothing to say
    assert book.next_due() == 11.0
    assert book.take_due(10.9) == []
    assert book.take_due(11.0) == [Change("ch", (A,), ())]
    assert book.next_due() is None
    assert book.leave("ch", "c1", 1.0, now=12) is None
    assert book.join("ch", A2, 1.0, now=12.2) is None
    assert book.take_due(13.0) == [Change("ch", (A2,), (A,))]
    assert book.leave("ch", "c3", 1.0, now=14) is None
    assert book.take_due(15) == [Change("ch", (), (A2,))]
    assert book.channels() == []


def test_a_batch_that_cancelled_out_announces_nothing() -> None:
    book = PresenceBook()
    book.join("ch", A, 1.0, now=0)
    book.leave("ch", "c1", 1.0, now=0.1)
    assert book.take_due(5) == [] and book.channels() == []


def test_announcements() -> None:
    assert announcements("ch", [], [], batched=False) == []
    assert announcements("ch", [], [], batched=True) == []
    a, b = A.to_wire(), B.to_wire()
    assert announcements("ch", [a], [b], batched=False) == [
        {"type": "leave", "channel": "ch", "member": b}, {"type": "join", "channel": "ch", "member": a}]
    assert announcements("ch", [a], [b], batched=True) == [
        {"type": "presence_diff", "channel": "ch", "joins": [a], "leaves": [b]}]


@pytest.mark.parametrize(("info", "problem"), [
    ({"name": "x"}, None),
    ("x" * (MAX_INFO_BYTES - 2), None),
    ("x" * (MAX_INFO_BYTES - 1), "the info claim takes 1,025 bytes as JSON; the limit is 1,024"),
    (float("nan"), None),  # (JSON from a token cannot hold it; Python's json writes NaN)
    ({1j: 2}, "the info claim must be JSON"),
], ids=["object", "at-limit", "over-limit", "nan", "not-json"])
def test_check_info(info: Any, problem: str | None) -> None:
    assert check_info(info) == problem


@pytest.mark.parametrize(("msg", "expected"), [
    ({"type": "presence", "channel": "a"}, e.Presence("a")),
    ({"type": "presence_stats", "channel": "a", "ref": 3}, e.Presence("a", 3, stats=True)),
], ids=["presence", "stats"])
def test_parse_presence_requests(msg: dict[str, Any], expected: e.Envelope) -> None:
    assert e.parse(msg) == expected
