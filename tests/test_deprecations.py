"""Names renamed in this release still work for one more, with a DeprecationWarning."""

from __future__ import annotations

import numpy as np
import pytest

import eqsolve
from conftest import AVAILABLE


@pytest.mark.parametrize(
    "name, module",
    [
        ("current_options", "eqsolve.backends.cupy.options"),
        ("run_fused", "eqsolve.backends.cupy.fused"),
        ("run_cupy", "eqsolve.backends.cupy.fused"),
        ("use_fused", "eqsolve.backends.cupy.fused"),
        ("AUTO_MAX_N", "eqsolve.backends.cupy.fused"),
    ],
)
def test_cupy_adapter_names_moved_to_the_backend(name, module):
    import importlib

    import eqsolve.adapters.cupy as ac

    with pytest.warns(DeprecationWarning, match=rf"eqsolve.adapters.cupy.{name} is deprecated"):
        value = getattr(ac, name)
    assert value is getattr(importlib.import_module(module), name)
    with pytest.raises(AttributeError):
        ac.not_a_name  # noqa: B018


def test_cupy_fixed_point_is_fixed_point_with_pullback():
    import eqsolve.cupy as ec

    with pytest.warns(DeprecationWarning, match="use eqsolve.cupy.fixed_point_with_pullback"):
        try:
            ec.fixed_point(np.cos, np.zeros((2, 2)), vjp=lambda z, v: v)
        except eqsolve.BackendUnavailableError:  # no GPU here: the warning came first
            pass


@pytest.mark.skipif("jax" not in AVAILABLE, reason="jax is not installed (or not selected)")
def test_jax_method_groups():
    import eqsolve.jax as ej

    with pytest.warns(DeprecationWarning, match="IMPLICIT_METHODS is deprecated"):
        assert set(ej.IMPLICIT_METHODS) == {"neumann", "anderson", "broyden", "gmres"}
    with pytest.warns(DeprecationWarning, match="INEXACT_METHODS is deprecated"):
        assert ej.INEXACT_METHODS == ("phantom", "jfb")
