"""Shared fixtures: one ``backend`` fixture parametrised over the installed array libraries.

``EQSOLVE_TEST_BACKENDS=numpy,torch`` restricts the run (the nox sessions set it, one
backend per session). JAX runs with float64 enabled so both dtypes can be tested.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from eqsolve.backends import BACKEND_NAMES, BackendUnavailableError, get_backend


def _usable(name: str) -> bool:
    if importlib.util.find_spec(name) is None:
        return False
    try:
        get_backend(name)
    except BackendUnavailableError:  # cupy without a GPU
        return False
    return True


_requested = os.environ.get("EQSOLVE_TEST_BACKENDS")
REQUESTED = [b.strip() for b in _requested.split(",")] if _requested else list(BACKEND_NAMES)
AVAILABLE = [b for b in REQUESTED if b in BACKEND_NAMES and _usable(b)]

if "jax" in AVAILABLE:
    import jax

    jax.config.update("jax_enable_x64", True)


@pytest.fixture(params=AVAILABLE)
def backend(request: pytest.FixtureRequest) -> str:
    """Name of an installed backend (numpy, torch, jax, cupy, array_api_strict)."""
    return request.param


@pytest.fixture
def xp(backend: str):
    """Array-API namespace of ``backend``."""
    return get_backend(backend).xp


@pytest.fixture(params=["float32", "float64"])
def dtype_name(request: pytest.FixtureRequest) -> str:
    return request.param


def to_numpy(x) -> np.ndarray:
    """Any backend's array -> a NumPy copy (for comparisons)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    if hasattr(x, "get"):  # cupy
        return x.get()
    try:
        return np.asarray(x)
    except (TypeError, ValueError):
        return np.from_dlpack(x)


def from_numpy(a: np.ndarray, backend: str):
    """A NumPy array -> ``backend``'s array (same dtype)."""
    return get_backend(backend).convert(np.ascontiguousarray(a))
