"""W4: keyed conflation. A fast feed of many symbols, fast subscribers that must see every
update, and slow subscribers whose view of each symbol should stay current.

Owns one W4 run per channel policy ("variant"): a fresh relay with a config file that declares
one channel pattern per policy and a small send queue, ``cload sub`` for the fast subscribers
(every update, checked by offset and sequence number), ``cload pub --keys`` for the feed, and
the measuring clients of :mod:`relay.bench.keyed_client` (slow subscribers and a fast probe, in
their own process on the load CPUs); then the numbers and the verdict. It must not render
reports or parse the command line.

Variants (each with its own server, same workload):

* ``keyed``: ``conflate_key = "symbol"``: a slow subscriber keeps the newest message per symbol;
* ``channel``: ``slow_consumer = "conflate"`` without a key: the newest message of the channel;
* ``disconnect``: ``slow_consumer = "disconnect"``: the slow subscriber is closed with 4002.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .loaders import JsonLines, Loaders, _finish, _say, merge_sub_results
from .procfs import _taskset, all_process_cpu, busy_share, cpu_breakdown, cpu_jiffies, other_cpu, parse_cpus
from .servers import Server, ServerSpec
from .settings import HOST, SATURATED_LOADGEN_SHARE, SOURCE_ROOT, BenchError, Settings

#: channel prefix (the channel is PREFIX + "0") and its [[channels]] table, per variant
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "keyed": ("w4k.", {"mode": "stream", "conflate_key": "symbol"}),
    "channel": ("w4c.", {"mode": "stream", "slow_consumer": "conflate"}),
    "disconnect": ("w4d.", {"mode": "stream", "slow_consumer": "disconnect"}),
}
KEY_FIELD = "symbol"


def config_text(send_queue: int) -> str:
    """The relay config of a W4 server: a small send queue and one channel pattern per variant."""
    max_message = min(65536, send_queue // 2)
    lines = ["# written by relay bench w4", f"max_message_size = {max_message}", f"send_queue_size = {send_queue}"]
    for prefix, table in VARIANTS.values():
        lines += ["", "[[channels]]", f'pattern = "{prefix}*"']
        lines += [f'{k} = "{v}"' for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _client_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")]))
    return env


def run_keyed(exe: Path, spec: ServerSpec, s: Settings, variant: str) -> dict[str, Any]:
    """One W4 run of ``variant`` against a fresh relay; return the facts (not yet judged)."""
    prefix, table = VARIANTS[variant]
    rate, keys = s.w4_rate, s.w4_keys
    warm_n = round(rate * s.w4_warmup)
    meas_n = max(2, round(rate * s.w4_duration))
    first_seq, last_seq = warm_n, warm_n + meas_n - 1
    res: dict[str, Any] = {
        "server": spec.name, "variant": variant, "channel": f"{prefix}0", "channel_config": table,
        "rate": rate, "keys": keys, "fast_subscribers": s.w4_fast_subscribers,
        "slow_subscribers": s.w4_slow_subscribers, "slow_rate": s.w4_slow_rate, "slow_rcvbuf": s.w4_slow_rcvbuf,
        "send_queue_size": s.w4_send_queue, "warmup_s": s.w4_warmup, "duration_s": s.w4_duration,
        "sample_ms": s.w4_sample_ms, "measured_messages": meas_n,
        "symbol_update_interval_ms": round(keys / rate * 1e3, 3),
    }
    cfg = tempfile.NamedTemporaryFile("w", prefix="relay-bench-w4-", suffix=".toml", delete=False)  # noqa: SIM115
    with cfg:
        cfg.write(config_text(s.w4_send_queue))
    res["config"] = config_text(s.w4_send_queue)
    server: Server | None = None
    loaders: Loaders | None = None
    pub: subprocess.Popen[bytes] | None = None
    kc: subprocess.Popen[bytes] | None = None
    try:
        server = Server(dataclasses.replace(spec, command=f"{spec.command} --config {shlex.quote(cfg.name)}"),
                        s.server_cpus if s.pin else None)
        res["server_argv"] = server.argv
        res["fastpath"] = server.metrics().get("fastpath")
        publish_s = (warm_n + meas_n) / rate
        # the slow subscribers' backlog when the feed stops, at most: the send queue, one held
        # value per symbol and the kernel's buffers, read at slow_rate
        frame = s.payload_bytes + 110
        backlog_s = ((s.w4_send_queue + keys * frame + 2 * 65536) / frame / max(1.0, s.w4_slow_rate)
                     if s.w4_slow_subscribers else 0.0)
        tail_s = s.drain + 2 * backlog_s + 2.0
        loaders = Loaders(exe, s, server.port, s.w4_fast_subscribers, first_seq, last_seq,
                          s.w4_duration + s.drain, extra_args=["--prefix", prefix])
        ready = loaders.ready(60.0)
        res["connect"] = ready
        kc_argv = [*_taskset(s.load_cpus if s.pin else None), sys.executable, "-m", "relay.bench.keyed_client",
                   "--port", str(server.port), "--channel", f"{prefix}0", "--encoding", s.encoding,
                   "--slow", str(s.w4_slow_subscribers), "--slow-rate", f"{s.w4_slow_rate:g}",
                   "--slow-rcvbuf", str(s.w4_slow_rcvbuf), "--probes", "1", "--keys", str(keys),
                   "--key-field", KEY_FIELD, "--sample-ms", f"{s.w4_sample_ms:g}"]
        res["keyed_client_argv"] = kc_argv
        kc = subprocess.Popen(kc_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_client_env())
        kc_lines = JsonLines(kc, "w4 measuring clients")
        kready = kc_lines.read(60.0)
        res["connect_measuring_clients"] = kready
        if ready["failed"] or kready.get("failed"):
            loaders.say("stop")
            res["error"] = (f"connections failed: {ready['failed']} fast subscribers, "
                            f"{kready.get('failed')} measuring clients {kready.get('errors')}")
            return res
        start_at = time.monotonic_ns() + 300_000_000
        pub_argv = [*_taskset(s.load_cpus if s.pin else None), str(exe), "pub", "--host", HOST,
                    "--port", str(server.port), "--encoding", s.encoding, "--rate", f"{rate:g}",
                    "--count", str(warm_n + meas_n), "--measure-from", str(warm_n), "--start", str(start_at),
                    "--payload-bytes", str(s.payload_bytes), "--prefix", prefix, "--channels", "1",
                    "--keys", str(keys), "--key-field", KEY_FIELD,
                    "--linger", f"{publish_s + tail_s + 30:.0f}", "--late-limit", f"{s.drain:g}"]
        res["publisher_argv"] = pub_argv
        pub = subprocess.Popen(pub_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        w0 = start_at + int(s.w4_warmup * 1e9)
        w1 = w0 + int(s.w4_duration * 1e9)
        pub_end = start_at + int(publish_s * 1e9)
        deadline = pub_end + int(tail_s * 1e9)
        _say(kc, f"go {w0} {w1} {pub_end} {deadline} {warm_n + meas_n - 1}")
        _sleep_until(w0)
        procs0 = all_process_cpu()
        cpu0, jif0, t0 = server.cpu_ns(), cpu_jiffies(), time.monotonic_ns()
        loaders.say("start")
        subs = loaders.results(s.w4_duration + s.drain + 30)
        _sleep_until(w1)  # at least the planned window, also when the fast subscribers stopped early (closed)
        cpu1, jif1, t1 = server.cpu_ns(), cpu_jiffies(), time.monotonic_ns()
        ours = {os.getpid(), server.pid, pub.pid, kc.pid, *(p.pid for p in loaders.procs)}
        res["other_processes_cpu"] = other_cpu(procs0, all_process_cpu(), ours, (t1 - t0) / 1e9)
        pres = JsonLines(pub, "publisher").read(s.w4_warmup + s.w4_duration + s.drain + 30)
        kres = kc_lines.read(max(1.0, (deadline - time.monotonic_ns()) / 1e9) + 30)
        res["server_metrics_after"] = server.metrics().get("counters")
        sub = merge_sub_results(subs)
        res.update(_numbers(s, sub, pres, kres, cpu0, cpu1, jif0, jif1, t1 - t0, start_at, pub_end))
        res["publisher"] = {k: pres.get(k) for k in (
            "sent", "sent_measured", "achieved_rate", "lag_us", "send_blocked_s", "stopped_by", "errors",
            "error_messages", "close_code", "cpu", "scheduling", "unread_bytes_max", "unread_bytes_end",
            "bytes_sent")}
        res["loadgen"] = {k: sub.get(k) for k in ("threads", "reads", "frames", "bytes", "pings", "stopped_by",
                                                   "errors", "cpu")}
        return res
    except BenchError as exc:
        res["error"] = str(exc)
        return res
    finally:
        if loaders is not None:
            loaders.finish()
        if kc is not None:
            _finish(kc, 10)
        if pub is not None:
            _say(pub, "stop")
            _finish(pub, 10)
        if server is not None:
            res["server_stop"] = server.stop()
        os.unlink(cfg.name)


def _note(msg: str) -> None:
    print(f"relay bench: {msg}", file=sys.stderr, flush=True)


def _sleep_until(mono_ns: int) -> None:
    left = (mono_ns - time.monotonic_ns()) / 1e9
    if left > 0:
        time.sleep(left)


def _ms(summary: dict[str, Any] | None) -> dict[str, Any]:
    """A percentile summary in µs, converted to ms (1 decimal)."""
    if not summary or not summary.get("count"):
        return {"count": 0}
    return {k: (v if k == "count" else round(v / 1e3, 1)) for k, v in summary.items()}


def _numbers(s: Settings, sub: dict[str, Any], pub: dict[str, Any], kres: dict[str, Any], cpu0: int | None,
             cpu1: int | None, jif0: Any, jif1: Any, window_ns: int, start_at: int, pub_end: int) -> dict[str, Any]:
    wall = window_ns / 1e9
    rate_ms = s.w4_rate / 1e3
    srv = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None
    probe, slow = kres.get("probe", {}), kres.get("slow", {})
    probe_c = (probe.get("per_client") or [{}])[0]
    slow_cs = slow.get("per_client") or []
    published_window = pub.get("sent_measured", 0)
    deliveries = (sub["received"] + probe_c.get("received_window", 0)
                  + sum(c.get("received_window", 0) for c in slow_cs))
    ncores = len(parse_cpus(s.load_cpus)) if s.pin else (os.cpu_count() or 1)
    load_cpu = sub["cpu"]["user_s"] + sub["cpu"]["sys_s"]
    pub_cpu = pub.get("cpu", {}).get("user_s", 0.0) + pub.get("cpu", {}).get("sys_s", 0.0)
    pub_cpu_window = pub_cpu * published_window / max(1, pub.get("sent", 0))
    kc_cpu = kres.get("cpu", {}).get("user_s", 0.0) + kres.get("cpu", {}).get("sys_s", 0.0)
    kc_wall = kres.get("wall_s") or wall
    # the measuring clients run past the window (the slow ones drain their backlog): their
    # average share of a core over their whole run stands for the window
    loadgen_util = ((load_cpu + pub_cpu_window) / wall + kc_cpu / kc_wall) / ncores if wall > 0 else None
    span = (sub["last_delivery_ns"] - sub["first_delivery_ns"]) / 1e9 if sub.get("first_delivery_ns") else 0.0
    server_cpus = parse_cpus(s.server_cpus) if s.pin else None
    load_cpus = parse_cpus(s.load_cpus) if s.pin else None
    slow_received = sum(c.get("received_window", 0) for c in slow_cs)
    slow_expected = published_window * len(slow_cs)
    return {
        "published_window": published_window,
        "fast": {
            "expected": sub["expected"], "received": sub["received"], "loss": sub["loss"],
            "loss_gaps": sub["loss_gaps"], "loss_late": sub["loss_late"],
            "offset_gaps": sub["offset_gap_events"], "out_of_order": sub["out_of_order"] + sub["duplicates"],
            "closes": sub["closes"], "closes_by_code": sub["closes_by_code"], "eof": sub["eof"] + sub["resets"],
            "gap_messages": sub["gap_messages"], "error_messages": sub["error_messages"],
            "unparsed_messages": sub.get("unparsed_messages", 0),
            "deliveries_per_s": round(sub["received"] / span, 1) if span > 0 else None,
            "latency_us": sub["latency_us"], "arrival_latency_us": sub.get("arrival_latency_us"),
            "frames_per_read": round(sub["frames"] / sub["reads"], 2) if sub.get("reads") else None,
        },
        "probe": {**probe_c, "age_ms": _ms(probe.get("age_us")), "latency_ms": _ms(probe.get("latency_us"))},
        "slow": {
            "clients": len(slow_cs),
            "received_window": slow_received,
            "received_per_s": round(slow_received / len(slow_cs) / s.w4_duration, 1) if slow_cs else None,
            "published_per_client_window": published_window,
            "conflated_share": round(1 - slow_received / slow_expected, 4) if slow_expected else None,
            "age_ms": _ms(slow.get("age_us")), "latency_ms": _ms(slow.get("latency_us")),
            "outdated_ms": _ms(slow.get("outdated_us")), "current_share": slow.get("current_share"),
            "missing_share": slow.get("missing_share"),
            "stale_after_fresh": sum(c.get("stale_after_fresh", 0) for c in slow_cs),
            "offset_backwards": sum(c.get("offset_backwards", 0) for c in slow_cs),
            "symbols_at_final_min": min((c.get("symbols_at_final", 0) for c in slow_cs), default=None),
            "symbols_seen_min": min((c.get("symbols_seen", 0) for c in slow_cs), default=None),
            "symbols_total": kres.get("symbols_published"),
            "close_codes": [c.get("close_code") for c in slow_cs],
            # seconds from the first publish to the close, and from the last publish until it
            # held the last value of every symbol
            "closed_after_s": [round((c["closed_at_ns"] - start_at) / 1e9, 2) if c.get("closed_at_ns") else None
                               for c in slow_cs],
            "caught_up_after_s": [round((c["caught_up_at_ns"] - pub_end) / 1e9, 2) if c.get("caught_up_at_ns")
                                  else None for c in slow_cs],
            "gap_messages": sum(c.get("gap_messages", 0) for c in slow_cs),
            "error_messages": sum(c.get("error_messages", 0) for c in slow_cs),
            "per_client": slow_cs,
        },
        "measuring_clients": {k: kres.get(k) for k in ("cpu", "wall_s", "sample_lag_us", "timed_out", "sample_ms")},
        "server_cpu_s": round(srv / 1e9, 4) if srv is not None else None,
        "server_cpu_us_per_delivery": round(srv / 1e3 / deliveries, 3) if srv is not None and deliveries else None,
        "server_cpu_utilization": round(srv / window_ns, 3) if srv is not None and window_ns else None,
        "deliveries_window": deliveries,
        "loadgen_cpu_utilization": round(loadgen_util, 3) if loadgen_util is not None else None,
        "measuring_clients_cpu_utilization": round(kc_cpu / kc_wall, 3) if kc_wall else None,
        "saturated_loadgen": bool(loadgen_util is not None and loadgen_util > SATURATED_LOADGEN_SHARE),
        "server_cores_busy": busy_share(jif0, jif1, server_cpus),
        "load_cores_busy": busy_share(jif0, jif1, load_cpus),
        "machine_busy": busy_share(jif0, jif1, None),
        "server_cores_time": cpu_breakdown(jif0, jif1, server_cpus),
        "load_cores_time": cpu_breakdown(jif0, jif1, load_cpus),
        "window_s": round(wall, 3),
        "publisher_achieved_rate": pub.get("achieved_rate"),
        # publishes the server had not read yet, at most (SIOCOUTQ on the publisher's socket), in
        # ms of the feed: the server's own backlog, which every subscriber's latency includes
        "server_intake_backlog_ms_max": round(pub["unread_bytes_max"] / (pub["bytes_sent"] / pub["sent"]) / rate_ms, 1)
        if pub.get("bytes_sent") and pub.get("sent") and pub.get("unread_bytes_max") is not None else None,
        "publisher_sent_all": pub.get("stopped_by") == "done",
        "publisher_lag_us": pub.get("lag_us"),
        "publisher_errors": pub.get("errors"),
        "publisher_error_messages": pub.get("error_messages", 0),
    }


def judge_keyed(r: dict[str, Any], quick: bool) -> None:
    """Set ``pass``, ``problems`` and ``warnings`` on one W4 run.

    Every variant: the fast subscribers and the probe got every update in order, nothing
    closed them, the publisher sent everything and got no error. The keyed variant also: each
    slow subscriber never saw an older value of a symbol after a newer one, was not closed,
    ended with the last published value of every symbol, and received fewer messages than
    were published (it really was conflated). Staleness is reported, not judged.
    """
    why: list[str] = []
    if r.get("error"):
        r["pass"], r["problems"], r["warnings"] = False, [str(r["error"])], []
        return
    f = r["fast"]
    if f["loss"] or f["offset_gaps"] or f["out_of_order"]:
        why.append(f"FAST LOSS {f['loss']:,} of {f['expected']:,} ({f['offset_gaps']} offset gaps, "
                   f"{f['out_of_order']} out of order)")
    if f["closes"] or f["eof"] or f["gap_messages"] or f["error_messages"]:
        why.append(f"FAST subscribers: {f['closes']} closes {f['closes_by_code']}, {f['eof']} EOF, "
                   f"{f['gap_messages']} gap and {f['error_messages']} error messages")
    p = r["probe"]
    if p.get("offset_jumps") or p.get("offset_backwards") or p.get("stale_after_fresh") or p.get("close_code"):
        why.append(f"PROBE (a fast subscriber) skipped {p.get('offset_skipped')} offsets in {p.get('offset_jumps')} "
                   f"jumps, {p.get('offset_backwards')} backwards, closed {p.get('close_code')}")
    if p.get("received", 0) < r["measured_messages"]:
        why.append(f"PROBE received {p.get('received')} messages, fewer than the {r['measured_messages']} measured")
    if not r["publisher_sent_all"] or r["publisher_error_messages"]:
        why.append(f"publisher: sent all {r['publisher_sent_all']}, {r['publisher_error_messages']} errors "
                   f"{r.get('publisher_errors')}")
    sl = r["slow"]
    if r["variant"] == "keyed" and sl["clients"]:
        # (offsets may go backwards here: the held values leave in the order their symbols
        # were first held, each with its newest offset; per symbol they only go forward)
        if sl["stale_after_fresh"]:
            why.append(f"SLOW saw {sl['stale_after_fresh']} older values of a symbol after newer ones")
        if any(c is not None for c in sl["close_codes"]):
            why.append(f"SLOW closed: {sl['close_codes']}")
        if sl["symbols_at_final_min"] != sl["symbols_total"]:
            why.append(f"SLOW ended with the last value of only {sl['symbols_at_final_min']} of "
                       f"{sl['symbols_total']} symbols")
        if not sl["received_window"] < sl["published_per_client_window"] * sl["clients"]:
            why.append("SLOW received everything: nothing was conflated (is it slow enough?)")
    if (r.get("measuring_clients") or {}).get("timed_out"):
        why.append("the measuring clients did not finish before their deadline")
    warn: list[str] = []
    if r.get("saturated_loadgen"):
        warn.append(f"load generator at {r['loadgen_cpu_utilization']:.0%} of its cores: numbers include its queueing")
    if not quick and (r.get("publisher_achieved_rate") or 0) < 0.95 * r["rate"]:
        warn.append(f"publisher reached {r.get('publisher_achieved_rate')} of {r['rate']:g} msg/s")
    backlog = r.get("server_intake_backlog_ms_max")
    if backlog is not None and backlog > 100:
        warn.append(f"the server fell behind its publisher: up to {backlog:,.0f} ms of publishes unread; "
                    "every latency and age includes that")
    other = (r.get("other_processes_cpu") or {}).get("cores")
    if other is not None and other > 0.1:
        warn.append(f"other processes used {other:.2f} cores during the run: {r['other_processes_cpu'].get('top')}")
    r["pass"], r["problems"], r["warnings"] = not why, why, warn


def _line(r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"  {r['server']:<18} {r['variant']:<10} ERROR {r['error']}"
    f, p, sl = r["fast"], r["probe"], r["slow"]
    return (f"  {r['server']:<18} {r['variant']:<10} fast {f['received']:,}/{f['expected']:,} loss {f['loss']}  "
            f"probe age p99 {p['age_ms'].get('p99', '-')} ms  slow {sl['received_per_s']}/s of {r['rate']:g}/s, "
            f"age p50/p99/max {sl['age_ms'].get('p50', '-')}/{sl['age_ms'].get('p99', '-')}/"
            f"{sl['age_ms'].get('max', '-')} ms, final {sl['symbols_at_final_min']}/{sl['symbols_total']}, "
            f"closed {sl['close_codes']}  srv {r.get('server_cpu_us_per_delivery')} µs/deliv "
            f"{'ok' if r['pass'] else '; '.join(r['problems'])}")


def scenario_w4(exe: Path, spec: ServerSpec, s: Settings) -> dict[str, Any]:
    """W4 for relay (each variant on a fresh server); other servers have no conflate_key."""
    if spec.relay_impl is None:
        return {"skipped": "W4 needs relay's channel options (conflate_key)", "steps": [], "pass": True}
    steps = []
    for variant in s.w4_variants:
        r = run_keyed(exe, spec, s, variant)
        judge_keyed(r, s.quick)
        _note(_line(r))
        steps.append(r)
    return {"steps": steps, "pass": all(r["pass"] for r in steps)}
