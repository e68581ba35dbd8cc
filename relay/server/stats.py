"""``GET /stats`` (a JSON snapshot for people and scripts) and the status page at ``/``.

The snapshot is read from the server's metrics registry and state when asked for, so it
costs nothing between requests. The status page (:mod:`relay.server.status_page`) is one
HTML document that polls ``/stats`` every second and shows counts and per-second rates
computed from successive snapshots; it needs nothing but the browser.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from .._version import __version__
from . import lag
from .status_page import STATUS_PAGE

_PAGE = STATUS_PAGE.encode()

if TYPE_CHECKING:
    from .app import RelayServer

def _families(server: RelayServer) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for family in server.metrics.registry.collect():
        for sample in family.samples:
            out[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _total(found: dict[tuple[tuple[str, str], ...], float]) -> int:
    return int(sum(found.values()))


def _by(found: dict[tuple[tuple[str, str], ...], float], label: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for labels, value in found.items():
        key = dict(labels).get(label, "")
        out[key] = out.get(key, 0) + int(value)
    return dict(sorted(out.items()))


def _percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank ``q``-quantile of a sorted, non-empty list."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def latency(server: RelayServer) -> list[dict[str, Any]]:
    """Publish-to-write latency percentiles (ms) over the latest publications, per
    channel pattern (see ``relay_publish_to_write_seconds`` for the full histogram)."""
    rows = []
    for (pattern, mode), recent in sorted(server.metrics.recent_latency.items()):
        ordered = sorted(recent)
        if not ordered:
            continue
        row: dict[str, Any] = {"pattern": pattern, "mode": mode, "samples": len(ordered)}
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)):
            row[name] = round(_percentile(ordered, q) * 1000, 3)
        row["max"] = round(ordered[-1] * 1000, 3)
        rows.append(row)
    return rows


def snapshot(server: RelayServer) -> dict[str, Any]:
    """Return the server's counts and totals now (see docs/operations.md for each field)."""
    m = _families(server)
    hub = server.hub.statistics()
    queues = [conn.outbox.size for conn in server.connections.values()]
    return {
        "node": server.node_id,
        "version": __version__,
        "time": round(time.time(), 3),
        "uptime_seconds": round(time.time() - server.started_at, 3),
        "draining": server.draining,
        "connections": {
            "active": len(server.connections),
            "client_addresses": server.security.caps.addresses(),
            "accepted_total": _total(m["relay_connections_total"]),
            "closed_total": _by(m["relay_connections_closed_total"], "code"),
        },
        "channels": hub.channels,
        "subscriptions": hub.subscriptions,
        "messages": {
            "received_total": _total(m["relay_messages_received_total"]),
            "published_total": _total(m["relay_publications_total"]),
            "delivered_total": _total(m["relay_deliveries_total"]),
        },
        "bytes": {
            "received_total": int(server.security.bytes_received),
            "sent_total": int(server.bytes_sent),
        },
        "send_queue": {"bytes": sum(queues), "max_bytes": max(queues, default=0)},
        "errors_total": _by(m["relay_errors_total"], "code"),
        "handshakes_refused_total": _by(m["relay_handshakes_refused_total"], "reason"),
        "slow_consumer_actions_total": _by(m["relay_slow_consumer_actions_total"], "action"),
        "publish_to_write_ms": latency(server),
        "lag": lag.summary(lag.lags(server.connections.values())),
        "presence": dataclasses.asdict(server.hub.presence.statistics()),
    }


def status_page() -> bytes:
    """Return the status page's HTML."""
    return _PAGE


__all__ = ["snapshot", "status_page"]
