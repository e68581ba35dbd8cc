"""``relay bench``: the end-to-end load scenarios W1-W3, against relay and other servers.

Each measurement starts a fresh server process (relay, or any command given with
``--against``) pinned to its own CPU, drives it over loopback with the C load generator
``bench/load/cload.c`` (compiled on first use) pinned to the other CPUs, and reads the
server's CPU time and memory from ``/proc``. Scenarios:

* ``w1``: fan-out, 1,000 subscribers on one channel and one publisher; a rate sweep finds
  the highest deliveries/s with zero loss and p99 <= 10 ms, and reports the p99 at
  100,000 deliveries/s.
* ``w2``: a small room, 100 subscribers and 1,000 messages/s: p50/p99.
* ``w3``: 10,000 idle subscribed connections: server memory per connection (VmRSS).

It owns processes, not protocol: it never imports the server. Everything it starts is
bounded in time and stopped in ``finally`` blocks; it only connects to 127.0.0.1.
See bench/load/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import http.client
import json
import math
import os
import platform
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import RelayError

PACKAGE_DIR = Path(__file__).resolve().parent
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
_LABEL_RE = re.compile(r"^([a-z0-9][a-z0-9_.-]{0,40})=(.+)$", re.DOTALL)


class BenchError(RelayError):
    """The benchmark cannot run (no compiler, no source, a server that does not start)."""


# -- settings ---------------------------------------------------------------------------


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
    pin: bool = True


@dataclass
class ServerSpec:
    """A server to measure: a name and a command with ``{port}`` (and ``{python}``)."""

    name: str
    command: str
    env: dict[str, str] = field(default_factory=dict)
    unset_env: tuple[str, ...] = ()
    relay_impl: str | None = None  # "compiled" / "pure" for relay itself

    def argv(self, port: int) -> list[str]:
        return [a.replace("{port}", str(port)).replace("{python}", sys.executable) for a in shlex.split(self.command)]


def relay_spec(impl: str) -> ServerSpec:
    """Return the spec that runs this relay (the package this module belongs to)."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")])),
           **RELAY_BENCH_ENV}
    unset: tuple[str, ...] = ("RELAY_PURE_PYTHON",)
    if impl == "pure":
        env["RELAY_PURE_PYTHON"] = "1"
        unset = ()
    return ServerSpec(
        name=f"relay-{impl}",
        command="{python} -m relay serve --host 127.0.0.1 --port {port} --node-id bench",
        env=env,
        unset_env=unset,
        relay_impl=impl,
    )


def peer_specs() -> list[ServerSpec]:
    """Return the bundled peer servers of bench/peers (source checkout only)."""
    specs = []
    for name, rel in PEERS.items():
        path = SOURCE_ROOT / rel
        if not path.exists():
            raise BenchError(f"--peers needs {rel} from a relay source checkout; not found at {path}")
        if path.suffix == ".c":
            exe = build_c_program(path)
            specs.append(ServerSpec(name=name, command=f"{shlex.quote(str(exe))} --port {{port}}"))
        else:
            specs.append(ServerSpec(name=name, command=f"{{python}} {shlex.quote(str(path))} --port {{port}}"))
    return specs


def against_spec(text: str, index: int) -> ServerSpec:
    """Parse ``[label=]COMMAND``; the label defaults to the script or program name."""
    m = _LABEL_RE.match(text)
    label, command = (m.group(1), m.group(2)) if m else (None, text)
    if "{port}" not in command:
        raise BenchError(f"--against {text!r}: the command needs a {{port}} placeholder")
    if label is None:
        words = shlex.split(command)
        scripts = [w for w in words if w.endswith((".py", ".js", ".mjs"))]
        label = Path(scripts[0] if scripts else words[0]).stem or f"against{index}"
    return ServerSpec(name=label, command=command)


# -- the C load generator -----------------------------------------------------------------


def cload_source() -> Path:
    """Return the path of cload.c: ``$RELAY_BENCH_CLOAD_SOURCE`` or the source checkout's."""
    env = os.environ.get(CLOAD_ENV)
    src = Path(env) if env else SOURCE_ROOT / "bench" / "load" / "cload.c"
    if not src.is_file():
        raise BenchError(
            f"relay bench needs the load generator's source, {src}; it is part of a relay "
            f"source checkout (bench/load/cload.c), not of the wheel. Run from a checkout or "
            f"set {CLOAD_ENV} to the file.")
    return src


def find_compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or (cc if Path(cc).exists() else None)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def build_cload() -> Path:
    """Compile the load generator (bench/load/cload.c) if needed; return the binary.

    Raises:
        BenchError: no source, no C compiler, or the compile failed.
    """
    return build_c_program(cload_source())


def build_c_program(src: Path, verbose: bool = True) -> Path:
    """Compile ``src`` (``cc -O2 -pthread``) into a cache keyed by its hash; return the binary.

    The cache is ``.build/`` beside the source, else ``~/.cache/relay-bench``.

    Raises:
        BenchError: no C compiler, or the compile failed.
    """
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    candidates = [src.parent / ".build", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "relay-bench"]
    for cache in candidates:
        exe = cache / f"{src.stem}-{digest}"
        if os.access(exe, os.X_OK):
            return exe
    cc = find_compiler()
    if cc is None:
        raise BenchError(
            f"relay bench compiles {src.name} and found no C compiler: set CC or install one "
            "(Debian/Ubuntu: apt-get install gcc).")
    errors = []
    for cache in candidates:
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            errors.append(f"{cache}: {exc}")
            continue
        exe = cache / f"{src.stem}-{digest}"
        tmp = cache / f".{src.stem}-{digest}.{os.getpid()}"
        cmd = [cc, "-O2", "-pthread", "-o", str(tmp), str(src)]
        if verbose:
            print(f"relay bench: compiling {src.name}: {' '.join(cmd)}", file=sys.stderr)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"compiling {src} with {cc} failed: {exc}") from exc
        if proc.returncode != 0:
            raise BenchError(f"compiling {src} with {cc} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        os.replace(tmp, exe)
        return exe
    raise BenchError("no writable cache directory for the load generator: " + "; ".join(errors))


# -- processes ------------------------------------------------------------------------------


def _taskset(cpus: str | None) -> list[str]:
    if cpus is None:
        return []
    exe = shutil.which("taskset")
    return [exe, "-c", cpus] if exe else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def proc_cpu_ns(pid: int) -> int | None:
    """Return the CPU time of every live thread of ``pid`` in ns (scheduler accounting).

    Uses ``se.sum_exec_runtime`` from /proc/PID/task/*/sched (ns resolution) when the
    kernel has it, else utime+stime from /proc/PID/stat (clock ticks). None when gone.
    """
    total = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    ok = False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/sched") as f:
                for line in f:
                    if line.startswith("se.sum_exec_runtime"):
                        total += float(line.split(":")[1]) * 1e6  # ms -> ns
                        ok = True
                        break
        except OSError:
            continue
    if ok:
        return int(total)
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(parts[11]) + int(parts[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def proc_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
Jiffies = dict[str, list[int]]


def cpu_jiffies() -> Jiffies:
    """Return {"cpu": [user, nice, system, idle, iowait, irq, softirq, steal], "cpu0": ...}."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *vals = line.split()
            out[name] = [int(v) for v in vals[:8]] + [0] * (8 - len(vals[:8]))
    return out


def busy_share(a: Jiffies, b: Jiffies, cpus: Sequence[int] | None) -> float | None:
    """Share of time the CPUs were busy (everything but idle and iowait) between a and b."""
    names = ["cpu"] if cpus is None else [f"cpu{c}" for c in cpus]
    busy = total = 0
    for n in names:
        if n in a and n in b:
            d = [y - x for x, y in zip(a[n], b[n])]
            total += sum(d)
            busy += sum(d) - d[3] - d[4]
    return round(busy / total, 3) if total > 0 else None


def cpu_breakdown(a: Jiffies, b: Jiffies, cpus: Sequence[int] | None) -> dict[str, float]:
    """Shares of user/system/softirq/steal/... time on the CPUs between a and b."""
    names = ["cpu"] if cpus is None else [f"cpu{c}" for c in cpus]
    sums = [0] * 8
    for n in names:
        if n in a and n in b:
            for i, (x, y) in enumerate(zip(a[n], b[n])):
                sums[i] += y - x
    total = sum(sums)
    return {f: round(v / total, 3) for f, v in zip(_STAT_FIELDS, sums) if total and v} if total else {}


def all_process_cpu() -> dict[int, tuple[str, int]]:
    """Return {pid: (name, utime+stime ticks)} of every process, to see who else was busy."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                text = f.read()
        except OSError:
            continue  # exited meanwhile
        name = text[text.find("(") + 1:text.rfind(")")]
        parts = text[text.rfind(")") + 2:].split()
        out[int(d)] = (name, int(parts[11]) + int(parts[12]))
    return out


def other_cpu(a: dict[int, tuple[str, int]], b: dict[int, tuple[str, int]], ours: set[int],
              seconds: float) -> dict[str, Any]:
    """CPU used by processes other than ``ours`` between two snapshots, in cores."""
    tck = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for pid, (name, ticks) in b.items():
        if pid in ours:
            continue
        before = a.get(pid, (name, 0))[1] if pid in a else 0
        if ticks > before:
            used[name] = used.get(name, 0.0) + (ticks - before) / tck
    total = sum(used.values())
    top = sorted(used.items(), key=lambda kv: -kv[1])[:4]
    return {"cores": round(total / seconds, 3) if seconds > 0 else None,
            "top": {k: round(v / seconds, 3) for k, v in top if v > 0} if seconds > 0 else {}}


def parse_cpus(spec: str) -> list[int]:
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.update(range(int(lo), int(hi) + 1))
        elif part:
            cpus.add(int(part))
    return sorted(cpus)


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


class Server:
    """A server process on 127.0.0.1:port, pinned with taskset; stopped by :meth:`stop`."""

    def __init__(self, spec: ServerSpec, cpus: str | None) -> None:
        self.spec = spec
        self.port = free_port()
        self.argv = _taskset(cpus) + spec.argv(self.port)
        env = dict(os.environ)
        for k in spec.unset_env:
            env.pop(k, None)
        env.update(spec.env)
        # Open for the server's lifetime (its stdout/stderr); closed and removed by stop().
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix=f"relay-bench-{spec.name}-", suffix=".log", delete=False)
        try:
            self.proc = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            self.log.close()
            os.unlink(self.log.name)
            raise BenchError(f"{spec.name}: cannot start {self.argv}: {exc}") from exc
        self.pid = self.proc.pid
        self.exit_code: int | None = None
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection((HOST, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BenchError(f"{self.spec.name} did not listen on port {self.port} within "
                         f"{SERVER_START_SECONDS:.0f} s ({self.argv}); its log:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")
        except OSError:
            return ""

    def cpu_ns(self) -> int | None:
        return proc_cpu_ns(self.pid)

    def rss_kib(self) -> int | None:
        return proc_rss_kib(self.pid)

    def metrics(self) -> dict[str, Any]:
        """relay only: the fast path it reports and its plain counters from /metrics."""
        if self.spec.relay_impl is None:
            return {}
        try:
            conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
            try:
                conn.request("GET", "/metrics")
                text = conn.getresponse().read().decode("utf-8", "replace")
            finally:
                conn.close()
        except OSError as exc:
            return {"error": f"cannot read /metrics: {exc}"}
        m = re.search(r'relay_info\{[^}]*fastpath="([^"]+)"', text)
        counters = {}
        for line in text.splitlines():
            if line.startswith(("#", "relay_info")) or "_bucket{" in line or "_created" in line:
                continue
            name, _, value = line.rpartition(" ")
            try:
                counters[name] = float(value)
            except ValueError:
                continue
        return {"fastpath": m.group(1) if m else None, "counters": counters}

    def stop(self) -> dict[str, Any]:
        """SIGTERM, then SIGKILL after SERVER_STOP_SECONDS; return the exit code and log facts."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(SERVER_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.exit_code = self.proc.returncode
        self.log.close()
        text = self.log_text()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass  # already removed
        noisy = [ln for ln in text.splitlines()
                 if any(w in ln for w in ("WARNING", "ERROR", "Traceback", "Exception", "CRITICAL"))]
        return {"exit_code": self.exit_code, "log_lines": len(text.splitlines()),
                "log_warning_count": len(noisy), "log_warnings": noisy[:20]}


# -- load generator processes -----------------------------------------------------------


class Loaders:
    """``--load-procs`` cload subscriber processes sharing N connections."""

    def __init__(self, exe: Path, s: Settings, port: int, conns: int, first_seq: int, last_seq: int,
                 max_seconds: float) -> None:
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
                    "--hold", "--connect-timeout", str(max(60, conns // 50)), "--batch-us", f"{s.batch_us:g}"]
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
              "protocol_errors", "clock_anomalies", "closes", "bytes", "reads", "frames", "epoll_rounds")
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


# -- one measurement --------------------------------------------------------------------------


def run_fanout(exe: Path, spec: ServerSpec, s: Settings, subscribers: int, rate: float, warmup: float,
               duration: float) -> dict[str, Any]:
    """Start a fresh server, connect ``subscribers``, publish at ``rate`` msg/s; return the facts."""
    warm_n = round(rate * warmup)
    meas_n = max(2, round(rate * duration))
    first_seq, last_seq = warm_n, warm_n + meas_n - 1
    res: dict[str, Any] = {"server": spec.name, "subscribers": subscribers, "rate": rate, "warmup_s": warmup,
                           "duration_s": duration, "target_deliveries_per_s": round(subscribers * rate, 1),
                           "measured_messages": meas_n}
    server = Server(spec, s.server_cpus if s.pin else None)
    loaders: Loaders | None = None
    pub: subprocess.Popen[bytes] | None = None
    try:
        res["server_argv"] = server.argv
        info = server.metrics()
        res["fastpath"] = info.get("fastpath")
        res["server_rss_kib_start"] = server.rss_kib()
        loaders = Loaders(exe, s, server.port, subscribers, first_seq, last_seq, duration + s.drain)
        ready = loaders.ready(max(60.0, subscribers / 50))
        res["connect"] = ready
        if ready["failed"]:
            loaders.say("stop")
            sub = merge_sub_results(loaders.results(30))
            res.update(error=f"{ready['failed']} of {subscribers} connections failed", errors=sub.get("errors"))
            return res
        start_at = time.monotonic_ns() + 300_000_000
        pub_argv = [*_taskset(s.load_cpus if s.pin else None), str(exe), "pub", "--host", HOST,
                    "--port", str(server.port), "--encoding", s.encoding, "--rate", f"{rate:g}",
                    "--count", str(warm_n + meas_n), "--measure-from", str(warm_n), "--start", str(start_at),
                    "--payload-bytes", str(s.payload_bytes), "--linger", f"{duration + warmup + s.drain + 30:.0f}",
                    "--late-limit", f"{s.drain:g}"]
        pub = subprocess.Popen(pub_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        window_start = start_at + int(warmup * 1e9)
        _sleep_until(window_start)
        procs0 = all_process_cpu()
        cpu0, jif0, t0 = server.cpu_ns(), cpu_jiffies(), time.monotonic_ns()
        loaders.say("start")
        subs = loaders.results(duration + s.drain + 30)
        cpu1, jif1, t1 = server.cpu_ns(), cpu_jiffies(), time.monotonic_ns()
        ours = {os.getpid(), server.pid, pub.pid, *(p.pid for p in loaders.procs)}
        res["other_processes_cpu"] = other_cpu(procs0, all_process_cpu(), ours, (t1 - t0) / 1e9)
        res["server_rss_kib_end"] = server.rss_kib()
        pres = JsonLines(pub, "publisher").read(warmup + duration + s.drain + 30)
        res["server_metrics_after"] = server.metrics().get("counters")
        sub = merge_sub_results(subs)
        res.update(_fanout_numbers(s, sub, pres, cpu0, cpu1, jif0, jif1, t1 - t0))
        res["loadgen"] = {k: sub.get(k) for k in (
            "threads", "reads", "frames", "epoll_rounds", "bytes", "pings", "stopped_by", "errors", "conns_done",
            "control_sends_dropped", "deliveries_all")}
        res["publisher"] = {k: pres.get(k) for k in (
            "sent", "sent_measured", "achieved_rate", "lag_us", "send_blocked_s", "stopped_by", "errors",
            "error_messages", "close_code", "cpu", "scheduling")}
        return res
    finally:
        if loaders is not None:
            loaders.finish()
        if pub is not None:
            _say(pub, "stop")
            _finish(pub, 10)
        res["server_stop"] = server.stop()


def _sleep_until(mono_ns: int) -> None:
    left = (mono_ns - time.monotonic_ns()) / 1e9
    if left > 0:
        time.sleep(left)


def _fanout_numbers(s: Settings, sub: dict[str, Any], pub: dict[str, Any], cpu0: int | None, cpu1: int | None,
                    jif0: Jiffies, jif1: Jiffies, window_ns: int) -> dict[str, Any]:
    received = sub["received"]
    span = (sub["last_delivery_ns"] - sub["first_delivery_ns"]) / 1e9 if sub.get("first_delivery_ns") else 0.0
    srv = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None
    ncores = len(parse_cpus(s.load_cpus)) if s.pin else (os.cpu_count() or 1)
    wall = window_ns / 1e9
    load_cpu = sub["cpu"]["user_s"] + sub["cpu"]["sys_s"]
    pub_cpu = pub.get("cpu", {}).get("user_s", 0.0) + pub.get("cpu", {}).get("sys_s", 0.0)
    sent = max(1, pub.get("sent", 0))
    pub_cpu_window = pub_cpu * pub.get("sent_measured", 0) / sent
    loadgen_util = (load_cpu + pub_cpu_window) / wall / ncores if wall > 0 else None
    server_cpus = parse_cpus(s.server_cpus) if s.pin else None
    load_cpus = parse_cpus(s.load_cpus) if s.pin else None
    out = {
        "expected_deliveries": sub["expected"],
        "received_deliveries": received,
        "loss": sub["loss"],
        "loss_gaps": sub["loss_gaps"],
        "loss_late": sub["loss_late"],
        "deliveries_per_s": round(received / span, 1) if span > 0 else None,
        "frames_per_read": round(sub["frames"] / sub["reads"], 2) if sub.get("reads") else None,
        "latency_us": sub["latency_us"],
        "loadgen_read_delay_us": sub.get("read_delay_us"),
        "arrival_latency_us": sub.get("arrival_latency_us"),
        "latency_timeline": sub.get("timeline"),
        "server_cpu_s": round(srv / 1e9, 4) if srv is not None else None,
        "server_cpu_us_per_delivery": round(srv / 1e3 / received, 3) if srv is not None and received else None,
        "server_cpu_utilization": round(srv / window_ns, 3) if srv is not None and window_ns else None,
        "loadgen_cpu_utilization": round(loadgen_util, 3) if loadgen_util is not None else None,
        "loadgen_cpu_us_per_delivery": round(load_cpu * 1e6 / received, 3) if received else None,
        "subscriber_cpu_s": round(load_cpu, 4),
        "publisher_cpu_s_window": round(pub_cpu_window, 4),
        "saturated_loadgen": bool(loadgen_util is not None and loadgen_util > SATURATED_LOADGEN_SHARE),
        "server_cores_busy": busy_share(jif0, jif1, server_cpus),
        "load_cores_busy": busy_share(jif0, jif1, load_cpus),
        "machine_busy": busy_share(jif0, jif1, None),
        "server_cores_time": cpu_breakdown(jif0, jif1, server_cpus),
        "load_cores_time": cpu_breakdown(jif0, jif1, load_cpus),
        "window_s": round(wall, 3),
        "offset_gaps": sub["offset_gap_events"],
        "out_of_order": sub["out_of_order"] + sub["duplicates"],
        "closes": sub["closes"],
        "closes_by_code": sub["closes_by_code"],
        "eof": sub["eof"] + sub["resets"],
        "gap_messages": sub["gap_messages"],
        "error_messages": sub["error_messages"] + pub.get("error_messages", 0),
        "publisher_achieved_rate": pub.get("achieved_rate"),
        "publisher_sent_all": pub.get("stopped_by") == "done",
        "publisher_lag_us": pub.get("lag_us"),
    }
    return out


def judge(r: dict[str, Any], quick: bool) -> None:
    """Set ``sustained`` (zero loss, no disconnects, on rate), ``within_p99`` and ``pass`` on a run.

    ``pass`` is ``sustained`` and, unless quick, p99 <= 10 ms; ``problems`` says why not,
    ``warnings`` what makes the numbers less trustworthy.
    """
    ok, why = verdict(r, quick)
    p99 = (r.get("latency_us") or {}).get("p99")
    r["within_p99"] = p99 is not None and p99 <= P99_LIMIT_US
    r["sustained"] = not [w for w in why if not w.startswith("p99 ")]
    r["pass"], r["problems"], r["warnings"] = ok, why, warnings(r) if not r.get("error") else []


def verdict(r: dict[str, Any], quick: bool) -> tuple[bool, list[str]]:
    """Say whether a fan-out run passes (zero loss etc.; p99 <= 10 ms unless quick) and why not."""
    why = []
    if r.get("error"):
        return False, [str(r["error"])]
    if r["loss"]:
        why.append(f"LOSS {r['loss']:,} of {r['expected_deliveries']:,} ({r['loss_gaps']:,} skipped, "
                   f"{r['loss_late']:,} not arrived by the end)")
    if r["closes"] or r["eof"]:
        why.append(f"DISCONNECTS {r['closes']} closes {r['closes_by_code']}, {r['eof']} EOF/reset")
    if r["offset_gaps"] or r["out_of_order"]:
        why.append(f"ORDER {r['offset_gaps']} offset gaps, {r['out_of_order']} out of order/duplicate")
    if r["gap_messages"] or r["error_messages"]:
        why.append(f"{r['gap_messages']} gap and {r['error_messages']} error messages")
    if not r["publisher_sent_all"]:
        why.append("the publisher could not send everything (server not reading)")
    if not quick:
        p99 = r["latency_us"].get("p99")
        if p99 is None or p99 > P99_LIMIT_US:
            why.append(f"p99 {p99} µs > {P99_LIMIT_US:,.0f}")
        dps = r.get("deliveries_per_s") or 0
        if dps < 0.95 * r["target_deliveries_per_s"]:
            why.append(f"SATURATED {dps:,.0f} of {r['target_deliveries_per_s']:,.0f} deliveries/s")
        if (r.get("publisher_achieved_rate") or 0) < 0.95 * r["rate"]:
            why.append(f"publisher reached {r.get('publisher_achieved_rate')} of {r['rate']:g} msg/s")
    if r.get("saturated_loadgen"):
        why.append(f"SATURATED-LOADGEN {r['loadgen_cpu_utilization']:.0%} of its cores")
    return not why, why


def warnings(r: dict[str, Any]) -> list[str]:
    """Conditions that make a run's numbers less trustworthy without failing it."""
    out = []
    busy = r.get("load_cores_busy")
    if busy is not None and busy > 0.95 and not r.get("saturated_loadgen"):
        out.append(f"load CPU(s) {busy:.0%} busy (kernel softirq work and other processes count too): "
                   "latency may include load-side queueing")
    other = (r.get("other_processes_cpu") or {}).get("cores")
    if other is not None and other > 0.1:
        out.append(f"other processes used {other:.2f} cores during the run: "
                   f"{(r.get('other_processes_cpu') or {}).get('top')}")
    return out


def run_idle(exe: Path, spec: ServerSpec, s: Settings, conns: int) -> dict[str, Any]:
    """W3: open ``conns`` subscribed connections that receive nothing; server VmRSS before/after."""
    res: dict[str, Any] = {"server": spec.name, "conns": conns}
    server = Server(spec, s.server_cpus if s.pin else None)
    loaders: Loaders | None = None
    try:
        res["server_argv"] = server.argv
        res["fastpath"] = server.metrics().get("fastpath")
        time.sleep(min(1.0, s.w3_settle))
        rss0, cpu0 = server.rss_kib(), server.cpu_ns()
        t0 = time.monotonic()
        loaders = Loaders(exe, s, server.port, conns, 0, -1, 600)
        ready = loaders.ready(max(120.0, conns / 50))
        res["connect"] = ready
        res["connect_seconds"] = round(time.monotonic() - t0, 3)
        cpu1 = server.cpu_ns()
        time.sleep(s.w3_settle)
        rss1 = server.rss_kib()
        time.sleep(min(1.0, s.w3_settle))
        rss2 = server.rss_kib()
        loaders.say("stop")
        sub = merge_sub_results(loaders.results(60))
        ok = ready["subscribed"]
        res.update({
            "connected": ok,
            "failed": ready["failed"],
            "rss_kib_before": rss0,
            "rss_kib_after": rss1,
            "rss_kib_after_again": rss2,
            "kib_per_conn": round((rss1 - rss0) / ok, 2) if rss0 is not None and rss1 is not None and ok else None,
            "server_cpu_us_per_connect": round((cpu1 - cpu0) / 1e3 / ok, 1)
            if cpu0 is not None and cpu1 is not None and ok else None,
            "closes": sub.get("closes", 0),
            "closes_by_code": sub.get("closes_by_code", {}),
            "eof": sub.get("eof", 0) + sub.get("resets", 0),
            "pings": sub.get("pings", 0),
            "errors": sub.get("errors", [])[:10],
        })
        return res
    finally:
        if loaders is not None:
            loaders.finish()
        res["server_stop"] = server.stop()


# -- scenarios ----------------------------------------------------------------------------------


def _note(msg: str) -> None:
    print(f"relay bench: {msg}", file=sys.stderr, flush=True)


def _step_line(r: dict[str, Any], ok: bool, why: list[str]) -> str:
    lat = r.get("latency_us", {})
    return (f"  {r['server']:<22} {r['subscribers']:>6} subs x {r['rate']:>7g}/s: "
            f"{(r.get('deliveries_per_s') or 0):>10,.0f} deliv/s  p99 {lat.get('p99', '-')} µs  "
            f"srv {r.get('server_cpu_us_per_delivery', '-')} µs/deliv  load {_pct(r.get('loadgen_cpu_utilization'))}  "
            f"{r.get('frames_per_read', '-')} frames/read  "
            f"arrival p99 {(r.get('arrival_latency_us') or {}).get('p99', '-')} µs  "
            f"{'ok' if ok else '; '.join(why)}")


def scenario_w1(exe: Path, spec: ServerSpec, s: Settings) -> dict[str, Any]:
    """The fan-out sweep (or, with --quick, one light step)."""
    steps: list[dict[str, Any]] = []

    def step(rate: float) -> dict[str, Any]:
        r = run_fanout(exe, spec, s, s.w1_subscribers, rate, s.warmup, s.duration)
        judge(r, s.quick)
        steps.append(r)
        _note(_step_line(r, r["pass"], r["problems"]))
        return r

    if s.quick:
        step(s.w1_rates[0])
        return {"steps": steps, "pass": steps[-1]["pass"]}
    # 1. The highest sustained rate (zero loss, on rate, no disconnects), from the reference
    #    rate up, or down until one is sustained; one geometric bisection step refines it.
    ladder = sorted(set(s.w1_rates))
    start = min(range(len(ladder)), key=lambda i: abs(ladder[i] - W1_REFERENCE_RATE))
    best: float | None = None
    worst: float | None = None
    if step(ladder[start])["sustained"]:
        best = ladder[start]
        for rate in ladder[start + 1:]:
            if step(rate)["sustained"]:
                best = rate
            else:
                worst = rate
                break
    else:
        worst = ladder[start]
        for rate in reversed(ladder[:start]):
            if step(rate)["sustained"]:
                best = rate
                break
            worst = rate
    for _ in range(s.w1_bisect):
        if best is None or worst is None or worst / best < 1.2:
            break
        mid = round(math.sqrt(best * worst), 1)
        if step(mid)["sustained"]:
            best = mid
        else:
            worst = mid
    # 2. If no sustained rate also had p99 <= 10 ms, go down the ladder (two steps at most).
    if not any(r["pass"] for r in steps):
        lowest = min(r["rate"] for r in steps)
        for rate in list(reversed([x for x in ladder if x < lowest]))[:2]:
            if step(rate)["pass"]:
                break
    ref = [r for r in steps if r["rate"] == W1_REFERENCE_RATE]
    if not ref and W1_REFERENCE_RATE * s.w1_subscribers == 100_000:
        ref = [step(W1_REFERENCE_RATE)]

    def top(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        return max(rows, key=lambda r: r.get("deliveries_per_s") or 0) if rows else None

    full = top([r for r in steps if r["pass"]])
    sustained = top([r for r in steps if r["sustained"]])
    return {
        "steps": steps,
        "max_rate": full["rate"] if full else None,
        "max_deliveries_per_s": full.get("deliveries_per_s") if full else None,
        "max_zero_loss_rate": sustained["rate"] if sustained else None,
        "max_zero_loss_deliveries_per_s": sustained.get("deliveries_per_s") if sustained else None,
        "first_unsustained_rate": worst,
        "max_zero_loss_is_ladder_top": bool(sustained and sustained["rate"] >= ladder[-1]),
        "at_max": _brief(full) if full else None,
        "at_max_zero_loss": _brief(sustained) if sustained else None,
        "at_100k": _brief(ref[0]) if ref else None,
        "pass": full is not None,
    }


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r.get(k) for k in ("rate", "target_deliveries_per_s", "deliveries_per_s", "loss", "latency_us",
                                  "arrival_latency_us", "loadgen_read_delay_us", "frames_per_read",
                                  "server_cpu_us_per_delivery", "server_cpu_utilization", "loadgen_cpu_utilization",
                                  "load_cores_busy", "saturated_loadgen", "sustained", "within_p99", "pass",
                                  "problems", "warnings")}


def scenario_w2(exe: Path, spec: ServerSpec, s: Settings) -> dict[str, Any]:
    r = run_fanout(exe, spec, s, s.w2_subscribers, s.w2_rate, s.warmup, s.w2_duration)
    judge(r, s.quick)
    _note(_step_line(r, r["pass"], r["problems"]))
    return {"steps": [r], "pass": r["pass"]}


def scenario_w3(exe: Path, spec: ServerSpec, s: Settings) -> dict[str, Any]:
    r = run_idle(exe, spec, s, s.w3_conns)
    ok = bool(r.get("connected") == s.w3_conns and not r.get("closes") and not r.get("eof"))
    r["pass"] = ok
    _note(f"  {spec.name:<22} {r.get('connected')} of {s.w3_conns} idle connections: "
          f"{r.get('kib_per_conn')} KiB/conn (RSS {r.get('rss_kib_before')} -> {r.get('rss_kib_after')} KiB)"
          f"{'' if ok else '  !! ' + str(r.get('errors'))}")
    return r


SCENARIOS = {"w1": scenario_w1, "w2": scenario_w2, "w3": scenario_w3}


# -- facts and report -----------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def machine_facts() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    flags = _read("/proc/cpuinfo") or ""
    return {
        "cpu_model": model,
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "virtualized": " hypervisor " in flags.replace("\n", " "),
        "mem_total_mib": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "ip_local_port_range": _read("/proc/sys/net/ipv4/ip_local_port_range"),
        "somaxconn": _read("/proc/sys/net/core/somaxconn"),
        "rlimit_nofile": [soft, hard],
    }


def versions(exe: Path | None) -> dict[str, Any]:
    out: dict[str, Any] = {"relay": __version__}
    try:
        from . import fastpath

        out["relay_fastpath_here"] = fastpath.IMPLEMENTATION
    except ImportError as exc:  # a broken tree: report it, the runs will show the rest
        out["relay_fastpath_here"] = f"import failed: {exc}"
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    cc = find_compiler()
    if cc:
        try:
            out["cc"] = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=10,
                                       check=False).stdout.splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            out["cc"] = cc
    if exe is not None:
        out["cload"] = exe.name
    return out


def git_facts() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True,
                                  timeout=10, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(status), "modified_files": status.splitlines()[:30]}


def _f(v: Any, nd: int = 0) -> str:
    return "-" if v is None else f"{v:,.{nd}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    """Return the human-readable tables of a report."""
    out = []
    sc = report["scenarios"]
    heads = ("server", "fastpath", "subs", "msg/s", "target/s", "deliv/s", "loss", "p50", "p90", "p99", "p99.9",
             "max", "arr p50", "arr p99", "srv µs/deliv", "srv CPU", "load CPU", "fr/read", "result")
    for name in ("w1", "w2"):
        if name not in sc:
            continue
        rows: list[tuple[str, ...]] = []
        for srv, data in sc[name].items():
            for r in data.get("steps", []):
                lat = r.get("latency_us", {})
                rows.append((srv, str(r.get("fastpath") or "-"), str(r["subscribers"]), f"{r['rate']:g}",
                             _f(r["target_deliveries_per_s"]), _f(r.get("deliveries_per_s")), _f(r.get("loss")),
                             _f(lat.get("p50")), _f(lat.get("p90")), _f(lat.get("p99")), _f(lat.get("p99.9")),
                             _f(lat.get("max")), _f((r.get("arrival_latency_us") or {}).get("p50")),
                             _f((r.get("arrival_latency_us") or {}).get("p99")),
                             _f(r.get("server_cpu_us_per_delivery"), 2),
                             _pct(r.get("server_cpu_utilization")), _pct(r.get("loadgen_cpu_utilization")),
                             _f(r.get("frames_per_read"), 1),
                             "ok" if r.get("pass") else "SATURATED-LOADGEN" if r.get("saturated_loadgen")
                             else "0-loss, p99>10ms" if r.get("sustained") else "FAIL"))
        out.append(f"\n{name.upper()}: latency in µs from the publisher's send to the subscriber's read "
                   "(arr: to the frame's arrival in the subscriber's socket, without the load generator's queueing)")
        out.append(_table(heads, rows))
        for srv, data in sc[name].items():
            for r in data.get("steps", []):
                for p in r.get("problems", []):
                    out.append(f"  !! {srv} @ {r['rate']:g}/s: {p}")
                for w in r.get("warnings", []):
                    out.append(f"  ?? {srv} @ {r['rate']:g}/s: {w}")
    if "w3" in sc:
        rows = [(srv, str(r.get("fastpath") or "-"), f"{r.get('connected')}/{r['conns']}", _f(r.get("rss_kib_before")),
                 _f(r.get("rss_kib_after")), _f(r.get("kib_per_conn"), 1), _f(r.get("server_cpu_us_per_connect")),
                 _f(r.get("connect_seconds"), 1), "ok" if r.get("pass") else "FAIL")
                for srv, r in sc["w3"].items()]
        out.append("\nW3: idle subscribed connections, server VmRSS")
        out.append(_table(("server", "fastpath", "connected", "RSS before KiB", "RSS after KiB", "KiB/conn",
                           "srv µs/connect", "connect s", "result"), rows))
    summ = report.get("summary", {})
    if summ:
        out.append("\nSummary")
        rows = []
        for srv, d in summ.items():
            rows.append((srv, _f(d.get("w1_max_deliveries_per_s")), _f(d.get("w1_max_zero_loss_deliveries_per_s")),
                         _f(d.get("w1_p99_us_at_max_zero_loss")), _f(d.get("w1_server_us_per_delivery_at_max_zero_loss"), 2),
                         _f(d.get("w1_p99_us_at_100k")), _f(d.get("w1_arrival_p99_us_at_100k")),
                         _f(d.get("w2_p50_us")), _f(d.get("w2_p99_us")), _f(d.get("w2_arrival_p99_us")),
                         _f(d.get("w2_server_us_per_delivery"), 2), _f(d.get("w3_kib_per_conn"), 1)))
        out.append(_table(("server", "W1 max deliv/s (p99<=10ms)", "W1 max deliv/s (0 loss)", "its p99 µs",
                           "its srv µs/deliv", "W1 p99@100k µs", "(arr)", "W2 p50 µs", "W2 p99 µs", "(arr)",
                           "W2 srv µs/deliv", "W3 KiB/conn"), rows))
    m, g = report["machine"], report["git"]
    out.append(f"\nmachine: {m['cpu_model']}, nproc {m['nproc']}, Linux {m['kernel']}, Python {m['python']}; "
               f"load avg {m['loadavg_before']} before, {m.get('loadavg_after')} after; commit "
               f"{str(g['commit'])[:12]}{' (dirty tree)' if g['dirty'] else ''}; server on CPU "
               f"{report['settings']['server_cpus'] if report['settings']['pin'] else '(not pinned)'}, load on "
               f"{report['settings']['load_cpus'] if report['settings']['pin'] else '(not pinned)'}")
    return "\n".join(out)


def summarize(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    summ: dict[str, dict[str, Any]] = {}
    sc = report["scenarios"]
    for srv, d in sc.get("w1", {}).items():
        e = summ.setdefault(srv, {})
        e["w1_max_deliveries_per_s"] = d.get("max_deliveries_per_s")
        e["w1_max_zero_loss_deliveries_per_s"] = d.get("max_zero_loss_deliveries_per_s")
        e["w1_p99_us_at_max_zero_loss"] = ((d.get("at_max_zero_loss") or {}).get("latency_us") or {}).get("p99")
        at100 = d.get("at_100k") or {}
        e["w1_p99_us_at_100k"] = (at100.get("latency_us") or {}).get("p99")
        e["w1_arrival_p99_us_at_100k"] = (at100.get("arrival_latency_us") or {}).get("p99")
        e["w1_pass_at_100k"] = at100.get("pass")
        e["w1_server_us_per_delivery_at_max_zero_loss"] = (d.get("at_max_zero_loss") or {}).get(
            "server_cpu_us_per_delivery")
        e["w1_loadgen_cpu_at_max_zero_loss"] = (d.get("at_max_zero_loss") or {}).get("loadgen_cpu_utilization")
    for srv, d in sc.get("w2", {}).items():
        e = summ.setdefault(srv, {})
        r = d["steps"][0]
        e["w2_p50_us"] = r.get("latency_us", {}).get("p50")
        e["w2_p99_us"] = r.get("latency_us", {}).get("p99")
        e["w2_arrival_p50_us"] = (r.get("arrival_latency_us") or {}).get("p50")
        e["w2_arrival_p99_us"] = (r.get("arrival_latency_us") or {}).get("p99")
        e["w2_pass"] = r.get("pass")
        e["w2_server_us_per_delivery"] = r.get("server_cpu_us_per_delivery")
    for srv, r in sc.get("w3", {}).items():
        summ.setdefault(srv, {})["w3_kib_per_conn"] = r.get("kib_per_conn")
    return summ


# -- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relay bench",
        description="End-to-end load scenarios against a fresh relay server (and other servers with --against): "
        "W1 fan-out sweep, W2 small room, W3 idle connections. Loopback only; see bench/load/README.md.")
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="w1, w2, w3 or all (default: all)")
    p.add_argument("--impl", choices=("compiled", "pure", "both"), default="compiled",
                   help="relay's fast path: compiled (Cython), pure (RELAY_PURE_PYTHON=1) or both (default compiled)")
    p.add_argument("--no-relay", action="store_true", help="measure only the --against/--peers servers")
    p.add_argument("--against", action="append", default=[], metavar="[LABEL=]COMMAND",
                   help="also run every scenario against this server command ({port} and {python} are replaced; "
                   "run without a shell); repeatable")
    p.add_argument("--peers", action="store_true",
                   help="add the bundled peers (bench/peers): a naive trio-websocket server, a websockets "
                   "broadcast() server and a minimal C server (the ceiling of one core and the kernel)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: small, short runs that only check for zero loss (not timed)")
    p.add_argument("--json", "--out", metavar="FILE", dest="json",
                   help="write the full report as JSON ('-' for stdout instead of the table)")
    p.add_argument("--encoding", choices=("json", "msgpack"), default="json")
    p.add_argument("--payload-bytes", type=int, default=64, metavar="B", help="size of the data object (default 64)")
    p.add_argument("--duration", type=float, metavar="S", help="measured seconds per W1 step (default 3)")
    p.add_argument("--w2-duration", type=float, metavar="S", help="measured seconds of W2 (default 8)")
    p.add_argument("--warmup", type=float, metavar="S", help="unmeasured seconds before each run (default 0.5)")
    p.add_argument("--drain", type=float, default=3.0, metavar="S",
                   help="after the last publish, wait at most S seconds for deliveries (default 3)")
    p.add_argument("--rates", metavar="R,R,...", help="W1 sweep ladder in messages/s (default 12.5,25,...,1600)")
    p.add_argument("--w1-subscribers", type=int, default=1000, metavar="N")
    p.add_argument("--w2-subscribers", type=int, default=100, metavar="N")
    p.add_argument("--w2-rate", type=float, default=1000.0, metavar="R")
    p.add_argument("--w3-conns", type=int, default=10_000, metavar="N")
    p.add_argument("--server-cpus", default="0", metavar="LIST", help="taskset CPU list for the server (default 0)")
    p.add_argument("--load-cpus", metavar="LIST", help="taskset CPU list for the load generator (default: the others)")
    p.add_argument("--no-pin", action="store_true", help="do not pin anything with taskset")
    p.add_argument("--load-procs", type=int, default=1, metavar="P", help="subscriber processes (default 1)")
    p.add_argument("--load-threads", type=int, metavar="T", help="threads per subscriber process (default: load CPUs)")
    p.add_argument("--batch-us", type=float, default=0.0, metavar="US",
                   help="load generator: at most one epoll round per US microseconds (default 0: every wake-up)")
    return p


def settings_from_args(a: argparse.Namespace, p: argparse.ArgumentParser) -> Settings:
    names = [n.lower() for n in a.scenarios] or ["all"]
    scen: list[str] = []
    for n in names:
        if n == "all":
            scen += [x for x in SCENARIOS if x not in scen]
        elif n in SCENARIOS:
            if n not in scen:
                scen.append(n)
        else:
            p.error(f"unknown scenario {n!r}; choose from w1, w2, w3, all")
    impls = [] if a.no_relay else (["compiled", "pure"] if a.impl == "both" else [a.impl])
    s = Settings(scenarios=scen, impls=impls, against=[], quick=a.quick, encoding=a.encoding,
                 payload_bytes=a.payload_bytes, server_cpus=a.server_cpus, drain=a.drain,
                 load_procs=a.load_procs, batch_us=a.batch_us, w1_subscribers=a.w1_subscribers,
                 w2_subscribers=a.w2_subscribers, w2_rate=a.w2_rate, w3_conns=a.w3_conns, pin=not a.no_pin)
    ncpu = os.cpu_count() or 1
    if a.load_cpus:
        s.load_cpus = a.load_cpus
    else:
        others = [c for c in sorted(os.sched_getaffinity(0)) if c not in parse_cpus(s.server_cpus)]
        s.load_cpus = ",".join(map(str, others)) if others else s.server_cpus
    if s.pin and (ncpu < 2 or not shutil.which("taskset")):
        _note("not pinning (needs taskset and at least 2 CPUs); server and load share the CPUs")
        s.pin = False
    s.load_threads = a.load_threads or max(1, len(parse_cpus(s.load_cpus)))
    if a.quick:
        s.warmup, s.duration, s.w2_duration, s.drain = 0.3, 1.0, 1.0, min(a.drain, 5.0)
        s.w1_subscribers = min(s.w1_subscribers, 100) if a.w1_subscribers == 1000 else a.w1_subscribers
        s.w1_rates = [50.0]
        s.w2_subscribers = min(s.w2_subscribers, 20) if a.w2_subscribers == 100 else a.w2_subscribers
        s.w2_rate = 200.0 if a.w2_rate == 1000.0 else a.w2_rate
        s.w3_conns = 200 if a.w3_conns == 10_000 else a.w3_conns
        s.w3_settle = 0.3
    if a.warmup is not None:
        s.warmup = a.warmup
    if a.duration is not None:
        s.duration = a.duration
    if a.w2_duration is not None:
        s.w2_duration = a.w2_duration
    if a.rates:
        try:
            s.w1_rates = [float(x) for x in a.rates.split(",") if x.strip()]
        except ValueError:
            p.error(f"--rates: numbers separated by commas, not {a.rates!r}")
        if s.quick:
            s.w1_rates = s.w1_rates[:1]
    for name in ("duration", "w2_duration", "warmup", "drain"):
        v = getattr(s, name)
        if not 0 <= v <= 600:
            p.error(f"--{name.replace('_', '-')} must be from 0 to 600 seconds")
    if s.duration <= 0 or s.w2_duration <= 0:
        p.error("durations must be > 0")
    for name in ("w1_subscribers", "w2_subscribers", "w3_conns", "load_procs", "payload_bytes"):
        if getattr(s, name) < (0 if name == "payload_bytes" else 1):
            p.error(f"--{name.replace('_', '-')} is too small")
    if any(r <= 0 or r > 1e6 for r in s.w1_rates) or not 0 < s.w2_rate <= 1e6:
        p.error("rates must be > 0 and <= 1,000,000 messages/s")
    return s


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``relay bench``; return 0 when every run passed, 1 otherwise, 2 for bad usage.

    Args:
        argv: the arguments after ``bench``; ``sys.argv[1:]`` when None.
    """
    p = build_parser()
    try:
        a = p.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    s = settings_from_args(a, p)
    specs = [relay_spec(i) for i in s.impls]
    try:
        if a.peers:
            specs += peer_specs()
        specs += [against_spec(t, i) for i, t in enumerate(a.against, 1)]
    except BenchError as exc:
        print(f"relay bench: {exc}", file=sys.stderr)
        return 2
    names = [sp.name for sp in specs]
    if not specs:
        p.error("nothing to measure: --no-relay needs --against or --peers")
    if len(set(names)) != len(names):
        p.error(f"two servers have the same label: {names}; name them with LABEL=COMMAND")
    s.against = [(sp.name, sp.command) for sp in specs if sp.relay_impl is None]
    try:
        exe = build_cload()
    except BenchError as exc:
        print(f"relay bench: {exc}", file=sys.stderr)
        return 2
    _raise_nofile(max(s.w3_conns if "w3" in s.scenarios else 0, s.w1_subscribers, s.w2_subscribers) + 1000)
    if s.pin:
        try:  # keep this process off the server's CPU too
            os.sched_setaffinity(0, parse_cpus(s.load_cpus))
        except OSError:
            pass  # not allowed here; only the children are pinned then
    report: dict[str, Any] = {
        "tool": "relay bench",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": ["relay", "bench", *(argv if argv is not None else sys.argv[1:])],
        "settings": asdict(s),
        "machine": machine_facts(),
        "versions": versions(exe),
        "git": git_facts(),
        "servers": {sp.name: {"command": sp.command, "env": sp.env, "relay_impl": sp.relay_impl} for sp in specs},
        "scenarios": {},
    }
    failed = False
    try:
        for name in s.scenarios:
            _note(f"{name.upper()} ...")
            results: dict[str, Any] = {}
            report["scenarios"][name] = results
            for sp in specs:
                try:
                    results[sp.name] = SCENARIOS[name](exe, sp, s)
                except BenchError as exc:
                    _note(f"  {sp.name}: {exc}")
                    results[sp.name] = {"error": str(exc), "pass": False, "steps": []}
                if sp.relay_impl == "compiled":
                    fps = {r.get("fastpath") for r in results[sp.name].get("steps", [results[sp.name]])}
                    if fps - {"cython"}:
                        _note(f"  WARNING: asked for the compiled fast path, the server reported {sorted(map(str, fps))}")
                failed |= not results[sp.name].get("pass")
    except KeyboardInterrupt:
        _note("interrupted; reporting what was measured")
        failed = True
    report["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    report["summary"] = summarize(report)
    if a.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
            print(f"wrote {a.json}")
    return 1 if failed else 0


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass  # the load generator reports exactly what it could not open
    if target < need:
        _note(f"RLIMIT_NOFILE hard limit {hard} is below the {need} descriptors wanted; raise it (ulimit -Hn)")


if __name__ == "__main__":
    sys.exit(main())
