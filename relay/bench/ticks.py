"""W6: ticks. The W2 workload (subscribers on one channel, one publisher) with every
subscriber on ``?tick_ms=N``: fewer, bigger frames for a bounded added latency.

Owns one W6 run per (rate, tick_ms) and the ``state`` variant: each is a W2-style fan-out run
(:func:`relay.bench.scenarios.run_fanout`: a fresh relay, ``cload sub`` with
``--path /ws?tick_ms=N``, which unpacks the tick frames' arrays, and ``cload pub``), then the
numbers a tick changes (frames and bytes per message, the latency a tick adds) and the verdict.
It must not render reports or parse the command line.

* ``stream`` runs: the channel keeps every message, so every subscriber must get all of them,
  in offset order (no loss, no gap, no duplicate), and with ticks fewer frames than messages.
* ``state`` runs (``[[channels]] mode = "state"``, tick_ms > 0): only the newest value per
  tick is kept, so offsets skip by design; what is checked is order (never backwards, never
  twice) and that every subscriber ends with the last value; reported: messages delivered
  per subscriber against messages published.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from .servers import ServerSpec
from .settings import Settings

STATE_CONFIG = """# written by relay bench w6 (state variant)
[[channels]]
pattern = "bench.*"
mode = "state"
"""


def _note(msg: str) -> None:
    print(f"relay bench: {msg}", file=sys.stderr, flush=True)


def _ratio(a: float | None, b: float | None, nd: int = 4) -> float | None:
    return round(a / b, nd) if a is not None and b else None


def run_tick(exe: Path, spec: ServerSpec, s: Settings, rate: float, tick_ms: int, mode: str) -> dict[str, Any]:
    """One W6 run: ``s.w6_subscribers`` on ``?tick_ms=tick_ms`` (0: none) at ``rate`` msg/s."""
    from .scenarios import run_fanout

    sub_args = ["--path", f"/ws?tick_ms={tick_ms}"] if tick_ms else []
    cfg_name = None
    if mode == "state":
        cfg = tempfile.NamedTemporaryFile("w", prefix="relay-bench-w6-", suffix=".toml", delete=False)  # noqa: SIM115
        with cfg:
            cfg.write(STATE_CONFIG)
        cfg_name = cfg.name
        spec = dataclasses.replace(spec, command=f"{spec.command} --config {shlex.quote(cfg_name)}")
    try:
        r = run_fanout(exe, spec, s, s.w6_subscribers, rate, s.warmup, s.w6_duration, sub_args=sub_args)
    finally:
        if cfg_name:
            os.unlink(cfg_name)
    r["server"] = spec.name
    r["tick_ms"] = tick_ms
    r["mode"] = mode
    if mode == "state":
        r["config"] = STATE_CONFIG
    lg = r.get("loadgen") or {}
    deliveries = lg.get("deliveries_all")
    r["deliveries_all"] = deliveries
    r["frames_per_message"] = _ratio(lg.get("msg_frames"), deliveries)
    r["messages_per_frame"] = _ratio(deliveries, lg.get("msg_frames"), 2)
    r["bytes_per_message"] = _ratio(lg.get("msg_frame_bytes"), deliveries, 1)
    r["loadgen_bytes_read"] = lg.get("bytes")
    pub = r.get("publisher") or {}
    subs = lg.get("subscribed") or s.w6_subscribers
    r["published"] = pub.get("sent")
    r["delivered_per_subscriber"] = _ratio(deliveries, subs, 1)
    r["delivered_share"] = _ratio(deliveries, (pub.get("sent") or 0) * subs)
    srv_s = r.get("server_cpu_s")
    r["server_cpu_us_per_published"] = (round(srv_s * 1e6 / pub["sent_measured"], 2)
                                        if srv_s is not None and pub.get("sent_measured") else None)
    lat = r.get("latency_us") or {}
    if tick_ms and lat.get("mean") is not None:
        r["tick_latency_added_expected_us"] = tick_ms * 1e3 / 2
    judge_tick(r, s.quick)
    return r


def judge_tick(r: dict[str, Any], quick: bool) -> None:
    """Set ``pass``, ``problems`` and ``warnings`` on a W6 run."""
    from .scenarios import warnings

    why: list[str] = []
    if r.get("error"):
        r["pass"], r["problems"], r["warnings"] = False, [str(r["error"])], []
        return
    lg = r.get("loadgen") or {}
    if r["mode"] == "stream":
        if r["loss"]:
            why.append(f"LOSS {r['loss']:,} of {r['expected_deliveries']:,} ({r['loss_gaps']:,} skipped, "
                       f"{r['loss_late']:,} not arrived by the end)")
        if r["offset_gaps"] or lg.get("seq_gap_events"):
            why.append(f"ORDER {r['offset_gaps']} offset gaps, {lg.get('seq_gap_events')} sequence gaps")
    else:
        # offsets skip by design; every subscriber must still end with the newest value
        done, subs = lg.get("conns_done"), lg.get("subscribed")
        if done != subs:
            why.append(f"only {done} of {subs} subscribers got the last value")
    if r["out_of_order"]:
        why.append(f"ORDER {r['out_of_order']} out of order/duplicate")
    if lg.get("unparsed_messages"):
        why.append(f"{lg['unparsed_messages']} messages the load generator could not read")
    if r["closes"] or r["eof"]:
        why.append(f"DISCONNECTS {r['closes']} closes {r['closes_by_code']}, {r['eof']} EOF/reset")
    if r["gap_messages"] or r["error_messages"]:
        why.append(f"{r['gap_messages']} gap and {r['error_messages']} error messages")
    if not r["publisher_sent_all"]:
        why.append("the publisher could not send everything (server not reading)")
    fpm = r.get("frames_per_message")
    if r["mode"] == "state":
        share = r.get("delivered_share")
        if share is None or share >= 1:
            why.append(f"STATE delivered {share} of what was published: nothing was left out of a tick")
    elif r["tick_ms"]:
        if fpm is None or fpm >= 1:
            why.append(f"TICKS frames per message {fpm}, not < 1")
        if not lg.get("array_frames"):
            why.append("TICKS no array frames read")
    elif lg.get("array_frames"):
        why.append(f"{lg['array_frames']} array frames without ticks")
    if not quick:
        if (r.get("publisher_achieved_rate") or 0) < 0.95 * r["rate"]:
            why.append(f"publisher reached {r.get('publisher_achieved_rate')} of {r['rate']:g} msg/s")
        p99 = (r.get("latency_us") or {}).get("p99")
        # a message waits at most one tick; 10 ms on top of that for everything else
        limit = r["tick_ms"] * 1e3 + 10_000
        if p99 is None or p99 > limit:
            why.append(f"p99 {p99} µs > tick + 10 ms = {limit:,.0f}")
    if r.get("saturated_loadgen"):
        why.append(f"SATURATED-LOADGEN {r['loadgen_cpu_utilization']:.0%} of its cores")
    r["pass"], r["problems"], r["warnings"] = not why, why, warnings(r)


def _line(r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"  {r['server']:<16} {r['mode']:<6} tick {r['tick_ms']:>3} ms @ {r['rate']:g}/s: ERROR {r['error']}"
    lat = r.get("latency_us") or {}
    return (f"  {r['server']:<16} {r['mode']:<6} tick {r['tick_ms']:>3} ms @ {r['rate']:>6g}/s: "
            f"{r.get('deliveries_all') or 0:>9,} msgs, {r.get('frames_per_message')} frames/msg, "
            f"{r.get('bytes_per_message')} B/msg, p50 {lat.get('p50')} p99 {lat.get('p99')} µs, "
            f"srv {r.get('server_cpu_us_per_delivery')} µs/deliv, load {r.get('loadgen_cpu_utilization')}  "
            f"{'ok' if r['pass'] else '; '.join(r['problems'])}")


def scenario_w6(exe: Path, spec: ServerSpec, s: Settings) -> dict[str, Any]:
    """W6 for relay: every (rate, tick) on a stream channel, then the state variant."""
    if spec.relay_impl is None:
        return {"skipped": "W6 needs relay's ?tick_ms=", "steps": [], "pass": True}
    steps = []
    plan = [(rate, tick, "stream") for rate in s.w6_rates for tick in s.w6_ticks]
    plan += [(s.w6_rates[0], tick, "state") for tick in s.w6_state_ticks]
    for rate, tick, mode in plan:
        r = run_tick(exe, spec, s, rate, tick, mode)
        _note(_line(r))
        steps.append(r)
    return {"steps": steps, "pass": all(r["pass"] for r in steps)}


render_line = _line
