"""W4's measuring clients: slow subscribers that read at a bounded pace, and fast probes.

Run by ``relay bench w4`` as its own process, pinned to the load CPUs
(``python -m relay.bench.keyed_client ...``); it talks to the bench over stdin/stdout JSON
lines like cload does. Standard library only (plus msgpack for ``--encoding msgpack``); it
never imports the server. Loopback only.

Every client is a hand-written WebSocket client on a plain socket, subscribed to one channel
whose messages carry ``data = {"t": send time (CLOCK_MONOTONIC ns), "s": sequence number,
<key field>: "SYM000".., "p": padding}`` (``cload pub --keys``).

* A **probe** reads everything as soon as it arrives (``recv`` of up to 1 MiB whenever its
  socket is readable) and is drained just before each sample: what it has "seen" is what had
  arrived in its socket. It is the floor for staleness.
* A **slow** subscriber has a small ``SO_RCVBUF`` (set before connecting) and consumes at most
  ``--slow-rate`` messages per second: a token bucket (at most 20 ms of credit), and it only
  reads from its socket (4 KiB at a time) when it has a token and no complete frame buffered.
  What it has "seen" is what it has consumed.

Staleness: every ``--sample-ms`` within the measured window, for every client and every
symbol, ``age = now - t`` of the newest value of that symbol the client has seen (``t`` is the
publisher's send time). A symbol the client has no value for counts as ``missing``. With
``K`` symbols published round robin at ``R`` messages/s, each symbol changes every ``K/R``
seconds, so even a client that sees every update at once has ages spread evenly over
``[latency, K/R + latency]``: that is the floor the probes measure. For the slow clients,
each sample also gives ``outdated = now - t`` of the first update of that symbol newer than
the value the client holds, as far as the (first) probe has received it; 0 when the client
holds the newest value the probe has (``current``). That is how long its value has been
superseded; with round robin it is about ``age - K/R``.

Protocol: prints ``{"event":"ready",...}`` once every client is subscribed (or failed), then
waits for ``go WINDOW_START_NS WINDOW_END_NS PUBLISH_END_NS DEADLINE_NS LAST_SEQ`` on stdin,
runs until every client is done (closed, or holding the last published value of every symbol,
or idle for ``--idle`` seconds after the publisher's end) or the deadline, prints
``{"event":"result",...}`` and exits.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import json
import math
import os
import resource
import select
import socket
import struct
import sys
import time
from typing import Any

HOST = "127.0.0.1"
SLOW_READ_BYTES = 4096
PROBE_READ_BYTES = 1 << 20
BURST_S = 0.02


def symbol_names(keys: int) -> list[str]:
    """The key values ``cload pub --keys N`` uses: SYM000 .. SYM<N-1>, zero padded to >= 3 digits."""
    width = max(3, len(str(max(0, keys - 1))))
    return [f"SYM{i:0{width}d}" for i in range(keys)]


def percentiles(values: list[int], scale: float = 1e3) -> dict[str, Any]:
    """Nearest-rank p50/p90/p99/p99.9 and max of ``values`` (ns), in µs by default."""
    if not values:
        return {"count": 0}
    v = sorted(values)
    n = len(v)

    def pct(q: float) -> float:
        return round(v[max(1, math.ceil(q / 100 * n)) - 1] / scale, 1)

    return {"count": n, "min": round(v[0] / scale, 1), "mean": round(sum(v) / n / scale, 1), "p50": pct(50),
            "p90": pct(90), "p99": pct(99), "p99.9": pct(99.9), "max": round(v[-1] / scale, 1)}


class Client:
    def __init__(self, role: str, index: int, port: int, channel: str, encoding: str, rcvbuf: int) -> None:
        self.role, self.index, self.channel, self.encoding = role, index, channel, encoding
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(10)
        self.sock.connect((HOST, port))
        self.rcvbuf_effective = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           f"Sec-WebSocket-Protocol: relay.v1.{encoding}\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise OSError("server closed during the handshake")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise OSError(f"handshake refused: {head[:200]!r}")
        self.buf = bytearray(rest)
        self.sock.setblocking(False)
        self.fragments: list[bytes] = []
        self.subscribed = False
        self.closed_code: int | None = None
        self.closed_at: int | None = None
        self.caught_up_at: int | None = None  # first time it held the last value of every symbol
        self.eof = False
        self.last_bytes_ns = time.monotonic_ns()
        self.tokens = 0.0
        self.tokens_ns = 0
        # what it has seen
        self.newest_s: dict[str, int] = {}
        self.newest_t: dict[str, int] = {}
        self.received = 0
        self.received_window = 0
        self.last_offset: int | None = None
        self.offset_jumps = 0
        self.offset_skipped = 0
        self.offset_backwards = 0
        self.stale_after_fresh = 0
        self.gap_messages = 0
        self.error_messages = 0
        self.other_messages = 0
        self.pings = 0
        self.latency_ns: list[int] = []  # consume time - t, within the window
        self.ages_ns: list[int] = []
        self.outdated_ns: list[int] = []
        self.current = 0
        self.missing = 0
        # a probe keeps every update it sees, per symbol, to tell when a slow client's value
        # was superseded
        self.keep_history = role == "probe"
        self.hist_s: dict[str, list[int]] = {}
        self.hist_t: dict[str, list[int]] = {}
        self.samples = 0
        self.send(self.encode({"type": "subscribe", "channel": channel, "ref": 1}), 1 if encoding == "json" else 2)

    # -- wire ------------------------------------------------------------------------------------

    def encode(self, obj: dict[str, Any]) -> bytes:
        if self.encoding == "json":
            return json.dumps(obj, separators=(",", ":")).encode()
        import msgpack

        out: bytes = msgpack.packb(obj)
        return out

    def decode(self, payload: bytes) -> Any:
        if self.encoding == "json":
            return json.loads(payload)
        import msgpack

        return msgpack.unpackb(payload, raw=False)

    def send(self, payload: bytes, opcode: int) -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        self.sock.setblocking(True)
        self.sock.settimeout(5)
        try:
            self.sock.sendall(head + mask + masked)
        except OSError:
            pass  # the connection is going away; the read side notices
        finally:
            self.sock.setblocking(False)

    def fill(self, nbytes: int) -> bool:
        """One non-blocking recv; False when nothing was there."""
        if self.eof:
            return False
        try:
            chunk = self.sock.recv(nbytes)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self.eof = True
            return False
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        self.last_bytes_ns = time.monotonic_ns()
        return True

    def has_frame(self) -> bool:
        """True when a complete frame is buffered."""
        b = self.buf
        if len(b) < 2:
            return False
        n, hl = b[1] & 0x7F, 2
        if n == 126:
            if len(b) < 4:
                return False
            n, hl = struct.unpack_from("!H", b, 2)[0], 4
        elif n == 127:
            if len(b) < 10:
                return False
            n, hl = struct.unpack_from("!Q", b, 2)[0], 10
        return len(b) >= hl + n

    def next_frame(self) -> tuple[int, bool, bytes] | None:
        """Pop one complete frame (opcode, fin, payload) from the buffer, or None."""
        b = self.buf
        if len(b) < 2:
            return None
        n = b[1] & 0x7F
        hl = 2
        if n == 126:
            if len(b) < 4:
                return None
            n, hl = struct.unpack_from("!H", b, 2)[0], 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, hl = struct.unpack_from("!Q", b, 2)[0], 10
        if len(b) < hl + n:
            return None
        opcode, fin = b[0] & 0x0F, bool(b[0] & 0x80)
        payload = bytes(b[hl:hl + n])
        del b[:hl + n]
        return opcode, fin, payload

    def consume_one(self, now: int, window: tuple[int, int], key_field: str) -> bool | None:
        """Handle one complete frame; True for a channel message, False for anything else,
        None when no complete frame is buffered."""
        frame = self.next_frame()
        if frame is None:
            return None
        opcode, fin, payload = frame
        if opcode == 0x9:
            self.pings += 1
            self.send(payload[:125], 0xA)
            return False
        if opcode == 0x8:
            self.closed_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self.closed_at = now
            self.send(payload[:2], 0x8)
            return False
        if opcode in (0x1, 0x2, 0x0):
            self.fragments.append(payload)
            if not fin:
                return False
            payload = b"".join(self.fragments)
            self.fragments = []
        else:
            return False
        msg = self.decode(payload)
        kind = msg.get("type")
        if kind == "message":
            self.on_message(msg, now, window, key_field)
            return True
        if kind == "subscribed":
            self.subscribed = True
        elif kind == "gap":
            self.gap_messages += 1
        elif kind == "error":
            self.error_messages += 1
        else:
            self.other_messages += 1
        return False

    def on_message(self, msg: dict[str, Any], now: int, window: tuple[int, int], key_field: str) -> None:
        off = msg.get("offset")
        data = msg.get("data") or {}
        t, s, key = data.get("t"), data.get("s"), data.get(key_field)
        self.received += 1
        if isinstance(off, int):
            if self.last_offset is not None:
                if off <= self.last_offset:
                    self.offset_backwards += 1
                elif off != self.last_offset + 1:
                    self.offset_jumps += 1
                    self.offset_skipped += off - self.last_offset - 1
            if self.last_offset is None or off > self.last_offset:
                self.last_offset = off
        if not isinstance(t, int) or not isinstance(s, int) or key is None:
            self.other_messages += 1
            return
        prev = self.newest_s.get(key)
        if prev is not None and s <= prev:
            self.stale_after_fresh += 1
            return
        self.newest_s[key] = s
        self.newest_t[key] = t
        if self.keep_history:
            self.hist_s.setdefault(key, []).append(s)
            self.hist_t.setdefault(key, []).append(t)
        if window[0] <= now < window[1]:
            self.received_window += 1
            self.latency_ns.append(now - t)

    def sample(self, now: int, symbols: list[str], reference: Client | None) -> None:
        self.samples += 1
        newest = self.newest_t
        for k in symbols:
            t = newest.get(k)
            if t is None:
                self.missing += 1
                continue
            self.ages_ns.append(now - t)
            if reference is None or reference is self:
                continue
            # outdated for: since the send of the first update of k newer than the value
            # this client holds (as far as the reference probe has seen); 0 when current
            hs = reference.hist_s.get(k, [])
            i = bisect.bisect_right(hs, self.newest_s[k])
            if i < len(hs):
                self.outdated_ns.append(max(0, now - reference.hist_t[k][i]))
            else:
                self.outdated_ns.append(0)
                self.current += 1

    def done(self) -> bool:
        return self.closed_code is not None or self.eof

    def summary(self, finals: dict[str, int], window_s: float) -> dict[str, Any]:
        at_final = sum(1 for k, s in finals.items() if self.newest_s.get(k) == s)
        return {
            "role": self.role, "index": self.index, "rcvbuf_effective": self.rcvbuf_effective,
            "received": self.received, "received_window": self.received_window,
            "received_per_s": round(self.received_window / window_s, 1) if window_s > 0 else None,
            "offset_jumps": self.offset_jumps, "offset_skipped": self.offset_skipped,
            "offset_backwards": self.offset_backwards, "stale_after_fresh": self.stale_after_fresh,
            "symbols_seen": len(self.newest_s), "symbols_at_final": at_final, "symbols_total": len(finals),
            "gap_messages": self.gap_messages, "error_messages": self.error_messages,
            "other_messages": self.other_messages, "pings": self.pings, "close_code": self.closed_code,
            "closed_at_ns": self.closed_at, "eof": self.eof and self.closed_code is None,
            "caught_up_at_ns": self.caught_up_at,
            "samples": self.samples, "missing": self.missing,
            "missing_share": round(self.missing / (self.missing + len(self.ages_ns)), 4)
            if self.missing + len(self.ages_ns) else None,
            "age_us": percentiles(self.ages_ns), "latency_us": percentiles(self.latency_ns),
            "outdated_us": percentiles(self.outdated_ns),
            "current_share": round(self.current / len(self.outdated_ns), 4) if self.outdated_ns else None,
        }


def _combined(clients: list[Client], finals: dict[str, int], window_s: float) -> dict[str, Any]:
    ages = [a for c in clients for a in c.ages_ns]
    lat = [x for c in clients for x in c.latency_ns]
    outdated = [x for c in clients for x in c.outdated_ns]
    current = sum(c.current for c in clients)
    missing = sum(c.missing for c in clients)
    return {
        "clients": len(clients),
        "age_us": percentiles(ages),
        "outdated_us": percentiles(outdated),
        "current_share": round(current / len(outdated), 4) if outdated else None,
        "latency_us": percentiles(lat),
        "missing_share": round(missing / (missing + len(ages)), 4) if missing + len(ages) else None,
        "per_client": [c.summary(finals, window_s) for c in clients],
    }


def _stdin_line(timeout: float) -> str | None:
    r, _, _ = select.select([sys.stdin], [], [], timeout)
    if not r:
        return None
    line = sys.stdin.readline()
    return line.strip() if line else "eof"


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m relay.bench.keyed_client", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--channel", required=True)
    p.add_argument("--encoding", choices=("json", "msgpack"), default="json")
    p.add_argument("--slow", type=int, default=1, help="slow subscribers")
    p.add_argument("--slow-rate", type=float, default=1000.0, help="messages/s each slow subscriber consumes")
    p.add_argument("--slow-rcvbuf", type=int, default=4096, help="SO_RCVBUF of the slow subscribers (bytes)")
    p.add_argument("--probes", type=int, default=1, help="fast probe subscribers")
    p.add_argument("--keys", type=int, default=500)
    p.add_argument("--key-field", default="symbol")
    p.add_argument("--sample-ms", type=float, default=50.0)
    p.add_argument("--idle", type=float, default=1.0,
                   help="after the publisher's end, a client with nothing new for this long is done")
    a = p.parse_args(argv)
    symbols = symbol_names(a.keys)
    t_connect = time.monotonic()
    clients: list[Client] = []
    errors: list[str] = []
    for i in range(a.probes):
        try:
            clients.append(Client("probe", i, a.port, a.channel, a.encoding, 0))
        except OSError as exc:
            errors.append(f"probe {i}: {exc}")
    for i in range(a.slow):
        try:
            clients.append(Client("slow", i, a.port, a.channel, a.encoding, a.slow_rcvbuf))
        except OSError as exc:
            errors.append(f"slow {i}: {exc}")
    # wait for every "subscribed" (nothing else is published yet)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(c.subscribed or c.done() for c in clients):
        select.select([c.sock for c in clients], [], [], 0.05)
        for c in clients:
            if c.fill(PROBE_READ_BYTES):
                while c.consume_one(time.monotonic_ns(), (0, 0), a.key_field) is not None:
                    pass
    ok = sum(1 for c in clients if c.subscribed)
    _emit({"event": "ready", "subscribed": ok, "failed": a.probes + a.slow - ok, "errors": errors,
           "seconds": round(time.monotonic() - t_connect, 3)})
    line = None
    while line is None:
        line = _stdin_line(60)
    parts = line.split()
    if not parts or parts[0] != "go":
        return 1
    w0, w1, pub_end, hard_deadline, last_seq = (int(x) for x in parts[1:6])
    window = (w0, w1)
    finals = {k: last_seq - ((last_seq - i) % a.keys) for i, k in enumerate(symbols) if last_seq >= i}
    ru0, go_ns = resource.getrusage(resource.RUSAGE_SELF), time.monotonic_ns()
    probes = [c for c in clients if c.role == "probe"]
    slow = [c for c in clients if c.role == "slow"]
    now = time.monotonic_ns()
    for c in slow:
        c.tokens, c.tokens_ns = 0.0, now
    sample_every = int(a.sample_ms * 1e6)
    next_sample = w0
    finished: set[int] = set()
    lag_ns: list[int] = []  # how late each sample was taken (this process's own scheduling)
    idle_ns = int(a.idle * 1e9)
    while True:
        now = time.monotonic_ns()
        if now >= hard_deadline:
            break
        for i, c in enumerate(clients):
            if i in finished:
                continue
            current = now > pub_end and all(c.newest_s.get(k) == s for k, s in finals.items())
            if current and c.caught_up_at is None:
                c.caught_up_at = now
            if c.done() or current or (now > pub_end and now - c.last_bytes_ns > idle_ns and not c.has_frame()):
                finished.add(i)
        if len(finished) == len(clients):
            break
        # probes: read everything there is
        for c in probes:
            while c.fill(PROBE_READ_BYTES):
                pass
            now = time.monotonic_ns()
            while c.consume_one(now, window, a.key_field) is not None:
                pass
        # slow ones: at most slow_rate messages per second
        for c in slow:
            if c.done():
                continue
            c.tokens = min(c.tokens + (now - c.tokens_ns) * a.slow_rate / 1e9, max(1.0, a.slow_rate * BURST_S))
            c.tokens_ns = now
            while c.tokens >= 1 and not c.done():
                got = c.consume_one(now, window, a.key_field)
                if got is None:
                    if not c.fill(SLOW_READ_BYTES):
                        break
                    now = time.monotonic_ns()
                    continue
                if got:
                    c.tokens -= 1
        now = time.monotonic_ns()
        if now >= next_sample and next_sample < w1:
            for c in probes:  # what has arrived counts for a probe
                while c.fill(PROBE_READ_BYTES):
                    pass
                now = time.monotonic_ns()
                while c.consume_one(now, window, a.key_field) is not None:
                    pass
            now = time.monotonic_ns()
            lag_ns.append(now - next_sample)
            for c in clients:
                c.sample(now, symbols, probes[0] if probes else None)
            next_sample += sample_every
            while next_sample <= now:  # skip samples that were missed altogether
                next_sample += sample_every
        # sleep until a socket has something, the next token or the next sample
        wait_ns = 10_000_000
        if next_sample < w1:
            wait_ns = min(wait_ns, max(0, next_sample - now))
        rlist = [c.sock for c in probes if not c.done()]
        for c in slow:
            if c.done():
                continue
            if c.tokens >= 1:
                rlist.append(c.sock)  # it wants data and has none buffered
            else:
                wait_ns = min(wait_ns, int((1 - c.tokens) * 1e9 / a.slow_rate))
        if rlist or wait_ns > 0:
            select.select(rlist, [], [], wait_ns / 1e9)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    window_s = (w1 - w0) / 1e9
    _emit({
        "event": "result",
        "keys": a.keys, "slow_rate": a.slow_rate, "sample_ms": a.sample_ms,
        "cpu": {"user_s": round(ru1.ru_utime - ru0.ru_utime, 4), "sys_s": round(ru1.ru_stime - ru0.ru_stime, 4)},
        "wall_s": round((time.monotonic_ns() - go_ns) / 1e9, 3), "window_start_ns": w0,
        "sample_lag_us": percentiles(lag_ns),
        "timed_out": len(finished) < len(clients),
        "probe": _combined(probes, finals, window_s),
        "slow": _combined(slow, finals, window_s),
        "symbols_published": len(finals),
    })
    for c in clients:
        try:
            c.sock.close()
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
