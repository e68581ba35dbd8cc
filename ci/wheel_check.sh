#!/usr/bin/env bash
# Build the wheel, check what is in it (the compiled .so; no .c/.pyx/.html), install it
# into a throwaway venv and check, from outside the source tree, that the compiled fast
# path is the one selected, then run tests/deploy with the relay nodes from that wheel.
# Uses the `python` on PATH, which needs `build` installed.
set -euxo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

RELAY_BUILD_EXT=yes python -m build --wheel --outdir "$work/dist" .
shopt -s nullglob
wheels=("$work"/dist/relay-*.whl)
if ((${#wheels[@]} != 1)); then
    echo "wheel_check: expected one wheel, got: ${wheels[*]:-none}" >&2
    exit 1
fi
wheel=${wheels[0]}

python - "$wheel" <<'PY'
import fnmatch
import sys
import zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
print("\n".join(sorted(names)))
compiled = [n for n in names if fnmatch.fnmatch(n, "relay/_fastpath.*.so")]
sources = [n for n in names if n.endswith((".c", ".pyx", ".html"))]
errors = []
if len(compiled) != 1:
    errors.append(f"expected one relay/_fastpath.*.so, found {compiled}")
if sources:
    errors.append(f"sources must not be in the wheel: {sources}")
for required in ("relay/_fastpath.pyi", "relay/_fastpath_py.py", "relay/py.typed", "relay/static/client.js"):
    if required not in names:
        errors.append(f"missing {required}")
if errors:
    sys.exit("wheel_check: " + "; ".join(errors))
PY

python -m venv "$work/venv"
# (with the redis extra: the rolling restart below runs the nodes on Redis)
"$work/venv/bin/python" -m pip install "${wheel}[redis]"
cd "$work"  # away from the checkout, so `relay` can only come from the installed wheel
"$work/venv/bin/python" - "$work/venv" <<'PY'
import sys

import relay._fastpath
import relay.fastpath as f

print("IMPLEMENTATION =", f.IMPLEMENTATION, "from", relay._fastpath.__file__)
assert f.IMPLEMENTATION == "cython", f.IMPLEMENTATION
assert relay._fastpath.__file__.startswith(sys.argv[1]), relay._fastpath.__file__
assert f.encode_frame(f.OP_TEXT, b"hi") == b"\x81\x02hi"
PY
"$work/venv/bin/relay" --help >/dev/null

# The operator's path (issue 7): relay from the built wheel, behind Debian's nginx and
# HAProxy with the shipped configs, on Redis, restarted node by node under load. The test
# process (clients, proxies, Redis) runs from the checkout; the relay nodes run the wheel.
"$work/venv/bin/relay" version
(cd "$repo" && RELAY_TEST_SERVE="$work/venv/bin/relay" timeout -k 30 300 python -m pytest -q -p no:cacheprovider tests/deploy)
