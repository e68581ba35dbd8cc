"""The load generator's processes: cload subscribers and publisher I/O, and merging their results.

Owns starting ``--load-procs`` cload subscriber processes, talking to children over
stdin/stdout JSON lines with deadlines, and adding their results up (percentiles from the
merged histogram). It must not judge results or start servers.
"""

from __future__ import annotations

import json
import math
import os
import select
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .procfs import _taskset
from .settings import HOST, BenchError, Settings


class JsonLines:
    """Read JSON lines from a child's stdout with deadlines (never blocks past them)."""

    def __init__(self, proc: subprocess.Popen[bytes], what: str) -> None:
        assert proc.stdout is not None
        self.proc, self.what, self.fd, self.buf = proc, what, proc.stdout.fileno(), b""

    def read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.what}: no answer within {timeout:.0f} s")
            r, _, _ = select.select([self.fd], [], [], left)
            if not r:
                continue
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                code = self.proc.wait(5)
                raise BenchError(f"{self.what} exited with {code} before answering")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            obj: dict[str, Any] = json.loads(line)
        except ValueError as exc:
            raise BenchError(f"{self.what}: unreadable output {line[:200]!r}") from exc
        return obj


def _say(proc: subprocess.Popen[bytes], line: str) -> None:
    if proc.stdin is None or proc.poll() is not None:
        return
    try:
        proc.stdin.write(line.encode() + b"\n")
        proc.stdin.flush()
    except (BrokenPipeError, OSError):
        pass  # the child already exited; its exit is noticed where it is waited for


def _finish(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """Close the child's stdin and wait for it; kill it if it does not exit in time."""
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # already gone
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


class Loaders:
    """``--load-procs`` cload subscriber processes sharing N connections."""

    def __init__(self, exe: Path, s: Settings, port: int, conns: int, first_seq: int, last_seq: int,
                 max_seconds: float, extra_args: Sequence[str] = ()) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.readers: list[JsonLines] = []
        nprocs = max(1, min(s.load_procs, conns))
        base = 0
        for i in range(nprocs):
            n = conns // nprocs + (i < conns % nprocs)
            argv = [*_taskset(s.load_cpus if s.pin else None), str(exe), "sub", "--host", HOST, "--port", str(port),
                    "--conns", str(n), "--threads", str(max(1, min(s.load_threads, n))),
                    "--index-base", str(base), "--encoding", s.encoding, "--first-seq", str(first_seq),
                    "--last-seq", str(last_seq), "--duration", f"{max_seconds:.3f}", "--start", "stdin",
                    "--hold", "--connect-timeout", str(max(60, conns // 50)), "--batch-us", f"{s.batch_us:g}",
                    *extra_args]
            base += n
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self.procs.append(p)
            self.readers.append(JsonLines(p, f"load generator {i}"))
        self.argv_example = argv

    def ready(self, timeout: float) -> dict[str, Any]:
        events = [r.read(timeout) for r in self.readers]
        return {"subscribed": sum(e.get("subscribed", 0) for e in events),
                "failed": sum(e.get("failed", 0) for e in events),
                "seconds": max(e.get("seconds", 0.0) for e in events)}

    def say(self, line: str) -> None:
        for p in self.procs:
            _say(p, line)

    def results(self, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        return [r.read(max(0.1, deadline - time.monotonic())) for r in self.readers]

    def finish(self) -> None:
        self.say("close")
        for p in self.procs:
            _finish(p, 15)


def merge_sub_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Add up several cload results; percentiles from the merged histogram."""
    if len(results) == 1:
        single = dict(results[0])
        single.pop("latency_hist_ns", None)
        single.pop("read_delay_hist_ns", None)
        single.pop("arrival_latency_hist_ns", None)
        return single
    summed = ("conns", "subscribed", "connect_failed", "expected", "received", "loss", "loss_gaps", "loss_late",
              "deliveries_all", "conns_done", "conns_closed", "offset_gap_events", "offset_missing",
              "out_of_order", "seq_gap_events", "seq_missing", "duplicates", "gap_messages", "error_messages",
              "other_messages", "unparsed_messages", "pings", "control_sends_dropped", "eof", "resets",
              "protocol_errors", "clock_anomalies", "closes", "bytes", "reads", "frames", "epoll_rounds",
              "msg_frames", "msg_frame_bytes", "array_frames")
    out: dict[str, Any] = {k: sum(r.get(k, 0) for r in results) for k in summed}
    out["threads"] = sum(r.get("threads", 0) for r in results)
    firsts = [r["first_delivery_ns"] for r in results if r.get("first_delivery_ns")]
    lasts = [r["last_delivery_ns"] for r in results if r.get("last_delivery_ns")]
    out["first_delivery_ns"] = min(firsts) if firsts else 0
    out["last_delivery_ns"] = max(lasts) if lasts else 0
    out["start_ns"] = min(r["start_ns"] for r in results)
    out["stop_ns"] = max(r["stop_ns"] for r in results)
    codes: dict[str, int] = {}
    for r in results:
        for k, v in r.get("closes_by_code", {}).items():
            codes[k] = codes.get(k, 0) + v
    out["closes_by_code"] = codes
    out["cpu"] = {"user_s": sum(r["cpu"]["user_s"] for r in results), "sys_s": sum(r["cpu"]["sys_s"] for r in results),
                  "wall_s": max(r["cpu"]["wall_s"] for r in results)}
    out["errors"] = [e for r in results for e in r.get("errors", [])][:20]
    out["per_conn_received"] = {
        "min": min(r["per_conn_received"]["min"] for r in results),
        "max": max(r["per_conn_received"]["max"] for r in results),
        "zero": sum(r["per_conn_received"]["zero"] for r in results)}
    out["stopped_by"] = ",".join(sorted({r.get("stopped_by", "?") for r in results}))
    lines = [r["timeline"] for r in results if r.get("timeline")]
    if lines:
        n = max(len(tl["max_us"]) for tl in lines)
        counts = [sum(tl["count"][i] for tl in lines if i < len(tl["count"])) for i in range(n)]
        out["timeline"] = {
            "bucket_ms": lines[0]["bucket_ms"],
            "max_us": [max(tl["max_us"][i] for tl in lines if i < len(tl["max_us"])) for i in range(n)],
            "mean_us": [round(sum(tl["mean_us"][i] * tl["count"][i] for tl in lines if i < len(tl["count"]))
                              / counts[i]) if counts[i] else 0 for i in range(n)],
            "count": counts}
    for name in ("latency", "read_delay", "arrival_latency"):
        buckets: dict[int, int] = {}
        for r in results:
            for upper, n in r.get(f"{name}_hist_ns", []):
                buckets[upper] = buckets.get(upper, 0) + n
        parts = [r[f"{name}_us"] for r in results if r.get(f"{name}_us", {}).get("count")]
        out[f"{name}_us"] = _hist_summary(sorted(buckets.items()), parts)
    return out


def _hist_summary(buckets: list[tuple[int, int]], parts: list[dict[str, Any]]) -> dict[str, Any]:
    count = sum(n for _, n in buckets)
    if not count:
        return {"count": 0}
    mx = float(max(p["max"] for p in parts))
    mn = float(min(p["min"] for p in parts))

    def pct(q: float) -> float:
        rank = max(1, math.ceil(q / 100 * count))
        cum = 0
        for upper, n in buckets:
            cum += n
            if cum >= rank:
                return round(min(max(upper / 1e3, mn), mx), 1)
        return mx

    mean = sum(p["mean"] * p["count"] for p in parts) / count
    return {"count": count, "min": mn, "mean": round(mean, 1), "p50": pct(50), "p90": pct(90), "p99": pct(99),
            "p99.9": pct(99.9), "max": mx}
