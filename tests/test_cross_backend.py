"""The same solve on every backend takes the same iterates as NumPy (float64), and the
``backend=`` argument converts inputs and hands ``f`` that backend's arrays."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from array_api_compat import array_namespace, is_array_api_obj

import eqsolve
from conftest import AVAILABLE, from_numpy, to_numpy
from eqsolve.backends import get_backend
from problems import tanh_cell

if "torch" in AVAILABLE:  # keep the suite single-threaded (a small VM stalls with >1 thread)
    import torch

    torch.set_num_threads(1)
else:  # pragma: no cover - torch is optional
    torch = None

SOLVERS = ["picard", "anderson", "broyden"]
OTHERS = [b for b in AVAILABLE if b != "numpy"]


def _is_backend_array(x, backend: str) -> bool:
    """Whether ``x`` is an array of ``backend``'s library (not another library's)."""
    from eqsolve.backends import backend_name_of

    return is_array_api_obj(x) and backend_name_of(array_namespace(x)) == backend


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backend", OTHERS)
def test_iterates_agree_with_numpy(backend, solver):
    cell = tanh_cell(d=16, batch=4, seed=5)
    z0 = 0.1 * np.random.default_rng(0).standard_normal((4, 16))
    ref = eqsolve.solve(cell, z0, solver=solver, tol=1e-10, max_iter=500)
    sol = eqsolve.solve(cell, from_numpy(z0, backend), solver=solver, tol=1e-10,
                              max_iter=500)
    assert _is_backend_array(sol.value, backend)
    np.testing.assert_allclose(to_numpy(sol.value), ref.value, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(to_numpy(sol.iterations), ref.iterations)
    np.testing.assert_array_equal(to_numpy(sol.status), ref.status)
    assert int(sol.nfev) == ref.nfev
    np.testing.assert_allclose(to_numpy(sol.residual), ref.residual, rtol=0, atol=1e-14)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backend", OTHERS)
def test_truncated_iterates_agree_with_numpy(backend, solver):
    """Stopped early (max_iter=6), so the comparison is of intermediate iterates, not of a
    fixed point every method would reach anyway."""
    cell = tanh_cell(d=16, batch=3, radius=0.99, seed=2, sym=True)
    z0 = cell.z0()
    kw = dict(solver=solver, tol=1e-12, max_iter=6, on_failure="ignore")
    ref = eqsolve.solve(cell, z0, **kw)
    sol = eqsolve.solve(cell, from_numpy(z0, backend), **kw)
    assert (ref.status == int(eqsolve.Status.MAX_ITER)).all()  # really stopped early
    np.testing.assert_allclose(to_numpy(sol.value), ref.value, rtol=0, atol=1e-10)
    np.testing.assert_allclose(to_numpy(sol.residual), ref.residual, rtol=1e-8)
    np.testing.assert_array_equal(to_numpy(sol.iterations), ref.iterations)
    assert int(sol.nfev) == ref.nfev == 7


# --------------------------------------------------------------------------------------
# backend= conversion
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", AVAILABLE)
def test_backend_argument_gives_f_that_backends_arrays(backend):
    cell = tanh_cell(d=8, batch=2)
    seen = []

    def f(z):
        assert _is_backend_array(z, backend), type(z)
        seen.append(type(z))
        out = cell(z)
        assert _is_backend_array(out, backend)
        return out

    z0 = cell.z0()  # a NumPy array
    sol = eqsolve.solve(f, z0, backend=backend, solver="picard", tol=1e-10)
    assert seen  # f was called (traced, under JAX)
    for field in (sol.value, sol.converged, sol.iterations, sol.residual, sol.status):
        assert _is_backend_array(field, backend), type(field)
    assert get_backend(backend).xp.isdtype(sol.value.dtype, "real floating")
    assert to_numpy(sol.value).dtype == np.float64
    assert to_numpy(sol.converged).all()
    ref = eqsolve.solve(cell, z0, solver="picard", tol=1e-10)
    np.testing.assert_allclose(to_numpy(sol.value), ref.value, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(z0, 0.0)  # the caller's array is untouched


needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (or not selected)")


@needs_torch
def test_torch_z0_with_numpy_backend():
    cell = tanh_cell(d=8, batch=2)

    def f(z):
        assert type(z) is np.ndarray
        return cell(z)

    z0 = torch.zeros(2, 8, dtype=torch.float64)
    sol = eqsolve.solve(f, z0, backend="numpy", tol=1e-10)
    assert type(sol.value) is np.ndarray
    assert sol.converged.all()
    assert (z0 == 0).all()


@needs_torch
@pytest.mark.parametrize("backend", [b for b in AVAILABLE if b != "torch"])
def test_torch_z0_requiring_grad_is_detached(backend):
    """A tensor that requires grad cannot be exported by DLPack or ``.numpy()``: conversion
    must detach it (DLPack refuses a tensor that requires grad)."""
    cell = tanh_cell(d=8, batch=2)
    z0 = torch.zeros(2, 8, dtype=torch.float64, requires_grad=True)

    def f(z):
        assert _is_backend_array(z, backend)
        return cell(z)

    sol = eqsolve.solve(f, z0, backend=backend, solver="picard", tol=1e-10)
    assert _is_backend_array(sol.value, backend)
    assert to_numpy(sol.converged).all()
    ref = eqsolve.solve(cell, np.zeros((2, 8)), solver="picard", tol=1e-10)
    np.testing.assert_allclose(to_numpy(sol.value), ref.value, rtol=0, atol=1e-10)
    assert z0.grad is None and (z0.detach() == 0).all()


@needs_torch
@pytest.mark.parametrize("start", ["zeros", "fixed_point"])
def test_torch_z0_requiring_grad_on_torch_backend(start):
    """The solve builds no graph and emits no warning, also when the best iterate is z0
    itself ("fixed_point": z0 already satisfies the stopping rule)."""
    cell = tanh_cell(d=8, batch=2)
    ref = eqsolve.solve(cell, np.zeros((2, 8)), tol=1e-10)
    base = np.zeros((2, 8)) if start == "zeros" else ref.value
    z0 = torch.tensor(base, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol = eqsolve.solve(cell, z0, tol=1e-8)
    assert [str(w.message) for w in caught] == []
    assert isinstance(sol.value, torch.Tensor)
    assert bool(sol.converged.all())
    assert (sol.iterations == 0).all() == (start == "fixed_point")
    assert not sol.value.requires_grad  # the solve itself builds no graph
    assert sol.value.grad_fn is None
