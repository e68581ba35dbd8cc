"""Token buckets and the per-connection message limiter built from them.

A :class:`TokenBucket` holds up to ``capacity`` tokens and gains ``rate`` per second.
:class:`MessageLimiter` gives each connection two (messages per second and bytes per
second) and a third one of patience: every refused message costs one strike, strikes
come back at one per second, and a connection that runs out of them is to be closed
(4003) instead of being answered ``rate_limited`` forever.

Pure: time is the ``now`` argument (seconds, any monotonic origin); nothing here
sleeps or reads a clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: Strikes come back at this rate (per second) while a connection behaves.
STRIKE_RECOVERY_PER_SECOND = 1.0


class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` per second, starting full.

    A cost larger than the capacity is admitted when the bucket is full and leaves it
    in debt, so one large message is possible but the long-run rate still holds.
    """

    __slots__ = ("rate", "capacity", "tokens", "_stamp")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError(f"rate and capacity must be > 0, got rate={rate}, capacity={capacity}")
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self._stamp = now

    def refill(self, now: float) -> None:
        """Add the tokens earned since the last call (time going backwards adds none)."""
        elapsed = now - self._stamp
        if elapsed > 0:
            self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
            self._stamp = now

    def can_take(self, cost: float) -> bool:
        """Return whether ``cost`` would be admitted now (call :meth:`refill` first)."""
        return self.tokens >= min(cost, self.capacity)

    def take(self, cost: float, now: float) -> bool:
        """Refill, then take ``cost`` tokens and return True, or take none and return False."""
        self.refill(now)
        if not self.can_take(cost):
            return False
        self.tokens -= cost
        return True


class Verdict(enum.Enum):
    """What to do with one client message."""

    ALLOW = "allow"
    #: Answer ``error rate_limited`` and drop the message.
    REFUSE = "refuse"
    #: Too many refusals: close the connection with 4003.
    CLOSE = "close"


@dataclass(frozen=True)
class RateLimits:
    """Per-connection limits; a rate of 0 turns that bucket off."""

    messages_per_second: float = 100.0
    messages_burst: int = 200
    bytes_per_second: int = 1048576
    bytes_burst: int = 2097152
    strikes: int = 10


class MessageLimiter:
    """Decide, message by message, whether a connection is within its limits."""

    __slots__ = ("_messages", "_bytes", "_strikes", "refused")

    def __init__(self, limits: RateLimits, now: float) -> None:
        self._messages = (TokenBucket(limits.messages_per_second, limits.messages_burst, now)
                          if limits.messages_per_second > 0 else None)
        self._bytes = (TokenBucket(limits.bytes_per_second, limits.bytes_burst, now)
                       if limits.bytes_per_second > 0 else None)
        self._strikes = TokenBucket(STRIKE_RECOVERY_PER_SECOND, max(1, limits.strikes), now)
        #: Messages refused so far.
        self.refused = 0

    def admit(self, size: int, now: float) -> Verdict:
        """Account for one message of ``size`` bytes received at ``now``.

        A refused message takes nothing from either bucket (the client is not
        charged for what was not handled) but costs a strike; the verdict is
        CLOSE once no strike is left.
        """
        messages, data = self._messages, self._bytes
        if messages is not None:
            messages.refill(now)
        if data is not None:
            data.refill(now)
        if (messages is None or messages.can_take(1)) and (data is None or data.can_take(size)):
            if messages is not None:
                messages.tokens -= 1
            if data is not None:
                data.tokens -= size
            return Verdict.ALLOW
        self.refused += 1
        if self._strikes.take(1, now):
            return Verdict.REFUSE
        return Verdict.CLOSE


__all__ = ["RateLimits", "MessageLimiter", "STRIKE_RECOVERY_PER_SECOND", "TokenBucket", "Verdict"]
