#!/usr/bin/env bash
# Install with the Cython extension (fatal if it does not build), run the suite on the
# compiled fast path and again on the pure-Python twin, then check the wheel.
# Uses the `python` on PATH (CI: the .venv that .ci/run activated).
set -euxo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RELAY_BUILD_EXT=yes python -m pip install -e ".[test]"
python -c 'import relay.fastpath as f; assert f.IMPLEMENTATION == "cython", f.IMPLEMENTATION'

# pytest under a hard time limit; exit 5 ("no tests collected") is a failure like any other.
run_pytest() {
    local rc=0
    timeout -k 30 600 python -m pytest -q "$@" || rc=$?
    if ((rc == 5)); then
        echo "ci/test.sh: pytest collected no tests" >&2
    elif ((rc == 124 || rc == 137)); then
        echo "ci/test.sh: pytest timed out" >&2
    fi
    return "$rc"
}

# CI has a compiler and Chromium: tests that need them fail instead of skipping.
export RELAY_REQUIRE_BROWSER=1
RELAY_REQUIRE_COMPILED=1 run_pytest
RELAY_PURE_PYTHON=1 run_pytest

bash ci/wheel_check.sh

# Hot-path regression check: compiled vs pure-Python ratios measured in this run,
# against stored floors (ci/bench_floors.json); absolute times are never compared.
python ci/bench_check.py
