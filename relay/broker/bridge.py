"""The Redis engine: one order and one history per channel for every node.

Data model, per channel ``C`` (the ``{C}`` hash tag keeps a channel's keys on one
Redis Cluster slot):

- ``relay:{C}:m``  hash: ``e`` the epoch, ``s`` the last offset, ``r`` the Redis server
  incarnation (``run_id``) that last wrote it, ``b`` the offset after which the epoch began;
  lives ``META_TTL_SECONDS`` (or ``history_ttl`` when longer) after the last publish. A
  script run on another incarnation (Redis restarted or failed over: it may have lost its
  last writes) starts a new epoch, offsets continuing (:data:`~relay.broker.shard.PUBLISH_LUA`);
- ``relay:{C}:s``  stream: one entry per message, id ``<offset>-0``, field ``d`` = msgpack
  ``[data, trace, ingress]``; trimmed to ``history_size`` (exactly), expires ``history_ttl``
  after the last publish;
- ``relay:{C}``    the pub/sub channel; a message is ``b"<epoch> <offset> <body>"``.

One Lua script per publish (``PUBLISH_LUA``) assigns the offset, appends to the
stream and publishes, atomically. A node subscribes to ``relay:{C}`` only while it has
local subscribers for ``C`` (once per channel), and delivers what arrives in offset
order through :meth:`relay.server.hub.Hub.deliver`: a message with a later offset than
the next one, or another epoch, holds the live stream (buffered, bounded) while the
missing range is read from the stream (``HISTORY_LUA``); what the stream no longer has is
announced to the members with ``gap``, and a new epoch travels in the next message.

A subscriber with ``since`` gets what it missed from the stream, joined to the live
stream without gap or duplicate: its cursor is the stream's top when the history read
ran; it joins the members once the live cursor reaches it, so live messages already
covered by the history are not sent again.

Each Redis URL is a :class:`~relay.broker.shard.Shard` (two connections: pipelined commands, pub/sub) that
reconnects with exponential backoff and jitter, then resubscribes every channel
with local interest and catches each one up from the stream. Channels are spread over
shards by consistent hashing (:mod:`relay.broker.ring`), or, with ``redis_cluster``, by the
cluster's hash slots (one shard per master, read again after a failover or a resharding).
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import hiredis
import msgpack
import trio
from redis.crc import key_slot

from ..config import Config
from ..core.envelope import Ref, Since
from ..core.history import Publication
from ..errors import RelayError, Unavailable
from . import HistoryView, PublishResult
from .redis import ConnectionLost, Endpoint, Link
from .ring import HashRing
from .shard import (
    BACKOFF_FIRST_SECONDS, BACKOFF_MAX_SECONDS, HISTORY_LUA, PING_TIMEOUT_SECONDS, PUBLISH_LUA,
    Shard, _describe,
)

if TYPE_CHECKING:
    from ..server.hub import Hub, PublishDone, Subscriber

log = logging.getLogger("relay.broker")

#: Live messages held per channel while its history is read; past it they are dropped
#: and read back from the stream instead.
MAX_BUFFERED = 10_000
#: How long the epoch and offset counter of an idle channel are kept at least.
META_TTL_SECONDS = 86_400.0
#: Entries read per history round trip at most.
MAX_FETCH = 10_000
#: History reads a joining subscriber may need to reach the live stream.
MAX_JOIN_ROUNDS = 8
#: Hash slots of a Redis Cluster.
CLUSTER_SLOTS = 16384
#: A cluster's slots are read again at most this often (after a lost connection or MOVED).
TOPOLOGY_REFRESH_SECONDS = 0.5

_IDLE, _SYNCING, _LIVE = 0, 1, 2


def _keys(name: str) -> tuple[bytes, bytes, bytes]:
    """The meta hash, stream and pub/sub channel of channel ``name``."""
    base = f"relay:{{{name}}}"
    return (base + ":m").encode(), (base + ":s").encode(), base.encode()


def _decode_entries(entries: list[Any], now: float) -> list[Publication]:
    """Decode stream entries; one that relay did not write is left out (and logged)."""
    pubs = []
    for ident, fields in entries:
        try:
            body = fields[1]
            data, trace, ingress = msgpack.unpackb(body, raw=False, strict_map_key=False)
            pubs.append(Publication(int(ident.split(b"-", 1)[0]), data, now, trace=trace,
                                    ingress=float(ingress)))
        except (ValueError, TypeError, IndexError, msgpack.UnpackException):
            log.warning("ignored a malformed stream entry %r", ident)
    return pubs


def _milliseconds(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisChannel:
    """What the bridge keeps per channel beside the hub's members: sync state, the
    live buffer and subscribers on their way in."""

    __slots__ = ("shard", "keys", "state", "ready", "buffer", "filling", "new_epoch",
                 "joiners", "pending", "closed", "subscribed", "generation")

    def __init__(self, shard: Shard, name: str) -> None:
        self.shard = shard
        self.keys = _keys(name)
        self.state = _IDLE
        self.ready = trio.Event()
        self.buffer: list[tuple[bytes, int, bytes]] = []
        self.filling = False
        self.new_epoch = False
        #: Subscribers whose history reached further than the live stream: outbox -> cursor.
        self.joiners: dict[Any, int] = {}
        #: Subscribers waiting for their ``subscribed``: outbox -> token.
        self.pending: dict[Any, object] = {}
        self.closed = False
        #: SUBSCRIBE was sent on the current pub/sub connection.
        self.subscribed = False
        #: Grows each time the channel is put on hold (shard lost, slot moved).
        self.generation = 0


class RedisBridge:
    """Publish, subscribe and history through Redis, for one node's hub."""

    def __init__(self, config: Config, hub: Hub, node_id: str) -> None:
        self.config = config
        self.hub = hub
        self.node_id = node_id
        self.endpoints = [Endpoint.parse(url) for url in config.redis_url]
        #: With ``redis_cluster`` the shards are the cluster's masters, known once
        #: CLUSTER SLOTS was read; channels follow the hash slot of their keys.
        self.cluster = config.redis_cluster
        self.shards: list[Shard] = [] if self.cluster else [
            Shard(self, ep, i) for i, ep in enumerate(self.endpoints)]
        self.ring = None if self.cluster else HashRing([ep.identity for ep in self.endpoints])
        self._slots: list[int] | None = None
        self._topology_problem = "redis cluster topology not read yet"
        self._refresh = trio.Event()
        self._state: dict[str, RedisChannel] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep every shard connected until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.cluster:
                nursery.start_soon(self._run_cluster, nursery)
            for shard in self.shards:
                nursery.start_soon(shard.run)
            task_status.started()

    async def _run_cluster(self, nursery: trio.Nursery) -> None:
        """Read the cluster's slots from a seed or a known master (retrying with backoff),
        run one shard per master, and read them again whenever a shard loses its
        connection or Redis answers ``MOVED`` (a failover or a resharding): channels whose
        slot moved are resubscribed on their new master and caught up from its stream."""
        delay = BACKOFF_FIRST_SECONDS
        while True:
            known = [s.endpoint for s in self.shards] + self.endpoints
            for endpoint in dict.fromkeys(known):
                try:
                    masters, slots = await self._read_slots(endpoint)
                except (OSError, trio.TooSlowError, trio.BrokenResourceError, ConnectionLost, ValueError,
                        TypeError) as exc:
                    if self._slots is None:
                        self._topology_problem = f"redis cluster {endpoint.shown} unavailable: {_describe(exc)}"
                    continue
                self._apply_topology(masters, slots, nursery)
                delay = BACKOFF_FIRST_SECONDS
                await self._refresh.wait()
                self._refresh = trio.Event()
                await trio.sleep(TOPOLOGY_REFRESH_SECONDS)  # at most this often
                break
            else:
                if self._slots is None:
                    log.warning("%s; retrying in %.2fs", self._topology_problem, delay)
                await trio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)

    def topology_suspect(self) -> None:
        """Ask for the cluster's slots to be read again (no-op without a cluster)."""
        if self.cluster:
            self._refresh.set()

    def _apply_topology(self, masters: list[Endpoint], slots: list[int], nursery: trio.Nursery) -> None:
        current = {s.endpoint.identity: s for s in self.shards}
        shards: list[Shard] = []
        for endpoint in masters:
            shard = current.pop(endpoint.identity, None)
            if shard is None:
                shard = Shard(self, endpoint, len(shards))
                nursery.start_soon(shard.run)
            shard.index = len(shards)
            shards.append(shard)
        changed = bool(current) or len(shards) != len(self.shards) or slots != self._slots
        self.shards, self._slots = shards, slots
        for gone in current.values():
            gone.retire()
        if not changed:
            return
        log.info("redis cluster: %d masters (%s)", len(shards), ", ".join(s.endpoint.identity for s in shards))
        for name, state in list(self._state.items()):
            shard = self.shard_for(name)
            if state.shard is shard:
                continue
            old = state.shard
            if state.subscribed and old.pubsub is not None:
                old.pubsub.unsubscribe([state.keys[2]])
            self._hold(state)
            state.shard = shard
            if shard.up:
                self._start_sync(name, state)
            # else: shard_up starts it once the new master is connected

    async def _read_slots(self, seed: Endpoint) -> tuple[list[Endpoint], list[int]]:
        link = await Link.open(seed, f"relay-{self.node_id}-topology")
        try:
            with trio.fail_after(PING_TIMEOUT_SECONDS):
                reply = await link.call(("CLUSTER", "SLOTS"))
        finally:
            await link.aclose()
        masters: list[Endpoint] = []
        index: dict[tuple[str, int], int] = {}
        slots = [-1] * CLUSTER_SLOTS
        for start, end, master, *_replicas in reply:
            host = master[0].decode() or seed.host
            port = int(master[1])
            if (host, port) not in index:
                index[(host, port)] = len(masters)
                masters.append(seed.moved_to(host, port))
            slots[int(start):int(end) + 1] = [index[(host, port)]] * (int(end) - int(start) + 1)
        if -1 in slots:
            raise ConnectionLost(f"the cluster does not serve slot {slots.index(-1)} (cluster state not ok)")
        return masters, slots

    # -- health ---------------------------------------------------------------------

    def problem(self) -> str | None:
        """Why this node cannot serve through Redis now (None when every shard is up)."""
        if self.cluster and self._slots is None:
            return self._topology_problem
        down = [s for s in self.shards if not s.up]
        if not down:
            return None
        return "; ".join(f"redis {s.endpoint.shown} unavailable: {s.problem}" for s in down)

    def shard_for(self, name: str) -> Shard:
        """Return the shard of channel ``name``.

        Raises:
            Unavailable: in a cluster whose topology is not known yet.
        """
        if self.ring is not None:
            return self.shards[self.ring.shard_of(name)]
        if self._slots is None:
            raise Unavailable(self._topology_problem)
        return self.shards[self._slots[key_slot(_keys(name)[2])]]

    # -- publish --------------------------------------------------------------------

    def submit(self, name: str, data: Any, now: float, done: PublishDone) -> None:
        """Send one publish script to the channel's shard; ``done`` gets the result.

        Raises:
            Unavailable: the shard is down or has too many commands waiting.
        """
        shard = self.shard_for(name)
        pipeline = shard.pipeline
        if pipeline is None:
            raise shard.unavailable()
        opts = self.config.channel_options(name)
        trace = f"{random.getrandbits(64):016x}"
        ingress = time.time()
        body = msgpack.packb([data, trace, ingress])
        meta, stream, channel_key = _keys(name)
        size = max(1, opts.history_size) if opts.mode == "state" else opts.history_size
        args: tuple[Any, ...] = (
            "EVALSHA", shard.publish_sha, 2, meta, stream,
            body, size, _milliseconds(opts.history_ttl), secrets.token_hex(4),
            _milliseconds(max(opts.history_ttl, META_TTL_SECONDS)), channel_key,
            "spublish" if self.cluster else "publish", shard.incarnation)

        def answered(reply: Any, retried: bool = False) -> None:
            if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT") and not retried:
                # The script cache was flushed: send the script itself once.
                current = shard.pipeline
                if current is not None:
                    try:
                        current.submit(("EVAL", PUBLISH_LUA, *args[2:]), partial(answered, retried=True))
                        return
                    except Unavailable as exc:
                        reply = exc
            if isinstance(reply, RelayError):
                done(reply)
            elif isinstance(reply, hiredis.ReplyError):
                if str(reply).startswith(("MOVED", "ASK", "CLUSTERDOWN")):
                    self.topology_suspect()
                done(Unavailable(f"redis {shard.endpoint.shown} refused the publish: {reply}"))
            else:
                done(PublishResult(name, reply[0].decode(), int(reply[1]), trace, ingress))

        pipeline.submit(args, answered)

    async def publish(self, name: str, data: Any, now: float) -> PublishResult:
        """Publish and wait for Redis' answer (see :meth:`submit`)."""
        done = trio.Event()
        box: list[PublishResult | RelayError] = []

        def settle(result: PublishResult | RelayError) -> None:
            box.append(result)
            done.set()

        self.submit(name, data, now, settle)
        await done.wait()
        result = box[0]
        if isinstance(result, RelayError):
            raise result
        return result

    # -- history --------------------------------------------------------------------

    async def _read(self, shard: Shard, name: str, what: str, since: int, count: int,
                    create: bool) -> tuple[str, int, list[Any], int]:
        """Run the history script: (epoch or '', top offset, entries, the offset after
        which the epoch began)."""
        pipeline = shard.pipeline
        if pipeline is None:
            raise shard.unavailable()
        opts = self.config.channel_options(name)
        meta, stream, _ = _keys(name)
        args = (2, meta, stream, what, since, count, secrets.token_hex(4),
                _milliseconds(max(opts.history_ttl, META_TTL_SECONDS)), "1" if create else "",
                shard.incarnation)
        try:
            reply = await pipeline.call("EVALSHA", shard.history_sha, *args)
        except hiredis.ReplyError as exc:
            if str(exc).startswith(("MOVED", "ASK", "CLUSTERDOWN")):
                self.topology_suspect()
            if not str(exc).startswith("NOSCRIPT"):
                raise Unavailable(f"redis {shard.endpoint.shown} refused a history read: {exc}") from None
            reply = await pipeline.call("EVAL", HISTORY_LUA, *args)
        epoch, top, entries, base = reply
        return epoch.decode(), int(top), entries, int(base)

    async def history(self, name: str, since: int | None, limit: int | None) -> HistoryView | None:
        """Read a channel's retained messages: those after ``since`` (oldest first, at most
        ``limit``), or the newest ``limit``; entries older than ``history_ttl`` are left out.

        Raises:
            Unavailable: the channel's shard is down.
        """
        opts = self.config.channel_options(name)
        size = opts.history_size
        count = min(limit, size) if limit is not None and since is None else (limit or size)
        count = min(count, MAX_FETCH)
        what = "top" if count <= 0 else ("last" if since is None else "since")
        epoch, top, entries, _ = await self._read(self.shard_for(name), name, what, since or 0, count, False)
        if not epoch:
            return None
        now, horizon = trio.current_time(), time.time() - opts.history_ttl
        pubs = _decode_entries(entries, now)
        if what == "last":
            pubs.reverse()
        pubs = [p for p in pubs if p.ingress > horizon]
        if size == 0:
            pubs = []
        return HistoryView(name, epoch, top, opts.mode, tuple(pubs))

    # -- subscribe ------------------------------------------------------------------

    def subscribe(self, sub: Subscriber, name: str, since: Since | None, ref: Ref, now: float) -> None:
        """Start subscribing ``sub`` to ``name``; ``subscribed`` (or ``error``) follows.

        Raises:
            Unavailable: the channel's shard is down.
        """
        try:
            shard = self.shard_for(name)
        except Unavailable as exc:
            exc.ref = ref
            raise
        if not shard.up:
            raise shard.unavailable(ref)
        ch = self.hub.channel(name, now)
        state = self._state.get(name)
        if state is None:
            state = self._state[name] = RedisChannel(shard, name)
        token = object()
        state.pending[sub.outbox] = token
        sub.subscriptions.add(name)
        if state.state == _IDLE:
            self._start_sync(name, state)
        shard.start_soon(self._join, sub, name, ch, state, since, ref, token)

    def unsubscribe(self, sub: Subscriber, name: str) -> None:
        """Remove ``sub`` (already out of ``sub.subscriptions``); the last one out
        unsubscribes the node from the Redis channel."""
        state = self._state.get(name)
        ch = self.hub.get(name)
        if state is None or ch is None:
            return
        out = sub.outbox
        ch.leave(out)
        state.joiners.pop(out, None)
        state.pending.pop(out, None)
        if not len(ch.members) and not state.joiners and not state.pending:
            self._release(name, state)

    def _release(self, name: str, state: RedisChannel) -> None:
        state.closed = True
        del self._state[name]
        self.hub.forget(name)
        shard = state.shard
        if state.subscribed and shard.pubsub is not None:
            shard.pubsub.unsubscribe([state.keys[2]])
            state.subscribed = False
        state.state = _IDLE

    def _start_sync(self, name: str, state: RedisChannel) -> None:
        state.state = _SYNCING
        state.shard.start_soon(self._sync, name, state)

    async def _sync(self, name: str, state: RedisChannel) -> None:
        """Subscribe the node to the channel, then read where it stands (or catch up).

        Gives up quietly when the channel was released or moved to another shard meanwhile
        (``state.generation`` changed): whoever did that started a new sync.
        """
        shard, generation = state.shard, state.generation
        pubsub = shard.pubsub
        assert pubsub is not None
        if state.closed:
            return  # released before this task ran: nothing was subscribed
        state.subscribed = True
        await pubsub.subscribe([state.keys[2]])[0].wait()
        if state.closed or state.generation != generation:
            return  # released meanwhile: _release sent the UNSUBSCRIBE
        ch = self.hub.get(name)
        assert ch is not None
        if not ch.log.epoch:
            opts = ch.options
            epoch, top, entries, _ = await self._read(
                shard, name, "last" if opts.mode != "stream" else "top", 0, 1, True)
            if state.closed or state.generation != generation:
                return
            ch.log.epoch, ch.log.offset = epoch, top
            now = trio.current_time()
            for latest in _decode_entries(entries, now):
                ch.log.latest = latest if latest.offset == top else None
        elif not await self._fill(name, state, generation):
            return
        state.state = _LIVE
        state.ready.set()
        self._drain(name, state)

    async def _fill(self, name: str, state: RedisChannel, generation: int) -> bool:
        """Deliver what the stream has after the live cursor (after a gap or a reconnection).

        Returns False when the channel was released or moved meanwhile.
        """
        ch = self.hub.get(name)
        assert ch is not None
        count = min(max(ch.options.history_size, 1), MAX_FETCH)
        for _ in range(MAX_JOIN_ROUNDS):
            epoch, top, entries, base = await self._read(state.shard, name, "since", ch.log.offset, count, True)
            if state.closed or state.generation != generation:
                return False
            if epoch != ch.log.epoch:
                # A new epoch: the channel's history is gone (Redis flushed or restarted
                # empty, or its keys expired: offsets start again, base 0), or Redis
                # restarted or failed over and may have lost writes (offsets continue after
                # what it kept, the base). Members hear of it with the next message; what
                # Redis kept up to the base they had already (or were told they missed).
                ch.log.epoch, ch.log.offset, state.new_epoch = epoch, base, True
                ch.log.latest = None
                if base and ch.options.mode != "stream":  # the value a new member gets
                    again, _, last, _ = await self._read(state.shard, name, "last", 0, 1, True)
                    if state.closed or state.generation != generation:
                        return False
                    for pub in _decode_entries(last, trio.current_time()):
                        if again == epoch and pub.offset == base:
                            ch.log.latest = pub
                for out in list(state.joiners):
                    self._promote(ch, state, out)
                continue
            now = trio.current_time()
            for pub in _decode_entries(entries, now):
                self._deliver(name, ch, state, pub)
            if len(entries) < count:
                if top > ch.log.offset:
                    self._gap(ch, state, ch.log.offset + 1, top)
                return True
        return True

    def _drain(self, name: str, state: RedisChannel) -> None:
        """Process the live messages held while the channel was catching up."""
        held, state.buffer = state.buffer, []
        for epoch, offset, body in held:
            self._live(name, state, epoch, offset, body)

    # -- live messages --------------------------------------------------------------

    def on_message(self, shard: Shard, key: bytes, payload: bytes) -> None:
        """A message arrived on a Redis channel this node subscribes to."""
        name = key[7:-1].decode()
        state = self._state.get(name)
        if state is None or state.shard is not shard:
            return  # unsubscribed meanwhile
        if payload[:1] == b"~":  # joins and leaves (relay.server.presence)
            self.hub.presence.on_redis_event(name, payload[1:])
            return
        try:
            epoch, offset, body = payload.split(b" ", 2)
            number = int(offset)
        except ValueError:
            log.warning("ignored a malformed message on redis channel %r", key)
            return
        self._live(name, state, epoch, number, body)

    def _live(self, name: str, state: RedisChannel, epoch: bytes, offset: int, body: bytes) -> None:
        if state.state != _LIVE or state.filling:
            if len(state.buffer) >= MAX_BUFFERED:
                state.buffer.clear()  # read back from the stream by the fill that follows
            state.buffer.append((epoch, offset, body))
            return
        ch = self.hub.get(name)
        assert ch is not None
        if epoch != ch.log.epoch.encode() or offset > ch.log.offset + 1:
            state.buffer.append((epoch, offset, body))
            state.filling = True
            state.shard.start_soon(self._refill, name, state)
            return
        if offset <= ch.log.offset:
            return  # already delivered (from the stream)
        try:
            data, trace, ingress = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.UnpackException):
            # Not written by relay's publish script (someone else published on our channel).
            log.warning("channel %r: ignored a malformed message at offset %d", name, offset)
            return
        self._deliver(name, ch, state, Publication(offset, data, trace=trace, ingress=ingress,
                                                   time=trio.current_time()))

    async def _refill(self, name: str, state: RedisChannel) -> None:
        if not await self._fill(name, state, state.generation):
            return
        state.filling = False
        self._drain(name, state)

    def _deliver(self, name: str, ch: Any, state: RedisChannel, pub: Publication) -> None:
        cursor = ch.log.offset
        if pub.offset <= cursor:
            return
        if pub.offset > cursor + 1:
            self._gap(ch, state, cursor + 1, pub.offset - 1)
        if state.new_epoch:
            pub.epoch, state.new_epoch = ch.log.epoch, False
        ch.log.offset = pub.offset
        ch.log.latest = pub
        self.hub.deliver(ch, pub)
        if state.joiners:
            for out, at in list(state.joiners.items()):
                if at <= pub.offset:
                    self._promote(ch, state, out)

    def _promote(self, ch: Any, state: RedisChannel, out: Any) -> None:
        state.joiners.pop(out, None)
        ch.join(out)

    def _gap(self, ch: Any, state: RedisChannel, first: int, last: int) -> None:
        """Tell members (and joiners short of ``last``) that ``first..last`` is lost."""
        log.warning("channel %r: offsets %d-%d are no longer in redis; members get a gap",
                    ch.name, first, last)
        targets = [out for out in ch.members]
        targets += [out for out, at in state.joiners.items() if at < last]
        for out in targets:
            at = state.joiners.get(out, first - 1)
            sub = out.owner
            out.put(sub.codec.frame({"type": "gap", "channel": ch.name, "from": max(first, at + 1), "to": last}))
            sub.wake()
        ch.log.offset = max(ch.log.offset, last)

    # -- joining --------------------------------------------------------------------

    async def _join(self, sub: Subscriber, name: str, ch: Any, state: RedisChannel,
                    since: Since | None, ref: Ref, token: object) -> None:
        """Answer one subscribe once the channel is live: recovery, then the live stream.

        Cancelled when the shard's connection is lost: the subscriber then gets
        ``error unavailable`` (and is not subscribed).
        """
        out = sub.outbox
        answered = False
        try:
            while state.state != _LIVE:
                await state.ready.wait()
            recovered, follow, cursor = await self._recover(name, ch, state, since)
            if state.pending.get(out) is not token:
                answered = True
                return  # it unsubscribed or left meanwhile
            answered = True
            del state.pending[out]
            self._admit(sub, ch, state, recovered, follow, cursor, since, ref)
        except Unavailable as exc:
            answered = True
            self._refuse(sub, name, state, token, exc.message, ref)
        finally:
            if not answered:
                self._refuse(sub, name, state, token, state.shard.unavailable().message, ref)

    async def _recover(self, name: str, ch: Any, state: RedisChannel,
                       since: Since | None) -> tuple[bool, list[Publication], int]:
        """Return (recovered, publications to send, cursor) for a subscriber with ``since``."""
        mode = ch.options.mode
        if since is None or mode == "state":
            return False, [], ch.log.offset
        if since.epoch != ch.log.epoch:
            return False, [], ch.log.offset
        opts = ch.options
        count = min(max(opts.history_size, 1), MAX_FETCH)
        horizon = time.time() - opts.history_ttl
        cursor, pubs, recovered = since.offset, [], True
        for _ in range(MAX_JOIN_ROUNDS):
            epoch, top, entries, _ = await self._read(state.shard, name, "since", cursor, count, True)
            if epoch != since.epoch or since.offset > top:
                return False, [], ch.log.offset
            now = trio.current_time()
            got = [p for p in _decode_entries(entries, now) if p.ingress > horizon]
            if opts.history_size == 0:
                got = []
            complete = len(got) == top - cursor and (not got or got[0].offset == cursor + 1)
            recovered = recovered and complete
            pubs.extend(got)
            cursor = max(cursor, top)
            if cursor >= ch.log.offset:
                break
        return recovered, pubs, cursor

    def _admit(self, sub: Subscriber, ch: Any, state: RedisChannel, recovered: bool,
               follow: list[Publication], cursor: int, since: Since | None, ref: Ref) -> None:
        from ..server.hub import with_ref

        out, enc = sub.outbox, sub.codec.encoding
        mode = ch.options.mode
        metrics = self.hub._metrics
        if mode == "state":
            recovered = since is not None and since.epoch == ch.log.epoch and since.offset <= ch.log.offset
            latest = ch.log.latest
            follow = []
            if latest is not None and not (recovered and since is not None and since.offset >= latest.offset):
                follow = [latest]
            cursor = ch.log.offset
        elif mode == "poke" and follow:
            follow = follow[-1:]
        if since is not None and metrics is not None:
            metrics.recovery(recovered)
        live = ch.log.offset
        answer: dict[str, Any] = {
            "type": "subscribed", "channel": ch.name, "epoch": ch.log.epoch,
            "offset": max(cursor, live), "recovered": recovered,
        }
        if ch.gives_delta(out):
            answer["delta"] = True
        out.put(sub.codec.frame(with_ref(answer, ref)))
        if metrics is not None:
            metrics.sent("subscribed", sub.codec.name)
            if follow:
                metrics.sent("recovered", sub.codec.name, len(follow))
        for pub in follow:
            # (A state channel's value: a newer one in the same tick replaces it.)
            out.put(ch.frame(pub, enc), ch.name if mode == "state" else None)
        if cursor < live:
            # History could not reach the live stream (it moved on too fast): say so.
            out.put(sub.codec.frame({"type": "gap", "channel": ch.name, "from": cursor + 1, "to": live}))
        if cursor > live:
            state.joiners[out] = cursor
        else:
            ch.join(out)
        sub.wake()
        self.hub.presence.joined(sub, ch.name)

    def _refuse(self, sub: Subscriber, name: str, state: RedisChannel, token: object,
                message: str, ref: Ref) -> None:
        from ..server.hub import with_ref

        if state.pending.get(sub.outbox) is not token:
            return
        del state.pending[sub.outbox]
        sub.subscriptions.discard(name)
        if self.hub._metrics is not None:
            self.hub._metrics.errors.labels("unavailable").inc()
        sub.outbox.put(sub.codec.frame(with_ref(
            {"type": "error", "code": "unavailable", "message": message}, ref)))
        sub.wake()
        ch = self.hub.get(name)
        if ch is not None:
            ch.wants_delta.discard(sub.outbox)
        if ch is not None and not len(ch.members) and not state.joiners and not state.pending \
                and not state.closed:
            self._release(name, state)

    # -- shard events ---------------------------------------------------------------

    def shard_up(self, shard: Shard) -> None:
        """Resubscribe and catch up every channel of ``shard`` that has local interest."""
        for name, state in list(self._state.items()):
            if state.shard is shard:
                self._start_sync(name, state)

    def shard_down(self, shard: Shard) -> None:
        """Hold every channel of ``shard`` until it is back (members stay subscribed)."""
        for state in self._state.values():
            if state.shard is shard and state.state != _IDLE:
                self._hold(state)

    @staticmethod
    def _hold(state: RedisChannel) -> None:
        """Stop delivering a channel until it is synced again (members stay subscribed)."""
        state.subscribed = False  # that connection is gone, and its subscriptions
        state.generation += 1  # a sync or fill still running for it gives up
        state.state = _SYNCING
        if state.ready.is_set():  # (an unset one may have waiters: they keep waiting on it)
            state.ready = trio.Event()
        state.buffer.clear()
        state.filling = False
