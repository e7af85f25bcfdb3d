"""Every solver on every installed backend, in float32 and float64.

Checks are independent of the library: residuals are recomputed in NumPy float64 from the
returned value, acceleration is measured against plain iteration, and the best-iterate rule
is checked against iterates computed separately in NumPy.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from array_api_compat import array_namespace, device

import eqsolve
from conftest import AVAILABLE, from_numpy, to_numpy
from eqsolve import Status
from eqsolve.backends import get_backend
from problems import tanh_cell

if "torch" in AVAILABLE:  # keep the suite single-threaded (a small VM stalls with >1 thread)
    import torch

    torch.set_num_threads(1)
else:  # pragma: no cover - torch is optional
    torch = None

SOLVERS = ["picard", "anderson", "broyden"]
TOL = {"float64": 1e-10, "float32": 1e-5}


def np_rel_residual(cell, z) -> np.ndarray:
    """``||f(z) - z|| / ||f(z)||`` per row, in NumPy float64, from the cell's own weights."""
    z = np.asarray(z, dtype=np.float64)
    fz = np.tanh(z @ cell.W.T + cell.inj)
    return np.linalg.norm(fz - z, axis=-1) / np.linalg.norm(fz, axis=-1)


def z0_for(cell, dtype_name: str, seed: int = 1) -> np.ndarray:
    """A nonzero start (so a mutation of the caller's array would be visible)."""
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(cell.inj.shape)).astype(dtype_name)


# --------------------------------------------------------------------------------------
# the main matrix: backend x dtype x solver
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
def test_solves_tanh_cell(backend, dtype_name, solver):
    cell = tanh_cell(d=16, batch=4)
    tol = TOL[dtype_name]
    z0_np = z0_for(cell, dtype_name)
    z0 = from_numpy(z0_np, backend)
    before = to_numpy(z0).copy()

    sol = eqsolve.solve(cell, z0, solver=solver, tol=tol, max_iter=500)

    # the caller's z0 is untouched
    np.testing.assert_array_equal(to_numpy(z0), before)
    # same array type, shape, dtype and device as z0
    assert type(sol.value) is type(z0)
    assert tuple(sol.value.shape) == tuple(z0.shape)
    assert sol.value.dtype == z0.dtype
    assert device(sol.value) == device(z0)
    # per-sample fields
    converged = to_numpy(sol.converged)
    iterations = to_numpy(sol.iterations)
    residual = to_numpy(sol.residual)
    status = to_numpy(sol.status)
    assert converged.shape == iterations.shape == residual.shape == status.shape == (4,)
    assert converged.dtype == np.bool_
    assert converged.all()
    assert (status == int(Status.CONVERGED)).all()
    assert (residual <= tol * (1 + 1e-4)).all(), residual
    assert (iterations >= 1).all()
    assert int(sol.nfev) == 1 + int(iterations.max())
    # independent check of f(z) = z in float64
    value = to_numpy(sol.value)
    assert value.dtype == np.dtype(dtype_name)
    indep = np_rel_residual(cell, value)
    bound = 3 * tol if dtype_name == "float64" else 10 * tol
    assert (indep <= bound).all(), indep
    # the reported residual is the residual of the returned value
    np.testing.assert_allclose(residual, indep, rtol=0.05 if dtype_name == "float64" else 1.0,
                               atol=tol * 0.05)
    # and the answer is the true fixed point, not just a slow point
    ref = np.zeros_like(value, dtype=np.float64)
    for _ in range(2000):
        ref = np.tanh(ref @ cell.W.T + cell.inj)
    err = np.abs(value - ref).max()
    assert err <= (1e-8 if dtype_name == "float64" else 1e-3), err


@pytest.mark.parametrize("backend", [b for b in AVAILABLE if b != "jax"])
def test_nfev_counts_calls(backend):
    """``nfev`` is the number of calls of ``f`` (eager backends: JAX traces ``f`` once)."""
    cell = tanh_cell(d=16, batch=4)
    calls = []

    def f(z):
        calls.append(1)
        return cell(z)

    for solver in SOLVERS:
        calls.clear()
        sol = eqsolve.solve(f, from_numpy(cell.z0(), backend), solver=solver, tol=1e-10)
        assert sol.nfev == len(calls)
        assert len(calls) == 1 + int(to_numpy(sol.iterations).max())


# --------------------------------------------------------------------------------------
# acceleration: Anderson and Broyden must beat plain iteration clearly
# --------------------------------------------------------------------------------------


# JAX is left out of the slower checks below only to keep the suite fast (each eager JAX
# solve compiles its loop); test_cross_backend shows JAX takes the same iterates as NumPy.
EAGER = [b for b in AVAILABLE if b != "jax"]


@pytest.mark.parametrize("backend", EAGER)
def test_anderson_and_broyden_accelerate(backend):
    cell = tanh_cell(d=32, batch=4, radius=0.99, sym=True)
    z0 = from_numpy(cell.z0(), backend)
    nfev = {}
    for solver in SOLVERS:
        sol = eqsolve.solve(cell, z0, solver=solver, tol=1e-10, max_iter=2000)
        assert bool(to_numpy(sol.converged).all()), solver
        assert (np_rel_residual(cell, to_numpy(sol.value)) <= 3e-10).all(), solver
        nfev[solver] = int(sol.nfev)
    assert nfev["anderson"] <= 0.5 * nfev["picard"], nfev
    assert nfev["broyden"] <= 0.5 * nfev["picard"], nfev


# --------------------------------------------------------------------------------------
# best iterate
# --------------------------------------------------------------------------------------

# f(z) = z A^T + c with A = diag(0.1, -1.2): the error's first component dies fast, the
# second (started tiny) grows. The Picard residual drops for a few steps, then rises.
_A = np.diag([0.1, -1.2])
_C = np.array([1.0, 1.0])
_ZSTAR = _C / (1.0 - np.diag(_A))
_E0 = np.array([[1.0, 1e-3], [2.0, 1e-3], [0.5, 2e-3]])


def _linear_f(z):
    xp = array_namespace(z)
    A = xp.asarray(_A, dtype=z.dtype, device=device(z))
    c = xp.asarray(_C, dtype=z.dtype, device=device(z))
    return z @ xp.matrix_transpose(A) + c


def _np_linear_rel(z):
    fz = z @ _A.T + _C
    return np.linalg.norm(fz - z, axis=-1) / np.linalg.norm(fz, axis=-1)


def test_best_iterate_is_returned(backend):
    max_iter = 25
    z0_np = _ZSTAR + _E0
    sol = eqsolve.solve(_linear_f, from_numpy(z0_np, backend), solver="picard",
                              tol=1e-12, max_iter=max_iter, on_failure="ignore")
    # independent Picard iterates z_0 .. z_max_iter
    iterates = [z0_np]
    for _ in range(max_iter):
        iterates.append(iterates[-1] @ _A.T + _C)
    iterates = np.stack(iterates)  # (K+1, B, n)
    res = np.stack([_np_linear_rel(z) for z in iterates])  # (K+1, B)
    best = res.argmin(axis=0)
    # the setup really has a last iterate worse than an earlier one
    assert (res[-1] > 10 * res.min(axis=0)).all()
    assert ((best > 0) & (best < max_iter)).all()

    assert (to_numpy(sol.status) == int(Status.MAX_ITER)).all()
    assert not to_numpy(sol.converged).any()
    np.testing.assert_array_equal(to_numpy(sol.iterations), max_iter)
    # the last evaluated points are not the returned ones: one more call of f verifies them
    assert int(sol.nfev) == max_iter + 2
    value = to_numpy(sol.value)
    expected = iterates[best, np.arange(3)]
    np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_numpy(sol.residual), res.min(axis=0), rtol=1e-8)
    np.testing.assert_allclose(to_numpy(sol.residual), _np_linear_rel(value), rtol=1e-8)


@pytest.mark.parametrize("solver", SOLVERS)
def test_best_iterate_among_evaluated_points(solver):
    """For every solver: the value is the evaluated point of lowest residual (per sample)."""
    rng = np.random.default_rng(3)
    n, B = 12, 3
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = Q @ np.diag(np.linspace(-1.6, 1.4, n)) @ Q.T  # not a contraction
    c = rng.standard_normal((B, n))
    seen = []

    def f(z):
        seen.append(np.array(z, copy=True))
        return z @ A.T + c

    sol = eqsolve.solve(f, rng.standard_normal((B, n)), solver=solver, tol=1e-14,
                              max_iter=6, on_failure="ignore")
    pts = np.stack(seen)  # (calls, B, n)
    res = np.stack([np.linalg.norm(p @ A.T + c - p, axis=-1) / np.linalg.norm(p @ A.T + c, axis=-1)
                    for p in pts])
    best = res.argmin(axis=0)
    np.testing.assert_array_equal(sol.value, pts[best, np.arange(B)])
    np.testing.assert_allclose(sol.residual, res.min(axis=0), rtol=1e-10)


# --------------------------------------------------------------------------------------
# solver objects and damping
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", EAGER)
@pytest.mark.parametrize("obj", [eqsolve.Anderson(m=3), eqsolve.Broyden(memory=4),
                                 eqsolve.Picard(beta=0.5)], ids=repr)
def test_solver_objects(backend, obj):
    cell = tanh_cell(d=16, batch=4)
    sol = eqsolve.solve(cell, from_numpy(cell.z0(), backend), solver=obj, tol=1e-10,
                              max_iter=500)
    assert to_numpy(sol.converged).all()
    assert (np_rel_residual(cell, to_numpy(sol.value)) <= 3e-10).all()


def test_solver_object_differs_from_default():
    """The object's hyperparameters are actually used (Broyden memory=1 restarts every step
    and so is plain iteration after the first step; Anderson m=1 is plain iteration)."""
    cell = tanh_cell(d=32, batch=4, radius=0.99, sym=True)
    plain = eqsolve.solve(cell, cell.z0(), solver="picard", tol=1e-10, max_iter=2000)
    a1 = eqsolve.solve(cell, cell.z0(), solver=eqsolve.Anderson(m=1), tol=1e-10,
                             max_iter=2000)
    a5 = eqsolve.solve(cell, cell.z0(), solver=eqsolve.Anderson(m=5), tol=1e-10,
                             max_iter=2000)
    assert a1.nfev == plain.nfev
    np.testing.assert_allclose(a1.value, plain.value, rtol=0, atol=1e-12)
    assert a5.nfev < plain.nfev


def _flip(z):
    """f(z) = -z + c: nonexpansive, plain iteration oscillates forever."""
    xp = array_namespace(z)
    c = xp.asarray(np.arange(1.0, 7.0).reshape(2, 3), dtype=z.dtype, device=device(z))
    return c - z


def test_damped_picard_converges_where_plain_does_not(backend):
    z0 = from_numpy(np.ones((2, 3)), backend)
    plain = eqsolve.solve(_flip, z0, solver="picard", tol=1e-10, max_iter=50,
                                on_failure="ignore")
    assert (to_numpy(plain.status) == int(Status.MAX_ITER)).all()
    assert (to_numpy(plain.residual) > 0.1).all()

    damped = eqsolve.solve(_flip, z0, solver=eqsolve.Picard(beta=0.5), tol=1e-10,
                                 max_iter=50)
    assert to_numpy(damped.converged).all()
    c = np.arange(1.0, 7.0).reshape(2, 3)
    np.testing.assert_allclose(to_numpy(damped.value), c / 2, rtol=1e-12)


def test_damped_picard_keyword_and_warning():
    z0 = np.ones((2, 3))
    with pytest.warns(eqsolve.ConvergenceWarning):
        eqsolve.solve(_flip, z0, solver="picard", tol=1e-10, max_iter=5)
    damped = eqsolve.solve(_flip, z0, solver=eqsolve.Picard(beta=0.5), tol=1e-10)
    kw = eqsolve.solve(_flip, z0, solver="picard", beta=0.5, tol=1e-10)
    np.testing.assert_array_equal(kw.value, damped.value)
    assert kw.nfev == damped.nfev == 2


# --------------------------------------------------------------------------------------
# batch invariance and batch_axis
# --------------------------------------------------------------------------------------


if "jax" in AVAILABLE:
    import jax
    import jax.numpy as jnp

    @functools.partial(jax.jit, static_argnames=("solver", "tol", "max_iter"))
    def _jax_cell_solve(z0, W, inj, solver, tol, max_iter):
        # the weights are arguments: one compilation per shape serves every sample
        return eqsolve.solve(lambda v: jnp.tanh(v @ W.T + inj), z0, solver=solver,
                                   tol=tol, max_iter=max_iter)


def _batch_and_singles(backend, cell, z0_np, solver, tol=1e-10, max_iter=500):
    """(batched solution, list of per-sample batch-of-one solutions) as NumPy tuples."""
    fields = ("value", "iterations", "residual", "status")

    def solve(z, inj):
        if backend == "jax":
            sol = _jax_cell_solve(jnp.asarray(z), jnp.asarray(cell.W), jnp.asarray(inj),
                                  solver=solver, tol=tol, max_iter=max_iter)
        else:
            sol = eqsolve.solve(type(cell)(cell.W, inj), from_numpy(z, backend),
                                      solver=solver, tol=tol, max_iter=max_iter)
        return {k: to_numpy(getattr(sol, k)) for k in fields} | {"nfev": int(sol.nfev)}

    return solve(z0_np, cell.inj), [solve(z0_np[b : b + 1], cell.inj[b : b + 1])
                                    for b in range(len(z0_np))]


@pytest.mark.parametrize("solver", SOLVERS)
def test_batch_invariance(backend, solver):
    cell = tanh_cell(d=12, batch=5, radius=0.95, seed=7)
    z0 = z0_for(cell, "float64", seed=2)
    full, singles = _batch_and_singles(backend, cell, z0, solver)
    # the samples really stop at different iterations, so freezing is exercised
    assert len(set(full["iterations"].tolist())) > 1, full["iterations"]
    assert full["nfev"] == 1 + int(full["iterations"].max())
    for b, one in enumerate(singles):
        np.testing.assert_allclose(one["value"][0], full["value"][b], rtol=0, atol=1e-10)
        assert int(one["iterations"][0]) == int(full["iterations"][b]), b
        assert int(one["status"][0]) == int(full["status"][b]) == int(Status.CONVERGED)
        np.testing.assert_allclose(one["residual"][0], full["residual"][b], rtol=1e-6,
                                   atol=1e-15)
        assert one["nfev"] == 1 + int(full["iterations"][b])


# every solver on the eager backends, Picard on JAX (the layout code is solver-independent;
# this keeps the suite fast)
AXIS_CASES = [(b, s) for b in AVAILABLE for s in SOLVERS if b != "jax" or s == "picard"]


@pytest.mark.parametrize(("backend", "solver"), AXIS_CASES)
def test_batch_axis_1_is_transpose(backend, solver):
    cell = tanh_cell(d=16, batch=4)
    z0 = z0_for(cell, "float64")

    def f_t(zt):  # samples along axis 1
        xp = array_namespace(zt)
        return xp.permute_dims(cell(xp.permute_dims(zt, (1, 0))), (1, 0))

    ref = eqsolve.solve(cell, z0, solver=solver, tol=1e-10)  # NumPy, batch_axis=0
    sol = eqsolve.solve(f_t, from_numpy(np.ascontiguousarray(z0.T), backend),
                              solver=solver, tol=1e-10, batch_axis=1)
    assert tuple(sol.value.shape) == (16, 4)
    assert tuple(sol.converged.shape) == (4,)
    np.testing.assert_allclose(to_numpy(sol.value), ref.value.T, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(to_numpy(sol.iterations), ref.iterations)
    np.testing.assert_allclose(to_numpy(sol.residual), ref.residual, rtol=0, atol=1e-15)
    if backend != "jax":  # (-1 is normalised before any backend code; spare a JAX compile)
        # batch_axis=-1 means the same thing here
        neg = eqsolve.solve(f_t, from_numpy(np.ascontiguousarray(z0.T), backend),
                                  solver=solver, tol=1e-10, batch_axis=-1)
        np.testing.assert_array_equal(to_numpy(neg.value), to_numpy(sol.value))


@pytest.mark.parametrize(("backend", "solver"), AXIS_CASES)
def test_batch_axis_none_is_one_system(backend, solver):
    cell = tanh_cell(d=16, batch=4)
    z0 = z0_for(cell, "float64")
    sol = eqsolve.solve(cell, from_numpy(z0, backend), solver=solver, tol=1e-10,
                              batch_axis=None)
    for field in (sol.converged, sol.iterations, sol.residual, sol.status):
        assert tuple(field.shape) == ()
    assert bool(to_numpy(sol.converged))
    assert tuple(sol.value.shape) == (4, 16)
    value = to_numpy(sol.value)
    fz = np.tanh(value @ cell.W.T + cell.inj)
    whole = np.linalg.norm(fz - value) / np.linalg.norm(fz)
    assert whole <= 3e-10
    np.testing.assert_allclose(float(to_numpy(sol.residual)), whole, rtol=0.05, atol=5e-12)
    assert int(sol.nfev) == 1 + int(to_numpy(sol.iterations))


@pytest.mark.parametrize("solver", ["anderson", "auto"])
def test_mixing_from_a_far_start_in_float32(backend, solver):
    """From z0 = 1e15 to a fixed point of size ~1 in float32, the last stored residuals are
    ~1e-22 of the first: their Gram entries are subnormal (XLA flushes them to 0, and such a
    slot is then weighted as an exact fixed point) and the mixing weights may overflow to
    NaN, where the safeguard steps plainly. Every sample still converges -- in 11-14 steps
    on NumPy/torch, up to 39 on JAX (plain iteration: 25-28; the code before 2026-12-02: up
    to 28 on JAX) -- and the rule holds at the value (checked in float64, outside eqsolve)."""
    from contract import check_contract

    rng = np.random.default_rng(3)
    n = 32
    W = rng.standard_normal((n, n))
    W *= 0.9 / np.linalg.norm(W, 2)
    x = rng.standard_normal((8, n))

    def f64(z):
        return 0.5 * np.tanh(z @ W.T + x) + 0.1 * z

    xp = get_backend(backend).xp
    Wt, xs = (from_numpy(a.astype("float32"), backend) for a in (W.T.copy(), x))

    def f(z):
        return 0.5 * xp.tanh(z @ Wt + xs) + 0.1 * z

    z0 = from_numpy(np.full((8, n), 1e15, dtype="float32"), backend)
    sol = eqsolve.solve(f, z0, solver=solver, tol=1e-6, max_iter=60, on_failure="ignore")
    assert (to_numpy(sol.status) == 0).all(), to_numpy(sol.status)
    assert int(np.max(to_numpy(sol.iterations))) <= 45
    check_contract(sol, f64, tol=1e-6, atol=0.0, dtype="float32")
