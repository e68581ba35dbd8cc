"""What a ``relay bench`` run is told to do: :class:`Settings`, :class:`BenchError` and the constants.

Owns the benchmark's fixed numbers (limits, the W1 ladder, timeouts, the bundled peers) and
where the source checkout is. It must not start processes or read ``/proc``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RelayError

#: The ``relay`` package directory (this file is relay/bench/settings.py).
PACKAGE_DIR = Path(__file__).resolve().parent.parent
SOURCE_ROOT = PACKAGE_DIR.parent
CLOAD_ENV = "RELAY_BENCH_CLOAD_SOURCE"
HOST = "127.0.0.1"
SERVER_START_SECONDS = 30.0
SERVER_STOP_SECONDS = 15.0
P99_LIMIT_US = 10_000.0
#: W1 rates in messages/s (x 1,000 subscribers = deliveries/s); the sweep starts at 100.
W1_LADDER = (12.5, 25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0)
W1_REFERENCE_RATE = 100.0
SATURATED_LOADGEN_SHARE = 0.9
#: W4 (keyed conflation): a feed of W4_KEYS symbols at W4_RATE messages/s, and the channel
#: policies it runs under, each with its own server: keyed conflation (the feature), then the
#: baselines, per-channel conflation and disconnect.
W4_RATE = 10_000.0
W4_KEYS = 500
W4_VARIANTS = ("keyed", "channel", "disconnect")
LIBRARIES = ("trio", "trio-websocket", "wsproto", "h11", "msgpack", "websockets", "Cython")
#: relay's per-client limits would stop the benchmark itself (one publisher sends 1,000+
#: messages/s; every connection comes from 127.0.0.1), so its relay runs turn them off.
#: A relay without these settings ignores unknown RELAY_* variables.
RELAY_BENCH_ENV = {
    "RELAY_LIMITS_MESSAGES_PER_SECOND": "0",
    "RELAY_LIMITS_BYTES_PER_SECOND": "0",
    "RELAY_LIMITS_MAX_CONNECTIONS_PER_IP": "0",
}
PEERS = {
    "trio-websocket-naive": "bench/peers/trio_ws_broadcast.py",
    "websockets-broadcast": "bench/peers/websockets_broadcast.py",
    "c-broadcast": "bench/peers/cbroadcast.c",  # the ceiling: what one core and the kernel allow
}


class BenchError(RelayError):
    """The benchmark cannot run (no compiler, no source, a server that does not start)."""


@dataclass
class Settings:
    """What to run; every field is recorded in the JSON report."""

    scenarios: list[str]
    impls: list[str]
    against: list[tuple[str, str]]
    quick: bool = False
    encoding: str = "json"
    payload_bytes: int = 64
    server_cpus: str = "0"
    load_cpus: str = "1"
    load_procs: int = 1
    load_threads: int = 1
    batch_us: float = 0.0
    warmup: float = 0.5
    duration: float = 3.0
    drain: float = 3.0
    w1_subscribers: int = 1000
    w1_rates: list[float] = field(default_factory=lambda: list(W1_LADDER))
    w1_bisect: int = 1
    w2_subscribers: int = 100
    w2_rate: float = 1000.0
    w2_duration: float = 8.0
    w3_conns: int = 10_000
    w3_settle: float = 2.0
    w4_rate: float = W4_RATE
    w4_keys: int = W4_KEYS
    w4_fast_subscribers: int = 20
    w4_slow_subscribers: int = 1
    w4_slow_rate: float = 1000.0
    w4_slow_rcvbuf: int = 4096
    w4_send_queue: int = 65536
    w4_warmup: float = 2.0
    w4_duration: float = 10.0
    w4_sample_ms: float = 50.0
    w4_variants: list[str] = field(default_factory=lambda: list(W4_VARIANTS))
    #: W5 (state deltas): updates published per workload.
    w5_updates: int = 1000
    #: W6 (ticks): subscribers on ?tick_ms=N (0: no ticks), W2-like; every rate x every tick on a
    #: stream channel, then each of w6_state_ticks on a state channel at the first rate.
    w6_subscribers: int = 100
    w6_rates: list[float] = field(default_factory=lambda: [1000.0])
    w6_ticks: list[int] = field(default_factory=lambda: [0, 16, 33, 50])
    w6_state_ticks: list[int] = field(default_factory=lambda: [33])
    w6_duration: float = 5.0
    pin: bool = True
