"""How far behind each connection is: bytes and frames waiting in its send queue, and how
long the oldest waiting message has waited.

Read when asked for (``/metrics``, ``/stats``), never on the hot path: the fan-out stamps
each outbox with ``time.monotonic()`` of the oldest channel message it holds
(``Outbox.oldest``), and the writer keeps that stamp while its bytes are on their way
(``Connection.writing_since``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: How many of the connections furthest behind ``/stats`` lists.
SLOWEST = 10


@dataclass(frozen=True, slots=True)
class Lag:
    """One connection's lag."""

    id: str
    user: str
    peer: str
    #: Bytes waiting in its send queue (what the kernel has not taken).
    queued_bytes: int
    #: Frames waiting (queued, or held by conflation).
    queued_frames: int
    #: Seconds the oldest channel message still waiting (or being written) has waited
    #: since it was handed to the connection; 0.0 when nothing waits.
    age: float


def lag_of(conn: Any, now: float | None = None) -> Lag:
    """Return ``conn``'s lag (``now``: ``time.monotonic()``, read when omitted)."""
    if now is None:
        now = time.monotonic()
    box = conn.outbox
    stamps = [s for s in (getattr(conn, "writing_since", 0.0), box.oldest) if s > 0.0]
    age = max(0.0, now - min(stamps)) if stamps else 0.0
    guard = getattr(conn, "guard", None)
    user = guard.identity.user if guard is not None else ""
    return Lag(conn.id, user, getattr(conn, "remote", ""), box.size, box.depth, age)


def lags(connections: Iterable[Any]) -> list[Lag]:
    """The lag of every connection in ``connections``, read at one instant."""
    now = time.monotonic()
    return [lag_of(conn, now) for conn in connections]


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summary(found: list[Lag]) -> dict[str, Any]:
    """The ``lag`` section of ``/stats``: how many connections have something waiting,
    percentiles of the age of their oldest message (ms), and the ones furthest behind."""
    waiting = [lag for lag in found if lag.queued_bytes or lag.queued_frames]
    ages = sorted(lag.age for lag in waiting)
    out: dict[str, Any] = {"connections_waiting": len(waiting)}
    if ages:
        out["age_ms"] = {name: round(_percentile(ages, q) * 1000, 3)
                         for name, q in (("p50", 0.5), ("p99", 0.99))}
        out["age_ms"]["max"] = round(ages[-1] * 1000, 3)
    slowest = sorted(waiting, key=lambda lag: (lag.age, lag.queued_bytes), reverse=True)[:SLOWEST]
    out["slowest"] = [{"id": lag.id, "user": lag.user, "peer": lag.peer,
                       "queued_bytes": lag.queued_bytes, "queued_frames": lag.queued_frames,
                       "age_ms": round(lag.age * 1000, 3)} for lag in slowest]
    return out
