"""Keyed conflation in the outbox (channel option ``conflate_key``): a full outbox keeps
only the newest frame per key, and what comes out never has a stale value after a fresh
one of the same key, never loses a key, and never goes back in offset order (clients
ignore an offset at or below one they have seen). Both implementations, hypothesis-driven."""

from __future__ import annotations

from types import ModuleType

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

LIMIT = 40  # about three frames: conflation starts after a few offers


def frame(key: str, seq: int) -> bytes:
    return f"{key}:{seq:06d};".encode()


def parse(data: bytes) -> list[tuple[str, int]]:
    return [(part.split(":")[0], int(part.split(":")[1])) for part in data.decode().split(";") if part]


# A run: publications (a key each, sequence numbers increasing) with drains of some
# bytes in between (a subscriber that reads now and then).
KEYS = ["AAPL", "MSFT", "TSLA", "NVDA", "AMZN"]
steps = st.lists(st.one_of(
    st.tuples(st.just("offer"), st.sampled_from(KEYS)),
    st.tuples(st.just("offer"), st.sampled_from(KEYS)),
    st.tuples(st.just("offer"), st.sampled_from(KEYS)),
    st.tuples(st.just("drain"), st.integers(min_value=0, max_value=200)),
), max_size=300)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run=steps)
def test_keyed_conflation_keeps_order_per_key_and_never_loses_a_key(impl: ModuleType, run: list[tuple[str, object]]) -> None:
    box = impl.Outbox(LIMIT, impl.ENC_JSON, None)
    out: list[tuple[str, int]] = []
    latest: dict[str, int] = {}
    seq = 0
    pending = b""
    for kind, arg in run:
        if kind == "offer":
            seq += 1
            key = ("prices", arg)  # the hub's key for a channel with conflate_key
            result = box.offer(key, frame(str(arg), seq), impl.POLICY_CONFLATE, seq)
            assert result in (impl.OFFER_QUEUED, impl.OFFER_CONFLATED)
            latest[str(arg)] = seq
        else:
            # the writer takes everything queued; the "socket" accepts ``arg`` bytes of it
            pending += box.take()
            n = min(int(arg), len(pending))  # type: ignore[call-overload]
            whole = pending[:n].rfind(b";") + 1  # parse complete frames only
            out.extend(parse(pending[:whole]))
            pending = pending[whole:]
        assert box.size <= LIMIT + 16 * 5  # bounded: the limit plus one held frame per key
    out.extend(parse(pending + box.take()))
    sequence = [s for _, s in out]
    assert sequence == sorted(sequence), "offsets went backwards across keys"  # clients drop those
    last_seen: dict[str, int] = {}
    for key, s in out:
        assert s > last_seen.get(key, 0), f"stale {key}={s} after {last_seen[key]}"
        last_seen[key] = s
    assert last_seen == latest  # every key, ending with its newest value
