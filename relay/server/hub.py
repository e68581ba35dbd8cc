"""Channels and fan-out on one node: who is subscribed where, and who gets which frame.

The hub owns every channel's members and, with the in-memory broker (the default),
its log (epoch, offsets, history). With Redis (``redis_url``) the hub hands
publish, subscribe and history to :class:`relay.broker.bridge.RedisBridge`, which
calls :meth:`Hub.deliver` for each message in offset order. A publish
is encoded once per encoding that some member reads, and the same frame bytes are
handed to the compiled fan-out, which appends them to each subscriber's bounded
outbox; the channel's slow-consumer policy applies at the bound. The hub never
awaits: subscribe (with its recovery) and publish are atomic with respect to each
other, so a subscriber's recovered messages and its live ones join without a gap.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .. import fastpath, logs
from ..core.codec import CODECS, Codec, check_json_compatible
from ..core.envelope import Ref, Since
from ..broker import HistoryView, PublishResult
from ..core.history import ChannelLog, Publication, publish_us
from ..core import mergepatch
from ..errors import BadRequest, RelayError
from .presence import Presence

if TYPE_CHECKING:
    from ..broker.bridge import RedisBridge
    from ..config import ChannelOptions, Config
    from ..metrics import Metrics

PublishDone = Callable[[PublishResult | RelayError], None]

_POLICIES = {
    "disconnect": fastpath.POLICY_DISCONNECT,
    "drop": fastpath.POLICY_DROP,
    "conflate": fastpath.POLICY_CONFLATE,
}
CLOSE_SLOW_CONSUMER = 4002


class Subscriber(Protocol):
    """What the hub needs from a connection."""

    outbox: Any
    codec: Codec
    subscriptions: set[str]

    def wake(self) -> None: ...
    def wake_writer(self) -> None: ...
    def kick(self, code: int, reason: str) -> None: ...


def with_ref(message: dict[str, Any], ref: Ref) -> dict[str, Any]:
    """Return ``message`` with ``ref`` added when the request carried one."""
    if ref is not None:
        message["ref"] = ref
    return message


@dataclass(frozen=True, slots=True)
class HubStatistics:
    channels: int
    subscriptions: int


class Channel:
    """One channel's options, log and members."""

    __slots__ = ("name", "options", "policy", "log", "members", "last_active",
                 "plain", "deltas", "wants_delta", "last", "pending", "flush_tick")

    def __init__(self, name: str, options: ChannelOptions, epoch: str, now: float) -> None:
        self.name = name
        self.options = options
        self.policy = _POLICIES[options.slow_consumer]
        self.log = ChannelLog(epoch, options.history_size, options.history_ttl)
        self.members = fastpath.Members()
        self.last_active = now
        # Delta channels (``delta = true``): ``members`` is split in those that get full
        # values (``plain``) and those that asked for deltas (``deltas``); ``last`` is the
        # publication this node delivered last, the base of the next patch.
        self.plain: Any = None
        self.deltas: Any = None
        self.wants_delta: set[Any] = set()
        self.last: Publication | None = None
        if options.delta and options.mode == "state":
            self.plain, self.deltas = fastpath.Members(), fastpath.Members()
        # Channel ticks (``tick_ms``): the publications of the tick under way, and what
        # delivers them now (the hub sets it).
        self.pending: list[Publication] = []
        self.flush_tick: Callable[[], None] | None = None

    def join(self, out: Any) -> None:
        """Make ``out`` a member (of ``deltas`` when it asked for deltas).

        On a ticked channel the tick under way is delivered first, to the members it was
        for: what ``out`` got before joining (history, the current value) covers it."""
        if self.pending and self.flush_tick is not None:
            self.flush_tick()
        self.members.add(out)
        if self.deltas is not None:
            (self.deltas if self.gives_delta(out) else self.plain).add(out)

    def gives_delta(self, out: Any) -> bool:
        """Whether ``out`` gets deltas once it joins (its ``subscribed`` says ``delta: true``)."""
        return self.deltas is not None and out in self.wants_delta

    def leave(self, out: Any) -> None:
        """Remove ``out`` from the members (a no-op when it is not one)."""
        self.members.remove(out)
        self.wants_delta.discard(out)
        if self.deltas is not None:
            self.deltas.remove(out)
            self.plain.remove(out)

    def delta_frames(self, pub: Publication) -> tuple[tuple[bytes | None, ...], tuple[bytes | None, ...]]:
        """Return, per encoding some delta member reads, the frame for ``pub`` and its full
        value (for :func:`~relay.fastpath.fanout_into`'s ``full``: what a member that fell
        behind keeps instead). The frame is the merge patch from the value delivered before
        (``last``), or the full value when there is no such base (first value, a gap or a
        new epoch on this node), no patch can express it, or the patch is not smaller. The
        patch is computed once per publication, never per subscriber."""
        deltas, prev = self.deltas, self.last
        patch: Any = mergepatch.NO_PATCH
        if prev is not None and prev.offset == pub.offset - 1 and not pub.epoch:
            patch = mergepatch.diff(prev.data, pub.data)
        frames: list[bytes | None] = []
        fulls: list[bytes | None] = []
        for enc in range(fastpath.N_ENCODINGS):
            if not deltas.count(enc):
                frames.append(None)
                fulls.append(None)
                continue
            full = self.frame(pub, enc)
            fulls.append(full)
            if patch is not mergepatch.NO_PATCH:
                assert prev is not None
                msg: dict[str, Any] = {
                    "type": "message", "channel": self.name, "offset": pub.offset,
                    "delta": True, "base": prev.offset, "data": patch}
                if pub.ingress:
                    msg["ts"] = publish_us(pub.ingress)
                small = CODECS[enc].frame(msg)
                if len(small) < len(full):
                    full = small
            frames.append(full)
        return tuple(frames), tuple(fulls)

    def frame(self, pub: Publication, encoding: int) -> bytes:
        """Return the frame carrying ``pub`` in ``encoding``, building it at most once."""
        frame = pub.frames[encoding]
        if frame is None:
            if self.options.mode == "poke":
                msg: dict[str, Any] = {"type": "poke", "channel": self.name, "offset": pub.offset}
            else:
                msg = {"type": "message", "channel": self.name, "offset": pub.offset, "data": pub.data}
                if pub.epoch:
                    msg["epoch"] = pub.epoch
            if pub.ingress:
                msg["ts"] = publish_us(pub.ingress)
            frame = pub.frames[encoding] = CODECS[encoding].frame(msg)
        return frame


#: One debug line per publication delivered on this node, with its trace id (set
#: ``log_level = "debug"`` to follow a message through every node that delivered it).
trace_log = logging.getLogger("relay.trace")


def conflation_key(options: ChannelOptions, name: str, data: Any) -> Any:
    """The slow-consumer key of a message: the channel, or with ``conflate_key`` the
    channel and the value of that field of ``data``.

    Raises:
        BadRequest: the channel conflates by a field and ``data`` is not an object
            whose field is a string or an integer.
    """
    field = options.conflate_key
    if not field:
        return name
    value = data.get(field) if isinstance(data, dict) else None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise BadRequest(
            f"channel {name!r} conflates by {field!r} (pattern {options.pattern!r}): data must "
            f"be an object whose {field!r} is a string or an integer")
    return (name, value)


def _delivered_key(options: ChannelOptions, name: str, data: Any) -> Any:
    """:func:`conflation_key` for a message already published (checked by the node that
    took it; should its config differ, the message conflates with the whole channel)."""
    try:
        return conflation_key(options, name, data)
    except BadRequest:
        return name


def _nothing() -> None:
    pass


def new_trace_id() -> str:
    """Return a fresh trace id: 16 hex digits."""
    return f"{random.getrandbits(64):016x}"


class Hub:
    """Every channel of this node."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self._config = config
        self._metrics = metrics
        self._channels: dict[str, Channel] = {}
        #: Outboxes that got frames since the last flush; the server writes them
        #: (``fastpath.flush``) when ``wake_flusher`` has woken its flusher task.
        self.dirty: list[Any] = []
        self.wake_flusher: Callable[[], None] = _nothing
        #: Messages published on this node (the flusher watches it to batch input).
        self.publications = 0
        #: (ingress, pattern, mode) of each publication fanned out since the last flush:
        #: the flusher records their publish-to-write latency once it has written them.
        self.written: list[tuple[float, str, str]] = []
        #: Channels with a tick under way, by their ``tick_ms`` (see :meth:`tick`).
        self._ticked: dict[int, dict[str, Channel]] = {}
        #: The Redis engine when ``redis_url`` is set (set by the server); None: in memory.
        self.broker: RedisBridge | None = None
        #: Presence members and join/leave (relay.server.presence); its task runs in the server.
        self.presence = Presence(self, config)

    def __iter__(self) -> Iterator[Channel]:
        return iter(self._channels.values())

    def get(self, name: str) -> Channel | None:
        return self._channels.get(name)

    def channel(self, name: str, now: float) -> Channel:
        """Return the channel ``name``, creating it (with a new epoch) when absent."""
        ch = self._channels.get(name)
        if ch is None:
            # With Redis the epoch is Redis' (the bridge fills it in once it has read it).
            epoch = "" if self.broker is not None else secrets.token_hex(4)
            ch = Channel(name, self._config.channel_options(name), epoch, now)
            if ch.options.tick_ms:
                ch.flush_tick = partial(self._flush_tick, ch)
            self._channels[name] = ch
        return ch

    def forget(self, name: str) -> None:
        """Drop channel ``name`` (with Redis: its last local subscriber left)."""
        self._channels.pop(name, None)

    def statistics(self) -> HubStatistics:
        return HubStatistics(
            channels=len(self._channels),
            subscriptions=sum(len(ch.members) for ch in self._channels.values()),
        )

    def publish(self, name: str, data: Any, now: float) -> tuple[Channel, Publication]:
        """Append ``data`` to channel ``name`` and deliver it to every member (in memory).

        Each encoding in use is serialized and framed once; members whose outbox
        overflows under the ``disconnect`` policy are kicked with 4002. With Redis the
        offset comes from Redis: use :meth:`submit` or :meth:`publish_wait` instead.

        Raises:
            RuntimeError: the hub runs on Redis.
        """
        if self.broker is not None:
            raise RuntimeError("with redis_url, publish through Hub.submit or Hub.publish_wait")
        ch = self.channel(name, now)
        pub = ch.log.append(data, now, new_trace_id(), time.time())
        ch.last_active = now
        self.deliver(ch, pub)
        return ch, pub

    def check_publish(self, name: str, data: Any) -> None:
        """Refuse ``data`` that channel ``name`` cannot carry; every publish path calls this
        before :meth:`submit` or :meth:`publish_wait`, so nothing refused gets an offset.

        Raises:
            BadRequest: some subscriber could not receive ``data``
                (:func:`~relay.core.codec.check_json_compatible`), or the channel conflates
                by a field that ``data`` lacks (:func:`conflation_key`).
        """
        check_json_compatible(data)
        conflation_key(self._config.channel_options(name), name, data)

    def submit(self, name: str, data: Any, now: float, done: PublishDone) -> None:
        """Publish ``data`` to ``name``; ``done`` gets the result or the error.

        In memory ``done`` is called before this returns; with Redis, once Redis
        answered (publishes queued in one scheduling pass leave in one pipelined write).

        ``data`` must have passed :meth:`check_publish`.

        Raises:
            Unavailable: Redis is unreachable or overloaded right now (``done`` is not called).
        """
        if self.broker is not None:
            self.broker.submit(name, data, now, self._timed(done))
            return
        ch, pub = self.publish(name, data, now)
        done(PublishResult(name, ch.log.epoch, pub.offset, pub.trace, pub.ingress))

    async def publish_wait(self, name: str, data: Any, now: float) -> PublishResult:
        """Publish ``data`` to ``name`` and return its epoch and offset.

        ``data`` must have passed :meth:`check_publish`.

        Raises:
            Unavailable: Redis is unreachable, overloaded, or the connection was lost
                before it answered (the message may or may not have been published).

        If cancelled after the message was sent to Redis, it is still published.
        """
        if self.broker is None:
            ch, pub = self.publish(name, data, now)
            return PublishResult(name, ch.log.epoch, pub.offset, pub.trace, pub.ingress)
        started = time.perf_counter()
        result = await self.broker.publish(name, data, now)
        if self._metrics is not None:
            self._metrics.redis_publish.observe(time.perf_counter() - started)
        return result

    def _timed(self, done: PublishDone) -> PublishDone:
        """``done``, timing the publish's round trip through Redis when it succeeds."""
        metrics = self._metrics
        if metrics is None:
            return done
        started = time.perf_counter()

        def timed(result: PublishResult | RelayError) -> None:
            if not isinstance(result, RelayError):
                metrics.redis_publish.observe(time.perf_counter() - started)
            done(result)

        return timed

    def deliver(self, ch: Channel, pub: Publication) -> None:
        """Hand ``pub`` (the channel's next message) to every member: encode once per
        encoding in use, offer the frames, wake the flusher, kick overflowing members."""
        self.publications += 1
        tick_ms = ch.options.tick_ms
        if tick_ms:
            # Delivered at the end of the tick (:meth:`tick`); a state channel keeps only
            # its newest value.
            if ch.options.mode == "state":
                ch.pending[:] = [pub]
            else:
                ch.pending.append(pub)
            self._ticked.setdefault(tick_ms, {})[ch.name] = ch
            return
        members = ch.members
        deltas = ch.deltas
        if deltas is not None:
            members = ch.plain  # (ch.members: everyone, for what follows)
        if len(ch.members):
            frames = tuple(
                ch.frame(pub, enc) if members.count(enc) else None
                for enc in range(fastpath.N_ENCODINGS)
            )
            dirty = self.dirty
            opts = ch.options
            key: Any = ch.name
            if opts.conflate_key:
                key = _delivered_key(opts, ch.name, pub.data)
            # On a ticked connection a state channel keeps only its newest value per tick.
            # (time.monotonic(): what a queued frame's age is measured from, see lag.py)
            stamp = time.monotonic()
            overflowed = fastpath.fanout_into(members, frames, key, ch.policy, pub.offset, dirty,
                                              opts.mode == "state", stamp=stamp)
            if deltas is not None and len(deltas):
                # A member that falls behind (conflation, ticks) keeps the full value instead.
                patches, fulls = ch.delta_frames(pub)
                overflowed += fastpath.fanout_into(deltas, patches, key, ch.policy,
                                                   pub.offset, dirty, True, fulls, stamp)
            self._fanned_out(ch, (pub,), overflowed)
        if deltas is not None:
            ch.last = pub

    def tick(self, tick_ms: int) -> None:
        """End the tick of every channel whose ``tick_ms`` option is ``tick_ms``: each
        delivers what it got during the tick as one frame (see :meth:`_flush_tick`)."""
        channels = self._ticked.pop(tick_ms, None)
        if channels:
            for ch in channels.values():
                self._flush_tick(ch)

    def _flush_tick(self, ch: Channel) -> None:
        """Deliver ``ch``'s pending publications as one batch frame (an array of their
        messages, :func:`fastpath.encode_batch`), built once per encoding in use and shared
        by every member; the slow-consumer policy sees it as one message (the last offset)."""
        pubs = ch.pending
        if not pubs:
            return
        ch.pending = []
        members = ch.members
        if not len(members):
            return
        opts = ch.options
        frames = tuple(
            fastpath.encode_batch(enc, [ch.frame(pub, enc) for pub in pubs]) if members.count(enc) else None
            for enc in range(fastpath.N_ENCODINGS)
        )
        overflowed = fastpath.fanout_into(members, frames, ch.name, ch.policy, pubs[-1].offset,
                                          self.dirty, opts.mode == "state", stamp=time.monotonic())
        self._fanned_out(ch, pubs, overflowed)

    def _fanned_out(self, ch: Channel, pubs: Sequence[Publication], overflowed: list[Any]) -> None:
        """After ``pubs`` were offered to ``ch``'s members: have the flusher write them (and
        time them), log their trace ids, close the members that overflowed, count."""
        opts, members = ch.options, ch.members
        for pub in pubs:
            self.written.append((pub.ingress, opts.pattern, opts.mode))
        self.wake_flusher()
        if trace_log.isEnabledFor(logging.DEBUG):
            for pub in pubs:
                trace_log.debug("delivered %s", pub.trace, extra=logs.fields(
                    event="deliver", trace=pub.trace, channel=ch.name, offset=pub.offset,
                    subscribers=len(members)))
        for sub in overflowed:
            sub.kick(CLOSE_SLOW_CONSUMER, "slow consumer: send queue overflowed")
        if self._metrics is not None:
            for _ in pubs:
                self._metrics.delivered(members, opts.mode)
            if overflowed:
                self._metrics.slow_consumer("disconnect", len(overflowed))

    def subscribe(self, sub: Subscriber, name: str, since: Since | None, ref: Ref, now: float,
                  delta: bool = False) -> None:
        """Subscribe ``sub`` to ``name``: queue ``subscribed``, then what it missed or the
        current value, then join the live stream, all without yielding.

        ``delta``: the subscriber applies merge patches (used on ``delta = true`` channels).

        Raises:
            BadRequest: ``sub`` is already subscribed to ``name``.
        """
        if name in sub.subscriptions:
            raise BadRequest(f"already subscribed to {name!r}", ref=ref)
        if delta and self._config.channel_options(name).delta:
            self.channel(name, now).wants_delta.add(sub.outbox)
        if self.broker is not None:
            # Answered later, once Redis told the channel's epoch, offset and what was missed.
            try:
                self.broker.subscribe(sub, name, since, ref, now)
            except RelayError:
                ch = self._channels.get(name)
                if ch is not None:
                    ch.wants_delta.discard(sub.outbox)
                raise
            return
        ch = self.channel(name, now)
        log, mode, enc = ch.log, ch.options.mode, sub.codec.encoding
        follow: tuple[Publication, ...] = ()
        if mode == "state":
            recovered = since is not None and since.epoch == log.epoch and since.offset <= log.offset
            latest = log.latest
            if latest is not None and not (recovered and since is not None and since.offset >= latest.offset):
                follow = (latest,)
        elif since is None:
            recovered = False
        else:
            rec = log.recover(since.epoch, since.offset, now)
            recovered, follow = rec.recovered, rec.publications
            if mode == "poke" and follow:
                follow = (follow[-1],)
        if since is not None and self._metrics is not None:
            self._metrics.recovery(recovered)
        out = sub.outbox
        answer: dict[str, Any] = {
            "type": "subscribed", "channel": name, "epoch": log.epoch,
            "offset": log.offset, "recovered": recovered,
        }
        if ch.gives_delta(out):
            answer["delta"] = True
        out.put(sub.codec.frame(with_ref(answer, ref)))
        if self._metrics is not None:
            self._metrics.sent("subscribed", sub.codec.name)
            if follow:
                self._metrics.sent("recovered", sub.codec.name, len(follow))
        for pub in follow:
            # (A state channel's value: a newer one in the same tick replaces it.)
            out.put(ch.frame(pub, enc), name if mode == "state" else None)
        ch.join(out)
        sub.subscriptions.add(name)
        sub.wake()
        self.presence.joined(sub, name)

    def unsubscribe(self, sub: Subscriber, name: str, now: float) -> None:
        """Remove ``sub`` from ``name`` (a no-op when it was not subscribed)."""
        if name not in sub.subscriptions:
            return
        sub.subscriptions.discard(name)
        self.presence.left(sub, name)
        if self.broker is not None:
            self.broker.unsubscribe(sub, name)
            return
        ch = self._channels.get(name)
        if ch is not None:
            ch.leave(sub.outbox)
            ch.last_active = now

    def disconnect(self, sub: Subscriber, now: float) -> None:
        """Remove ``sub`` from every channel it is in."""
        for name in list(sub.subscriptions):
            self.unsubscribe(sub, name, now)

    def history(self, name: str, now: float, since: int | None, limit: int | None) -> tuple[Channel, list[Publication]] | None:
        """Return the channel and its retained publications, or None for an unknown channel.

        In memory only; with Redis use :meth:`history_wait`.

        Raises:
            RuntimeError: the hub runs on Redis.
        """
        if self.broker is not None:
            raise RuntimeError("with redis_url, read history through Hub.history_wait")
        ch = self._channels.get(name)
        if ch is None:
            return None
        return ch, ch.log.history(now, since, limit)

    async def history_wait(self, name: str, now: float, since: int | None,
                           limit: int | None) -> HistoryView | None:
        """Return a channel's retained publications (from Redis when configured), or None
        for a channel that has none and no epoch.

        Raises:
            Unavailable: Redis is unreachable.
        """
        if self.broker is not None:
            return await self.broker.history(name, since, limit)
        found = self.history(name, now, since, limit)
        if found is None:
            return None
        ch, pubs = found
        return HistoryView(name, ch.log.epoch, ch.log.offset, ch.options.mode, tuple(pubs))

    def sweep(self, now: float) -> int:
        """Forget channels with no members whose history has expired; return how many.

        With Redis channels are forgotten as soon as their last subscriber leaves.
        """
        if self.broker is not None:
            return 0
        dead = [
            name for name, ch in self._channels.items()
            if not len(ch.members) and ch.log.is_expired(now, ch.last_active)
        ]
        for name in dead:
            del self._channels[name]
        return len(dead)
