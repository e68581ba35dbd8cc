"""Fixtures for the micro-benchmarks (run with ``python -m pytest bench``)."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def _fastpath_impls() -> list[ModuleType]:
    impls = [importlib.import_module("relay._fastpath_py")]
    try:
        impls.append(importlib.import_module("relay._fastpath"))
    except ImportError:  # not built: benchmark the twin alone
        pass
    return impls


@pytest.fixture(params=_fastpath_impls(), ids=lambda module: module.IMPLEMENTATION)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """Return one fast-path implementation module (parametrized over all available)."""
    module: ModuleType = request.param
    return module
