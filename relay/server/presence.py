"""Presence on a node: members, ``presence`` / ``presence_stats`` answers, join and leave.

The hub calls :meth:`Presence.joined` when a subscriber of a ``presence = true`` channel
is admitted and :meth:`Presence.left` when it unsubscribes or disconnects; both are
synchronous (the hub never awaits). The bookkeeping is :mod:`relay.core.presence`.

In memory the node's book is the truth: answers are immediate and join/leave go
straight to the channel's local subscribers. With Redis each channel has two hashes
beside its other keys (same ``{C}`` hash tag, so the same Redis Cluster slot):

- ``relay:{C}:p``  connection id -> ``<node>\\n<member JSON>``;
- ``relay:{C}:n``  node id -> unix milliseconds (Redis' clock) until which its members count.

A node writes its joins and leaves with one script (``UPDATE_LUA``) that also refreshes
its own expiry, drops the members of nodes whose expiry passed (announcing their
``leave``) and publishes the joins and leaves on the channel's pub/sub key as
``~{"joins":[...],"leaves":[...]}``; every node subscribed there
(:meth:`relay.broker.bridge.RedisBridge.on_message`) hands them to its local
subscribers. A node refreshes each channel it has members in every third of
``presence_ttl``; readers (``READ_LUA``) skip members of expired nodes, so the members
of a node that died disappear within ``presence_ttl``.

Join/leave are best effort: a subscriber whose send queue is over its limit misses
them (``presence`` is the truth to resynchronise from).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ..core.auth import ANONYMOUS
from ..core.codec import CODECS
from ..core.envelope import Presence as PresenceRequest
from ..core.presence import Change, Member, PresenceBook, announcements, stats_of
from ..errors import BadRequest, Forbidden, RelayError, Unavailable

if TYPE_CHECKING:
    from ..config import ChannelOptions, Config
    from .hub import Hub, Subscriber

log = logging.getLogger("relay.presence")


def _is_reply_error(reply: Any) -> bool:
    """Whether ``reply`` is an error reply from Redis (only ever called with ``redis_url``,
    so hiredis, part of the ``redis`` extra, is imported here and not at start-up)."""
    import hiredis

    return isinstance(reply, hiredis.ReplyError)


# KEYS: members hash, nodes hash. ARGV: 1 node, 2 ttl ms, 3 announce cap (-1: announce
# nothing, 0: no cap), 4 pub/sub key, 5 publish command, 6 '1': replace this node's
# members (after Redis lost them), 7 number of joins J, then J pairs (conn, member JSON),
# then the conns that left. Returns {1 if this node's expiry was there, member count}.
UPDATE_LUA = r"""
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local node, ttl = ARGV[1], tonumber(ARGV[2])
local had = redis.call('hget', KEYS[2], node)
redis.call('hset', KEYS[2], node, now + ttl)
local joins, leaves, dead, anydead = {}, {}, {}, false
local nodes = redis.call('hgetall', KEYS[2])
for k = 1, #nodes, 2 do
  if tonumber(nodes[k + 1]) < now then
    dead[nodes[k]] = true
    anydead = true
    redis.call('hdel', KEYS[2], nodes[k])
  end
end
if anydead or ARGV[6] == '1' then
  local all = redis.call('hgetall', KEYS[1])
  for k = 1, #all, 2 do
    local owner, member = string.match(all[k + 1], '^(.*)\n([^\n]*)$')
    if owner and dead[owner] then
      redis.call('hdel', KEYS[1], all[k])
      leaves[#leaves + 1] = member
    elseif owner == node and ARGV[6] == '1' then
      redis.call('hdel', KEYS[1], all[k])
    end
  end
end
local i = 8
for _ = 1, tonumber(ARGV[7]) do
  redis.call('hset', KEYS[1], ARGV[i], node .. '\n' .. ARGV[i + 1])
  joins[#joins + 1] = ARGV[i + 1]
  i = i + 2
end
while i <= #ARGV do
  local old = redis.call('hget', KEYS[1], ARGV[i])
  if old then
    redis.call('hdel', KEYS[1], ARGV[i])
    leaves[#leaves + 1] = string.match(old, '\n([^\n]*)$')
  end
  i = i + 1
end
redis.call('pexpire', KEYS[1], ttl * 2)
redis.call('pexpire', KEYS[2], ttl * 2)
local count = redis.call('hlen', KEYS[1])
local cap = tonumber(ARGV[3])
if cap >= 0 and (#joins > 0 or #leaves > 0) and (cap == 0 or count <= cap) then
  redis.call(ARGV[5], ARGV[4], '~{"joins":[' .. table.concat(joins, ',') ..
    '],"leaves":[' .. table.concat(leaves, ',') .. ']}')
end
if had then return {1, count} end
return {0, count}
"""

# KEYS: members hash, nodes hash. ARGV: 1 'members' (returns the member JSONs) or
# 'stats' (returns {connections, users}). Members of expired nodes are skipped.
READ_LUA = r"""
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = {}
local nodes = redis.call('hgetall', KEYS[2])
for k = 1, #nodes, 2 do
  if tonumber(nodes[k + 1]) >= now then live[nodes[k]] = true end
end
local all = redis.call('hgetall', KEYS[1])
local out, users, n, u = {}, {}, 0, 0
for k = 1, #all, 2 do
  local owner, member = string.match(all[k + 1], '^(.*)\n([^\n]*)$')
  if owner and live[owner] then
    if ARGV[1] == 'stats' then
      n = n + 1
      local user = cjson.decode(member)['user'] or ''
      if not users[user] then
        users[user] = true
        u = u + 1
      end
    else
      out[#out + 1] = member
    end
  end
end
if ARGV[1] == 'stats' then return {n, u} end
return out
"""


@dataclass(frozen=True, slots=True)
class PresenceStatistics:
    #: Channels with presence members on this node, and those members.
    channels: int
    members: int
    #: join/leave/presence_diff messages handed to subscribers, and skipped (queue full).
    announced: int
    skipped: int


def with_ref(message: dict[str, Any], ref: Any) -> dict[str, Any]:
    """Return ``message`` with ``ref`` added when the request carried one."""
    if ref is not None:
        message["ref"] = ref
    return message


_SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in (UPDATE_LUA, READ_LUA)}


def _run_script(shard: Any, script: str, args: list[Any], done: Callable[[Any], None]) -> None:
    """Run ``script`` (by its SHA1; sent in full once if Redis does not have it cached)
    on ``shard`` with ``args`` (number of keys, keys, arguments); ``done`` gets the reply.

    Raises:
        Unavailable: the shard is down or overloaded.
    """
    pipeline = shard.pipeline
    if pipeline is None:
        raise shard.unavailable()

    def answered(reply: Any) -> None:
        if _is_reply_error(reply) and str(reply).startswith("NOSCRIPT"):
            current = shard.pipeline
            if current is not None:
                try:
                    current.submit(("EVAL", script, *args), done)
                    return
                except Unavailable as exc:
                    reply = exc
        done(reply)

    pipeline.submit(("EVALSHA", _SHA[script], *args), answered)


def presence_keys(name: str) -> tuple[bytes, bytes]:
    """The members hash and the nodes hash of channel ``name`` (its ``{name}`` slot)."""
    base = f"relay:{{{name}}}"
    return (base + ":p").encode(), (base + ":n").encode()


def _member_of(sub: Subscriber) -> Member:
    guard = getattr(sub, "guard", None)
    identity = guard.identity if guard is not None else ANONYMOUS
    conn = getattr(sub, "id", None) or f"{id(sub):x}"
    return Member(identity.user, conn, round(time.time(), 3), identity.info)


def _interval(opts: ChannelOptions) -> float:
    return opts.join_leave_interval if opts.join_leave else 0.0


class Presence:
    """Presence of every channel of one node (owned by the hub; its task by the server)."""

    def __init__(self, hub: Hub, config: Config) -> None:
        self._hub = hub
        self._config = config
        self.book = PresenceBook()
        self._wake = trio.Event()
        #: Channels whose members in Redis may be wrong (a write failed): rewritten in full
        #: at the next refresh.
        self._unsynced: set[str] = set()
        #: join/leave messages handed to subscribers (and how many were skipped because
        #: the subscriber's send queue was full).
        self.announced = 0
        self.skipped = 0

    def statistics(self) -> PresenceStatistics:
        names = self.book.channels()
        return PresenceStatistics(len(names), sum(self.book.count(n) for n in names),
                                  self.announced, self.skipped)

    # -- hub hooks (synchronous) -------------------------------------------------------

    def joined(self, sub: Subscriber, name: str) -> None:
        """``sub`` was admitted to channel ``name``: it is a member if the channel has presence."""
        opts = self._config.channel_options(name)
        if not opts.presence or sub.codec.name == "poll":
            # (A long-poll subscribes for one request at a time: it would join and leave
            # with every poll. Event streams are members, like WebSocket connections.)
            return
        change = self.book.join(name, _member_of(sub), _interval(opts), trio.current_time())
        self._changed(change, opts)

    def left(self, sub: Subscriber, name: str) -> None:
        """``sub`` left channel ``name`` (a no-op when it was no member)."""
        opts = self._config.channel_options(name)
        if not opts.presence:
            return
        conn = getattr(sub, "id", None) or f"{id(sub):x}"
        change = self.book.leave(name, conn, _interval(opts), trio.current_time())
        self._changed(change, opts)

    def _changed(self, change: Change | None, opts: ChannelOptions) -> None:
        if change is not None:
            self._apply(change, opts)
        elif opts.join_leave and opts.join_leave_interval > 0:
            self._wake.set()  # the runner recomputes when the next batch is due

    def _apply(self, change: Change, opts: ChannelOptions) -> None:
        """Announce ``change`` here (in memory) or write and publish it through Redis."""
        if self._hub.broker is not None:
            self._write(change.channel, opts, change.joins, [m.conn for m in change.leaves])
            return
        if not opts.join_leave:
            return
        cap = opts.join_leave_max_members
        if cap and self.book.count(change.channel) > cap:
            return
        self.deliver(change.channel, [m.to_wire() for m in change.joins],
                     [m.to_wire() for m in change.leaves])

    # -- announcing ----------------------------------------------------------------------

    def deliver(self, name: str, joins: list[dict[str, Any]], leaves: list[dict[str, Any]]) -> None:
        """Hand the announcements of ``joins`` and ``leaves`` to the channel's local subscribers."""
        ch = self._hub.get(name)
        if ch is None or not len(ch.members) or not ch.options.join_leave:
            return
        batched = ch.options.join_leave_interval > 0
        for message in announcements(name, joins, leaves, batched):
            frames: dict[int, bytes] = {}
            for out in ch.members:
                if out.size > out.limit:
                    self.skipped += 1  # behind already: presence is the truth to refetch
                    continue
                sub = out.owner
                enc = sub.codec.encoding
                frame = frames.get(enc)
                if frame is None:
                    frame = frames[enc] = CODECS[enc].frame(message)
                out.put(frame)
                sub.wake()
                self.announced += 1

    def on_redis_event(self, name: str, body: bytes) -> None:
        """A ``~{...}`` presence message arrived on channel ``name``'s pub/sub key."""
        try:
            event = json.loads(body)
            joins, leaves = event["joins"], event["leaves"]
        except (ValueError, TypeError, KeyError):
            log.warning("channel %r: ignored a malformed presence message", name)
            return
        if isinstance(joins, list) and isinstance(leaves, list):
            self.deliver(name, joins, leaves)

    # -- requests ------------------------------------------------------------------------

    def request(self, conn: Any, env: PresenceRequest) -> None:
        """Answer a ``presence`` or ``presence_stats`` request of connection ``conn``.

        Raises:
            BadRequest: presence is not enabled for the channel.
            Forbidden: the client may not subscribe to the channel.
            Unavailable: Redis is unreachable (with Redis).
        """
        name, ref = env.channel, env.ref
        opts = self._config.channel_options(name)
        kind = "presence_stats" if env.stats else "presence"
        if not opts.presence:
            raise BadRequest(
                f"presence is not enabled for channel {name!r}; its channel pattern "
                f"{opts.pattern!r} has presence = false", ref=ref)
        if not conn.guard.identity.permissions.may_subscribe(name):
            raise Forbidden(f"your token does not allow {kind} of {name!r} (it does not allow "
                            f"subscribing to it)", ref=ref)
        if self._hub.broker is None:
            members = [m.to_wire() for m in self.book.members(name)]
            conn.send(self._answer(kind, name, ref, members))
            return
        try:
            shard = self._hub.broker.shard_for(name)
        except Unavailable as exc:
            exc.ref = ref
            raise

        def answered(reply: Any) -> None:
            if isinstance(reply, RelayError) or _is_reply_error(reply):
                conn.send_error("unavailable", f"redis {shard.endpoint.shown} could not answer "
                                f"{kind}: {reply}", ref)
                return
            if env.stats:
                conn.send(with_ref({"type": kind, "channel": name, "connections": int(reply[0]),
                                    "users": int(reply[1])}, ref))
            else:
                members = [json.loads(m) for m in reply]
                members.sort(key=lambda m: (m.get("joined", 0), m.get("conn", "")))
                conn.send(with_ref({"type": kind, "channel": name, "members": members}, ref))

        try:
            _run_script(shard, READ_LUA, [2, *presence_keys(name), "stats" if env.stats else "members"],
                        answered)
        except Unavailable as exc:
            exc.ref = ref
            raise

    @staticmethod
    def _answer(kind: str, name: str, ref: Any, members: list[dict[str, Any]]) -> dict[str, Any]:
        if kind == "presence_stats":
            stats = stats_of(members)
            return with_ref({"type": kind, "channel": name, "connections": stats.connections,
                             "users": stats.users}, ref)
        return with_ref({"type": kind, "channel": name, "members": members}, ref)

    # -- Redis -----------------------------------------------------------------------------

    def _write(self, name: str, opts: ChannelOptions, joins: Any, leaves: list[str],
               sync: bool = False) -> None:
        """Send one ``UPDATE_LUA`` for channel ``name``; a failure marks it unsynced."""
        bridge = self._hub.broker
        assert bridge is not None
        try:
            shard = bridge.shard_for(name)
        except Unavailable:
            self._unsynced.add(name)
            return
        members, nodes = presence_keys(name)
        cap = -1 if sync or not opts.join_leave else opts.join_leave_max_members
        args: list[Any] = [
            2, members, nodes, bridge.node_id,
            max(1, int(self._config.presence_ttl * 1000)), cap, f"relay:{{{name}}}",
            "spublish" if bridge.cluster else "publish", "1" if sync else "0", len(joins)]
        for member in joins:
            args += [member.conn, member.to_json()]
        args += leaves

        def answered(reply: Any) -> None:
            if isinstance(reply, RelayError) or _is_reply_error(reply):
                if _is_reply_error(reply) and str(reply).startswith(("MOVED", "ASK")):
                    bridge.topology_suspect()
                log.debug("channel %r: presence write failed (%s); rewritten at the next refresh",
                          name, reply)
                self._unsynced.add(name)
                return
            if sync:
                self._unsynced.discard(name)
            elif not reply[0] and (joins == () or len(joins) < self.book.count(name)):
                # This node's expiry was gone (Redis restarted or flushed, or this node
                # stalled past presence_ttl): other members of ours may be missing.
                self._unsynced.add(name)
                self._wake.set()

        try:
            _run_script(shard, UPDATE_LUA, args, answered)
        except Unavailable:
            self._unsynced.add(name)

    def _refresh(self) -> None:
        """Refresh this node's expiry in every channel it has members in (Redis only)."""
        for name in self.book.channels():
            if name not in self._unsynced:
                self._write(name, self._config.channel_options(name), (), [])
        self._resync()

    def _resync(self) -> None:
        for name in list(self._unsynced):
            self._unsynced.discard(name)
            self._write(name, self._config.channel_options(name), self.book.members(name), [],
                        sync=True)

    # -- task ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send batched join/leave when due, and (with Redis) refresh this node's members
        every third of ``presence_ttl``; runs until cancelled (nothing is left half done)."""
        redis = self._hub.broker is not None
        every = self._config.presence_ttl / 3 if redis else math.inf
        next_refresh = trio.current_time() + every
        task_status.started()
        while True:
            due = self.book.next_due()
            deadline = min(next_refresh, due if due is not None else math.inf)
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            for change in self.book.take_due(now):
                self._apply(change, self._config.channel_options(change.channel))
            if redis and self._unsynced:
                self._resync()
            if now >= next_refresh:
                self._refresh()
                next_refresh = now + every
