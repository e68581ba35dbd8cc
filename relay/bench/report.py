"""The ``relay bench`` report: machine, version and git facts, the tables and the summary.

Owns what is recorded beside the measurements and how a report reads as text. Pure
functions of the report dict, apart from reading the facts: it must not run anything timed.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from .._version import __version__
from .build import find_compiler
from .settings import LIBRARIES, SOURCE_ROOT


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
        from .. import fastpath

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
    if "w4" in sc:
        out.extend(_render_w4(sc["w4"]))
    if "w5" in sc:
        from .deltas import render_line

        out.append("\nW5: bytes on the wire per update (WebSocket frames), full values vs state deltas")
        for srv, data in sc["w5"].items():
            if data.get("skipped"):
                out.append(f"  -- {srv}: {data['skipped']}")
            for r in data.get("steps", []):
                out.append(render_line(r))
    if "w6" in sc:
        out.extend(_render_w6(sc["w6"]))
    summ = {srv: d for srv, d in report.get("summary", {}).items() if any(k[:2] in ("w1", "w2", "w3") for k in d)}
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


def _p99_ms(summary: dict[str, Any] | None) -> float | None:
    p99 = (summary or {}).get("p99")
    return None if p99 is None else p99 / 1e3


def _after(seconds: list[float | None] | None) -> str:
    """" after 1.2 s" for the slowest of several clients, "" when none."""
    known = [x for x in seconds or [] if x is not None]
    return f" after {max(known):.1f} s" if known else ""


def _render_w4(w4: dict[str, Any]) -> list[str]:
    """The W4 table: one row per server and channel policy."""
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    first: dict[str, Any] | None = None
    for srv, data in w4.items():
        if data.get("skipped"):
            notes.append(f"  -- {srv}: {data['skipped']}")
            continue
        for r in data.get("steps", []):
            if r.get("error"):
                notes.append(f"  !! {srv} {r.get('variant')}: {r['error']}")
                continue
            first = first or r
            f, pr, sl = r["fast"], r["probe"], r["slow"]
            pa, sa = pr.get("age_ms") or {}, sl.get("age_ms") or {}
            closed = ",".join(str(c) for c in sl.get("close_codes", []) if c is not None) or "-"
            rows.append((srv, r["variant"], f"{f['received']:,}/{f['expected']:,}",
                         _f(_p99_ms(f.get("latency_us")), 1),
                         _f(pa.get("p50"), 1), _f(pa.get("p99"), 1), _f(pa.get("max"), 1),
                         _f(sl.get("received_per_s")), _pct(sl.get("conflated_share")),
                         _f(sa.get("p50"), 1), _f(sa.get("p99"), 1), _f(sa.get("max"), 1),
                         _f((sl.get("outdated_ms") or {}).get("p99"), 1),
                         _pct(sl.get("missing_share")),
                         f"{sl.get('symbols_at_final_min')}/{sl.get('symbols_total')}" + _after(sl.get("caught_up_after_s")),
                         closed + _after(sl.get("closed_after_s")),
                         _f(r.get("server_cpu_us_per_delivery"), 2), _pct(r.get("server_cpu_utilization")),
                         _f(r.get("server_intake_backlog_ms_max"), 1),
                         _pct(r.get("loadgen_cpu_utilization")), "ok" if r.get("pass") else "FAIL"))
            for p in r.get("problems", []):
                notes.append(f"  !! {srv} {r['variant']}: {p}")
            for w in r.get("warnings", []):
                notes.append(f"  ?? {srv} {r['variant']}: {w}")
    out = []
    if first is not None:
        out.append(f"\nW4: keyed conflation. {first['rate']:g} msg/s over {first['keys']} symbols (each changes every "
                   f"{first['symbol_update_interval_ms']:g} ms), {first['fast_subscribers']} fast subscribers (C) + 1 "
                   f"fast probe, {first['slow_subscribers']} slow at {first['slow_rate']:g} msg/s, send queue "
                   f"{first['send_queue_size']:,} B. age = sample time - send time of the newest value of a symbol the "
                   f"client has seen, every {first['sample_ms']:g} ms over {first['duration_s']:g} s, in ms; outdated: "
                   f"sample time - send time of the first update newer than the slow client's value (0 when "
                   f"current); slow at final: symbols whose last value it got (after: seconds from the feed's end); closed: "
                   f"close code (after: seconds from the feed's start); srv behind: most publishes the server had not "
                   f"read yet, in ms of the feed")
        out.append(_table(("server", "policy", "fast got/sent", "fast p99 ms", "probe age p50", "p99", "max",
                           "slow msg/s", "conflated", "slow age p50", "p99", "max", "outdated p99", "no value",
                           "slow at final", "closed", "srv µs/deliv", "srv CPU", "srv behind ms", "load CPU",
                           "result"), rows))
    elif notes:
        out.append("\nW4: keyed conflation")
    return out + notes


def _render_w6(w6: dict[str, Any]) -> list[str]:
    """The W6 table: one row per server, mode, rate and tick."""
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    first: dict[str, Any] | None = None
    for srv, data in w6.items():
        if data.get("skipped"):
            notes.append(f"  -- {srv}: {data['skipped']}")
            continue
        for r in data.get("steps", []):
            tag = f"{srv} {r.get('mode')} tick {r.get('tick_ms')} @ {r.get('rate', 0):g}/s"
            if r.get("error"):
                notes.append(f"  !! {tag}: {r['error']}")
                continue
            first = first or r
            lat = r.get("latency_us") or {}
            got = (f"{r.get('received_deliveries', 0):,}/{r.get('expected_deliveries', 0):,}" if r["mode"] == "stream"
                   else f"{_f(r.get('delivered_per_subscriber'), 1)}/{_f(r.get('published'))} per sub")
            rows.append((srv, r["mode"], f"{r['rate']:g}", str(r["tick_ms"] or "none"), got,
                         _f(r.get("frames_per_message"), 3), _f(r.get("messages_per_frame"), 1),
                         _f(r.get("bytes_per_message"), 1), _f(lat.get("p50")), _f(lat.get("p90")),
                         _f(lat.get("p99")), _f(lat.get("max")), _f(lat.get("mean")),
                         _f(r.get("server_cpu_us_per_delivery"), 2), _pct(r.get("server_cpu_utilization")),
                         _pct(r.get("loadgen_cpu_utilization")), "ok" if r.get("pass") else "FAIL"))
            for p in r.get("problems", []):
                notes.append(f"  !! {tag}: {p}")
            for w in r.get("warnings", []):
                notes.append(f"  ?? {tag}: {w}")
    out = []
    if first is not None:
        out.append(f"\nW6: ticks. {first['subscribers']} subscribers on ?tick_ms=N (none: plain), one channel, one "
                   f"publisher, {first['duration_s']:g} s measured per run. got: messages received in the window "
                   "(stream: all, in offset order; state: delivered per subscriber / published); frames/msg and B/msg: "
                   "WebSocket frames carrying messages and their bytes (header included) per message received; "
                   "latency in µs from the publisher's send stamp to the subscriber's read of the frame; srv µs/deliv: "
                   "server CPU per message delivered")
        out.append(_table(("server", "channel", "msg/s", "tick ms", "got", "frames/msg", "msgs/frame", "B/msg",
                           "p50", "p90", "p99", "max", "mean", "srv µs/deliv", "srv CPU", "load CPU", "result"),
                          rows))
    elif notes:
        out.append("\nW6: ticks")
    return out + notes


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
    for srv, d in sc.get("w4", {}).items():
        for r in d.get("steps", []):
            if r.get("error"):
                continue
            e = summ.setdefault(srv, {})
            v = r["variant"]
            e[f"w4_{v}_fast_loss"] = r["fast"]["loss"]
            e[f"w4_{v}_probe_age_p99_ms"] = (r["probe"].get("age_ms") or {}).get("p99")
            e[f"w4_{v}_slow_age_p50_ms"] = (r["slow"].get("age_ms") or {}).get("p50")
            e[f"w4_{v}_slow_age_p99_ms"] = (r["slow"].get("age_ms") or {}).get("p99")
            e[f"w4_{v}_slow_received_per_s"] = r["slow"].get("received_per_s")
            e[f"w4_{v}_pass"] = r.get("pass")
    for srv, d in sc.get("w6", {}).items():
        for r in d.get("steps", []):
            if r.get("error"):
                continue
            e = summ.setdefault(srv, {})
            k = f"w6_{r['mode']}_{r['rate']:g}_tick{r['tick_ms']}"
            e[f"{k}_frames_per_message"] = r.get("frames_per_message")
            e[f"{k}_p99_us"] = (r.get("latency_us") or {}).get("p99")
            e[f"{k}_pass"] = r.get("pass")
    return summ
