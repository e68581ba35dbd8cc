"""Why relay talks to Redis with its own trio client: the two candidates, measured.

    python bench/load/redis_client_choice.py          # about 20 s; needs redis-server

Starts a redis-server (no persistence) on a free loopback port and, inside one trio
program, measures:

- ``rtt``: 2,000 sequential ``PUBLISH`` round trips (the shape of an ``ack`` on a quiet
  channel), through (a) redis-py's synchronous client called with
  ``trio.to_thread.run_sync``, (b) redis-py in one long-lived thread fed by a queue (pipelining
  its backlog), answering through ``TrioToken.run_sync_soon``, and (c) relay's
  ``relay.broker.redis.Pipeline`` (hiredis parser, trio socket);
- ``burst``: 20,000 publishes submitted at once (how each path pipelines under load).
"""

from __future__ import annotations

import json
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from relay.broker.redis import Endpoint, Link, Pipeline  # noqa: E402

N_RTT = 2_000
N_BURST = 20_000


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_us": round(ordered[len(ordered) // 2], 1), "p99_us": round(ordered[int(len(ordered) * 0.99)], 1),
            "mean_us": round(statistics.fmean(ordered), 1)}


class _ThreadPublisher:
    """redis-py in one dedicated thread; results come back with ``run_sync_soon``."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.jobs: queue.SimpleQueue[tuple[tuple[Any, ...], Callable[[Any], None]] | None] = queue.SimpleQueue()
        self.token = trio.lowlevel.current_trio_token()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            batch = [job]
            while True:  # drain what queued meanwhile into one pipeline
                try:
                    more = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.jobs.put(None)
                    break
                batch.append(more)
            if len(batch) == 1:
                results = [self.client.execute_command(*batch[0][0])]
            else:
                pipe = self.client.pipeline(transaction=False)
                for args, _ in batch:
                    pipe.execute_command(*args)
                results = pipe.execute()
            for (_, done), result in zip(batch, results):
                self.token.run_sync_soon(done, result)

    def submit(self, args: tuple[Any, ...], done: Callable[[Any], None]) -> None:
        self.jobs.put((args, done))

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self.client.close()


async def _rtt(call: Callable[[], Any]) -> dict[str, float]:
    samples = []
    for _ in range(N_RTT):
        t0 = time.perf_counter_ns()
        await call()
        samples.append((time.perf_counter_ns() - t0) / 1000)
    return _summary(samples)


async def _burst(submit: Callable[[Callable[[Any], None]], None]) -> float:
    done = trio.Event()
    left = N_BURST

    def one(_: Any) -> None:
        nonlocal left
        left -= 1
        if not left:
            done.set()

    t0 = time.perf_counter()
    for _ in range(N_BURST):
        submit(one)
    await done.wait()
    return round(N_BURST / (time.perf_counter() - t0))


async def main() -> dict[str, Any]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed")
    port, work = _free_port(), tempfile.mkdtemp(prefix="relay-redis-choice-")
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", work], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    out: dict[str, Any] = {"redis_py": redis.__version__}
    try:
        for _ in range(100):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        args = ("PUBLISH", "bench", b"x" * 64)

        sync = redis.Redis.from_url(url)
        out["a_to_thread_per_call"] = {"rtt": await _rtt(lambda: trio.to_thread.run_sync(sync.execute_command, *args))}
        sync.close()

        threaded = _ThreadPublisher(url)

        async def thread_call() -> Any:
            event, box = trio.Event(), []
            threaded.submit(args, lambda r: (box.append(r), event.set()))
            await event.wait()
            return box[0]

        out["b_dedicated_thread"] = {"rtt": await _rtt(thread_call),
                                     "burst_per_s": await _burst(lambda done: threaded.submit(args, done))}
        threaded.close()

        link = await Link.open(Endpoint.parse(url), "bench")
        pipeline = Pipeline(link, N_BURST + 10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipeline.run)
            out["c_trio_hiredis"] = {"rtt": await _rtt(lambda: pipeline.call(*args)),
                                     "burst_per_s": await _burst(lambda done: pipeline.submit(args, done))}
            nursery.cancel_scope.cancel()
        await link.aclose()
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    print(json.dumps(trio.run(main), indent=2))
