"""One channel's order and memory: epoch, offsets, the history ring and ``since`` recovery.

Offsets start at 1 for a channel's first message; ``offset`` is the last one
assigned (0 before any). History keeps at most ``size`` publications, each for at
most ``ttl`` seconds. Time arrives as ``now`` (monotonic seconds); nothing here
reads a clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..fastpath import N_ENCODINGS


def publish_us(ingress: float) -> int:
    """A message's ``ts`` on the wire: its ingress (unix seconds) in whole unix
    microseconds (an integer of 16 digits until the year 2286, exact in JavaScript)."""
    return int(round(ingress * 1_000_000.0))


@dataclass(slots=True)
class Publication:
    """A message published to a channel, with its frames cached per encoding.

    ``trace`` (a hex id) and ``ingress`` (unix seconds when the node that took the
    publish received it) follow the message across nodes, for logs and latency
    metrics. ``epoch``, when not empty, is put in the message's frames: the channel's
    epoch changed right before this message (its history was lost).
    """

    offset: int
    data: Any
    time: float
    frames: list[bytes | None] = field(default_factory=lambda: [None] * N_ENCODINGS)
    trace: str = ""
    ingress: float = 0.0
    epoch: str = ""


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a subscriber with ``since`` gets: whether nothing was lost, and what follows."""

    recovered: bool
    publications: tuple[Publication, ...]


class ChannelLog:
    """Epoch, offset and retained history of one channel."""

    __slots__ = ("epoch", "offset", "size", "ttl", "latest", "_ring")

    def __init__(self, epoch: str, size: int, ttl: float) -> None:
        self.epoch = epoch
        self.offset = 0
        self.size = size
        self.ttl = ttl
        self.latest: Publication | None = None
        self._ring: deque[Publication] = deque(maxlen=size if size > 0 else 0)

    def append(self, data: Any, now: float, trace: str = "", ingress: float = 0.0) -> Publication:
        """Assign the next offset to ``data`` and retain it."""
        self.offset += 1
        pub = Publication(self.offset, data, now, trace=trace, ingress=ingress)
        self.latest = pub
        if self.size > 0:
            self._ring.append(pub)
        self.prune(now)
        return pub

    def prune(self, now: float) -> None:
        """Forget publications older than ``ttl``."""
        ring, horizon = self._ring, now - self.ttl
        while ring and ring[0].time <= horizon:
            ring.popleft()

    def retained(self, now: float) -> tuple[Publication, ...]:
        self.prune(now)
        return tuple(self._ring)

    def history(self, now: float, since: int | None = None, limit: int | None = None) -> list[Publication]:
        """Return retained publications with offset > ``since``, oldest first, at most ``limit``."""
        self.prune(now)
        pubs = [p for p in self._ring if since is None or p.offset > since]
        if limit is not None:
            pubs = pubs[-limit:] if since is None else pubs[:limit]
        return pubs

    def recover(self, epoch: str, offset: int, now: float) -> Recovery:
        """Return what a subscriber that last saw ``(epoch, offset)`` missed.

        ``recovered`` is True only when every publication after ``offset`` is
        retained (or there is none). A different epoch, an offset from the future,
        or a range that has partly expired gives ``recovered=False``; what is still
        retained after ``offset`` is returned either way within the same epoch.
        """
        if epoch != self.epoch or offset > self.offset:
            return Recovery(False, ())
        if offset == self.offset:
            return Recovery(True, ())
        pubs = tuple(self.history(now, since=offset))
        complete = bool(pubs) and pubs[0].offset == offset + 1
        return Recovery(complete, pubs)

    def is_expired(self, now: float, last_active: float) -> bool:
        """True when the channel retains nothing and was last active over ``ttl`` ago."""
        self.prune(now)
        return not self._ring and now - last_active > self.ttl
