#!/usr/bin/env bash
# Build release wheels with cibuildwheel (manylinux and musllinux, x86_64 and aarch64;
# the settings are in pyproject.toml [tool.cibuildwheel]). Needs a running Docker or
# Podman engine, and QEMU binfmt for aarch64 on an x86_64 host:
#     docker run --privileged --rm tonistiigi/binfmt --install arm64
# Usage: ci/build-wheels.sh [--archs x86_64] [OUTPUT_DIR]    (default output: wheelhouse/)
# Each wheel is tested inside cibuildwheel: it is installed into a fresh environment and
# must select the compiled implementation. ci/wheel_check.sh does the same for a local
# `python -m build --wheel` without containers (run by .ci/run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
archs=()
if [[ "${1:-}" == "--archs" ]]; then
    archs=(--archs "$2")
    shift 2
fi
out="${1:-wheelhouse}"
python -m pip install -q "cibuildwheel>=2.21"
python -m cibuildwheel --platform linux "${archs[@]}" --output-dir "$out" .
ls -l "$out"
