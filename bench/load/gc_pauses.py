"""How long Python's cyclic garbage collector stops a relay server: N subscribers on one
channel, a publisher at RATE messages/s for SECONDS, every collection timed by a
``gc.callbacks`` hook (wall time of each collection, by generation), and one full
``gc.collect()`` timed before the load starts.

    PYTHONPATH=. taskset -c 0 python bench/load/gc_pauses.py 1000 1000
    PYTHONPATH=. taskset -c 0 python bench/load/gc_pauses.py 10000 100 --seconds 5

One in-process server on loopback (a free port), ``relay bench``'s C load generator
(bench/load/cload.c, compiled on first use) for the subscribers and the publisher. The
server's event loop does nothing else while a collection runs, so the longest
collections are a floor for the publish-to-deliver tail. Results in docs/performance.md
("Garbage collection pauses"). Not a test: nothing here asserts a limit.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import time
from typing import Any

import trio

from relay.bench.build import build_cload
from relay.bench.settings import RELAY_BENCH_ENV
from relay.config import load_config
from relay.server.app import RelayServer


async def measure(conns: int, rate: int, seconds: float) -> dict[str, Any]:
    cload = str(build_cload())
    cfg = load_config(env={"RELAY_PORT": "0", **RELAY_BENCH_ENV})
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append(time.perf_counter() - started[0])

    count = int(rate * seconds)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(RelayServer(cfg).run)
        port = str(server.port)
        sub = await trio.lowlevel.open_process(
            [cload, "sub", "--port", port, "--conns", str(conns), "--hold", "--start", "now",
             "--duration", str(seconds + 60), "--first-seq", "0", "--last-seq", str(count - 1)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with trio.fail_after(120):
            while len(server.connections) < conns:
                await trio.sleep(0.2)
        await trio.sleep(1)
        before = time.perf_counter()
        gc.collect()
        full = time.perf_counter() - before
        tracked = len(gc.get_objects())
        gc.callbacks.append(timed)
        try:
            pub = await trio.lowlevel.open_process(
                [cload, "pub", "--port", port, "--rate", str(rate), "--count", str(count),
                 "--start", "now"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await pub.wait()
            await trio.sleep(0.5)
        finally:
            gc.callbacks.remove(timed)
        sub.kill()
        nursery.cancel_scope.cancel()
    return {
        "connections": conns, "rate": rate, "seconds": seconds, "tracked_objects": tracked,
        "full_collect_ms": round(full * 1e3, 2),
        "collections": {f"gen{g}": {"count": len(p), "max_ms": round(max(p, default=0) * 1e3, 2),
                                    "total_ms": round(sum(p) * 1e3, 2)} for g, p in pauses.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("connections", type=int)
    parser.add_argument("rate", type=int, help="messages/s published to the one channel")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    result = trio.run(measure, args.connections, args.rate, args.seconds)
    print(result)


if __name__ == "__main__":
    main()
