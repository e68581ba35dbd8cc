"""The scenarios W1-W4: one fan-out or idle measurement, its verdict, and the W1 sweep (W4 lives in
:mod:`relay.bench.conflation`).

Owns what a run does (fresh server, loaders, publisher, CPU and memory before/after), the
numbers derived from it, pass/fail with reasons, and the progress lines on stderr. It must
not render reports or parse the command line.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from .conflation import scenario_w4
from .deltas import scenario_w5
from .ticks import scenario_w6
from .loaders import JsonLines, Loaders, _finish, _say, merge_sub_results
from .procfs import (
    Jiffies,
    _taskset,
    all_process_cpu,
    busy_share,
    cpu_breakdown,
    cpu_jiffies,
    other_cpu,
    parse_cpus,
)
from .report import _pct
from .servers import Server, ServerSpec
from .settings import HOST, P99_LIMIT_US, SATURATED_LOADGEN_SHARE, W1_REFERENCE_RATE, Settings


# -- one measurement --------------------------------------------------------------------------


def run_fanout(exe: Path, spec: ServerSpec, s: Settings, subscribers: int, rate: float, warmup: float,
               duration: float, sub_args: Sequence[str] = ()) -> dict[str, Any]:
    """Start a fresh server, connect ``subscribers``, publish at ``rate`` msg/s; return the facts.

    ``sub_args`` go to every ``cload sub`` (W6 passes ``--path /ws?tick_ms=N``).
    """
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
        loaders = Loaders(exe, s, server.port, subscribers, first_seq, last_seq, duration + s.drain,
                          extra_args=sub_args)
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
            "control_sends_dropped", "deliveries_all", "msg_frames", "msg_frame_bytes", "array_frames",
            "duplicates", "seq_gap_events", "seq_missing", "unparsed_messages", "subscribed")}
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


SCENARIOS = {"w1": scenario_w1, "w2": scenario_w2, "w3": scenario_w3, "w4": scenario_w4, "w5": scenario_w5,
             "w6": scenario_w6}
