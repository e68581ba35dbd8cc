"""RelayServer: the root of the task tree, its listener, and graceful drain.

The server owns one nursery. In it run the listener (inside a cancel scope of its
own so drain can stop accepting without touching open connections), one task per
TCP connection, the channel sweeper, the flusher, the heartbeater, and one ticker per
tick interval that some connection asked for (``?tick_ms=N``). ``run_server`` adds
signal handling for the ``relay serve`` command.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import time
from collections import deque
from functools import partial
from typing import TYPE_CHECKING

import trio

from .. import fastpath
from ..config import Config, effective_node_id
from ..core.codec import CODECS
from ..errors import ConfigError
from ..metrics import Metrics
from .forwarded import TrustedProxies
from .frontdoor import handle_stream
from .hub import Hub
from .lag import lags
from .security import build_security, build_ssl_context
from .ws import CLOSE_GOING_AWAY, Connection

if TYPE_CHECKING:
    from ..broker.bridge import RedisBridge

log = logging.getLogger("relay.server")

#: The flusher waits at most this many extra scheduling passes, and this long, for
#: more input to join a batch before writing it (see RelayServer._flusher).
MAX_BATCH_PASSES = 16
MAX_BATCH_SECONDS = 0.002
#: How often channels with no members and expired history are forgotten.
SWEEP_SECONDS = 10.0


class RelayServer:
    """One relay node: listener, connections, channels, metrics."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.node_id = effective_node_id(config)
        self.metrics = Metrics(self.node_id)
        #: Authentication, origins and connection caps (raises ConfigError for unusable
        #: key files or anonymous clients on a public address without ``insecure``).
        self.security = build_security(config)
        #: TLS context when ``[tls]`` is configured: every connection is TLS.
        self.ssl_context = build_ssl_context(config)
        #: Whose X-Forwarded-For names the client (``trusted_proxies``).
        self.trusted_proxies = TrustedProxies(config.trusted_proxies)
        #: Unix time the server was created (``/stats`` uptime).
        self.started_at = time.time()
        self.metrics.bind_load(
            lambda: _by_encoding(self.security.bytes_received_by_encoding),
            lambda: [conn.outbox.size for conn in self.connections.values()],
            self.security.caps.addresses)
        self.hub = Hub(config, self.metrics)
        if config.redis_url:
            broker = self.hub.broker = _redis_bridge(config, self.hub, self.node_id)
            self.metrics.bind_redis(lambda: [(s.endpoint.identity, s.up, s.connects) for s in broker.shards])
        self.metrics.bind_channels(lambda: self.hub.statistics().channels)
        self.metrics.bind_presence(self.hub.presence.statistics)
        self.connections: dict[str, Connection] = {}
        self.metrics.bind_lag(lambda: [(lag.queued_bytes, lag.age) for lag in lags(self.connections.values())])
        #: Bytes written to WebSocket connections (read by the metrics at scrape time).
        self.bytes_sent = 0
        #: The part of it written to WebSocket connections, per encoding.
        self.bytes_sent_by_encoding = [0] * fastpath.N_ENCODINGS
        self.metrics.bind_bytes_sent(lambda: {
            **_by_encoding(self.bytes_sent_by_encoding),
            "http": self.bytes_sent - sum(self.bytes_sent_by_encoding)})
        self._flush_lot = trio.lowlevel.ParkingLot()
        self.hub.wake_flusher = self.wake_flusher
        #: The outboxes of ticked connections, by tick interval (ms); one ticker task each.
        self._ticks: dict[int, fastpath.Members] = {}
        self.draining = False
        #: TCP connections waiting for a request or in the WebSocket handshake
        #: (``limits.max_pending_connections``; maintained by the front door).
        self.pending_connections = 0
        self.port: int = 0
        self._nursery: trio.Nursery | None = None
        self._listen_scope = trio.CancelScope()
        self._emptied = trio.Event()
        self._broker_seen_up = False

    def starting(self) -> str | None:
        """Why new WebSocket clients are refused at start (None once they are welcome).

        With Redis, until it has been reachable once: a client let in before could not
        subscribe or publish, so it is sent to another node (503, Retry-After: 1). Once
        Redis was up, a later outage does not refuse clients (they get ``unavailable``
        per request, and recover when it is back).
        """
        if self._broker_seen_up or self.hub.broker is None:
            return None
        problem = self.hub.broker.problem()
        if problem is None:
            self._broker_seen_up = True
        return problem

    def not_ready(self) -> str | None:
        """Why ``/readyz`` answers 503 (draining, or Redis unreachable), or None."""
        if self.draining:
            return "draining"
        if self.hub.broker is not None:
            return self.hub.broker.problem()
        return None

    @property
    def url(self) -> str:
        """The WebSocket URL clients use, e.g. ``ws://127.0.0.1:8765/ws`` (``wss://`` with TLS)."""
        return f"{'wss' if self.ssl_context else 'ws'}://{self._netloc}/ws"

    @property
    def http_url(self) -> str:
        """The base URL of the HTTP API, e.g. ``http://127.0.0.1:8765`` (``https://`` with TLS)."""
        return f"{'https' if self.ssl_context else 'http'}://{self._netloc}"

    @property
    def _netloc(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[RelayServer] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until :meth:`drain` finishes or :meth:`stop` is called.

        With ``nursery.start`` it returns the server once the port is bound. When
        cancelled, every connection is dropped at once (use :meth:`drain` to close
        them gracefully first).
        """
        cfg = self.config
        listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.hub.broker is not None:
                await nursery.start(self.hub.broker.run)
            nursery.start_soon(self._listen, listeners, nursery)
            nursery.start_soon(self._sweeper)
            nursery.start_soon(self._flusher)
            nursery.start_soon(self._heartbeater)
            for tick_ms in sorted({c.tick_ms for c in self.config.channels if c.tick_ms}):
                nursery.start_soon(self._channel_ticker, tick_ms)
            await nursery.start(self.hub.presence.run)
            log.info("relay listening on %s (node %s)", self.url, self.node_id)
            task_status.started(self)

    async def _listen(self, listeners: list[trio.SocketListener], nursery: trio.Nursery) -> None:
        with self._listen_scope:
            await trio.serve_listeners(
                partial(handle_stream, self), listeners, handler_nursery=nursery)

    async def _sweeper(self) -> None:
        while True:
            await trio.sleep(SWEEP_SECONDS)
            self.hub.sweep(trio.current_time())

    def wake_flusher(self) -> None:
        """Wake the flusher task: some outbox was marked dirty (``hub.dirty``).

        The flusher runs at trio's next scheduling pass, after every task that was
        already runnable (readers handling more input, the HTTP API) has had its turn.
        So under load one pass handles a batch of input and each connection it touched
        is written once, many frames in one ``send``; at light load a frame waits one
        scheduling pass, never a timer.
        """
        self._flush_lot.unpark_all()

    async def _flusher(self) -> None:
        hub, lot = self.hub, self._flush_lot
        while True:
            await lot.park()
            # Input that is still arriving joins this batch: trio-websocket hands over
            # one parsed message per scheduling pass, so wait further passes while each
            # one brought new publications, within MAX_BATCH_PASSES and
            # MAX_BATCH_SECONDS. At light load that is one pass; under load many
            # frames then leave in each send instead of one send per frame.
            seen = hub.publications
            deadline = trio.current_time() + MAX_BATCH_SECONDS
            for _ in range(MAX_BATCH_PASSES):
                await trio.lowlevel.cancel_shielded_checkpoint()
                if hub.publications == seen or trio.current_time() >= deadline:
                    break
                seen = hub.publications
            if hub.dirty:
                wake, sent = fastpath.flush(hub.dirty, self.bytes_sent_by_encoding)
                self.bytes_sent += sent
                for conn in wake:
                    conn.wake_writer()
            if hub.written:
                self.metrics.written(hub.written, time.time())
                hub.written.clear()

    async def _heartbeater(self) -> None:
        """Ping every connection each ``heartbeat`` seconds; close those whose pong does
        not come within ``heartbeat_timeout`` (1011).

        One task for the whole server instead of one per connection: a ping pass, and a
        pong check ``heartbeat_timeout`` after each ping pass. The ping frames go into
        the connections' outboxes, the one ordered path of every outbound byte.
        """
        cfg = self.config
        next_ping = trio.current_time() + cfg.heartbeat
        checks: deque[float] = deque()
        while True:
            await trio.sleep_until(min(next_ping, checks[0]) if checks else next_ping)
            now = trio.current_time()
            while checks and checks[0] <= now:
                checks.popleft()
                for conn in list(self.connections.values()):
                    conn.check_pong(now, cfg.heartbeat_timeout)
            if next_ping <= now:
                for conn in self.connections.values():
                    conn.ping(now)
                checks.append(now + cfg.heartbeat_timeout)
                next_ping = now + cfg.heartbeat

    def add_ticked(self, conn: Connection) -> None:
        """Have the ticker of ``conn.tick_ms`` write ``conn`` (starting that ticker if needed).

        One task per distinct interval, not per connection; it ends when its last
        connection leaves.
        """
        members = self._ticks.get(conn.tick_ms)
        if members is None:
            members = self._ticks[conn.tick_ms] = fastpath.Members()
            assert self._nursery is not None, "connections exist only while the server runs"
            self._nursery.start_soon(self._ticker, conn.tick_ms, members)
        members.add(conn.outbox)

    def remove_ticked(self, conn: Connection) -> None:
        members = self._ticks.get(conn.tick_ms)
        if members is not None:
            members.remove(conn.outbox)

    async def _ticker(self, tick_ms: int, members: fastpath.Members) -> None:
        """Every ``tick_ms``, write each connection on this tick that has something queued:
        one batch frame per connection (``fastpath.flush_tick``); the writer tasks finish
        what a direct send could not.

        Ticks keep to a fixed grid; when a tick comes late (a busy event loop), the ticks
        missed are skipped, not caught up in a burst. Ends once no connection is left.
        """
        interval = tick_ms / 1000.0
        next_tick = trio.current_time() + interval
        try:
            while len(members):
                await trio.sleep_until(next_tick)
                wake, sent = fastpath.flush_tick(members, self.bytes_sent_by_encoding)
                self.bytes_sent += sent
                for conn in wake:
                    conn.wake_writer()
                next_tick += interval
                now = trio.current_time()
                if next_tick <= now:
                    next_tick = now + interval
        finally:
            # (No await between the last emptiness check and this: a connection added
            # meanwhile starts a new ticker.)
            if self._ticks.get(tick_ms) is members:
                del self._ticks[tick_ms]

    async def _channel_ticker(self, tick_ms: int) -> None:
        """Every ``tick_ms``, hand the channels with that ``tick_ms`` option their tick's
        messages as one batch frame each (:meth:`Hub.tick`); the flusher writes them.
        On a fixed grid; late ticks are skipped, not caught up in a burst."""
        interval = tick_ms / 1000.0
        next_tick = trio.current_time() + interval
        while True:
            await trio.sleep_until(next_tick)
            self.hub.tick(tick_ms)
            next_tick += interval
            now = trio.current_time()
            if next_tick <= now:
                next_tick = now + interval

    def add_connection(self, conn: Connection) -> None:
        self.connections[conn.id] = conn
        self.metrics.connections.inc()
        self.metrics.connections_total.labels(conn.codec.name).inc()

    def remove_connection(self, conn: Connection) -> None:
        if self.connections.pop(conn.id, None) is not None:
            self.metrics.connections.dec()
            self.metrics.connection_duration.observe(max(0.0, time.time() - conn.started_at))
        if self.draining and not self.connections:
            self._emptied.set()

    async def drain(self) -> None:
        """Stop accepting, close every client with 1001 and a reconnect hint, then stop.

        From the start of the drain ``/readyz`` answers 503, and plain-HTTP keep-alive
        connections get ``Connection: close`` on their next response.

        Each client's close reason is ``{"reconnect_after_ms": N}`` with N spread
        uniformly over ``drain_window`` so reconnections do not arrive all at once.
        Waits up to ``drain_timeout`` for the clients to go, then cancels whatever
        is left. Safe to call more than once.
        """
        if self.draining:
            return
        cfg = self.config
        self.draining = True
        self.metrics.draining.set(1)
        self._listen_scope.cancel()
        window_ms = cfg.drain_window * 1000.0
        conns = list(self.connections.values())
        log.info("draining: closing %d connection(s) with 1001 over a %.1fs window",
                 len(conns), cfg.drain_window)
        for conn in conns:
            hint = json.dumps({"reconnect_after_ms": int(random.uniform(0, window_ms))})
            conn.kick(CLOSE_GOING_AWAY, hint)
        if self.connections:
            with trio.move_on_after(cfg.drain_timeout) as scope:
                await self._emptied.wait()
            if scope.cancelled_caught:
                log.warning("drain timeout: %d connection(s) still open, dropping them",
                            len(self.connections))
        self.stop()

    def stop(self) -> None:
        """Cancel everything at once."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()


def _redis_bridge(config: Config, hub: Hub, node_id: str) -> RedisBridge:
    try:
        from ..broker.bridge import RedisBridge
    except ImportError as exc:
        raise ConfigError(
            f"redis_url is set but the Redis client libraries are missing ({exc.name}); "
            "install them with: pip install 'relay[redis]'", key="redis_url") from None
    return RedisBridge(config, hub, node_id)


def _by_encoding(counts: list[int]) -> dict[str, float]:
    return {codec.name: float(n) for codec, n in zip(CODECS, counts)}


async def run_server(config: Config) -> int:
    """Serve until SIGTERM or SIGINT, then drain; a second signal stops at once.

    Returns the process exit code: 0 after a drain, 1 when the port cannot be bound.
    """
    server = RelayServer(config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if server.draining:
                        log.warning("received %s again: stopping now", name)
                        server.stop()
                    else:
                        log.info("received %s: draining", name)
                        nursery.start_soon(server.drain)

            nursery.start_soon(watch_signals)
            try:
                await server.run()
            except OSError as exc:
                log.error("cannot listen on %s port %s: %s", config.host, config.port, exc)
                return 1
            finally:
                nursery.cancel_scope.cancel()
    log.info("relay stopped")
    return 0
