"""Two relay nodes on one Redis: what Redis adds to publish-to-deliver latency, and how many
messages one node takes in from Redis.

    python bench/load/redis_nodes.py                 # about 40 s
    python bench/load/redis_nodes.py --rates 1000,10000 --duration 8 --json out.json

Starts a redis-server (no persistence) on a free loopback port and three
``relay serve`` processes: a single node without Redis (the baseline) and nodes A and B on
the Redis. Scenarios:

- ``single``: subscriber and publisher on the single node (in memory);
- ``two-node``: subscribers on A, publisher on B (every message goes B -> Redis -> A);
- ``same-node``: subscriber and publisher both on A, through Redis.

Each run uses ``relay bench``'s C load generator (bench/load/cload.c, compiled here):
``--subscribers`` connections read, one publisher sends each of ``--rates`` messages/s for
``--duration`` s after a 1 s warm-up, each message carrying its send time
(CLOCK_MONOTONIC, shared by every process); cload checks loss and order and reports
publish-to-deliver latency. ``intake`` repeats ``two-node`` at higher rates: how much one
node takes in from Redis, with its CPU share from /proc.

The difference between ``single`` and ``two-node`` is what Redis adds. Not a test: nothing
here asserts a limit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def process(cmd: list[str], env: dict[str, str] | None = None) -> AsyncIterator[trio.Process]:
    proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, env=env)
    try:
        yield proc
    finally:
        proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()


async def wait_port(port: int, timeout: float = 15) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


async def wait_ready(port: int, timeout: float = 15) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    data = b""
                    while chunk := await stream.receive_some(4096):
                        data += chunk
                if data.startswith(b"HTTP/1.1 200"):
                    return
            except OSError:
                pass
            await trio.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def build_cload(work: Path) -> Path:
    """Compile bench/load/cload.c (the C load generator of ``relay bench``) into ``work``."""
    exe = work / "cload"
    subprocess.run(["cc", "-O2", "-pthread", "-o", str(exe), str(REPO / "bench" / "load" / "cload.c")], check=True)
    return exe


def _json_line(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        try:
            return json.loads(line)  # type: ignore[no-any-return]
        except json.JSONDecodeError:
            continue
    raise RuntimeError(f"load generator gave no result: {proc.args}")


def _say(proc: subprocess.Popen[bytes], line: str) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(line.encode() + b"\n")
        proc.stdin.flush()
    except BrokenPipeError:
        pass


def run(exe: Path, pub_port: int, sub_port: int, node_pid: int, subscribers: int, rate: int,
        warmup: float, duration: float, others: dict[str, int] | None = None) -> dict[str, Any]:
    """Subscribers on ``sub_port``, one publisher on ``pub_port`` at ``rate`` msg/s; the facts."""
    warm_n, meas_n = round(rate * warmup), max(2, round(rate * duration))
    first, last = warm_n, warm_n + meas_n - 1
    sub = subprocess.Popen(
        [str(exe), "sub", "--port", str(sub_port), "--conns", str(subscribers), "--first-seq", str(first),
         "--last-seq", str(last), "--duration", f"{warmup + duration + 5:.1f}", "--start", "stdin", "--hold"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    pub = None
    try:
        ready = _json_line(sub, 60)
        assert ready.get("event") == "ready" and not ready.get("failed"), ready
        start_at = time.monotonic_ns() + 300_000_000
        pub = subprocess.Popen(
            [str(exe), "pub", "--port", str(pub_port), "--rate", str(rate), "--count", str(warm_n + meas_n),
             "--measure-from", str(warm_n), "--start", str(start_at), "--linger", f"{warmup + duration + 30:.0f}",
             "--late-limit", "5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        left = (start_at + int(warmup * 1e9) - time.monotonic_ns()) / 1e9
        if left > 0:
            time.sleep(left)
        others = others or {}
        cpu0, t0 = cpu_seconds(node_pid), time.monotonic()
        other0 = {name: cpu_seconds(pid) for name, pid in others.items()}
        _say(sub, "start")
        result = _json_line(sub, warmup + duration + 40)
        cpu1, t1 = cpu_seconds(node_pid), time.monotonic()
        other1 = {name: cpu_seconds(pid) for name, pid in others.items()}
        published = _json_line(pub, 30)
    finally:
        _say(sub, "close")
        if pub is not None:
            _say(pub, "stop")
        for proc in (sub, pub):
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    received = result.get("received", 0)
    span = (result["last_delivery_ns"] - result["first_delivery_ns"]) / 1e9 if result.get("first_delivery_ns") else 0
    return {
        "subscribers": subscribers, "rate": rate, "loss": result.get("loss"),
        "deliveries_per_s": round(received / span) if span else None,
        "latency_us": {k: result["latency_us"].get(k) for k in ("p50", "p90", "p99", "p99.9", "max")},
        "arrival_latency_us": {k: (result.get("arrival_latency_us") or {}).get(k) for k in ("p50", "p99")},
        "subscriber_node_cpu_share": round((cpu1 - cpu0) / (t1 - t0), 2),
        **{f"{name}_cpu_share": round((other1[name] - other0[name]) / (t1 - t0), 2) for name in others},
        "publisher_achieved_rate": published.get("achieved_rate"),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    work = Path(tempfile.mkdtemp(prefix="relay-bench-redis-"))
    (work / "relay.toml").write_text("[limits]\nmessages_per_second = 0\nbytes_per_second = 0\n"
                                     "[[channels]]\npattern = '*'\nhistory_size = 100\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    redis_port, single_port, a_port, b_port = free_port(), free_port(), free_port(), free_port()
    relay = [sys.executable, "-m", "relay", "serve", "--log-level", "warning", "--config", str(work / "relay.toml")]
    url = f"redis://127.0.0.1:{redis_port}/0"
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "fastpath": os.environ.get("RELAY_PURE_PYTHON") and "python" or "default"},
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                 text=True).stdout.strip(),
        "settings": {"rates": args.rates, "duration": args.duration, "subscribers": args.subscribers},
    }
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(process(
            [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(work)]))
        await wait_port(redis_port)
        await stack.enter_async_context(process([*relay, "--port", str(single_port), "--node-id", "single"], env))
        await stack.enter_async_context(process([*relay, "--port", str(a_port), "--node-id", "a", "--redis-url", url], env))
        await stack.enter_async_context(
            process([*relay, "--port", str(b_port), "--node-id", "b", "--redis-url", url], env))
        for port in (single_port, a_port, b_port):
            await wait_ready(port)
        pids = {port: _pid_listening(port) for port in (single_port, a_port, b_port)}
        others = {"publisher_node": pids[b_port], "redis": _pid_listening(redis_port)}
        exe = build_cload(work)
        n = args.subscribers
        for name, pub, sub in (("single", single_port, single_port), ("two-node", b_port, a_port),
                               ("same-node", a_port, a_port)):
            results[name] = []
            for rate in args.rates:
                r = await trio.to_thread.run_sync(
                    run, exe, pub, sub, pids[sub], n, rate, 1.0, args.duration, others)
                results[name].append(r)
                print(name, r, flush=True)
        results["intake"] = []
        for rate in args.intake_rates:
            r = await trio.to_thread.run_sync(run, exe, b_port, a_port, pids[a_port], n, rate, 1.0, args.duration,
                                              others)
            results["intake"].append(r)
            print("intake", r, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return results


def _pid_listening(port: int) -> int:
    """The pid of the relay process listening on ``port`` (read from /proc)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[3] == "0A" and int(parts[1].split(":")[1], 16) == port:
            inode = parts[9]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return int(pid)
        except OSError:
            continue
    raise RuntimeError(f"no process listens on port {port}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=lambda v: [int(x) for x in v.split(",")], default=[1_000, 5_000, 10_000],
                        help="messages/s of the latency runs, comma-separated (default 1000,5000,10000)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per run (default 8)")
    parser.add_argument("--subscribers", type=int, default=10, help="subscribers per run (default 10)")
    parser.add_argument("--intake-rates", type=lambda v: [int(x) for x in v.split(",")], default=[20_000, 40_000],
                        help="publish rates for the intake runs, comma-separated (default 20000,40000)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    arguments = parser.parse_args()
    out = trio.run(main, arguments)
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(out, indent=2) + "\n")
