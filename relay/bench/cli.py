"""The ``relay bench`` command line: arguments, settings, and the run that writes the report.

Owns parsing and checking the arguments, choosing the servers, running each scenario
against each server, and printing or writing the report. ``relay.cli`` hands it
everything after ``bench``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .build import build_cload
from .procfs import parse_cpus
from .report import git_facts, machine_facts, render, summarize, versions
from .scenarios import SCENARIOS, _note
from .servers import against_spec, peer_specs, relay_spec
from .settings import BenchError, Settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relay bench",
        description="End-to-end load scenarios against a fresh relay server (and other servers with --against): "
        "W1 fan-out sweep, W2 small room, W3 idle connections, W4 keyed conflation (relay only), "
        "W5 bytes saved by state deltas (relay only), W6 ticks (?tick_ms=, relay only). "
        "Loopback only; see bench/load/README.md.")
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="w1, w2, w3, w4, w5, w6 or all (default: all)")
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
    w4 = p.add_argument_group("W4 (keyed conflation)")
    w4.add_argument("--w4-rate", type=float, metavar="R", help="feed rate in messages/s (default 10000)")
    w4.add_argument("--w4-keys", type=int, metavar="N", help="symbols, round robin (default 500)")
    w4.add_argument("--w4-fast", type=int, metavar="N", help="fast subscribers, C (default 20)")
    w4.add_argument("--w4-slow", type=int, metavar="N", help="slow subscribers (default 1)")
    w4.add_argument("--w4-slow-rate", type=float, metavar="R",
                    help="messages/s a slow subscriber consumes (default 1000)")
    w4.add_argument("--w4-send-queue", type=int, metavar="BYTES",
                    help="the server's send_queue_size for W4 (default 65536)")
    w4.add_argument("--w4-duration", type=float, metavar="S", help="measured seconds per variant (default 10)")
    w4.add_argument("--w4-warmup", type=float, metavar="S", help="unmeasured seconds first (default 2)")
    w4.add_argument("--w4-variants", metavar="V,V", help="keyed, channel, disconnect (default: all three)")
    p.add_argument("--w5-updates", type=int, metavar="N",
                   help="W5 (state deltas): updates published per workload (default 1000)")
    w6 = p.add_argument_group("W6 (ticks)")
    w6.add_argument("--w6-subscribers", type=int, metavar="N", help="subscribers (default 100)")
    w6.add_argument("--w6-rates", metavar="R,R", help="publish rates in messages/s (default 1000)")
    w6.add_argument("--w6-ticks", metavar="T,T", help="tick_ms values, 0 for none (default 0,16,33,50)")
    w6.add_argument("--w6-state-ticks", metavar="T,T",
                    help="tick_ms values of the state-channel variant ('' for none; default 33)")
    w6.add_argument("--w6-duration", type=float, metavar="S", help="measured seconds per run (default 5)")
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
            p.error(f"unknown scenario {n!r}; choose from w1, w2, w3, w4, w5, w6, all")
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
        # W4: a lighter feed, a slow subscriber far below it, the keyed variant only
        s.w4_rate, s.w4_keys, s.w4_fast_subscribers, s.w4_slow_rate = 2000.0, 100, 5, 300.0
        s.w4_warmup, s.w4_duration, s.w4_variants = 0.5, 2.0, ["keyed"]
        s.w5_updates = 100
        # W6: a light W2 without ticks, with one tick, and the state variant
        s.w6_subscribers, s.w6_rates, s.w6_ticks, s.w6_state_ticks, s.w6_duration = 20, [200.0], [0, 33], [33], 1.0
    if a.warmup is not None:
        s.warmup = a.warmup
    if a.duration is not None:
        s.duration = a.duration
    if a.w2_duration is not None:
        s.w2_duration = a.w2_duration
    for opt, name in (("w4_rate", "w4_rate"), ("w4_keys", "w4_keys"), ("w4_fast", "w4_fast_subscribers"),
                      ("w4_slow", "w4_slow_subscribers"), ("w4_slow_rate", "w4_slow_rate"),
                      ("w4_send_queue", "w4_send_queue"), ("w4_duration", "w4_duration"),
                      ("w4_warmup", "w4_warmup")):
        if getattr(a, opt) is not None:
            setattr(s, name, getattr(a, opt))
    if a.w5_updates is not None:
        if not 2 <= a.w5_updates <= 100_000:
            p.error("--w5-updates from 2 to 100000")
        s.w5_updates = a.w5_updates
    if a.w6_subscribers is not None:
        s.w6_subscribers = a.w6_subscribers
    if a.w6_duration is not None:
        s.w6_duration = a.w6_duration
    try:
        if a.w6_rates:
            s.w6_rates = [float(x) for x in a.w6_rates.split(",") if x.strip()]
        if a.w6_ticks:
            s.w6_ticks = [int(x) for x in a.w6_ticks.split(",") if x.strip()]
        if a.w6_state_ticks is not None:
            s.w6_state_ticks = [int(x) for x in a.w6_state_ticks.split(",") if x.strip()]
    except ValueError:
        p.error("--w6-rates, --w6-ticks, --w6-state-ticks: numbers separated by commas")
    if not s.w6_rates or any(not 0 < r <= 1e6 for r in s.w6_rates):
        p.error("--w6-rates must be > 0 and <= 1,000,000 messages/s")
    if not s.w6_ticks or any(t != 0 and not 10 <= t <= 1000 for t in s.w6_ticks + s.w6_state_ticks):
        p.error("--w6-ticks: 0 (no ticks) or 10 to 1000 ms; --w6-state-ticks: 10 to 1000 ms")
    if 0 in s.w6_state_ticks:
        p.error("--w6-state-ticks: 10 to 1000 ms (a state channel without ticks conflates only when slow)")
    if s.w6_subscribers < 1 or not 0 < s.w6_duration <= 600:
        p.error("--w6-subscribers >= 1; --w6-duration from 0 to 600 s (> 0)")
    if a.w4_variants:
        from .conflation import VARIANTS

        s.w4_variants = [v.strip() for v in a.w4_variants.split(",") if v.strip()]
        bad = [v for v in s.w4_variants if v not in VARIANTS]
        if bad or not s.w4_variants:
            p.error(f"--w4-variants: choose from {', '.join(VARIANTS)}, not {a.w4_variants!r}")
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
    if any(r <= 0 or r > 1e6 for r in s.w1_rates) or not 0 < s.w2_rate <= 1e6 or not 0 < s.w4_rate <= 1e6:
        p.error("rates must be > 0 and <= 1,000,000 messages/s")
    if not 0 < s.w4_slow_rate <= 1e6 or not 0 < s.w4_duration <= 600 or not 0 <= s.w4_warmup <= 600:
        p.error("--w4-slow-rate must be > 0; --w4-duration from 0 to 600 s (> 0), --w4-warmup 0 to 600 s")
    if not 1 <= s.w4_keys <= 100_000 or s.w4_fast_subscribers < 1 or s.w4_slow_subscribers < 0:
        p.error("--w4-keys from 1 to 100000; --w4-fast >= 1, --w4-slow >= 0")
    if s.w4_send_queue < 1024:
        p.error("--w4-send-queue must be at least 1024 bytes")
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
    _raise_nofile(max(s.w3_conns if "w3" in s.scenarios else 0, s.w1_subscribers, s.w2_subscribers,
                      s.w6_subscribers) + 1000)
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

