"""One WebSocket connection: its reader and writer tasks, and its send queue.

The reader decodes each client message and hands it to the hub (synchronously);
every answer and every delivery goes into the connection's bounded
:class:`~relay.fastpath.Outbox`. Once per scheduling pass the server flushes each
connection that got frames with one direct non-blocking ``send`` of everything
queued (:meth:`Connection.flush`); only what the kernel did not take is left to the
connection's writer task, which sends it with ``send_all``. Frames are
pre-encoded, so both paths bypass trio-websocket's per-message framing; they write
only while trio-websocket's stream lock is free (the writer holds it), so its
pings, pongs and close frames never interleave inside one of ours.

A connection opened with ``?tick_ms=N`` is *ticked*: after ``welcome`` its outbox
batches (:meth:`~relay.fastpath.Outbox.start_batching`), the flusher leaves it alone,
and the server's ticker for N ms writes it once per tick
(:func:`relay.fastpath.flush_tick`): everything queued in the tick leaves as one frame
holding an array of envelopes.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from trio_websocket import WebSocketConnection
from wsproto.connection import ConnectionState

from .. import fastpath
from ..config import MAX_TICK_MS, MIN_TICK_MS  # (the tick intervals a client may ask for)
from ..core import envelope
from ..core.codec import Codec
from ..core.auth import ANONYMOUS, Identity
from ..broker import PublishResult
from ..errors import Forbidden, PeerError, RelayError, Unavailable
from .hub import with_ref
from .security import Guard

if TYPE_CHECKING:
    from .app import RelayServer
    from .frontdoor import _ServerWebSocket

log = logging.getLogger("relay.connection")

CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
#: How long an in-flight write may go on after the connection was told to close,
#: and how long the close handshake may take, before the TCP connection is dropped.
CLOSE_GRACE_SECONDS = 2.0
#: The heartbeat ping; any pong counts as the answer.
PING_FRAME = fastpath.encode_frame(fastpath.OP_PING, b"relay")


class _HoldingLock:
    """trio-websocket's stream lock, holding the connection's outbox while it is used.

    Every write of trio-websocket (ping, pong, close) and of the writer task takes
    this lock; holding the outbox meanwhile keeps direct sends out, from the moment a
    writer starts waiting for the lock until it is done. Once a close frame has been
    written the hold is kept for good: nothing may follow a close frame.
    """

    def __init__(self, lock: trio.StrictFIFOLock, outbox: Any, ws: WebSocketConnection) -> None:
        self._lock = lock
        self._outbox = outbox
        self._ws = ws

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        self._outbox.hold()
        entered = False
        try:
            await self._lock.acquire()
            try:
                # A direct send may have stopped inside a frame: whoever writes next (a
                # pong, a ping, a close frame) finishes that frame first.
                rest = self._outbox.take_rest()
                if rest:
                    await self._write_rest(rest)
                entered = True
            finally:
                if not entered:
                    self._lock.release()
        finally:
            if not entered:
                self._outbox.release()

    async def _write_rest(self, rest: bytes) -> None:
        stream = self._ws._stream
        done = False
        try:
            await stream.send_all(rest)
            done = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            done = True  # the holder's own write meets the same error and handles it
        finally:
            if not done:
                # Cut short (cancelled): half a frame is on the wire, nothing may follow.
                await trio.aclose_forcefully(stream)

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()
        if self._ws._wsproto.state is ConnectionState.OPEN:
            self._outbox.release()


class Connection:
    """A client connected over WebSocket; owns its reader and writer tasks (heartbeats: the server pings)."""

    def __init__(self, server: RelayServer, ws: _ServerWebSocket, codec: Codec, remote: str,
                 identity: Identity = ANONYMOUS, tick_ms: int = 0) -> None:
        cfg = server.config
        self.server = server
        #: Milliseconds between the ticks that deliver this connection's frames (0: none).
        self.tick_ms = tick_ms
        self.ws = ws
        self.codec = codec
        self.remote = remote
        self.id = secrets.token_hex(8)
        self.outbox = fastpath.Outbox(cfg.send_queue_size, codec.encoding, self)
        self.subscriptions: set[str] = set()
        #: Who the client is, its rate limits and its token's expiry (relay.server.security).
        self.guard = Guard(server.security, identity, trio.current_time())
        self.started_at = time.time()
        self.last_activity = trio.current_time()
        self._lot = trio.lowlevel.ParkingLot()
        self._drained = trio.lowlevel.ParkingLot()
        self._counted_dropped = 0
        #: ``outbox.oldest`` of the bytes the writer task is writing now (0.0: none).
        self.writing_since = 0.0
        self._counted_conflated = 0
        self._close: tuple[int, str] | None = None
        self._peer_gone = False
        self._reader_done = False
        self._send_scope: trio.CancelScope | None = None
        self._reader_waiting = False
        #: Set once messages are no longer handled (the connection is ending).
        self._detached = False
        # Direct sends (fastpath.flush) write to the socket's descriptor when the stream
        # is a plain socket; under TLS, or any other stream, every write goes through
        # the writer task. trio-websocket's stream lock is wrapped so that its own
        # writes (pings, pongs, close frames) hold the outbox while they happen.
        sock = getattr(getattr(ws._stream, "socket", None), "_sock", None)
        if isinstance(sock, socket.socket):
            self.outbox.fd = sock.fileno()
        ws._stream_lock = _HoldingLock(ws._stream_lock, self.outbox, ws)
        #: When the unanswered heartbeat ping was queued (None: none outstanding).
        self._ping_sent: float | None = None
        ws.on_pong = self._pong

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.remote} {self.codec.name}>"

    # -- called by the hub and the server (synchronous) --------------------------------

    def wake(self) -> None:
        """Note that the outbox has something to send: the server's flusher task writes it
        at the next scheduling pass (:meth:`RelayServer.wake_flusher`)."""
        if self.outbox.mark_dirty(self.server.hub.dirty):
            self.server.wake_flusher()

    def wake_writer(self) -> None:
        """Wake the writer task: what is queued could not be written directly."""
        self._lot.unpark_all()

    def kick(self, code: int, reason: str) -> None:
        """Close this connection with ``code``: the writer flushes what is queued, then closes.

        A write already in progress gets ``CLOSE_GRACE_SECONDS`` to finish.
        """
        if self._close is None:
            self._close = (code, reason)
            self.outbox.hold()  # from now on only the writer writes: the rest, then the close
            if self._send_scope is not None:
                self._send_scope.deadline = min(
                    self._send_scope.deadline, trio.current_time() + CLOSE_GRACE_SECONDS
                )
        self._lot.unpark_all()

    def ping(self, now: float) -> None:
        """Queue a ping frame (the server's heartbeat task calls this every ``heartbeat``).

        Nothing is sent while the previous ping is unanswered or once closing.
        """
        if self._ping_sent is None and self._close is None and not self._reader_done:
            self._ping_sent = now
            self.outbox.put(PING_FRAME)
            self.wake()

    def check_pong(self, now: float, timeout: float) -> None:
        """Close with 1011 when the last ping has gone unanswered for ``timeout`` seconds."""
        if self._ping_sent is not None and now - self._ping_sent >= timeout and self._close is None:
            log.info("connection %s: no pong within %ss, closing", self.id, timeout)
            self.kick(CLOSE_INTERNAL_ERROR, "heartbeat timeout")

    def _pong(self) -> None:
        self._ping_sent = None

    def send(self, message: dict[str, Any]) -> None:
        """Queue a direct answer (never dropped by the slow-consumer policy)."""
        self.outbox.put(self.codec.frame(message))
        self.server.metrics.sent(message["type"], self.codec.name)
        self.wake()

    def send_error(self, code: str, message: str, ref: envelope.Ref = None) -> None:
        self.server.metrics.errors.labels(code).inc()
        self.send(with_ref({"type": "error", "code": code, "message": message}, ref))

    # -- tasks ---------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run until the peer leaves or the connection is closed; cancel-safe.

        Client messages are handled in trio-websocket's reader task as it parses them
        (:meth:`_deliver`); this task writes what the direct sends left.
        """
        cfg = self.server.config
        welcome: dict[str, Any] = {
            "type": "welcome", "session": self.id, "node": self.server.node_id,
            "heartbeat": cfg.heartbeat,
        }
        if self.tick_ms:
            welcome["tick_ms"] = self.tick_ms
        self.send(welcome)
        if self.tick_ms:
            # welcome leaves as it is (a client learns from it that ticks are on); every
            # later data frame holds an array.
            self.outbox.start_batching()
            self.server.add_ticked(self)
        try:
            self._attach()
            if self.guard.identity.expires is None:
                await self._writer()  # (no nursery to keep for the connection's lifetime)
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.guard.watch_expiry, self)
                    await self._writer()
                    nursery.cancel_scope.cancel()
        finally:
            self._detached = True  # a message still being parsed is not handled any more
            if self.tick_ms:
                self.server.remove_ticked(self)
            self.server.hub.disconnect(self, trio.current_time())
            self._count_slow_consumer_actions()

    def release(self) -> None:
        """Break the references between this connection, its outbox and trio-websocket's
        connection once the connection's tasks have ended, so that all of it is freed at
        once by reference counting instead of waiting, as garbage in reference cycles
        (44 objects per connection), for Python's cycle collector."""
        ws = self.ws
        ws.deliver = ws.on_pong = ws.on_reader_done = ws.before_close = None
        lock = ws._stream_lock
        if isinstance(lock, _HoldingLock):
            ws._stream_lock = lock._lock
        box = self.outbox
        box.close()
        box.take_rest()  # (nothing is written any more: flush() skips an empty outbox)
        box.fd = -1
        box.owner = None
        # wsproto's frame parser keeps itself alive through the frame of its own generator
        parse_more = getattr(getattr(ws._wsproto.connection, "_proto", None), "_parse_more", None)
        if parse_more is not None:
            parse_more.close()

    def _count_slow_consumer_actions(self) -> None:
        """Add the messages this outbox dropped or conflated since last time to the metrics."""
        box, metrics = self.outbox, self.server.metrics
        if box.dropped != self._counted_dropped:
            metrics.slow_consumer("drop", box.dropped - self._counted_dropped)
            self._counted_dropped = box.dropped
        if box.conflated != self._counted_conflated:
            metrics.slow_consumer("conflate", box.conflated - self._counted_conflated)
            self._counted_conflated = box.conflated

    def _take(self) -> bytes:
        """Empty the outbox into bytes to write: queued frames, held values, then gaps."""
        outbox = self.outbox
        frame = self.codec.frame
        if outbox.batched:
            # Ticked: the gaps join the tick's array, after what was queued.
            gaps = outbox.take_gaps()
            for ch, lo, hi in gaps:
                outbox.put(frame({"type": "gap", "channel": ch, "from": lo, "to": hi}))
            data = outbox.take()
        else:
            data = outbox.take()
            gaps = outbox.take_gaps()
            if gaps:
                data += b"".join(
                    frame({"type": "gap", "channel": ch, "from": lo, "to": hi})
                    for ch, lo, hi in gaps
                )
        if gaps:
            self._count_slow_consumer_actions()
        elif outbox.conflated != self._counted_conflated:
            self._count_slow_consumer_actions()
        return data

    async def _writer(self) -> None:
        outbox, ws = self.outbox, self.ws
        while True:
            while not outbox.pending and self._close is None and not self._peer_gone:
                await self._lot.park()
            if self._peer_gone:
                return
            if outbox.pending:
                if not await self._write():
                    # The peer may be closing: trio-websocket answers its close frame, then
                    # ends the reader. Ending the connection sooner would cancel the answer.
                    with trio.move_on_after(CLOSE_GRACE_SECONDS):
                        while not self._reader_done:
                            await self._lot.park()
                    return
                if self._reader_waiting:
                    self._drained.unpark_all()
                continue
            code, reason = self._close  # type: ignore[misc]
            with trio.move_on_after(CLOSE_GRACE_SECONDS):
                await ws.aclose(code, reason)
            return

    async def _write(self, answering_close: bool = False) -> bool:
        """Write what is queued; return False when the connection is gone.

        The bytes are taken only once the stream lock is held (its holder may be next to
        write after a direct send that stopped inside a frame), and direct sends wait
        meanwhile (the lock holds the outbox) so frames queued later cannot overtake them.
        ``answering_close``: the reader writes before it answers the peer's close (the
        connection is no longer OPEN then), within ``CLOSE_GRACE_SECONDS``.
        """
        ws = self.ws
        with trio.CancelScope() as scope:
            if not answering_close:
                self._send_scope = scope  # (the writer's: kick() shortens it)
            if self._close is not None or answering_close:
                scope.deadline = trio.current_time() + CLOSE_GRACE_SECONDS
            async with ws._stream_lock:
                if ws.closed is not None or (
                        ws._wsproto.state is not ConnectionState.OPEN and not answering_close):
                    return False
                # While these bytes are on their way, their oldest message is the lag.
                self.writing_since = self.outbox.oldest
                data = self._take()
                try:
                    if data:
                        await ws._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    # The peer went away mid-write; the reader sees the closure too.
                    return False
                finally:
                    self.writing_since = 0.0
                self.outbox.written()
        if not answering_close:
            self._send_scope = None
        if scope.cancelled_caught:
            # A write cut short leaves half a frame on the wire: no close frame can follow.
            log.info("connection %s: dropped after a stalled write during close", self.id)
            await trio.aclose_forcefully(ws._stream)
            return False
        self.server.bytes_sent += len(data)
        self.server.bytes_sent_by_encoding[self.codec.encoding] += len(data)
        return True

    async def _write_before_close(self) -> None:
        """The reader is about to answer a close frame of the peer, or a frame it refuses
        with a close (1002, 1007, 1009): write what is queued first (the answers to the
        peer's last messages among it), since nothing may follow a close frame. Within
        ``CLOSE_GRACE_SECONDS``; a write cut short drops the TCP connection."""
        if self._close is None:  # (closing already: the writer writes the rest, then its close)
            await self._write(answering_close=True)

    def _attach(self) -> None:
        """Have trio-websocket's reader task hand each client message to :meth:`_deliver`.

        A message parsed before this waits in trio-websocket's (unbuffered) channel,
        its reader blocked on it: it is handled here first, so the order holds.
        """
        ws = self.ws
        ws.on_reader_done = self._reader_ended
        ws.deliver = self._deliver
        ws.before_close = self._write_before_close
        try:
            while True:
                self._handle_safely(ws._recv_channel.receive_nowait())
        except trio.WouldBlock:
            pass
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self._reader_ended()  # the peer is already gone
        ws.drop_message_channel()

    async def _deliver(self, raw: str | bytes) -> None:
        """Handle one client message, in trio-websocket's reader task, without yielding
        unless the client does not read its answers.

        All messages parsed from one read are so handled in one scheduling pass, and the
        flusher task (``wake_flusher``) then writes each touched connection once.
        """
        if self._detached:
            return
        outbox = self.outbox
        # Backpressure: a client that does not read its answers is not read from either,
        # so direct answers (never dropped) cannot pile up without bound.
        while outbox.size > outbox.limit and not outbox.closed:
            # The writer drains the queue meanwhile (and wakes this reader).
            self._reader_waiting = True
            outbox.hold()
            self._lot.unpark_all()
            try:
                await self._drained.park()
            finally:
                self._reader_waiting = False
                outbox.release()
        self.last_activity = trio.current_time()
        self._handle_safely(raw)

    def _handle_safely(self, raw: str | bytes) -> None:
        """Handle ``raw``; a bug closes this connection with 1011, nobody else's."""
        try:
            self.handle(raw)
        except Exception:
            log.exception("connection %s (%s): unexpected error; closing with 1011", self.id, self.remote)
            self._detached = True
            self.kick(CLOSE_INTERNAL_ERROR, "internal error")

    def _reader_ended(self) -> None:
        """trio-websocket's reader task ended: the peer closed, or we did."""
        if not self._reader_done:
            self._peer_gone = self._close is None
            self._reader_done = True
            self._lot.unpark_all()

    # -- protocol ------------------------------------------------------------------------

    def handle(self, raw: str | bytes) -> None:
        """Handle one client message; a bad one gets an ``error`` and the connection stays."""
        metrics = self.server.metrics
        if not self.guard.admit(self, raw):
            return  # over its rate limits: answered rate_limited, or closing with 4003
        try:
            env = envelope.parse(
                self.codec.decode(raw), max_channel_length=self.server.config.max_channel_length
            )
            metrics.messages_in.labels(type(env).__name__.lower(), self.codec.name).inc()
            self.dispatch(env)
        except PeerError as exc:
            metrics.messages_in.labels("invalid", self.codec.name).inc()
            self.send_error(exc.code, exc.message, exc.ref)
        except Unavailable as exc:  # Redis is down: the request is answered, not dropped
            self.send_error(exc.code, exc.message, exc.ref)

    def _published(self, ref: envelope.Ref, result: PublishResult | RelayError) -> None:
        """Answer a publish once its offset is known (at once in memory, later with Redis)."""
        if isinstance(result, RelayError):
            # With Redis: the connection to it was lost or it refused; never dropped silently.
            self.send_error(getattr(result, "code", "internal"), str(result), ref)
            return
        self.server.metrics.published.labels("websocket").inc()
        if ref is not None:
            self.send({"type": "ack", "ref": ref, "channel": result.channel,
                       "offset": result.offset, "epoch": result.epoch})

    def dispatch(self, env: envelope.Envelope) -> None:
        server, now = self.server, trio.current_time()
        if isinstance(env, envelope.Publish):
            ch_opts = server.config.channel_options(env.channel)
            if not ch_opts.client_publish:
                raise Forbidden(
                    f"clients may not publish to {env.channel!r}; its channel pattern "
                    f"{ch_opts.pattern!r} has client_publish = false", ref=env.ref)
            self.guard.check_publish(env.channel, env.ref)
            try:
                server.hub.check_publish(env.channel, env.data)
            except PeerError as exc:
                exc.ref = env.ref
                raise
            try:
                server.hub.submit(env.channel, env.data, now, partial(self._published, env.ref))
            except Unavailable as exc:
                exc.ref = env.ref
                raise
        elif isinstance(env, envelope.Subscribe):
            self.guard.check_subscribe(env.channel, self.subscriptions, env.ref)
            server.hub.subscribe(self, env.channel, env.since, env.ref, now, env.delta)
        elif isinstance(env, envelope.Unsubscribe):
            server.hub.unsubscribe(self, env.channel, now)
            self.send(with_ref({"type": "unsubscribed", "channel": env.channel}, env.ref))
        elif isinstance(env, envelope.Ping):
            self.send(with_ref({"type": "pong"}, env.ref))
        elif isinstance(env, envelope.Presence):
            server.hub.presence.request(self, env)
        elif isinstance(env, envelope.Refresh):
            self.guard.refresh(self, env.token, env.ref,
                               lambda channel: server.hub.unsubscribe(self, channel, now))
