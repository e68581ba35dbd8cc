"""relay bench: its C load generator counts what it sees, and a short run against a real server
loses nothing. Not timed: no assertion here depends on the machine's speed.

Needs a C compiler (the load generator is compiled on first use) and the source checkout's
bench/load/cload.c; without them these tests are skipped.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from relay import bench, fastpath

REPO = Path(__file__).resolve().parents[1]

# CI (RELAY_REQUIRE_COMPILED=1) always has a compiler: there a missing one fails.
pytestmark = pytest.mark.skipif(
    (bench.find_compiler() is None or not (REPO / "bench" / "load" / "cload.c").exists())
    and not os.environ.get("RELAY_REQUIRE_COMPILED"),
    reason="relay bench needs a C compiler and bench/load/cload.c",
)


@pytest.fixture(scope="module")
def cload() -> Path:
    return bench.build_cload()


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """An unmasked server frame, in the shortest length form."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack("!H", n)
    else:
        head += bytes([127]) + struct.pack("!Q", n)
    return head + payload


def _read_client_frame(conn: socket.socket) -> tuple[int, bytes]:
    """Read one masked client frame; return (opcode, unmasked payload)."""
    def exact(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            assert chunk, "client closed early"
            data += chunk
        return data

    b0, b1 = exact(2)
    assert b1 & 0x80, "client frames must be masked"
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", exact(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", exact(8))[0]
    key = exact(4)
    data = exact(n)
    return b0 & 0x0F, bytes(c ^ key[i % 4] for i, c in enumerate(data))


def _scripted_server(listener: socket.socket, encoding: str, seen: dict[str, Any]) -> None:
    """Accept one subscriber and send it a script of awkward frames, byte by byte."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        seen["request"] = request.decode()
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        op, payload = _read_client_frame(conn)
        seen["subscribe"] = (op, payload)

        def enc(obj: dict[str, Any]) -> bytes:
            if encoding == "json":
                return json.dumps(obj, separators=(",", ":")).encode()
            return msgpack.packb(obj)  # type: ignore[no-any-return]

        def msg(offset: int, seq: int, pad: int = 1) -> dict[str, Any]:
            return {"type": "message", "channel": "bench.0", "offset": offset,
                    "data": {"t": time.monotonic_ns(), "s": seq, "p": "x" * pad}}

        opcode = 1 if encoding == "json" else 2
        script = [
            _frame(opcode, enc({"type": "subscribed", "channel": "bench.0", "offset": 0})),
            _frame(opcode, enc(msg(1, 0))),
            _frame(opcode, enc(msg(2, 1, pad=200))),  # 16-bit length form
            _frame(opcode, enc(msg(4, 3))),  # offset 3 and seq 2 skipped: a gap
            _frame(opcode, enc(msg(3, 2))),  # arrives late: out of order, never counted
            _frame(opcode, enc(msg(5, 4, pad=70_000))),  # 64-bit length form
        ]
        fragmented = enc(msg(6, 5))
        script += [_frame(opcode, fragmented[:10], fin=False), _frame(0, fragmented[10:])]
        script += [_frame(9, b"hi"), _frame(opcode, enc({"type": "gap", "channel": "bench.0", "from": 7, "to": 8}))]
        stream = b"".join(script)
        for i in range(0, len(stream), 7):  # 7-byte pieces: every frame is split across reads
            conn.sendall(stream[i:i + 7])
            if i < 2000:
                time.sleep(0.0005)
        op, payload = _read_client_frame(conn)
        seen["pong"] = (op, payload)
        conn.sendall(_frame(8, struct.pack("!H", 4002) + b"slow"))
        seen["close"] = _read_client_frame(conn)


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_cload_counts_gaps_order_closes_and_pings(cload: Path, encoding: str) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, Any] = {}
    server = threading.Thread(target=_scripted_server, args=(listener, encoding, seen), daemon=True)
    server.start()
    try:
        proc = subprocess.run(
            [str(cload), "sub", "--port", str(listener.getsockname()[1]), "--conns", "1", "--encoding", encoding,
             "--first-seq", "0", "--last-seq", "9", "--duration", "20", "--start", "now"],
            capture_output=True, text=True, timeout=30, check=True)
    finally:
        server.join(10)
        listener.close()
    ready, result = (json.loads(line) for line in proc.stdout.splitlines())
    assert ready == {"event": "ready", "conns": 1, "subscribed": 1, "failed": 0,
                     "seconds": ready["seconds"], "slowest_connection_s": ready["slowest_connection_s"]}
    assert f"Sec-WebSocket-Protocol: relay.v1.{encoding}" in seen["request"]
    sub_op, sub_payload = seen["subscribe"]
    sub = json.loads(sub_payload) if encoding == "json" else msgpack.unpackb(sub_payload)
    assert (sub_op, sub) == (1 if encoding == "json" else 2, {"type": "subscribe", "channel": "bench.0"})
    assert seen["pong"] == (0xA, b"hi")
    assert seen["close"] == (8, struct.pack("!H", 4002))
    got = {k: result[k] for k in (
        "expected", "received", "loss", "loss_gaps", "loss_late", "offset_gap_events", "offset_missing",
        "out_of_order", "duplicates", "seq_gap_events", "seq_missing", "gap_messages", "pings", "closes",
        "closes_by_code", "unparsed_messages", "protocol_errors", "stopped_by")}
    assert got == {
        "expected": 10, "received": 5, "loss": 5, "loss_gaps": 1, "loss_late": 4,
        "offset_gap_events": 1, "offset_missing": 1, "out_of_order": 1, "duplicates": 1,
        "seq_gap_events": 1, "seq_missing": 1, "gap_messages": 1, "pings": 1, "closes": 1,
        "closes_by_code": {"4002": 1}, "unparsed_messages": 0, "protocol_errors": 0, "stopped_by": "all_done",
    }
    assert result["latency_us"]["count"] == 5



def run_quick(tmp_path: Path, scenario: str) -> tuple[str, dict[str, Any], str]:
    """Run ``relay bench SCENARIO --quick`` on this run's implementation in a child process
    (it must exit 0); return the implementation's name, the JSON report and the output."""
    impl = "compiled" if fastpath.IMPLEMENTATION == "cython" else "pure"
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "bench", scenario, "--quick", "--impl", impl, "--json", str(out)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return impl, json.loads(out.read_text()), proc.stdout


def test_relay_bench_w2_quick_loses_nothing(tmp_path: Path) -> None:
    """A short W2 run against a real relay server: zero loss, and the report has its keys."""
    impl, report, _ = run_quick(tmp_path, "w2")
    assert {"tool", "date", "settings", "machine", "versions", "git", "servers", "scenarios", "summary"} <= set(report)
    run = report["scenarios"]["w2"][f"relay-{impl}"]["steps"][0]
    assert run["fastpath"] == fastpath.IMPLEMENTATION
    assert run["expected_deliveries"] == run["received_deliveries"] > 0
    assert (run["loss"], run["closes"], run["eof"], run["offset_gaps"], run["out_of_order"]) == (0, 0, 0, 0, 0)
    for key in ("deliveries_per_s", "server_cpu_us_per_delivery", "loadgen_cpu_utilization", "saturated_loadgen"):
        assert key in run
    assert {"p50", "p90", "p99", "p99.9", "max"} <= set(run["latency_us"])
    assert report["summary"][f"relay-{impl}"]["w2_p50_us"] is not None


@pytest.mark.parametrize(
    ("text", "name", "command"),
    [
        ("node ws-server.js --port {port}", "ws-server", "node ws-server.js --port {port}"),
        ("uws=./server -p {port}", "uws", "./server -p {port}"),
        ("{python} peers/x.py --port {port}", "x", "{python} peers/x.py --port {port}"),
    ],
    ids=["script-name", "explicit-label", "python-script"],
)
def test_against_labels(text: str, name: str, command: str) -> None:
    spec = bench.against_spec(text, 1)
    assert (spec.name, spec.command) == (name, command)


def test_against_needs_a_port_placeholder() -> None:
    with pytest.raises(bench.BenchError, match="needs a \\{port\\} placeholder"):
        bench.against_spec("node server.js", 1)


def test_merged_percentiles_come_from_the_merged_histogram() -> None:
    parts = [{"count": 2, "min": 1.0, "mean": 1.5, "max": 2.0}, {"count": 2, "min": 9.0, "mean": 9.5, "max": 10.0}]
    summary = bench._hist_summary([(1000, 1), (2000, 1), (9000, 1), (10000, 1)], parts)
    assert summary == {"count": 4, "min": 1.0, "mean": 5.5, "p50": 2.0, "p90": 10.0, "p99": 10.0, "p99.9": 10.0,
                       "max": 10.0}


def _capture_publishes(listener: socket.socket, count: int, seen: list[bytes]) -> None:
    """Accept one publisher, answer its upgrade, and keep the payloads of its first ``count`` frames."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        while len(seen) < count:
            op, payload = _read_client_frame(conn)
            if op in (1, 2):
                seen.append(payload)
        conn.sendall(_frame(8, struct.pack("!H", 1000)))


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_cload_pub_keys_adds_a_round_robin_symbol(cload: Path, encoding: str) -> None:
    """``cload pub --keys N`` (W4's feed): every data object carries t, s and symbol SYM<s mod N>."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []
    count = 12
    server = threading.Thread(target=_capture_publishes, args=(listener, count, seen), daemon=True)
    server.start()
    try:
        proc = subprocess.run(
            [str(cload), "pub", "--port", str(listener.getsockname()[1]), "--encoding", encoding, "--rate", "2000",
             "--count", str(count), "--start", "now", "--keys", "5", "--key-field", "sym", "--prefix", "w4k.",
             "--payload-bytes", "80", "--linger", "1"],
            capture_output=True, text=True, timeout=30, check=False)
    finally:
        server.join(10)
        listener.close()
    assert json.loads(proc.stdout.splitlines()[0])["sent"] == count, proc.stdout + proc.stderr
    msgs = [json.loads(p) if encoding == "json" else msgpack.unpackb(p) for p in seen]
    assert [m["type"] for m in msgs] == ["publish"] * count
    assert {m["channel"] for m in msgs} == {"w4k.0"}
    assert [list(m["data"]) for m in msgs] == [["t", "s", "sym", "p"]] * count
    assert [m["data"]["s"] for m in msgs] == list(range(count))
    assert [m["data"]["sym"] for m in msgs] == [f"SYM{i % 5:03d}" for i in range(count)]
    times = [m["data"]["t"] for m in msgs]
    assert times == sorted(times) and times[0] > 0


def test_relay_bench_w4_quick_fast_get_everything_slow_ends_current(tmp_path: Path) -> None:
    """A short W4 run (keyed conflation) against a real relay server: the fast subscribers lose
    nothing, the slow one is conflated (fewer messages than published), never sees an older
    value of a symbol after a newer one, and ends with the last value of every symbol."""
    impl, report, stdout = run_quick(tmp_path, "w4")
    (run,) = report["scenarios"]["w4"][f"relay-{impl}"]["steps"]
    assert run["variant"] == "keyed" and run["fastpath"] == fastpath.IMPLEMENTATION
    fast, probe, slow = run["fast"], run["probe"], run["slow"]
    # fast subscribers (C) and the fast probe: every update, in order
    assert fast["expected"] == fast["received"] > 0
    assert (fast["loss"], fast["offset_gaps"], fast["out_of_order"], fast["closes"], fast["eof"]) == (0, 0, 0, 0, 0)
    assert probe["received"] >= run["measured_messages"]
    assert (probe["offset_jumps"], probe["offset_backwards"], probe["stale_after_fresh"]) == (0, 0, 0)
    assert probe["symbols_at_final"] == probe["symbols_total"] == run["keys"]
    # the slow subscriber: conflated, per symbol never backwards, ends current, not closed
    (client,) = slow["per_client"]
    assert 0 < client["received_window"] < run["published_window"]
    assert client["offset_skipped"] > 0
    assert client["stale_after_fresh"] == 0
    assert client["symbols_at_final"] == client["symbols_total"] == run["keys"]
    assert client["close_code"] is None and not client["eof"]
    # staleness was sampled for both, and the report renders it
    assert slow["age_ms"]["count"] > 0 and probe["age_ms"]["count"] > 0
    assert "W4: keyed conflation" in stdout
    assert report["summary"][f"relay-{impl}"]["w4_keyed_pass"] is True


def test_relay_bench_w5_quick_deltas_save_bytes_and_end_right(tmp_path: Path) -> None:
    """A short W5 run: every subscriber ends on the last value, every patch had its base, and
    the delta subscribers read fewer bytes than the full-value ones (not timed)."""
    impl, report, stdout = run_quick(tmp_path, "w5")
    steps = report["scenarios"]["w5"][f"relay-{impl}"]["steps"]
    assert [r["workload"] for r in steps] == ["book", "game", "book-arrays"]
    for r in steps:
        assert r["pass"] and r["fastpath"] == fastpath.IMPLEMENTATION, r
        for enc in ("json", "msgpack"):
            assert r[f"{enc}_delta"]["patches"] > 0 and r[f"{enc}_full"]["patches"] == 0
            assert r[f"{enc}_delta"]["bytes"] < r[f"{enc}_full"]["bytes"]
    assert steps[0]["json_saved"] > 0.5 and steps[1]["json_saved"] > 0.5
    assert "W5: bytes on the wire" in stdout


def _tick_server(listener: socket.socket, encoding: str, seen: dict[str, Any]) -> None:
    """Accept one subscriber and answer like a ?tick_ms= connection: every frame after the
    welcome an array of messages (awkward strings inside, and a ping between two arrays)."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        seen["request"] = request.decode()
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        _read_client_frame(conn)  # subscribe

        def enc(obj: Any) -> bytes:
            if encoding == "json":
                return json.dumps(obj, separators=(",", ":")).encode()
            return msgpack.packb(obj)  # type: ignore[no-any-return]

        def msg(seq: int, pad: str = "x") -> dict[str, Any]:
            return {"type": "message", "channel": "bench.0", "offset": seq + 1,
                    "data": {"t": time.monotonic_ns(), "s": seq, "p": pad}, "ts": 1795835952438554}

        opcode = 1 if encoding == "json" else 2
        script = [
            _frame(opcode, enc({"type": "welcome", "tick_ms": 33})),  # on its own, as always
            _frame(opcode, enc([{"type": "subscribed", "channel": "bench.0", "offset": 0, "x": [1, {"y": None}]},
                                msg(0)])),
            _frame(opcode, enc([msg(1, 'a}"{]['), msg(2, "\\"), msg(3, "z" * 300), msg(4, "é")])),
            _frame(9, b"hi"),
            _frame(opcode, enc([{"type": "pong", "ref": [1.5, True, False]}, msg(5)])),
            _frame(opcode, enc([msg(k) for k in range(6, 26)])),  # 20 elements: msgpack's array16 form
        ]
        stream = b"".join(script)
        for i in range(0, len(stream), 5):  # frames split across reads
            conn.sendall(stream[i:i + 5])
        seen["pong"] = _read_client_frame(conn)
        conn.sendall(_frame(8, struct.pack("!H", 1000)))
        seen["close"] = _read_client_frame(conn)


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_cload_unpacks_tick_arrays(cload: Path, encoding: str) -> None:
    """cload sub --path /ws?tick_ms=N: every element of an array frame counts as a message
    (W6); frames that carried messages, and the array frames, are counted apart."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, Any] = {}
    server = threading.Thread(target=_tick_server, args=(listener, encoding, seen), daemon=True)
    server.start()
    try:
        proc = subprocess.run(
            [str(cload), "sub", "--port", str(listener.getsockname()[1]), "--conns", "1", "--encoding", encoding,
             "--path", "/ws?tick_ms=33", "--first-seq", "0", "--last-seq", "25", "--duration", "20",
             "--start", "now"],
            capture_output=True, text=True, timeout=30, check=True)
    finally:
        server.join(10)
        listener.close()
    ready, result = (json.loads(line) for line in proc.stdout.splitlines())
    assert ready["subscribed"] == 1
    assert seen["request"].startswith("GET /ws?tick_ms=33 HTTP/1.1\r\n")
    assert seen["pong"] == (0xA, b"hi")
    got = {k: result[k] for k in ("expected", "received", "loss", "offset_gap_events", "out_of_order", "duplicates",
                                  "seq_gap_events", "unparsed_messages", "other_messages", "protocol_errors",
                                  "msg_frames", "array_frames", "stopped_by")}
    assert got == {"expected": 26, "received": 26, "loss": 0, "offset_gap_events": 0, "out_of_order": 0,
                   "duplicates": 0, "seq_gap_events": 0, "unparsed_messages": 0, "other_messages": 2,
                   "protocol_errors": 0, "msg_frames": 4, "array_frames": 4, "stopped_by": "all_done"}
    assert result["latency_us"]["count"] == 26


def test_relay_bench_w6_quick_ticks_lose_nothing_in_fewer_frames(tmp_path: Path) -> None:
    """A short W6 run against a real relay server: with and without ticks every subscriber gets
    every message in offset order; with ticks in fewer frames than messages; on a state channel
    with ticks fewer messages than published, in order, ending with the last (not timed)."""
    impl, report, stdout = run_quick(tmp_path, "w6")
    steps = report["scenarios"]["w6"][f"relay-{impl}"]["steps"]
    assert [(r["mode"], r["tick_ms"]) for r in steps] == [("stream", 0), ("stream", 33), ("state", 33)]
    for r in steps:
        assert r["pass"] and r["fastpath"] == fastpath.IMPLEMENTATION, r
        lg = r["loadgen"]
        assert (r["out_of_order"], r["closes"], r["eof"], lg["unparsed_messages"]) == (0, 0, 0, 0), r
    plain, ticked, state = steps
    for r in (plain, ticked):
        assert r["received_deliveries"] == r["expected_deliveries"] > 0 and r["loss"] == 0
        assert r["offset_gaps"] == 0 and r["loadgen"]["seq_gap_events"] == 0
        assert r["loadgen"]["deliveries_all"] == r["publisher"]["sent"] * r["subscribers"]
    assert plain["frames_per_message"] == 1 and plain["loadgen"]["array_frames"] == 0
    assert ticked["frames_per_message"] < 1 and ticked["loadgen"]["array_frames"] > 0
    assert state["loadgen"]["conns_done"] == state["subscribers"]  # every subscriber got the last value
    assert 0 < state["delivered_share"] < 1
    assert "W6: ticks" in stdout
