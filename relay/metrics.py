"""Prometheus metrics of one server, in a registry of its own.

Each :class:`RelayServer` has its own :class:`Metrics` (so several servers can run
in one process, as the tests do). Hot-path callers make one counter call per
publish, never one per subscriber; publish-to-write latency is recorded once per
publication by the flusher, after the write.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import fastpath
from .core.codec import CODECS
from ._version import __version__

CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Buckets of ``relay_publish_to_write_seconds``: 50 µs to 2.5 s.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: How many of the latest latencies per channel pattern ``/stats`` computes percentiles over.
RECENT_LATENCIES = 2048


class _FunctionCounter:
    """A counter whose values, one per value of ``label``, are read from a function at
    scrape time (a plain int on the hot path instead of a locked counter per write)."""

    def __init__(self, name: str, documentation: str, label: str,
                 read: Callable[[], dict[str, float]]) -> None:
        self._name, self._doc, self._label, self._read = name, documentation, label, read

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self._name, self._doc, labels=[self._label])]

    def collect(self) -> list[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._doc, labels=[self._label])
        for value, count in self._read().items():
            family.add_metric([value], count)
        return [family]


class _RedisCollector:
    """``relay_redis_up`` and ``relay_redis_connects_total`` per shard, read from the
    bridge at scrape time: (shard address, up, connections made) for each shard."""

    def __init__(self, read: Callable[[], list[tuple[str, bool, int]]]) -> None:
        self._read = read

    def describe(self) -> list[Any]:
        return self.collect()

    def collect(self) -> list[Any]:
        up = GaugeMetricFamily("relay_redis_up", "1 while this node's connections to the Redis "
                               "shard are up, 0 while it reconnects.", labels=["shard"])
        connects = CounterMetricFamily("relay_redis_connects", "Connections made to the Redis shard "
                                       "(more than one: it was lost and reconnected).", labels=["shard"])
        for shard, is_up, count in self._read():
            up.add_metric([shard], 1.0 if is_up else 0.0)
            connects.add_metric([shard], float(count))
        return [up, connects]


#: Buckets of ``relay_connection_lag_seconds`` (age of a connection's oldest waiting message).
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
#: Buckets of ``relay_connection_send_queue_bytes``.
QUEUE_BUCKETS = (0, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)


def _gauge_histogram(name: str, doc: str, values: list[float], bounds: tuple[float, ...]) -> Any:
    buckets = [(str(float(b)), float(sum(1 for v in values if v <= b))) for b in bounds]
    buckets.append(("+Inf", float(len(values))))
    return GaugeHistogramMetricFamily(name, doc, buckets=buckets, gsum_value=float(sum(values)))


class _LagCollector:
    """Per-connection lag as distributions over the open connections, read at scrape time:
    ``read()`` gives (bytes waiting, seconds its oldest waiting message has waited) for each."""

    def __init__(self, read: Callable[[], list[tuple[int, float]]]) -> None:
        self._read = read

    def describe(self) -> list[Any]:
        return self.collect()

    def collect(self) -> list[Any]:
        found = self._read()
        ages = [age for _, age in found]
        return [
            _gauge_histogram("relay_connection_lag_seconds", "Connections by how long the oldest "
                             "message waiting in their send queue has waited (0: nothing waits).",
                             ages, LAG_BUCKETS),
            _gauge_histogram("relay_connection_send_queue_bytes", "Connections by bytes waiting in "
                             "their send queue.", [float(size) for size, _ in found], QUEUE_BUCKETS),
            GaugeMetricFamily("relay_connection_lag_max_seconds", "The longest wait of a message "
                              "still in some connection's send queue.", value=max(ages, default=0.0)),
        ]


class Metrics:
    """The counters, gauges and histograms relay exports."""

    def __init__(self, node_id: str) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        info = Gauge("relay_info", "Build and node information (always 1).",
                     ["version", "fastpath", "node"], registry=r)
        info.labels(__version__, fastpath.IMPLEMENTATION, node_id).set(1)
        self.connections = Gauge("relay_active_connections", "Open WebSocket connections.", registry=r)
        self.connections_total = Counter(
            "relay_connections_total", "WebSocket connections accepted.", ["encoding"], registry=r)
        self.connection_duration = Histogram(
            "relay_connection_duration_seconds", "How long WebSocket connections stayed open.",
            buckets=(1, 10, 60, 300, 1800, 3600, 6 * 3600, 24 * 3600), registry=r)
        self.handshakes_refused = Counter(
            "relay_handshakes_refused_total", "WebSocket upgrades refused, by reason.",
            ["reason"], registry=r)
        self.messages_in = Counter(
            "relay_messages_received_total",
            "Client messages received, by type and encoding (http: the fallback endpoints).",
            ["type", "encoding"], registry=r)
        self.messages_out = Counter(
            "relay_messages_sent_total",
            "Messages sent to clients other than channel deliveries (relay_deliveries_total): "
            "answers by type (welcome, subscribed, ack, pong, error, ...) and recovered history "
            "(recovered), by encoding.", ["type", "encoding"], registry=r)
        self._out_children: dict[tuple[str, str], Any] = {}
        self.published = Counter(
            "relay_publications_total", "Messages published, by transport.",
            ["transport"], registry=r)
        self.deliveries = Counter(
            "relay_deliveries_total",
            "Messages handed to subscribers' send queues, by channel mode and encoding.",
            ["mode", "encoding"], registry=r)
        self.errors = Counter(
            "relay_errors_total", "Error answers sent to clients, by code.", ["code"], registry=r)
        self.slow_consumers = Counter(
            "relay_slow_consumer_actions_total",
            "Slow-consumer actions taken (disconnect, drop, conflate).", ["action"], registry=r)
        self.recoveries = Counter(
            "relay_recoveries_total", "Subscriptions with since, by outcome.", ["recovered"],
            registry=r)
        self.http_requests = Counter(
            "relay_http_requests_total", "Plain HTTP requests, by route and status.",
            ["route", "status"], registry=r)
        self.publish_to_write = Histogram(
            "relay_publish_to_write_seconds",
            "From a publication's ingress (on the node that took the publish, so across "
            "nodes with Redis) to the first write of its fan-out on this node, by channel "
            "pattern and mode.", ["pattern", "mode"], buckets=LATENCY_BUCKETS, registry=r)
        self._latency_children: dict[tuple[str, str], Any] = {}
        #: The latest publications' latencies per (pattern, mode), for /stats percentiles.
        self.recent_latency: dict[tuple[str, str], deque[float]] = {}
        self.channels = Gauge("relay_channels", "Channels held in memory.", registry=r)
        self.draining = Gauge("relay_draining", "1 while the server drains.", registry=r)
        self._bytes_sent: Callable[[], dict[str, float]] = dict
        r.register(_FunctionCounter(
            "relay_sent_bytes", "Bytes written to clients, by encoding (json, msgpack: WebSocket; "
            "http: event streams and polls).", "encoding", lambda: self._bytes_sent()))
        # Security and load (bound by RelayServer; read at scrape time, never per message).
        self.connections_closed = Counter(
            "relay_connections_closed_total",
            "WebSocket connections closed, by close code (none: no close frame).", ["code"], registry=r)
        self._bytes_received: Callable[[], dict[str, float]] = dict
        r.register(_FunctionCounter(
            "relay_received_bytes", "Bytes of client messages received over WebSocket, by "
            "encoding (characters for text frames).", "encoding", lambda: self._bytes_received()))
        self.send_queue = Gauge(
            "relay_send_queue_bytes", "Bytes waiting in WebSocket send queues, over all connections.",
            registry=r)
        self.send_queue_max = Gauge(
            "relay_send_queue_max_bytes", "The longest WebSocket send queue, in bytes.", registry=r)
        self.client_addresses = Gauge(
            "relay_client_addresses", "Client addresses holding at least one WebSocket connection.",
            registry=r)

    def bind_presence(self, read: Callable[[], Any]) -> None:
        """Register the presence series, read from ``read()`` (a
        :class:`relay.server.presence.PresenceStatistics`) at scrape time."""
        members = Gauge("relay_presence_members",
                        "Presence members (subscribers of presence channels) on this node.",
                        registry=self.registry)
        members.set_function(lambda: float(read().members))
        self.registry.register(_FunctionCounter(
            "relay_presence_announcements", "join/leave/presence_diff messages handed to "
            "subscribers (sent), or not because the subscriber's send queue was full (skipped).",
            "outcome", lambda: {"sent": read().announced, "skipped": read().skipped}))

    def bind_channels(self, count: Callable[[], int]) -> None:
        """Make the ``relay_channels`` gauge read ``count()`` at scrape time."""
        self.channels.set_function(count)

    def bind_bytes_sent(self, read: Callable[[], dict[str, float]]) -> None:
        """Make ``relay_sent_bytes_total`` read ``read()`` (encoding -> bytes) at scrape time."""
        self._bytes_sent = read

    def bind_load(self, bytes_received: Callable[[], dict[str, float]], queue_sizes: Callable[[], list[int]],
                  addresses: Callable[[], int]) -> None:
        """Make ``relay_received_bytes_total``, the send-queue gauges and
        ``relay_client_addresses`` read these functions at scrape time."""
        self._bytes_received = bytes_received
        self.send_queue.set_function(lambda: float(sum(queue_sizes())))
        self.send_queue_max.set_function(lambda: float(max(queue_sizes(), default=0)))
        self.client_addresses.set_function(lambda: float(addresses()))

    def bind_lag(self, read: Callable[[], list[tuple[int, float]]]) -> None:
        """Export per-connection lag: ``read()`` gives (bytes waiting, age in seconds of the
        oldest waiting message) for each open connection, at scrape time."""
        self.registry.register(_LagCollector(read))

    def sent(self, kind: str, encoding: str, n: int = 1) -> None:
        """Count ``n`` messages of type ``kind`` sent in ``encoding`` (answers, recovered history)."""
        child = self._out_children.get((kind, encoding))
        if child is None:
            child = self._out_children[(kind, encoding)] = self.messages_out.labels(kind, encoding)
        child.inc(n)

    def bind_redis(self, shards: Callable[[], list[tuple[str, bool, int]]]) -> None:
        """Export the Redis bridge's state (``shards()``: address, up, connects per shard)
        and time publishes through it (:attr:`redis_publish`)."""
        self.redis_publish = Histogram(
            "relay_redis_publish_seconds",
            "Round trip of a publish through Redis (the script that assigns the offset, appends "
            "to the stream and publishes), from the node's submit to Redis' answer.",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_RedisCollector(shards))

    def written(self, batch: list[tuple[float, str, str]], now: float) -> None:
        """Record publish-to-write latency for ``batch``: (ingress unix time, pattern,
        mode) of each publication whose fan-out was just written at unix time ``now``."""
        children, recent = self._latency_children, self.recent_latency
        for ingress, pattern, mode in batch:
            key = (pattern, mode)
            child = children.get(key)
            if child is None:
                child = children[key] = self.publish_to_write.labels(pattern, mode)
                recent[key] = deque(maxlen=RECENT_LATENCIES)
            latency = max(0.0, now - ingress)
            child.observe(latency)
            recent[key].append(latency)

    def delivered(self, members: Any, mode: str) -> None:
        """Count one publication handed to ``members`` (a ``fastpath.Members``) by encoding."""
        for encoding, codec in enumerate(CODECS):
            n = members.count(encoding)
            if n:
                self.deliveries.labels(mode, codec.name).inc(n)

    def slow_consumer(self, action: str, n: int = 1) -> None:
        self.slow_consumers.labels(action).inc(n)

    def recovery(self, recovered: bool) -> None:
        self.recoveries.labels("true" if recovered else "false").inc()

    def render(self) -> bytes:
        """Return the Prometheus text exposition."""
        return generate_latest(self.registry)
