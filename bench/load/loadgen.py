"""End-to-end load benchmark: publish-to-deliver latency and throughput of a real relay server.

Starts ``python -m relay serve`` as a subprocess on 127.0.0.1 (or uses ``--url``), connects N
subscribers from one or more separate load processes, publishes at a fixed rate from this
process and measures, for every delivery after the warm-up, the time from the publisher's
``time.perf_counter_ns()`` just before ``send`` to the subscriber's ``perf_counter_ns()`` just
after ``recv`` (on Linux both read the system-wide CLOCK_MONOTONIC, so the two processes share
a clock). Reports deliveries/s, loss, latency percentiles and the server's CPU time per
delivery; writes everything, with the machine, commit and settings, to ``--out``.

The load side is kept cheap on purpose: blocking/non-blocking raw sockets, epoll, a minimal
parser for unmasked server frames and a regex (JSON) or msgpack (binary) to pull ``t`` and
``seq`` out of each message. Client frames are masked, as RFC 6455 requires.

It only ever connects to loopback (127.0.0.1 / ::1) and always stops by itself.

Usage: ``python bench/load/loadgen.py --help`` (see bench/load/README.md).
"""

from __future__ import annotations

import argparse
import array
import base64
import datetime
import http.client
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK_HOSTS = {"127.0.0.1": "127.0.0.1", "::1": "::1", "localhost": "127.0.0.1"}
SUBPROTOCOLS = {"json": "relay.v1.json", "msgpack": "relay.v1.msgpack"}
CHANNEL_PREFIX = "bench."
LISTEN_RE = re.compile(r"relay listening on (ws://\S+) \(node ([^)]*)\)")
T_SEQ_RE = re.compile(rb'"t":(\d+),"seq":(\d+)')
FASTPATH_RE = re.compile(r'relay_info\{[^}]*fastpath="([^"]+)"')
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
SERVER_START_SECONDS = 20.0
CONNECT_SECONDS = 120.0
CONNECT_BATCH = 50
RECV_BYTES = 1 << 18
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The same settings as `relay bench` (relay/bench/settings.py): limits off for the benchmark's clients.
RELAY_BENCH_ENV = {
    "RELAY_LIMITS_MESSAGES_PER_SECOND": "0",
    "RELAY_LIMITS_BYTES_PER_SECOND": "0",
    "RELAY_LIMITS_MAX_CONNECTIONS_PER_IP": "0",
}


# -- WebSocket client helpers (loopback only, no extensions) ---------------------------------


def mask_frame(opcode: int, payload: bytes) -> bytes:
    """Return one final client frame carrying ``payload``, masked with a random key."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    if not n:
        return head + key
    keys = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")
    return head + key + masked


def split_frames(buf: bytes) -> tuple[list[tuple[int, bool, bytes]], bytes]:
    """Split unmasked server frames off ``buf``; return them as (opcode, fin, payload) and the rest.

    Raises:
        ValueError: a frame is masked (servers must not mask).
    """
    frames: list[tuple[int, bool, bytes]] = []
    pos, n = 0, len(buf)
    while n - pos >= 2:
        b0, b1 = buf[pos], buf[pos + 1]
        if b1 & 0x80:
            raise ValueError("masked frame from the server")
        ln, hl = b1 & 0x7F, 2
        if ln == 126:
            if n - pos < 4:
                break
            ln, hl = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
        elif ln == 127:
            if n - pos < 10:
                break
            ln, hl = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
        end = pos + hl + ln
        if end > n:
            break
        frames.append((b0 & 0x0F, bool(b0 & 0x80), buf[pos + hl:end]))
        pos = end
    return frames, buf[pos:]


def open_ws(host: str, port: int, path: str, encoding: str, timeout: float = 10.0) -> tuple[socket.socket, bytes]:
    """Connect and upgrade; return the (blocking) socket and any bytes read past the headers."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(upgrade_request(host, port, path, encoding))
    return sock, read_upgrade_response(sock)


def upgrade_request(host: str, port: int, path: str, encoding: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return (
        f"GET {path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {SUBPROTOCOLS[encoding]}\r\n\r\n"
    ).encode()


def read_upgrade_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"server closed during the handshake: {data[:200]!r}")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status + b" ":
        raise ConnectionError(f"upgrade refused: {head[:300]!r}")
    return rest


def encode_message(encoding: str, msg: dict[str, Any]) -> bytes:
    if encoding == "json":
        return mask_frame(OP_TEXT, json.dumps(msg, separators=(",", ":")).encode())
    import msgpack

    return mask_frame(OP_BINARY, msgpack.packb(msg, use_bin_type=True))


def decode_message(encoding: str, payload: bytes) -> dict[str, Any]:
    if encoding == "json":
        return json.loads(payload)  # type: ignore[no-any-return]
    import msgpack

    return msgpack.unpackb(payload, raw=False)  # type: ignore[no-any-return]


def check_loopback(host: str) -> str:
    """Return the loopback address for ``host``, or exit: this tool targets nothing else."""
    addr = LOOPBACK_HOSTS.get(host.strip("[]"))
    if addr is None:
        sys.exit(f"loadgen: refusing to target {host!r}: only 127.0.0.1, ::1 or localhost")
    return addr


# -- subscriber worker (a separate process) --------------------------------------------------


@dataclass(slots=True)
class _Sub:
    sock: socket.socket
    channel: int
    last_seq: int  # the last measured seq this subscriber's channel gets
    buf: bytes = b""
    frag: bytes = b""
    subscribed: bool = False
    finished: bool = False
    prev_seq: int = -1
    received: int = 0  # measured deliveries
    out_of_order: int = 0
    first_ns: int = 0
    last_ns: int = 0
    close_code: int | None = None


def _worker_main(cfg: dict[str, Any]) -> int:
    """Run ``cfg["count"]`` subscribers; talk to the parent over stdin/stdout (JSON lines)."""
    host, port, path, enc = cfg["host"], cfg["port"], cfg["path"], cfg["encoding"]
    first_seq, n_measured, n_channels = cfg["first_seq"], cfg["measured"], cfg["channel_count"]
    is_json = enc == "json"
    if not is_json:
        import msgpack

        unpackb = msgpack.unpackb
    lat = array.array("q")
    lat_append = lat.append
    perf = time.perf_counter_ns
    stats: dict[str, int] = {"gaps": 0, "errors": 0, "other_frames": 0, "closed": 0, "eof": 0}
    errors: list[str] = []

    def emit(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    subs: dict[int, _Sub] = {}
    t0 = time.monotonic()
    indices = list(range(cfg["first_index"], cfg["first_index"] + cfg["count"]))
    try:
        for i in range(0, len(indices), CONNECT_BATCH):
            batch = indices[i:i + CONNECT_BATCH]
            opened = []
            for idx in batch:
                sock = socket.create_connection((host, port), timeout=30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(upgrade_request(host, port, path, enc))
                opened.append((idx, sock))
            for idx, sock in opened:
                rest = read_upgrade_response(sock)
                ch = idx % n_channels
                # Last measured seq of this channel: seqs of channel ch are ch, ch+C, ch+2C, ...
                last = first_seq + n_measured - 1
                last -= (last - ch) % n_channels
                sub = _Sub(sock, ch, last, buf=rest)
                sock.sendall(encode_message(enc, {"type": "subscribe", "channel": f"{CHANNEL_PREFIX}{ch}"}))
                sock.setblocking(False)
                subs[sock.fileno()] = sub
    except (OSError, ConnectionError) as exc:
        emit({"event": "error", "message": f"connecting subscriber {len(subs)}: {exc}"})
        return 1

    ep = select.epoll()
    stdin_fd = sys.stdin.fileno()
    ep.register(stdin_fd, select.EPOLLIN)
    for fd in subs:
        ep.register(fd, select.EPOLLIN)
    n_subscribed = n_finished = 0
    ready_sent = done_sent = False
    stop = False

    def control(sub: _Sub, op: int, payload: bytes) -> None:
        nonlocal n_finished
        if op == OP_PING:
            try:
                sub.sock.send(mask_frame(OP_PONG, payload))
            except OSError:
                pass  # the connection is going away; the close/EOF path records it
        elif op == OP_CLOSE:
            sub.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            stats["closed"] += 1
            if len(errors) < 20:
                errors.append(f"close {sub.close_code} {payload[2:200]!r} on channel {sub.channel}")
            if not sub.finished:
                sub.finished = True
                n_finished += 1

    def other(sub: _Sub, payload: bytes) -> None:
        nonlocal n_subscribed
        msg = decode_message(enc, payload)
        kind = msg.get("type")
        if kind == "subscribed":
            if not sub.subscribed:
                sub.subscribed = True
                n_subscribed += 1
        elif kind == "welcome":
            pass
        elif kind in ("error", "gap"):
            stats["gaps" if kind == "gap" else "errors"] += 1
            if len(errors) < 20:
                errors.append(json.dumps(msg, default=repr)[:300])
        else:
            stats["other_frames"] += 1

    while not stop:
        if not ready_sent and n_subscribed == len(subs):
            emit({"event": "ready", "subscribers": len(subs), "seconds": round(time.monotonic() - t0, 3)})
            ready_sent = True
        if ready_sent and not done_sent and n_finished == len(subs):
            emit({"event": "done"})
            done_sent = True
        for fd, _ev in ep.poll(0.5):
            if fd == stdin_fd:
                line = sys.stdin.readline()
                if not line or line.strip() == "stop":
                    stop = True
                continue
            sub = subs[fd]
            try:
                data = sub.sock.recv(RECV_BYTES)
            except BlockingIOError:
                continue
            except OSError as exc:
                data = b""
                if len(errors) < 20:
                    errors.append(f"recv: {exc}")
            now = perf()
            if not data:
                stats["eof"] += 1
                ep.unregister(fd)
                if not sub.finished:
                    sub.finished = True
                    n_finished += 1
                continue
            buf = sub.buf + data if sub.buf else data
            # Inline frame loop (the hot path): unmasked server frames only.
            pos, n = 0, len(buf)
            while n - pos >= 2:
                b0, b1 = buf[pos], buf[pos + 1]
                ln, hl = b1 & 0x7F, 2
                if ln == 126:
                    if n - pos < 4:
                        break
                    ln, hl = (buf[pos + 2] << 8) | buf[pos + 3], 4
                elif ln == 127:
                    if n - pos < 10:
                        break
                    ln, hl = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
                end = pos + hl + ln
                if end > n:
                    break
                payload = buf[pos + hl:end]
                pos = end
                op = b0 & 0x0F
                if op & 0x8:
                    control(sub, op, payload)
                    continue
                if not b0 & 0x80:  # fragmented message: keep the parts
                    sub.frag += payload
                    continue
                if sub.frag:
                    payload, sub.frag = sub.frag + payload, b""
                if is_json:
                    m = T_SEQ_RE.search(payload)
                    if m is None:
                        other(sub, payload)
                        continue
                    t, seq = int(m[1]), int(m[2])
                else:
                    msg = unpackb(payload)
                    d = msg.get("data") if msg.get("type") == "message" else None
                    if not isinstance(d, dict) or "t" not in d:
                        other(sub, payload)
                        continue
                    t, seq = d["t"], d["seq"]
                if seq <= sub.prev_seq:
                    sub.out_of_order += 1
                sub.prev_seq = seq
                if seq >= first_seq:
                    if seq > sub.last_seq:
                        continue
                    lat_append(now - t)
                    sub.received += 1
                    if not sub.first_ns:
                        sub.first_ns = now
                    sub.last_ns = now
                    if seq == sub.last_seq and not sub.finished:
                        sub.finished = True
                        n_finished += 1
            sub.buf = buf[pos:] if pos < n else b""

    with open(cfg["latency_file"], "wb") as f:
        lat.tofile(f)
    firsts = [s.first_ns for s in subs.values() if s.first_ns]
    lasts = [s.last_ns for s in subs.values() if s.last_ns]
    per_channel: dict[int, int] = {}
    missing = pending = 0
    for s in subs.values():
        per_channel[s.channel] = per_channel.get(s.channel, 0) + s.received
        # Messages arrive in seq order, so what is absent below the last seq seen was lost
        # on the way (gap), and what is absent above it had not arrived yet (late).
        first = first_seq + (s.channel - first_seq) % n_channels
        seen_upto = min(s.prev_seq, s.last_seq)
        n_upto = (seen_upto - first) // n_channels + 1 if seen_upto >= first else 0
        n_all = (s.last_seq - first) // n_channels + 1 if s.last_seq >= first else 0
        missing += n_upto - s.received
        pending += n_all - n_upto
    emit({
        "event": "result",
        "subscribers": len(subs),
        "received": sum(s.received for s in subs.values()),
        "received_by_channel": per_channel,
        "out_of_order": sum(s.out_of_order for s in subs.values()),
        "missing": missing,
        "pending": pending,
        "first_ns": min(firsts) if firsts else 0,
        "last_ns": max(lasts) if lasts else 0,
        "close_codes": sorted({s.close_code for s in subs.values() if s.close_code is not None}),
        "errors_sample": errors,
        **stats,
    })
    for s in subs.values():
        try:
            s.sock.setblocking(True)
            s.sock.settimeout(0.2)
            s.sock.send(mask_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
        except OSError:
            pass  # already closed by the server; nothing to say goodbye to
        s.sock.close()
    return 0


# -- the orchestrator: server, workers, publisher, report ------------------------------------


def proc_cpu_ns(pid: int, which: str = "both") -> int | None:
    """Return utime+stime (or only ``"user"`` / ``"system"``) of ``pid`` in ns; None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields_ = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    utime, stime = int(fields_[11]), int(fields_[12])
    ticks = {"user": utime, "system": stime}.get(which, utime + stime)
    return ticks * 1_000_000_000 // CLK_TCK


def machine_busy() -> tuple[int, int]:
    """Return (busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_facts() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,
                                  text=True, timeout=10, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(status),
            "modified_files": status.splitlines()[:20]}


def machine_facts() -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for name in ("trio", "trio-websocket", "wsproto", "h11", "msgpack"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu_model": cpu_model(),
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "libraries": versions,
        "loadavg_before": list(os.getloadavg()),
        "clock": time.get_clock_info("perf_counter").implementation,
    }


def http_get(host: str, port: int, path: str) -> str:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode("utf-8", "replace")
    finally:
        conn.close()


def scrape(host: str, port: int) -> dict[str, Any]:
    """Return relay_info's fastpath and the counters worth keeping from /metrics."""
    text = http_get(host, port, "/metrics")
    m = FASTPATH_RE.search(text)
    keep = ("relay_deliveries_total", "relay_slow_consumer_actions_total", "relay_errors_total",
            "relay_active_connections", "relay_publications_total", "relay_messages_received_total")
    counters = {}
    for line in text.splitlines():
        if line.startswith(keep) and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            if not name.endswith("_created"):
                counters[name] = float(value)
    return {"fastpath": m.group(1) if m else None, "counters": counters}


class Server:
    """A relay server subprocess on 127.0.0.1:0; stopped (SIGTERM, then SIGKILL) by :meth:`stop`."""

    def __init__(self, pure: bool, cpu: str | None) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env.pop("RELAY_PURE_PYTHON", None)
        if pure:
            env["RELAY_PURE_PYTHON"] = "1"
        # relay's per-client limits (100 msg/s, 1,000 connections per address by default)
        # would stop the benchmark's own publisher and subscribers; unknown to older relays.
        for key, value in RELAY_BENCH_ENV.items():
            env.setdefault(key, value)
        cmd = [sys.executable, "-m", "relay", "serve", "--host", "127.0.0.1", "--port", "0",
               "--node-id", "b1"]
        self.pinned = False
        if cpu is not None:
            if shutil.which("taskset"):
                cmd = ["taskset", "-c", cpu, *cmd]
                self.pinned = True
            else:
                print("loadgen: taskset not found; the server is not pinned", file=sys.stderr)
        self.command = cmd
        self.relay_env = {k: v for k, v in env.items() if k.startswith("RELAY_")}
        self.log = tempfile.NamedTemporaryFile(prefix="relay-bench-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, env=env, cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log)
        self.pid = self.proc.pid
        self.url = self._wait_listening()

    def _wait_listening(self) -> str:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while time.monotonic() < deadline:
            m = LISTEN_RE.search(Path(self.log.name).read_text(errors="replace"))
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        sys.exit(f"loadgen: the server did not start; its log:\n{self.log_text()}")

    def log_text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # drain: closes what is left with 1001
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


def percentile(sorted_us: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_us:
        return None
    k = max(0, min(len(sorted_us) - 1, int(-(-q * len(sorted_us) // 100)) - 1))
    return sorted_us[k]


@dataclass
class Settings:
    subscribers: int
    channel_count: int
    rate: float
    duration: float
    warmup: float
    payload_bytes: int
    encoding: str
    load_procs: int
    drain: float
    server_cpu: str | None
    url: str | None
    server_pid: int | None


def run_once(s: Settings, impl: str) -> dict[str, Any]:
    """Run one measurement against a fresh server (or ``--url``) and return its results."""
    server: Server | None = None
    if s.url is None:
        server = Server(pure=(impl == "pure"), cpu=s.server_cpu)
        url, server_pid = server.url, server.pid
    else:
        url, server_pid = s.url, s.server_pid
    parts = urlsplit(url)
    host = check_loopback(parts.hostname or "")
    port = parts.port or 80
    path = parts.path or "/ws"
    workers: list[subprocess.Popen[str]] = []
    tmpdir = tempfile.mkdtemp(prefix="relay-bench-")
    result: dict[str, Any] = {"impl_requested": impl, "url": url, "server_pid": server_pid,
                              "server_command": server.command if server else None,
                              "server_pinned_cpu": s.server_cpu if server and server.pinned else None,
                              "server_relay_env": server.relay_env if server else None}
    try:
        info = scrape(host, port)
        result["fastpath"] = info["fastpath"]
        if impl == "compiled" and info["fastpath"] != "cython":
            print(f"loadgen: WARNING: asked for the compiled fast path, the server reports "
                  f"fastpath={info['fastpath']!r}", file=sys.stderr)
        first_seq = round(s.rate * s.warmup)
        measured = round(s.rate * s.duration)
        total = first_seq + measured
        # Start the subscriber processes.
        per = [s.subscribers // s.load_procs + (i < s.subscribers % s.load_procs) for i in range(s.load_procs)]
        start_index = 0
        for i, count in enumerate(per):
            if not count:
                continue
            cfg = {"host": host, "port": port, "path": path, "encoding": s.encoding,
                   "first_seq": first_seq, "measured": measured, "channel_count": s.channel_count,
                   "first_index": start_index, "count": count,
                   "latency_file": os.path.join(tmpdir, f"lat{i}.bin")}
            start_index += count
            workers.append(subprocess.Popen(
                [sys.executable, __file__, "_subscribers", json.dumps(cfg)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1))
        connect_start = time.monotonic()
        for w in workers:
            msg = _read_event(w, connect_start + CONNECT_SECONDS)
            if msg.get("event") != "ready":
                raise RuntimeError(f"subscriber process failed: {msg}")
        result["connect_seconds"] = round(time.monotonic() - connect_start, 3)

        # Publish on an absolute schedule.
        # A send that blocks this long means the server stopped reading: give up, report it.
        pub_sock, rest = open_ws(host, port, path, s.encoding, timeout=max(10.0, s.drain))
        pub_errors: list[str] = []
        pub_buf = rest
        pad_len = _pad_length(s)
        pad = "x" * pad_len
        channels = [f"{CHANNEL_PREFIX}{c}" for c in range(s.channel_count)]
        is_json = s.encoding == "json"
        if not is_json:
            import msgpack
        interval_ns = int(1e9 / s.rate)
        perf = time.perf_counter_ns
        lags = array.array("q")
        cpu0: dict[str, int | None] = {}
        busy0 = (0, 0)
        t_first = t_last = 0
        start = perf() + 50_000_000
        for k in range(total):
            due = start + k * interval_ns
            now = perf()
            if now < due:
                time.sleep((due - now) / 1e9)
            if k == first_seq:
                cpu0 = _cpu_snapshot(server_pid, workers)
                busy0 = machine_busy()
            ch = channels[k % s.channel_count]
            t = perf()
            if is_json:
                body = (f'{{"type":"publish","channel":"{ch}","data":{{"t":{t},"seq":{k},'
                        f'"pad":"{pad}"}}}}').encode()
                frame = mask_frame(OP_TEXT, body)
            else:
                frame = mask_frame(OP_BINARY, msgpack.packb(
                    {"type": "publish", "channel": ch, "data": {"t": t, "seq": k, "pad": pad}}))
            try:
                pub_sock.sendall(frame)
            except OSError as exc:
                pub_errors.append(f"publisher: send of seq {k} failed: {exc}; stopped publishing")
                break
            if k >= first_seq:
                lags.append(t - due)
                if k == first_seq:
                    t_first = t
                t_last = t
            if k % 256 == 0:
                pub_buf = _drain_publisher(pub_sock, pub_buf, s.encoding, pub_errors)
        publish_span = (t_last - t_first) / 1e9 if measured > 1 else 0.0

        # Wait until every subscriber saw its channel's last measured message, or --drain.
        drain_deadline = time.monotonic() + s.drain
        done = 0
        for w in workers:
            msg = _read_event(w, drain_deadline, allow_timeout=True)
            if msg.get("event") == "done":
                done += 1
        drain_timed_out = done < len(workers)
        cpu1 = _cpu_snapshot(server_pid, workers)
        busy1 = machine_busy()
        pub_buf = _drain_publisher(pub_sock, pub_buf, s.encoding, pub_errors)
        window_ns = perf() - t_first if t_first else 0

        # Collect.
        results = []
        for w in workers:
            assert w.stdin is not None
            w.stdin.write("stop\n")
            w.stdin.flush()
            results.append(_read_event(w, time.monotonic() + 30))
        lat: array.array[int] = array.array("q")
        for i in range(len(per)):
            p = os.path.join(tmpdir, f"lat{i}.bin")
            if os.path.exists(p):
                with open(p, "rb") as f:
                    lat.frombytes(f.read())
        try:
            pub_sock.sendall(mask_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
        except OSError:
            pass  # the server already closed the publisher; its close code is in pub_errors
        pub_sock.close()
        time.sleep(0.2)
        try:
            metrics_after = scrape(host, port)
        except OSError as exc:
            metrics_after = {"counters": {"error": f"cannot scrape /metrics after the run: {exc}"}}

        received = sum(r.get("received", 0) for r in results)
        subs_per_channel = [len(range(c, s.subscribers, s.channel_count)) for c in range(s.channel_count)]
        msgs_per_channel = [len(range(first_seq + ((c - first_seq) % s.channel_count), total, s.channel_count))
                            for c in range(s.channel_count)]
        expected = sum(a * b for a, b in zip(subs_per_channel, msgs_per_channel))
        firsts = [r["first_ns"] for r in results if r.get("first_ns")]
        lasts = [r["last_ns"] for r in results if r.get("last_ns")]
        delivery_span = (max(lasts) - min(firsts)) / 1e9 if firsts and lasts else 0.0
        us = sorted(v / 1000 for v in lat)
        srv_cpu = (cpu1["server"] - cpu0["server"]) if cpu0.get("server") is not None and cpu1.get("server") is not None else None
        load_cpu = sum((cpu1.get(f"load{i}") or 0) - (cpu0.get(f"load{i}") or 0) for i in range(len(workers)))
        b0, tot0 = busy0
        b1, tot1 = busy1
        lags_us = sorted(v / 1000 for v in lags)
        result.update({
            "published_measured": measured,
            "publish_rate_achieved": round((measured - 1) / publish_span, 1) if publish_span else None,
            "publisher_lag_us": {"p50": percentile(lags_us, 50), "p99": percentile(lags_us, 99),
                                 "max": lags_us[-1] if lags_us else None},
            "target_deliveries_per_s": round(expected / s.duration, 1),
            "deliveries_per_s": round(received / delivery_span, 1) if delivery_span else None,
            "expected_deliveries": expected,
            "received_deliveries": received,
            "loss": expected - received,
            "loss_gaps": sum(r.get("missing", 0) for r in results),
            "loss_not_arrived_by_deadline": sum(r.get("pending", 0) for r in results),
            "drain_timed_out": drain_timed_out,
            "latency_us": {
                "count": len(us),
                "p50": _r(percentile(us, 50)), "p90": _r(percentile(us, 90)),
                "p99": _r(percentile(us, 99)), "p99.9": _r(percentile(us, 99.9)),
                "max": _r(us[-1] if us else None), "min": _r(us[0] if us else None),
                "mean": _r(sum(us) / len(us) if us else None),
            },
            "server_cpu_seconds": round(srv_cpu / 1e9, 3) if srv_cpu is not None else None,
            "server_cpu_us_per_delivery": round(srv_cpu / 1000 / received, 3) if srv_cpu is not None and received else None,
            "server_cpu_system_share": round((cpu1["server_system"] - cpu0["server_system"]) / srv_cpu, 3)
            if srv_cpu and cpu0.get("server_system") is not None and cpu1.get("server_system") is not None else None,
            "server_cpu_utilization": round(srv_cpu / window_ns, 3) if srv_cpu is not None and window_ns else None,
            "load_cpu_utilization": round(load_cpu / window_ns, 3) if window_ns else None,
            "machine_cpu_busy": round((b1 - b0) / (tot1 - tot0), 3) if tot1 > tot0 else None,
            "window_seconds": round(window_ns / 1e9, 3),
            "out_of_order": sum(r.get("out_of_order", 0) for r in results),
            "server_closes": sum(r.get("closed", 0) for r in results),
            "eof": sum(r.get("eof", 0) for r in results),
            "gap_messages": sum(r.get("gaps", 0) for r in results),
            "error_messages": sum(r.get("errors", 0) for r in results),
            "close_codes": sorted({c for r in results for c in r.get("close_codes", [])}),
            "subscriber_errors_sample": [e for r in results for e in r.get("errors_sample", [])][:20],
            "publisher_errors_sample": pub_errors[:20],
            "metrics_after": metrics_after["counters"],
            "pad_chars": pad_len,
            "settings_drain": s.drain,
        })
        return result
    finally:
        for w in workers:
            if w.poll() is None:
                try:
                    w.wait(10)
                except subprocess.TimeoutExpired:
                    w.kill()
                    w.wait(5)
            for pipe in (w.stdin, w.stdout):
                if pipe is not None:
                    try:
                        pipe.close()
                    except BrokenPipeError:
                        pass  # the worker is gone; nothing left to flush to it
        if server is not None:
            result["server_exit_code"] = server.stop()
            log = server.log_text()
            noisy = [ln for ln in log.splitlines()
                     if any(w in ln for w in (" WARNING ", " ERROR ", "Traceback", "Exception"))]
            result["server_log_warnings"] = noisy[:30]
            result["server_log_warning_count"] = len(noisy)
            result["server_log_lines"] = len(log.splitlines())
            os.unlink(server.log.name)
        shutil.rmtree(tmpdir, ignore_errors=True)


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def _pad_length(s: Settings) -> int:
    """Pad so the encoded ``data`` object is about ``--payload-bytes`` long."""
    probe: dict[str, Any] = {"t": time.perf_counter_ns(), "seq": 0, "pad": ""}
    if s.encoding == "json":
        base = len(json.dumps(probe, separators=(",", ":")))
    else:
        import msgpack

        base = len(msgpack.packb(probe))
    return max(0, s.payload_bytes - base)


def _cpu_snapshot(server_pid: int | None, workers: list[subprocess.Popen[str]]) -> dict[str, int | None]:
    snap: dict[str, int | None] = {"server": proc_cpu_ns(server_pid) if server_pid else None}
    snap["server_system"] = proc_cpu_ns(server_pid, "system") if server_pid else None
    for i, w in enumerate(workers):
        snap[f"load{i}"] = proc_cpu_ns(w.pid)
    return snap


def _drain_publisher(sock: socket.socket, buf: bytes, encoding: str, errors: list[str]) -> bytes:
    """Read what the server sent the publisher (welcome, pings, errors) without blocking."""
    while select.select([sock], [], [], 0)[0]:
        try:
            data = sock.recv(65536)
        except OSError as exc:
            errors.append(f"publisher: recv failed: {exc}")
            break
        if not data:
            errors.append("publisher: server closed the connection")
            break
        buf += data
    frames, buf = split_frames(buf)
    for op, _fin, payload in frames:
        if op == OP_PING:
            sock.sendall(mask_frame(OP_PONG, payload))
        elif op == OP_CLOSE:
            errors.append(f"publisher: close {int.from_bytes(payload[:2], 'big')} {payload[2:]!r}")
        elif op in (OP_TEXT, OP_BINARY):
            msg = decode_message(encoding, payload)
            if msg.get("type") != "welcome":
                errors.append(json.dumps(msg, default=repr)[:300])
    return buf


def _read_event(w: subprocess.Popen[str], deadline: float, allow_timeout: bool = False) -> dict[str, Any]:
    assert w.stdout is not None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if allow_timeout:
                return {"event": "timeout"}
            raise TimeoutError("subscriber process did not answer in time")
        r, _, _ = select.select([w.stdout], [], [], remaining)
        if not r:
            continue
        line = w.stdout.readline()
        if not line:
            raise RuntimeError(f"subscriber process exited with {w.wait()}")
        return json.loads(line)  # type: ignore[no-any-return]


# -- report ----------------------------------------------------------------------------------


def print_table(report: dict[str, Any]) -> None:
    cols = ("impl", "fastpath", "deliv/s", "target/s", "loss", "p50", "p90", "p99", "p99.9", "max",
            "srv µs/deliv", "srv CPU", "load CPU")
    rows = []
    for r in report["runs"]:
        lat = r["latency_us"]
        rows.append((r["impl_requested"], str(r["fastpath"]), _f(r["deliveries_per_s"], 0),
                     _f(r["target_deliveries_per_s"], 0), str(r["loss"]), _f(lat["p50"]),
                     _f(lat["p90"]), _f(lat["p99"]), _f(lat["p99.9"]), _f(lat["max"]),
                     _f(r["server_cpu_us_per_delivery"], 2),
                     _pct(r["server_cpu_utilization"]), _pct(r["load_cpu_utilization"])))
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    st = report["settings"]
    print(f"\nrelay load: {st['subscribers']} subscribers, {st['channel_count']} channel(s), "
          f"{st['rate']:g} msg/s for {st['duration']:g}s (+{st['warmup']:g}s warm-up), "
          f"{st['encoding']}, ~{st['payload_bytes']} B data; latency in µs")
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    for r in report["runs"]:
        problems = []
        if r["loss"]:
            problems.append(
                f"LOSS: {r['loss']} of {r['expected_deliveries']} deliveries missing: "
                f"{r['loss_gaps']} skipped (gaps), {r['loss_not_arrived_by_deadline']} not arrived "
                f"by the end of the run (drain <= {r['settings_drain']}s)")
        if r["server_closes"] or r["eof"]:
            problems.append(f"DISCONNECTS: {r['server_closes']} close frames {r['close_codes']}, {r['eof']} EOFs")
        if r["out_of_order"]:
            problems.append(f"OUT OF ORDER: {r['out_of_order']}")
        if r["gap_messages"] or r["error_messages"] or r["publisher_errors_sample"]:
            problems.append(f"gap={r['gap_messages']} error={r['error_messages']} publisher={r['publisher_errors_sample'][:3]}")
        if r.get("server_exit_code") not in (0, None):
            problems.append(f"server exited with {r['server_exit_code']}")
        if r.get("server_log_warning_count"):
            problems.append(f"server log: {r['server_log_warning_count']} warning/error lines, e.g. {r['server_log_warnings'][:2]}")
        target, got = r["target_deliveries_per_s"], r["deliveries_per_s"]
        if got is not None and got < 0.95 * target:
            problems.append(f"SATURATED: {got:,.0f} deliveries/s of {target:,.0f} targeted; "
                            "latency includes queueing behind the backlog")
        if r["drain_timed_out"]:
            problems.append("drain timed out before every subscriber saw the last message")
        for p in problems:
            print(f"  !! [{r['impl_requested']}] {p}")
    if "ratio_pure_over_compiled" in report:
        print("pure / compiled: " + ", ".join(f"{k} {v}" for k, v in report["ratio_pure_over_compiled"].items()))
    m = report["machine"]
    print(f"machine: {m['cpu_model']}, nproc {m['nproc']}, Linux {m['kernel']}, Python {m['python']}, "
          f"load avg before {m['loadavg_before'][0]:.2f}; commit {str(report['git']['commit'])[:12]}"
          f"{' (dirty tree)' if report['git']['dirty'] else ''}")


def _f(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:,.{nd}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def ratios(compiled: dict[str, Any], pure: dict[str, Any]) -> dict[str, float | None] | None:
    """Return pure/compiled ratios, or None unless the compiled run really ran Cython."""
    if compiled.get("fastpath") != "cython" or pure.get("fastpath") != "python":
        return None

    def q(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a and b else None

    return {
        "server_cpu_us_per_delivery": q(pure["server_cpu_us_per_delivery"], compiled["server_cpu_us_per_delivery"]),
        "p50": q(pure["latency_us"]["p50"], compiled["latency_us"]["p50"]),
        "p99": q(pure["latency_us"]["p99"], compiled["latency_us"]["p99"]),
        "p99.9": q(pure["latency_us"]["p99.9"], compiled["latency_us"]["p99.9"]),
        "deliveries_per_s": q(pure["deliveries_per_s"], compiled["deliveries_per_s"]),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="End-to-end relay benchmark: N subscribers, one publisher at a fixed rate, "
        "publish-to-deliver latency, deliveries/s and server CPU per delivery (loopback only).")
    p.add_argument("--subscribers", type=int, default=100, metavar="N", help="subscriber connections (default 100)")
    p.add_argument("--channel-count", type=int, default=1, metavar="C",
                   help="channels; subscribers and messages are spread round-robin (default 1)")
    p.add_argument("--rate", type=float, default=1000.0, metavar="R", help="messages published per second (default 1000)")
    p.add_argument("--duration", type=float, default=10.0, metavar="S", help="measured seconds (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, metavar="S", help="unmeasured seconds first (default 2)")
    p.add_argument("--payload-bytes", type=int, default=64, metavar="B",
                   help="size of the encoded data object {t, seq, pad} (default 64)")
    p.add_argument("--encoding", choices=("json", "msgpack"), default="json")
    p.add_argument("--impl", choices=("compiled", "pure", "both"), default="compiled",
                   help="server fast path: compiled (Cython, if built), pure (RELAY_PURE_PYTHON=1), "
                   "or both back to back with their ratio (default compiled)")
    p.add_argument("--server-cpu", metavar="N", help="pin the server with taskset -c N")
    p.add_argument("--load-procs", type=int, default=1, metavar="P",
                   help="subscriber processes (default 1; each costs a core under load)")
    p.add_argument("--drain", type=float, default=5.0, metavar="S",
                   help="after the last publish, wait at most S seconds for deliveries (default 5)")
    p.add_argument("--url", help="use a running server (ws://127.0.0.1:PORT/ws) instead of starting one")
    p.add_argument("--server-pid", type=int, help="with --url: the server's pid, for its CPU time")
    p.add_argument("--out", metavar="FILE.json", help="write the full report as JSON")
    a = p.parse_args(argv)
    for name in ("subscribers", "channel_count", "load_procs"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.rate <= 0 or a.duration <= 0 or a.warmup < 0 or a.drain < 0:
        p.error("--rate and --duration must be > 0, --warmup and --drain >= 0")
    if a.duration > 600 or a.warmup > 120:
        p.error("--duration is limited to 600 s and --warmup to 120 s")
    if a.url:
        parts = urlsplit(a.url)
        if parts.scheme != "ws":
            p.error("--url must be ws://127.0.0.1:PORT/ws (or ::1 / localhost)")
        check_loopback(parts.hostname or "")
        if a.impl == "both":
            p.error("--impl both starts its own servers; it cannot be used with --url")
    return a


def main(argv: list[str] | None = None) -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "_subscribers" and argv is None:
        return _worker_main(json.loads(sys.argv[2]))
    a = parse_args(argv)
    s = Settings(a.subscribers, a.channel_count, a.rate, a.duration, a.warmup, a.payload_bytes,
                 a.encoding, a.load_procs, a.drain, a.server_cpu, a.url, a.server_pid)
    report: dict[str, Any] = {
        "tool": "bench/load/loadgen.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.executable).name, *sys.argv],
        "settings": asdict(s) | {"impl": a.impl},
        "machine": machine_facts(),
        "git": git_facts(),
        "runs": [],
    }
    if a.url:
        impls = ["external"]  # whatever the running server was started with; see "fastpath"
    else:
        impls = ["compiled", "pure"] if a.impl == "both" else [a.impl]
    for impl in impls:
        print(f"loadgen: running {impl} ...", file=sys.stderr)
        report["runs"].append(run_once(s, impl))
    if a.impl == "both":
        rat = ratios(report["runs"][0], report["runs"][1])
        if rat is None:
            print("loadgen: no ratio: the two runs did not report cython and python fast paths",
                  file=sys.stderr)
        else:
            report["ratio_pure_over_compiled"] = rat
    report["machine"]["loadavg_after"] = list(os.getloadavg())
    print_table(report)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.out}")
    bad = any(r["loss"] or r["server_closes"] or r["eof"] for r in report["runs"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
