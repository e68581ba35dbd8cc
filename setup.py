"""Declare the optional C extension ``relay._fastpath``; everything else is in pyproject.toml.

Where the extension comes from:
- Cython importable (always true in an isolated build) and the .pyx present: cythonize it;
- else a shipped ``relay/_fastpath.c`` (sdists carry it): compile that;
- else there is no extension and ``relay.fastpath`` uses the pure-Python twin.

``RELAY_BUILD_EXT`` picks what a failure means:
- ``yes``: the extension must be built; no source or a failed compile fails the build (CI, wheels);
- ``no``: do not build it at all (pure-Python install);
- unset or ``auto``: try, and fall back to pure Python with a warning if the compiler fails.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

HERE = os.path.dirname(os.path.abspath(__file__))
PYX = "relay/_fastpath.pyx"
C_SOURCE = "relay/_fastpath.c"
MODES = ("yes", "no", "auto")

# Errors that mean "no working C toolchain here", as opposed to bugs in this file.
BUILD_ERRORS = (CCompilerError, CompileError, ExecError, LinkError, PlatformError)


def _mode() -> str:
    mode = os.environ.get("RELAY_BUILD_EXT", "auto").strip().lower() or "auto"
    if mode not in MODES:
        sys.exit(f"RELAY_BUILD_EXT={mode!r} is not one of {', '.join(MODES)}")
    return mode


def _warn(message: str) -> None:
    print(f"relay setup.py: {message}", file=sys.stderr)


class optional_build_ext(build_ext):
    """build_ext that, unless RELAY_BUILD_EXT=yes, turns a compiler failure into a warning."""

    def run(self) -> None:
        try:
            super().run()
        except BUILD_ERRORS as exc:
            self._fallback(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except BUILD_ERRORS as exc:
            self._fallback(exc)

    def _fallback(self, exc: Exception) -> None:
        if _mode() == "yes":
            raise exc
        _warn(
            f"building the C extension failed ({exc}); installing the pure-Python "
            "fast path instead (set RELAY_BUILD_EXT=yes to make this fatal)"
        )


def _extensions() -> list[Extension]:
    mode = _mode()
    if mode == "no":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        cythonize = None
    if cythonize is not None and os.path.exists(os.path.join(HERE, PYX)):
        annotate = os.environ.get("RELAY_CYTHON_ANNOTATE", "") not in ("", "0")
        # depends= puts the .pyx into the sdist (beside the generated .c) and
        # rebuilds the extension when it changes.
        return cythonize(
            [Extension("relay._fastpath", [PYX], depends=[PYX])],
            annotate=annotate,
            compiler_directives={"language_level": 3},
        )
    if os.path.exists(os.path.join(HERE, C_SOURCE)):
        return [Extension("relay._fastpath", [C_SOURCE])]
    if mode == "yes":
        sys.exit(
            "RELAY_BUILD_EXT=yes but Cython is not installed and there is no "
            f"{C_SOURCE} to compile"
        )
    _warn(f"Cython is not installed and {C_SOURCE} is absent; no C extension")
    return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": optional_build_ext})
