"""Check that a repaired wheel's manylinux tags are honest, by auditwheel's own analysis.

Usage: python ci/manylinux_check.py WHEEL [--expect manylinux_2_X_ARCH]

Runs `auditwheel show --json WHEEL` (with the Python running this script) and fails unless
  * every platform tag, in the file name and in the WHEEL metadata (the two must agree), is a
    manylinux tag (PEP 600 `manylinux_2_X_ARCH`, or a legacy alias such as manylinux2014);
  * no tag claims an older glibc than the oldest policy auditwheel finds the contents
    consistent with (`overall_tag`): a tag older than that is a claim the .so files break;
  * auditwheel reports no external shared library, no PyFPE/UCS2 build, no unsupported ISA;
  * with --expect, the PEP 600 tag is exactly that one.
Used by ci/wheel_check.sh (CI) and ci/build-wheels.sh --local.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

# Pre-PEP 600 names and the glibc they stand for (PEP 600, "Legacy manylinux tags").
LEGACY = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
PEP600 = re.compile(r"manylinux_(\d+)_(\d+)_(\w+)")


def glibc_of(platform_tag: str) -> tuple[int, int] | None:
    """The glibc version a manylinux platform tag claims, or None for any other tag."""
    if m := PEP600.fullmatch(platform_tag):
        return int(m[1]), int(m[2])
    legacy, _, arch = platform_tag.partition("_")
    return LEGACY.get(legacy) if arch else None


def wheel_platform_tags(wheel: Path) -> tuple[set[str], set[str]]:
    """(platform tags of the file name, platform tags of the WHEEL metadata's Tag lines)."""
    # name-version(-build)?-python-abi-platform.whl; compressed tag sets are dot-separated
    from_name = set(wheel.name.removesuffix(".whl").split("-")[-1].split("."))
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/WHEEL", n))
        lines = zf.read(meta).decode().splitlines()
    from_meta = {line.split(":", 1)[1].strip().split("-")[-1] for line in lines if line.startswith("Tag:")}
    return from_name, from_meta


def problems(tags: set[str], report: dict, expect: str | None) -> list[str]:
    """What is wrong with claiming `tags` for a wheel that `auditwheel show --json` reported."""
    errors = []
    overall = report["overall_tag"]
    floor = glibc_of(overall)
    if floor is None:
        errors.append(f"auditwheel finds the contents consistent with no manylinux policy ({overall})")
    for flag in ("pyfpe", "ucs2", "unsupported_isa"):
        if report[flag]:
            errors.append(f"auditwheel reports {flag}")
    if report["external_libs"]:
        errors.append(f"external shared libraries: {sorted(report['external_libs'])}")
    for tag in sorted(tags):
        claimed = glibc_of(tag)
        if claimed is None:
            errors.append(f"{tag} is not a manylinux tag")
        elif floor is not None and claimed < floor:
            errors.append(f"{tag} claims glibc {claimed[0]}.{claimed[1]}, the contents need {overall}")
    pep600 = sorted(t for t in tags if PEP600.fullmatch(t))
    if len(pep600) != 1:
        errors.append(f"expected one PEP 600 manylinux_2_X tag, got {pep600}")
    elif expect and pep600[0] != expect:
        errors.append(f"tag {pep600[0]}, expected {expect}")
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--expect", help="the PEP 600 tag the wheel must carry")
    args = parser.parse_args()

    show = subprocess.run(
        [sys.executable, "-m", "auditwheel", "show", "--json", str(args.wheel)],
        capture_output=True,
        text=True,
    )
    if show.returncode != 0:
        sys.exit(f"manylinux_check: auditwheel show failed ({show.returncode}):\n{show.stdout}{show.stderr}")
    report = json.loads(show.stdout)
    from_name, from_meta = wheel_platform_tags(args.wheel)
    errors = problems(from_name, report, args.expect)
    if from_name != from_meta:
        errors.append(f"file name tags {sorted(from_name)} differ from WHEEL's {sorted(from_meta)}")
    print(f"manylinux_check: {args.wheel.name}: tags {sorted(from_name)}; auditwheel: {report['overall_tag']},",
          f"versioned symbols {report['versioned_symbols']}")
    if errors:
        sys.exit(f"manylinux_check: {args.wheel.name}: " + "; ".join(errors))


if __name__ == "__main__":
    main()
