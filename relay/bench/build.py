"""Find a C compiler and compile the load generator (bench/load/cload.c) and the C peers.

Owns the source lookup (``$RELAY_BENCH_CLOAD_SOURCE`` or the source checkout) and the
hash-keyed binary cache. It must not run what it builds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .settings import CLOAD_ENV, SOURCE_ROOT, BenchError


def cload_source() -> Path:
    """Return the path of cload.c: ``$RELAY_BENCH_CLOAD_SOURCE`` or the source checkout's."""
    env = os.environ.get(CLOAD_ENV)
    src = Path(env) if env else SOURCE_ROOT / "bench" / "load" / "cload.c"
    if not src.is_file():
        raise BenchError(
            f"relay bench needs the load generator's source, {src}; it is part of a relay "
            f"source checkout (bench/load/cload.c), not of the wheel. Run from a checkout or "
            f"set {CLOAD_ENV} to the file.")
    return src


def find_compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or (cc if Path(cc).exists() else None)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def build_cload() -> Path:
    """Compile the load generator (bench/load/cload.c) if needed; return the binary.

    Raises:
        BenchError: no source, no C compiler, or the compile failed.
    """
    return build_c_program(cload_source())


def build_c_program(src: Path, verbose: bool = True) -> Path:
    """Compile ``src`` (``cc -O2 -pthread``) into a cache keyed by its hash; return the binary.

    The cache is ``.build/`` beside the source, else ``~/.cache/relay-bench``.

    Raises:
        BenchError: no C compiler, or the compile failed.
    """
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    candidates = [src.parent / ".build", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "relay-bench"]
    for cache in candidates:
        exe = cache / f"{src.stem}-{digest}"
        if os.access(exe, os.X_OK):
            return exe
    cc = find_compiler()
    if cc is None:
        raise BenchError(
            f"relay bench compiles {src.name} and found no C compiler: set CC or install one "
            "(Debian/Ubuntu: apt-get install gcc).")
    errors = []
    for cache in candidates:
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            errors.append(f"{cache}: {exc}")
            continue
        exe = cache / f"{src.stem}-{digest}"
        tmp = cache / f".{src.stem}-{digest}.{os.getpid()}"
        cmd = [cc, "-O2", "-pthread", "-o", str(tmp), str(src)]
        if verbose:
            print(f"relay bench: compiling {src.name}: {' '.join(cmd)}", file=sys.stderr)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"compiling {src} with {cc} failed: {exc}") from exc
        if proc.returncode != 0:
            raise BenchError(f"compiling {src} with {cc} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        os.replace(tmp, exe)
        return exe
    raise BenchError("no writable cache directory for the load generator: " + "; ".join(errors))
