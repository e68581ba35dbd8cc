"""Presence bookkeeping of one node: who is in which channel, and what to announce.

A channel with ``presence = true`` has *members*: its subscribers (a connection that
subscribes joins, one that unsubscribes, disconnects or is kicked leaves). The
:class:`PresenceBook` holds this node's members per channel and, for channels that
announce joins and leaves, what is still to be announced. :func:`announcements` turns
joins and leaves into the messages subscribers get: ``join`` / ``leave`` one by one,
or one ``presence_diff`` per interval (``join_leave_interval``), or nothing above
``join_leave_max_members``.

Pure: no trio, no Redis, no clock (``now`` is an argument). The trio shell is
:mod:`relay.server.presence`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

#: The JWT ``info`` claim (shown with each member) may take this many bytes as JSON.
MAX_INFO_BYTES = 1024


@dataclass(frozen=True, slots=True)
class Member:
    """One connection in one channel: ``user`` (the token's ``sub``, "" when anonymous),
    ``conn`` (its session id), ``joined`` (unix seconds), ``info`` (the token's ``info``)."""

    user: str
    conn: str
    joined: float
    info: Any = None

    def to_wire(self) -> dict[str, Any]:
        """Return the member as the protocol shows it (``info`` only when there is one)."""
        out: dict[str, Any] = {"user": self.user, "conn": self.conn, "joined": self.joined}
        if self.info is not None:
            out["info"] = self.info
        return out

    def to_json(self) -> str:
        """Return :meth:`to_wire` as compact JSON (how Redis stores it)."""
        return json.dumps(self.to_wire(), separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class PresenceStats:
    connections: int
    users: int


def stats_of(members: Iterable[dict[str, Any]]) -> PresenceStats:
    """Count the connections and distinct users of ``members`` (wire dicts)."""
    conns = 0
    users: set[Any] = set()
    for member in members:
        conns += 1
        users.add(member.get("user", ""))
    return PresenceStats(conns, len(users))


@dataclass(slots=True)
class ChannelPresence:
    """One channel's members on this node, and its joins and leaves not announced yet."""

    members: dict[str, Member] = field(default_factory=dict)
    joins: dict[str, Member] = field(default_factory=dict)
    leaves: dict[str, Member] = field(default_factory=dict)
    #: When the pending joins and leaves are due (``now`` of the first one + interval).
    due: float | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """A channel's joins and leaves, to announce (and, with Redis, to write) together."""

    channel: str
    joins: tuple[Member, ...]
    leaves: tuple[Member, ...]


class PresenceBook:
    """This node's presence members per channel.

    ``join`` and ``leave`` return the :class:`Change` to act on at once (interval 0),
    or None when it waits for :meth:`take_due` (interval > 0) or nothing changed.
    Within an interval a join and a leave of the same connection cancel out.
    """

    def __init__(self) -> None:
        self._channels: dict[str, ChannelPresence] = {}

    def __contains__(self, channel: str) -> bool:
        return channel in self._channels

    def channels(self) -> list[str]:
        return list(self._channels)

    def members(self, channel: str) -> list[Member]:
        """Return this node's members of ``channel``, oldest first."""
        found = self._channels.get(channel)
        return list(found.members.values()) if found is not None else []

    def count(self, channel: str) -> int:
        found = self._channels.get(channel)
        return len(found.members) if found is not None else 0

    def join(self, channel: str, member: Member, interval: float, now: float) -> Change | None:
        """Add ``member``; return what to announce now, if anything."""
        ch = self._channels.get(channel)
        if ch is None:
            ch = self._channels[channel] = ChannelPresence()
        if member.conn in ch.members:
            return None
        ch.members[member.conn] = member
        if interval <= 0:
            return Change(channel, (member,), ())
        ch.joins[member.conn] = member
        if ch.due is None:
            ch.due = now + interval
        return None

    def leave(self, channel: str, conn: str, interval: float, now: float) -> Change | None:
        """Remove connection ``conn``; return what to announce now, if anything."""
        ch = self._channels.get(channel)
        if ch is None:
            return None
        member = ch.members.pop(conn, None)
        if member is None:
            return None
        if interval <= 0:
            change = Change(channel, (), (member,))
        else:
            change = None
            if ch.joins.pop(conn, None) is None:  # a join not announced yet cancels out
                ch.leaves[conn] = member
                if ch.due is None:
                    ch.due = now + interval
        if not ch.members and not ch.joins and not ch.leaves:
            del self._channels[channel]
        return change

    def next_due(self) -> float | None:
        """When the earliest pending announcement is due (None: none pending)."""
        dues = [ch.due for ch in self._channels.values() if ch.due is not None]
        return min(dues) if dues else None

    def take_due(self, now: float) -> list[Change]:
        """Return (and forget) the pending joins and leaves of every channel due by ``now``."""
        out = []
        for name, ch in list(self._channels.items()):
            if ch.due is None or ch.due > now:
                continue
            if ch.joins or ch.leaves:
                out.append(Change(name, tuple(ch.joins.values()), tuple(ch.leaves.values())))
            ch.joins, ch.leaves, ch.due = {}, {}, None
            if not ch.members:
                del self._channels[name]
        return out


def announcements(channel: str, joins: Iterable[dict[str, Any]], leaves: Iterable[dict[str, Any]],
                  batched: bool) -> list[dict[str, Any]]:
    """Return the messages announcing ``joins`` and ``leaves`` (wire dicts) to subscribers.

    ``batched`` (``join_leave_interval`` > 0): one ``presence_diff`` holding both lists
    (apply the leaves first, then the joins). Else one ``leave`` per leave, then one
    ``join`` per join.
    """
    joins, leaves = list(joins), list(leaves)
    if not joins and not leaves:
        return []
    if batched:
        return [{"type": "presence_diff", "channel": channel, "joins": joins, "leaves": leaves}]
    return ([{"type": "leave", "channel": channel, "member": m} for m in leaves]
            + [{"type": "join", "channel": channel, "member": m} for m in joins])


def check_info(info: Any) -> str | None:
    """Say why ``info`` (a JWT ``info`` claim) cannot be shown with members, or None."""
    try:
        size = len(json.dumps(info, separators=(",", ":"), ensure_ascii=False).encode())
    except (TypeError, ValueError):
        return "the info claim must be JSON"
    if size > MAX_INFO_BYTES:
        return f"the info claim takes {size:,} bytes as JSON; the limit is {MAX_INFO_BYTES:,}"
    return None
