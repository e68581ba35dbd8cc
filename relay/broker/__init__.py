"""Brokers: where a channel's order and history live, and how publications reach every node.

Without ``redis_url`` the hub keeps each channel's epoch, offsets and history in
memory (:class:`relay.core.history.ChannelLog`, one node). With it,
:class:`relay.broker.bridge.RedisBridge` keeps them in Redis, shared by every node:
one Lua script per publish assigns the offset, appends to the channel's stream and
publishes to the other nodes. See docs/scaling.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What a publish got: the channel's epoch and the message's offset, trace id and
    ingress time (unix seconds)."""

    channel: str
    epoch: str
    offset: int
    trace: str
    ingress: float


@dataclass(frozen=True, slots=True)
class HistoryView:
    """A channel's retained messages as the history endpoint shows them."""

    channel: str
    epoch: str
    offset: int
    mode: str
    publications: tuple[Any, ...]
