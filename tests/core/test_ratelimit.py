"""Tests for relay.core.ratelimit: token buckets and the per-connection limiter (injected time)."""

from __future__ import annotations

import pytest

from relay.core.ratelimit import MessageLimiter, RateLimits, TokenBucket, Verdict


def test_bucket_starts_full_and_refills_at_its_rate() -> None:
    b = TokenBucket(rate=10, capacity=5, now=0.0)
    assert [b.take(1, 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not b.take(1, 0.05)  # half a token
    assert b.take(1, 0.1)
    assert b.take(1, 100.0) and b.tokens == 4  # never above capacity


def test_bucket_large_cost_goes_into_debt() -> None:
    b = TokenBucket(rate=10, capacity=5, now=0.0)
    assert b.take(50, 0.0)  # full bucket admits one oversized message
    assert b.tokens == -45
    assert not b.take(1, 4.0)  # still paying back
    assert b.take(1, 4.7)


def test_bucket_ignores_time_going_backwards() -> None:
    b = TokenBucket(rate=1, capacity=1, now=10.0)
    assert b.take(1, 10.0)
    assert not b.take(1, 5.0)
    assert b.take(1, 11.0)


@pytest.mark.parametrize(("rate", "capacity"), [(0, 1), (1, 0), (-1, 1)], ids=["no-rate", "no-capacity", "negative"])
def test_bucket_refuses_nonsense(rate: float, capacity: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, capacity, 0.0)


def test_limiter_messages_then_refuse_then_close() -> None:
    lim = MessageLimiter(RateLimits(messages_per_second=10, messages_burst=3, bytes_per_second=0, strikes=2), 0.0)
    verdicts = [lim.admit(10, 0.0) for _ in range(6)]
    assert verdicts == [Verdict.ALLOW] * 3 + [Verdict.REFUSE, Verdict.REFUSE, Verdict.CLOSE]
    assert lim.refused == 3


def test_limiter_strikes_come_back_one_per_second() -> None:
    lim = MessageLimiter(RateLimits(messages_per_second=1, messages_burst=1, bytes_per_second=0, strikes=2), 0.0)
    assert lim.admit(1, 0.0) is Verdict.ALLOW
    assert lim.admit(1, 0.1) is Verdict.REFUSE
    assert lim.admit(1, 0.2) is Verdict.REFUSE
    # a second later: one message token and one strike are back
    assert lim.admit(1, 1.3) is Verdict.ALLOW
    assert lim.admit(1, 1.4) is Verdict.REFUSE
    assert lim.admit(1, 1.5) is Verdict.CLOSE


def test_limiter_bytes_bucket_and_refusals_cost_nothing() -> None:
    lim = MessageLimiter(RateLimits(messages_per_second=0, bytes_per_second=100, bytes_burst=100, strikes=5), 0.0)
    assert lim.admit(60, 0.0) is Verdict.ALLOW
    assert lim.admit(60, 0.0) is Verdict.REFUSE  # 40 left
    assert lim.admit(40, 0.0) is Verdict.ALLOW  # the refused one took nothing
    assert lim.admit(1, 0.0) is Verdict.REFUSE


def test_limiter_refused_message_takes_from_neither_bucket() -> None:
    lim = MessageLimiter(RateLimits(messages_per_second=10, messages_burst=2, bytes_per_second=100, bytes_burst=100), 0.0)
    assert lim.admit(100, 0.0) is Verdict.ALLOW
    assert lim.admit(100, 0.0) is Verdict.REFUSE  # over bytes: the message token stays
    assert lim.admit(0, 0.0) is Verdict.ALLOW


def test_limiter_off() -> None:
    lim = MessageLimiter(RateLimits(messages_per_second=0, bytes_per_second=0), 0.0)
    assert all(lim.admit(10**9, 0.0) is Verdict.ALLOW for _ in range(10_000))
