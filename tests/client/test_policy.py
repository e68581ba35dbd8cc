"""The client's sans-IO decisions: backoff, close codes, handshake refusals, cursors."""

from __future__ import annotations

import random

import pytest

from relay.client import (
    MessagesSkipped,
    Position,
    RecoveryLost,
    backoff_cap,
    backoff_delay,
)
from relay.client._policy import (
    LONGER_BACKOFF_STEPS,
    Action,
    Cursor,
    Decision,
    decide_close,
    decide_rejection,
    parse_reconnect_hint,
)

BACKOFF = {"min_backoff": 0.1, "max_backoff": 30.0, "factor": 2.0}


@pytest.mark.parametrize(("attempt", "cap"), [
    (1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (9, 25.6), (10, 30.0), (11, 30.0), (1000, 30.0), (0, 0.1),
], ids=lambda v: str(v))
def test_backoff_cap_grows_by_factor_up_to_max(attempt: int, cap: float) -> None:
    assert backoff_cap(attempt, **BACKOFF) == pytest.approx(cap)


@pytest.mark.parametrize("attempt", range(1, 16))
def test_backoff_delay_is_full_jitter_within_its_cap(attempt: int) -> None:
    cap = min(30.0, 0.1 * 2.0 ** (attempt - 1))
    assert backoff_delay(attempt, **BACKOFF, rand=lambda: 0.0) == 0.0
    assert backoff_delay(attempt, **BACKOFF, rand=lambda: 0.5) == pytest.approx(cap / 2)
    rng = random.Random(attempt)
    delays = [backoff_delay(attempt, **BACKOFF, rand=rng.random) for _ in range(2000)]
    assert all(0.0 <= d <= cap for d in delays)
    # full jitter: spread over the whole range, not bunched near the cap
    assert min(delays) < cap * 0.05 and max(delays) > cap * 0.95


def test_backoff_with_factor_1_is_flat() -> None:
    assert [backoff_cap(n, min_backoff=0.5, max_backoff=9, factor=1) for n in (1, 5, 50)] == [0.5] * 3


@pytest.mark.parametrize(("code", "reason", "decision"), [
    (1000, "", Decision(Action.STOP)),
    (1008, "forbidden origin", Decision(Action.STOP)),
    (1001, '{"reconnect_after_ms": 1500}', Decision(Action.RECONNECT, hint=1.5)),
    (1001, "", Decision(Action.RECONNECT)),
    (1001, "going away", Decision(Action.RECONNECT)),
    (4001, "token expired", Decision(Action.REFRESH_TOKEN)),
    (4002, "slow consumer: send queue overflowed", Decision(Action.RECONNECT)),
    (4003, "", Decision(Action.RECONNECT, longer=True)),
    (1013, "", Decision(Action.RECONNECT, longer=True)),
    (1011, "heartbeat timeout", Decision(Action.RECONNECT)),
    (1006, "", Decision(Action.RECONNECT)),
    (1009, "too big", Decision(Action.RECONNECT)),
    (4999, "", Decision(Action.RECONNECT)),
    (None, "connection refused", Decision(Action.RECONNECT)),
], ids=lambda v: repr(v)[:24])
def test_close_code_table(code: int | None, reason: str, decision: Decision) -> None:
    assert decide_close(code, reason) == decision


@pytest.mark.parametrize(("status", "decision"), [
    (401, Decision(Action.REFRESH_TOKEN)),
    (400, Decision(Action.STOP)),
    (403, Decision(Action.STOP)),
    (404, Decision(Action.STOP)),
    (429, Decision(Action.RECONNECT, longer=True)),
    (408, Decision(Action.RECONNECT)),
    (500, Decision(Action.RECONNECT)),
    (503, Decision(Action.RECONNECT)),
], ids=str)
def test_handshake_refusals(status: int, decision: Decision) -> None:
    assert decide_rejection(status) == decision


@pytest.mark.parametrize(("reason", "seconds"), [
    ('{"reconnect_after_ms": 0}', 0.0),
    ('{"reconnect_after_ms": 2500}', 2.5),
    ('{"reconnect_after_ms": 12.5}', 0.0125),
    ('{"reconnect_after_ms": -1}', None),
    ('{"reconnect_after_ms": true}', None),
    ('{"reconnect_after_ms": "50"}', None),
    ('{"other": 1}', None),
    ("[50]", None),
    ("not json", None),
    ("", None),
    (None, None),
], ids=lambda v: repr(v)[:30])
def test_reconnect_hint(reason: str | None, seconds: float | None) -> None:
    assert parse_reconnect_hint(reason) == seconds


def test_longer_backoff_is_a_few_doublings_further() -> None:
    assert backoff_cap(1 + LONGER_BACKOFF_STEPS, **BACKOFF) == pytest.approx(0.8)


@pytest.mark.parametrize(("text", "position"), [
    ("1b0502ed:17", Position("1b0502ed", 17)),
    ("a:b:0", Position("a:b", 0)),
], ids=str)
def test_position_parse(text: str, position: Position) -> None:
    assert Position.parse(text) == position
    assert str(position) == text


@pytest.mark.parametrize("text", ["", "17", ":17", "abc:", "abc:-1", "abc:1.5", "abc:x"])
def test_position_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="EPOCH:OFFSET"):
        Position.parse(text)


# --------------------------------------------------------------------------- cursor


def test_cursor_fresh_subscription_resumes_from_the_subscribed_offset() -> None:
    cur = Cursor("c")
    assert cur.since() is None
    assert cur.on_subscribed(None, "e1", 5, recovered=False) is None  # nothing was asked
    assert cur.since() == Position("e1", 5)
    assert cur.on_message(6) == (True, None)
    assert cur.since() == Position("e1", 6)


def test_cursor_state_channel_current_value_is_not_a_duplicate() -> None:
    cur = Cursor("prices")
    cur.on_subscribed(None, "e1", 3, recovered=False)
    assert cur.on_message(3) == (True, None)  # the current value follows subscribed
    assert cur.on_message(3) == (False, None)


def test_cursor_drops_duplicates_and_keeps_order() -> None:
    cur = Cursor("c", Position("e1", 4))
    assert cur.on_subscribed(Position("e1", 4), "e1", 9, recovered=True) is None
    assert [cur.on_message(n)[0] for n in (3, 4, 5, 5, 6, 4, 7)] == [False, False, True, False, True, False, True]
    assert cur.since() == Position("e1", 7)


def test_cursor_new_epoch_is_recovery_lost_and_restarts_offsets() -> None:
    cur = Cursor("c", Position("e1", 40))
    lost = cur.on_subscribed(Position("e1", 40), "e2", 3, recovered=False)
    assert isinstance(lost, RecoveryLost)
    assert (lost.channel, lost.old_epoch, lost.old_offset, lost.new_epoch, lost.new_offset) == ("c", "e1", 40, "e2", 3)
    assert cur.since() == Position("e2", 3)
    assert cur.on_message(4) == (True, None)  # offsets of the new epoch are not duplicates


def test_cursor_same_epoch_partial_history_keeps_deduplicating() -> None:
    cur = Cursor("c", Position("e1", 2))
    lost = cur.on_subscribed(Position("e1", 2), "e1", 8, recovered=False)
    assert isinstance(lost, RecoveryLost) and "no longer all retained" in str(lost)
    assert cur.on_message(6) == (True, None)
    assert cur.on_message(2) == (False, None)


def test_cursor_epoch_change_inside_a_subscription() -> None:
    cur = Cursor("c")
    cur.on_subscribed(None, "e1", 0, recovered=False)
    cur.on_message(1)
    deliver, lost = cur.on_message(1, epoch="e2")
    assert deliver and isinstance(lost, RecoveryLost)
    assert (lost.old_epoch, lost.old_offset, lost.new_epoch, lost.new_offset) == ("e1", 1, "e2", 0)
    assert cur.since() == Position("e2", 1)


def test_cursor_gap_is_reported_once_and_never_recovered_later() -> None:
    cur = Cursor("c")
    cur.on_subscribed(None, "e1", 0, recovered=False)
    cur.on_message(46)
    skipped = cur.on_gap(47, 200)
    assert isinstance(skipped, MessagesSkipped)
    assert (skipped.first, skipped.last, skipped.epoch) == (47, 200, "e1")
    assert cur.since() == Position("e1", 200)
    assert cur.on_gap(47, 200) is None
    assert cur.on_message(201) == (True, None)


def test_cursor_save_and_restore() -> None:
    cur = Cursor("c")
    cur.on_subscribed(None, "e1", 0, recovered=False)
    cur.on_message(1)
    saved = cur.save()
    assert cur.on_message(2) == (True, None)
    cur.restore(saved)
    assert cur.since() == Position("e1", 1)
    assert cur.on_message(2) == (True, None)  # not a duplicate: it was never delivered
