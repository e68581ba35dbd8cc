"""W5: state deltas. Bytes on the wire for realistic state workloads with and without
``delta = true``, through a real relay server.

Owns one W5 run per workload: a fresh relay with a config file that declares one delta state
channel, one subscriber per encoding that asks for deltas and one that does not, a publisher
that sends the workload's updates one at a time (each acknowledged, so no subscriber falls
behind and nothing is conflated), and the byte counts of every frame each subscriber read
(WebSocket header included). The delta subscribers apply the patches and must end with the
publisher's last value, with every patch's base equal to the value they held. It also times
:func:`relay.core.mergepatch.diff` on the same sequence (the server's added work per
publication). It must not render reports or parse the command line.

Workloads (deterministic, seeded):

* ``book``: an order book of 50 levels per side, as objects keyed by price; each update
  changes the size of two or three levels and now and then replaces a level;
* ``game``: a game state of 100 entities; each tick 5 of them move (and one loses hit points);
* ``book-arrays``: the same book as arrays of ``[price, size]``: a merge patch replaces an
  array whole, so a patch holds every side that changed in full (the format's limit, shown).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import trio
import trio_websocket

from ..core import mergepatch
from .servers import Server, ServerSpec
from .settings import HOST, Settings

CHANNEL = "w5.state"
CONFIG = """# written by relay bench w5
[limits]
messages_per_second = 0
bytes_per_second = 0

[[channels]]
pattern = "w5.*"
mode = "state"
delta = true
"""
WORKLOADS = ("book", "game", "book-arrays")
SUBPROTOCOLS = {"json": "relay.v1.json", "msgpack": "relay.v1.msgpack"}


def _book(rng: random.Random, arrays: bool) -> Iterator[Any]:
    mid = 64_000.0
    bids = {round(mid - 0.5 * (k + 1), 1): round(rng.uniform(0.01, 5.0), 4) for k in range(50)}
    asks = {round(mid + 0.5 * (k + 1), 1): round(rng.uniform(0.01, 5.0), 4) for k in range(50)}
    seq = 0
    while True:
        seq += 1
        for _ in range(rng.choice((2, 2, 3))):
            side = bids if rng.random() < 0.5 else asks
            price = rng.choice(list(side))
            side[price] = round(rng.uniform(0.01, 5.0), 4)
        if rng.random() < 0.2:  # a level empties and another appears behind the book
            side, sign = (bids, -1) if rng.random() < 0.5 else (asks, 1)
            del side[rng.choice(list(side))]
            edge = (min(side) if sign < 0 else max(side)) + sign * 0.5
            side[round(edge, 1)] = round(rng.uniform(0.01, 5.0), 4)
        if arrays:
            yield {"symbol": "BTC-USD", "seq": seq,
                   "bids": [[p, s] for p, s in sorted(bids.items(), reverse=True)],
                   "asks": [[p, s] for p, s in sorted(asks.items())]}
        else:
            yield {"symbol": "BTC-USD", "seq": seq,
                   "bids": {f"{p:.1f}": s for p, s in bids.items()},
                   "asks": {f"{p:.1f}": s for p, s in asks.items()}}


def _game(rng: random.Random) -> Iterator[Any]:
    kinds = ("orc", "elf", "human", "dwarf")
    entities: dict[str, dict[str, Any]] = {f"e{i}": {"kind": kinds[i % 4], "name": f"unit-{i:03d}", "team": i % 2,
                          "x": round(rng.uniform(0, 1000), 2), "y": round(rng.uniform(0, 1000), 2),
                          "hp": 100, "state": "idle"} for i in range(100)}
    tick = 0
    while True:
        tick += 1
        for name in rng.sample(sorted(entities), 5):
            e = entities[name]
            e["x"] = round(e["x"] + rng.uniform(-3, 3), 2)
            e["y"] = round(e["y"] + rng.uniform(-3, 3), 2)
            e["state"] = "moving"
        hit = entities[rng.choice(sorted(entities))]
        hit["hp"] = max(0, hit["hp"] - rng.randint(1, 10))
        yield {"tick": tick, "entities": json.loads(json.dumps(entities))}


def workload(name: str, seed: int = 5) -> Iterator[Any]:
    """Return the endless, deterministic sequence of values of workload ``name``."""
    rng = random.Random(seed)
    if name == "game":
        return _game(rng)
    return _book(rng, arrays=name == "book-arrays")


def values_of(name: str, n: int) -> list[Any]:
    """The first ``n`` values of workload ``name`` (independent copies)."""
    it = workload(name)
    return [json.loads(json.dumps(next(it))) for _ in range(n)]


def _header(n: int) -> int:
    return 2 if n < 126 else 4 if n < 65536 else 10


class _Reader:
    """One subscriber: counts the bytes of each frame and follows the channel's value."""

    def __init__(self, encoding: str, delta: bool) -> None:
        self.encoding, self.delta = encoding, delta
        self.bytes = self.frames = self.patches = self.fulls = 0
        self.value: Any = None
        self.offset = 0
        self.problems: list[str] = []

    def decode(self, raw: str | bytes) -> dict[str, Any]:
        msg: dict[str, Any]
        if isinstance(raw, str):
            payload = raw.encode()
            msg = json.loads(raw)
        else:
            payload = raw
            msg = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        return {"msg": msg, "size": len(payload) + _header(len(payload))}

    def take(self, raw: str | bytes) -> dict[str, Any]:
        got = self.decode(raw)
        msg: dict[str, Any] = got["msg"]
        if msg.get("type") != "message":
            return msg
        self.frames += 1
        self.bytes += got["size"]
        if msg.get("delta"):
            if msg.get("base") != self.offset:
                self.problems.append(f"offset {msg['offset']}: base {msg.get('base')} but holds {self.offset}")
            self.value = mergepatch.apply(self.value, msg["data"])
            self.patches += 1
        else:
            self.value = msg["data"]
            self.fulls += 1
        self.offset = msg["offset"]
        return msg


async def _measure(port: int, values: list[Any], timeout: float) -> dict[str, Any]:
    url = f"ws://{HOST}:{port}/ws"
    readers = {(enc, delta): _Reader(enc, delta) for enc in SUBPROTOCOLS for delta in (False, True)}
    n = len(values)
    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            conns = {}
            for key, reader in readers.items():
                ws = await trio_websocket.connect_websocket_url(
                    nursery, url, subprotocols=[SUBPROTOCOLS[reader.encoding]], message_queue_size=0)
                conns[key] = ws
                reader.decode(await ws.get_message())  # welcome
                sub = {"type": "subscribe", "channel": CHANNEL, "ref": 1, "delta": reader.delta}
                await ws.send_message(json.dumps(sub) if reader.encoding == "json" else msgpack.packb(sub))
                answer = reader.decode(await ws.get_message())["msg"]
                assert answer["type"] == "subscribed", answer

            async def read(key: tuple[str, bool]) -> None:
                reader, ws = readers[key], conns[key]
                while reader.offset < n:
                    reader.take(await ws.get_message())

            for key in readers:
                nursery.start_soon(read, key)
            pub = await trio_websocket.connect_websocket_url(nursery, url)
            await pub.get_message()
            started = time.perf_counter()
            for i, value in enumerate(values, 1):
                await pub.send_message(json.dumps({"type": "publish", "channel": CHANNEL, "data": value, "ref": i}))
                while True:
                    answer = json.loads(await pub.get_message())
                    if answer.get("type") == "ack":
                        break
            publish_s = time.perf_counter() - started
            while any(r.offset < n for r in readers.values()):
                await trio.sleep(0.01)
            for ws in [*conns.values(), pub]:
                await ws.aclose()
            nursery.cancel_scope.cancel()
    out: dict[str, Any] = {"publish_seconds": round(publish_s, 3)}
    for (enc, delta), r in readers.items():
        out[f"{enc}_{'delta' if delta else 'full'}"] = {
            "bytes": r.bytes, "frames": r.frames, "patches": r.patches, "fulls": r.fulls,
            "bytes_per_update": round(r.bytes / max(1, r.frames), 1),
            "ends_right": r.value == values[-1], "problems": r.problems[:5]}
    return out


def _diff_cost(values: list[Any], repeat: int = 3) -> dict[str, Any]:
    """µs per :func:`mergepatch.diff` over consecutive values (best of ``repeat`` passes)."""
    best = float("inf")
    no_patch = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        no_patch = 0
        for a, b in zip(values, values[1:]):
            if mergepatch.diff(a, b) is mergepatch.NO_PATCH:
                no_patch += 1
        best = min(best, time.perf_counter() - t0)
    pairs = max(1, len(values) - 1)
    return {"diff_us_per_publication": round(best / pairs * 1e6, 2), "no_patch": no_patch}


def run_delta(spec: ServerSpec, s: Settings, name: str) -> dict[str, Any]:
    """One W5 run of workload ``name`` against a fresh relay; return the facts."""
    n = s.w5_updates
    values = values_of(name, n)
    res: dict[str, Any] = {"server": spec.name, "workload": name, "updates": n,
                           "full_value_json_bytes": len(json.dumps(values[-1], separators=(",", ":")))}
    cfg = tempfile.NamedTemporaryFile("w", prefix="relay-bench-w5-", suffix=".toml", delete=False)  # noqa: SIM115
    with cfg:
        cfg.write(CONFIG)
    server: Server | None = None
    try:
        server = Server(dataclasses.replace(spec, command=f"{spec.command} --config {shlex.quote(cfg.name)}"),
                        s.server_cpus if s.pin else None)
        res["fastpath"] = server.metrics().get("fastpath")
        res.update(trio.run(_measure, server.port, values, 60.0 + n * 0.05))
    except (OSError, trio.TooSlowError, trio_websocket.HandshakeError,
            trio_websocket.ConnectionClosed, AssertionError) as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if server is not None:
            res["server_exit"] = server.stop()
        Path(cfg.name).unlink(missing_ok=True)
    res.update(_diff_cost(values))
    for enc in SUBPROTOCOLS:
        full, delta = res.get(f"{enc}_full"), res.get(f"{enc}_delta")
        if full and delta and full["bytes"]:
            res[f"{enc}_saved"] = round(1 - delta["bytes"] / full["bytes"], 4)
    ok = "error" not in res and all(
        res[k]["ends_right"] and not res[k]["problems"] and res[k]["frames"] == n
        for k in res if k.endswith(("_full", "_delta")))
    res["pass"] = ok
    return res


def _line(r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"  {r['server']:<16} {r['workload']:<12} ERROR {r['error']}"
    j, m = r["json_full"], r["json_delta"]
    return (f"  {r['server']:<16} {r['workload']:<12} json {j['bytes_per_update']:>8.1f} -> "
            f"{m['bytes_per_update']:>7.1f} B/update ({r['json_saved']:.1%} saved), msgpack "
            f"{r['msgpack_full']['bytes_per_update']:.1f} -> {r['msgpack_delta']['bytes_per_update']:.1f} "
            f"({r['msgpack_saved']:.1%}); diff {r['diff_us_per_publication']} µs/pub"
            f"{'' if r['pass'] else '  !! FAIL'}")


def _note(msg: str) -> None:
    print(f"relay bench: {msg}", file=sys.stderr, flush=True)


def scenario_w5(exe: Path, spec: ServerSpec, s: Settings) -> dict[str, Any]:
    """W5 for relay (each workload on a fresh server); other servers have no deltas."""
    del exe  # (no load generator: four subscribers and one publisher, in this process)
    if spec.relay_impl is None:
        return {"skipped": "W5 needs relay's channel option delta", "steps": [], "pass": True}
    steps = []
    for name in WORKLOADS:
        r = run_delta(spec, s, name)
        _note(_line(r))
        steps.append(r)
    return {"steps": steps, "pass": all(r["pass"] for r in steps)}


#: For the report: one line per run.
render_line: Callable[[dict[str, Any]], str] = _line
