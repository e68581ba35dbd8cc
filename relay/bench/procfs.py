"""Read processes and CPUs from ``/proc``, and pin with taskset.

Owns CPU time and VmRSS of a process, per-CPU jiffies and busy shares, other processes'
CPU use, CPU-list parsing, the ``taskset`` prefix and a free loopback port. Plain
functions on Linux files: it must not start or stop processes.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Sequence
from typing import Any

from .settings import HOST


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
