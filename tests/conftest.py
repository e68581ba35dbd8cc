"""Shared fixtures for the test suite."""

from __future__ import annotations

# --- fastpath impl fixture ----------------------------------------------------
# `impl` runs a test once per available fast-path implementation: the pure-Python
# twin `relay._fastpath_py` always, the compiled `relay._fastpath` when it was
# built (ids "python" / "cython"). Whether the compiled module *must* be present
# is checked by tests/test_fastpath_differential.py under RELAY_REQUIRE_COMPILED=1,
# not here. This block is self-contained: it needs only the imports inside it.
import importlib
from types import ModuleType

import pytest


def _fastpath_impls() -> list[ModuleType]:
    impls = [importlib.import_module("relay._fastpath_py")]
    try:
        impls.append(importlib.import_module("relay._fastpath"))
    except ImportError:  # not built (pure-Python install): only the twin exists
        pass
    return impls


FASTPATH_IMPLS: list[ModuleType] = _fastpath_impls()


@pytest.fixture(params=FASTPATH_IMPLS, ids=lambda module: module.IMPLEMENTATION)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """Return one fast-path implementation module (parametrized over all available)."""
    module: ModuleType = request.param
    return module


# --- end fastpath impl fixture ------------------------------------------------
