"""A channel's offsets, history ring (size and TTL) and ``since`` recovery."""

from __future__ import annotations

import pytest

from relay.core.history import ChannelLog


def filled(n: int, size: int = 10, ttl: float = 100.0) -> ChannelLog:
    log = ChannelLog("E", size, ttl)
    for i in range(1, n + 1):
        log.append(i, now=float(i))
    return log


def test_offsets_start_at_one_and_grow_by_one() -> None:
    log = ChannelLog("E", 10, 100.0)
    assert log.offset == 0 and log.latest is None
    assert [log.append(x, 0.0).offset for x in "abc"] == [1, 2, 3]
    assert log.latest is not None and log.latest.data == "c"


def test_ring_keeps_size_newest() -> None:
    log = filled(8, size=3)
    assert [p.offset for p in log.retained(8.0)] == [6, 7, 8]


def test_size_zero_keeps_no_history_but_latest() -> None:
    log = filled(3, size=0)
    assert log.retained(3.0) == ()
    assert log.latest is not None and log.latest.offset == 3


def test_ttl_expires_old_publications() -> None:
    log = filled(5, ttl=2.5)  # published at t=1..5
    assert [p.offset for p in log.retained(5.0)] == [3, 4, 5]
    assert [p.offset for p in log.retained(7.6)] == []


@pytest.mark.parametrize(("epoch", "since", "recovered", "offsets"), [
    ("E", 8, True, []),
    ("E", 5, True, [6, 7, 8]),
    ("E", 4, False, [6, 7, 8]),    # offset 5 is gone: the range is incomplete
    ("E", 0, False, [6, 7, 8]),
    ("E", 9, False, []),           # from the future
    ("OTHER", 5, False, []),       # epoch changed
], ids=["current", "complete", "one-missing", "from-zero", "future", "other-epoch"])
def test_recover(epoch: str, since: int, recovered: bool, offsets: list[int]) -> None:
    log = filled(8, size=3)
    rec = log.recover(epoch, since, now=8.0)
    assert rec.recovered is recovered
    assert [p.offset for p in rec.publications] == offsets


def test_recover_from_zero_with_full_history_is_complete() -> None:
    log = filled(3)
    rec = log.recover("E", 0, now=3.0)
    assert rec.recovered and [p.data for p in rec.publications] == [1, 2, 3]


@pytest.mark.parametrize(("since", "limit", "offsets"), [
    (None, None, [1, 2, 3, 4, 5]),
    (2, None, [3, 4, 5]),
    (2, 2, [3, 4]),
    (None, 2, [4, 5]),
    (5, None, []),
], ids=["all", "since", "since-limit", "limit-newest", "none-newer"])
def test_history(since: int | None, limit: int | None, offsets: list[int]) -> None:
    assert [p.offset for p in filled(5).history(5.0, since, limit)] == offsets


def test_is_expired_only_after_ttl_of_inactivity() -> None:
    log = filled(2, ttl=10.0)
    assert not log.is_expired(now=5.0, last_active=2.0)
    assert log.is_expired(now=12.5, last_active=2.0)
