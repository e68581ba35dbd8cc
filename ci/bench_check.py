"""CI regression check of the compiled hot path: ratios measured in one run, against floors.

Runs the micro-benchmarks in ``bench/`` with pytest-benchmark, pairs each group's
compiled and pure-Python rows, and fails when ``python_mean / cython_mean`` falls
below the floor stored in ``ci/bench_floors.json``. Absolute times are never
compared (CI machines are shared and noisy); a ratio measured in the same run is.

Usage: ``python ci/bench_check.py [--json OUT]`` (exit 1 on a regression).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_benchmarks(out: Path) -> dict[str, dict[str, float]]:
    """Run the micro-benchmarks; return {group: {implementation: mean seconds}}."""
    cmd = [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider",
           "--benchmark-only", "--benchmark-min-rounds=20", "--benchmark-max-time=0.2",
           f"--benchmark-json={out}"]
    subprocess.run(cmd, cwd=ROOT, check=True)
    report = json.loads(out.read_text())
    means: dict[str, dict[str, float]] = {}
    for bench in report["benchmarks"]:
        impl = bench["extra_info"].get("implementation")
        if impl is None:
            continue
        means.setdefault(bench["group"], {})[impl] = bench["stats"]["mean"]
    return means


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the pytest-benchmark JSON here")
    args = parser.parse_args(argv)
    floors = {k: float(v) for k, v in json.loads((ROOT / "ci/bench_floors.json").read_text()).items()
              if not k.startswith("_")}
    with tempfile.TemporaryDirectory() as tmp:
        out = args.json or Path(tmp) / "bench.json"
        means = run_benchmarks(out)
    failed = False
    print(f"{'group':32} {'cython µs':>11} {'python µs':>11} {'ratio':>7} {'floor':>6}")
    for group, floor in floors.items():
        row = means.get(group, {})
        if "cython" not in row or "python" not in row:
            print(f"{group:32} missing a row (have {sorted(row)}): FAIL")
            failed = True
            continue
        ratio = row["python"] / row["cython"]
        ok = ratio >= floor
        failed |= not ok
        print(f"{group:32} {row['cython'] * 1e6:11.3f} {row['python'] * 1e6:11.3f} "
              f"{ratio:7.2f} {floor:6.2f}{'' if ok else '  REGRESSION'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
