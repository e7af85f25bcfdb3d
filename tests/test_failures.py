"""Failure handling of ``eqsolve.fixed_point``: NaN/inf during a solve, non-convergence,
``on_failure`` modes, behaviour under ``jax.jit``, no mutation of user inputs, and the
Anderson safeguards on ill-posed mixing problems.

JAX note: every eager JAX solve compiles its ``lax.while_loop`` (~2 s), so on JAX the
solver-independent checks use ``picard`` (cheap to compile) and the solver matrices run on
the eager backends; each check still runs on JAX at least once.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import eqsolve
from conftest import AVAILABLE, from_numpy, to_numpy
from eqsolve import ConvergenceError, ConvergenceWarning, Status
from eqsolve.backends import get_backend
from problems import TanhCell, tanh_cell

SOLVERS = ["anderson", "broyden", "picard"]
EAGER = [b for b in AVAILABLE if b != "jax"]
#: (backend, solver) pairs: every solver on the eager backends, picard on JAX (compile
#: cost; Anderson on JAX is covered by the jit and ill-posed-batch tests)
PAIRS = [(b, s) for b in EAGER for s in SOLVERS] + (
    [("jax", "picard")] if "jax" in AVAILABLE else []
)
#: cheap solver per backend for checks that do not depend on the solver
CHEAP = [(b, "picard" if b == "jax" else "anderson") for b in AVAILABLE]

BATCH, DIM = 4, 6
THRESHOLD = 3.0


def _cell() -> TanhCell:
    return tanh_cell(d=DIM, batch=BATCH, radius=0.5, seed=1)


def _row_mask(xp, z, row: int = 0):
    """(B, 1) boolean mask selecting ``row`` of a (B, n) array."""
    idx = xp.arange(z.shape[0], device=get_backend_device(z))
    return xp.reshape(idx == row, (z.shape[0], 1))


def get_backend_device(z):
    from array_api_compat import device

    return device(z)


def drifting_nan_map(cell: TanhCell, bad: float = math.nan):
    """Rows 1.. : the contractive tanh cell. Row 0: ``z + 1`` (no fixed point; the residual is
    constant, so every solver drifts upward), which returns ``bad`` once ``z + 1 > 3``:
    NaN/inf appears after a few iterations, never in ``f(z0)`` for ``z0 = 0``. The
    relative residual of row 0 is ``1 / (z + 1)``, so its best finite iterate is its last
    finite one. Works under ``jax.jit`` (no Python state)."""

    def f(z):
        from array_api_compat import array_namespace

        xp = array_namespace(z)
        shifted = z + 1.0
        row0 = xp.where(shifted > THRESHOLD, xp.full_like(z, bad), shifted)
        return xp.where(_row_mask(xp, z), row0, cell(z))

    return f


def nan_at_start_map(cell: TanhCell):
    def f(z):
        from array_api_compat import array_namespace

        xp = array_namespace(z)
        return xp.where(_row_mask(xp, z), xp.full_like(z, math.nan), cell(z))

    return f


def _solve_rest_alone(cell: TanhCell, backend: str, solver: str, **kw):
    rest = TanhCell(cell.W, cell.inj[1:])
    return eqsolve.solve(rest, from_numpy(rest.z0(), backend), solver=solver, **kw)


def _status(sol):
    return to_numpy(sol.status).tolist()


# --------------------------------------------------------------------------- NaN / inf


@pytest.mark.parametrize("backend, solver", PAIRS)
def test_nan_during_solve_stops_that_sample(backend, solver):
    cell = _cell()
    kw = dict(solver=solver, tol=1e-10, max_iter=200)
    with pytest.warns(ConvergenceWarning, match=r"1 of 4 samples hit NaN/inf") as record:
        sol = eqsolve.solve(drifting_nan_map(cell), from_numpy(cell.z0(), backend), **kw)
    assert len([w for w in record if issubclass(w.category, ConvergenceWarning)]) == 1

    status = _status(sol)
    assert status == [int(Status.NONFINITE)] + [int(Status.CONVERGED)] * (BATCH - 1)
    assert to_numpy(sol.converged).tolist() == [False] + [True] * (BATCH - 1)
    value = to_numpy(sol.value)
    res = to_numpy(sol.residual)
    its = to_numpy(sol.iterations)
    # the stopped sample: best finite iterate, finite residual that belongs to it
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(res))
    assert np.all(value[0] + 1.0 <= THRESHOLD)  # f(value) was finite
    np.testing.assert_allclose(res[0], 1.0 / (value[0, 0] + 1.0), rtol=1e-10)
    assert value[0, 0] > 0  # it did move before NaN appeared
    assert 1 <= its[0] < 200
    # the other samples: exactly what they get alone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alone = _solve_rest_alone(cell, backend, **kw)
    assert _status(alone) == [int(Status.CONVERGED)] * (BATCH - 1)
    np.testing.assert_allclose(value[1:], to_numpy(alone.value), rtol=0, atol=1e-13)
    assert its[1:].tolist() == to_numpy(alone.iterations).tolist()


@pytest.mark.parametrize("bad", [math.inf, -math.inf])
@pytest.mark.parametrize("backend, solver", [(b, "anderson") for b in EAGER])  # JAX: the jit test
def test_inf_during_solve_stops_that_sample(backend, solver, bad):
    cell = _cell()
    with pytest.warns(ConvergenceWarning, match=r"NaN/inf"):
        sol = eqsolve.solve(
            drifting_nan_map(cell, bad),
            from_numpy(cell.z0(), backend),
            solver=solver,
            tol=1e-10,
            max_iter=200,
        )
    assert _status(sol)[0] == int(Status.NONFINITE)
    assert _status(sol)[1:] == [int(Status.CONVERGED)] * (BATCH - 1)
    assert np.all(np.isfinite(to_numpy(sol.value)))
    assert np.all(np.isfinite(to_numpy(sol.residual)))


@pytest.mark.parametrize("backend, solver", CHEAP)
def test_nan_on_failure_raise(backend, solver):
    cell = _cell()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # raise mode must not also warn
        with pytest.raises(ConvergenceError, match=r"hit NaN/inf") as info:
            eqsolve.solve(
                drifting_nan_map(cell),
                from_numpy(cell.z0(), backend),
                solver=solver,
                tol=1e-10,
                max_iter=200,
                on_failure="raise",
            )
    assert isinstance(info.value, RuntimeError)
    sol = info.value.solution
    assert isinstance(sol, eqsolve.Solution)
    assert _status(sol) == [int(Status.NONFINITE)] + [int(Status.CONVERGED)] * (BATCH - 1)
    assert np.all(np.isfinite(to_numpy(sol.value)))


@pytest.mark.parametrize("backend, solver", CHEAP)
def test_nan_on_failure_ignore_is_silent(backend, solver):
    cell = _cell()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing at all may be emitted
        sol = eqsolve.solve(
            drifting_nan_map(cell),
            from_numpy(cell.z0(), backend),
            solver=solver,
            tol=1e-10,
            max_iter=200,
            on_failure="ignore",
        )
    assert _status(sol) == [int(Status.NONFINITE)] + [int(Status.CONVERGED)] * (BATCH - 1)


@pytest.mark.parametrize("backend, solver", CHEAP)
def test_nan_in_f_of_z0(backend, solver):
    cell = _cell()
    z0_np = np.random.default_rng(3).standard_normal((BATCH, DIM)) * 0.1
    with pytest.warns(ConvergenceWarning, match=r"1 of 4 samples hit NaN/inf"):
        sol = eqsolve.solve(
            nan_at_start_map(cell),
            from_numpy(z0_np, backend),
            solver=solver,
            tol=1e-10,
            max_iter=200,
        )
    assert _status(sol) == [int(Status.NONFINITE)] + [int(Status.CONVERGED)] * (BATCH - 1)
    its = to_numpy(sol.iterations)
    assert its[0] == 0
    assert np.all(its[1:] > 0)
    value = to_numpy(sol.value)
    np.testing.assert_array_equal(value[0], z0_np[0])  # the only finite iterate is z0
    assert np.all(np.isfinite(value))


@pytest.mark.parametrize("backend", AVAILABLE)
def test_nan_everywhere_in_f_of_z0_stops_immediately(backend):
    calls = []

    def f(z):
        calls.append(1)
        return z * math.nan

    z0_np = np.ones((BATCH, DIM))
    with pytest.warns(ConvergenceWarning, match=r"4 of 4 samples hit NaN/inf"):
        sol = eqsolve.solve(f, from_numpy(z0_np, backend), solver="picard")
    assert _status(sol) == [int(Status.NONFINITE)] * BATCH
    assert to_numpy(sol.iterations).tolist() == [0] * BATCH
    assert int(sol.nfev) == 1
    if backend != "jax":  # (JAX traces f for the loop body as well)
        assert len(calls) == 1
    np.testing.assert_array_equal(to_numpy(sol.value), z0_np)


@pytest.mark.parametrize("backend", EAGER)
def test_nan_in_one_leaf_of_tuple_state(backend):
    """A NaN in one array of a tuple state stops the whole sample it belongs to."""
    cell = _cell()

    def f(z):
        a, b = z
        from array_api_compat import array_namespace

        xp = array_namespace(a)
        fa = cell(a)
        fb = xp.where(
            _row_mask(xp, b, row=2) & (b + 1.0 > THRESHOLD), xp.full_like(b, math.nan), b + 1.0
        )
        fb = xp.where(_row_mask(xp, b, row=2), fb, 0.5 * b)
        return (fa, fb)

    z0 = (from_numpy(cell.z0(), backend), from_numpy(np.zeros((BATCH, 2)), backend))
    with pytest.warns(ConvergenceWarning, match=r"1 of 4 samples hit NaN/inf"):
        sol = eqsolve.solve(f, z0, tol=1e-8, atol=1e-12, max_iter=200)
    assert _status(sol) == [0, 0, int(Status.NONFINITE), 0]
    assert all(np.all(np.isfinite(to_numpy(leaf))) for leaf in sol.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("backend", EAGER)
@pytest.mark.parametrize("solver", SOLVERS)
def test_nonfinite_f_gives_no_runtime_warning(backend, solver, bad):
    """NaN/inf returned by f is reported through the status (and one ConvergenceWarning)
    only: the library's own arithmetic on it must not emit NumPy RuntimeWarnings (under
    ``-W error`` or ``np.errstate(all="raise")`` those become exceptions and the solve never
    returns its status)."""
    cell = _cell()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = eqsolve.solve(
            drifting_nan_map(cell, bad),
            from_numpy(cell.z0(), backend),
            solver=solver,
            tol=1e-10,
            max_iter=200,
            on_failure="ignore",
        )
    assert _status(sol) == [int(Status.NONFINITE)] + [int(Status.CONVERGED)] * (BATCH - 1)


# --------------------------------------------------------------------------- non-convergence


def _slow_cell() -> TanhCell:
    return tanh_cell(d=16, batch=3, radius=0.99, seed=2, sym=True)


def _rel_residual_np(cell: TanhCell, z: np.ndarray) -> np.ndarray:
    fz = cell(z)
    return np.linalg.norm(fz - z, axis=1) / np.linalg.norm(fz, axis=1)


@pytest.mark.parametrize("backend, solver", PAIRS)
def test_max_iter_reached_warns(backend, solver):
    cell = _slow_cell()
    with pytest.warns(
        ConvergenceWarning, match=r"3 of 3 samples did not converge within max_iter=3"
    ):
        sol = eqsolve.solve(
            cell, from_numpy(cell.z0(), backend), solver=solver, tol=1e-12, max_iter=3
        )
    assert _status(sol) == [int(Status.MAX_ITER)] * 3
    assert to_numpy(sol.converged).tolist() == [False] * 3
    assert to_numpy(sol.iterations).tolist() == [3] * 3
    assert int(sol.nfev) == 4
    # the reported residual is the relative residual of the returned value
    res = to_numpy(sol.residual)
    assert np.all(res > 1e-12)
    np.testing.assert_allclose(res, _rel_residual_np(cell, to_numpy(sol.value)), rtol=1e-8)


@pytest.mark.parametrize("backend", EAGER)  # JAX: test_jit_max_iter_no_exception_no_warning
def test_max_iter_on_failure_raise(backend):
    cell = _slow_cell()
    with pytest.raises(ConvergenceError, match=r"max_iter=3") as info:
        eqsolve.solve(
            cell,
            from_numpy(cell.z0(), backend),
            solver="picard",
            tol=1e-12,
            max_iter=3,
            on_failure="raise",
        )
    sol = info.value.solution
    assert _status(sol) == [int(Status.MAX_ITER)] * 3
    assert np.all(np.isfinite(to_numpy(sol.value)))


@pytest.mark.parametrize("backend", EAGER)
def test_max_iter_on_failure_ignore_is_silent(backend):
    cell = _slow_cell()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = eqsolve.solve(
            cell, from_numpy(cell.z0(), backend), tol=1e-12, max_iter=3, on_failure="ignore"
        )
    assert _status(sol) == [int(Status.MAX_ITER)] * 3


@pytest.mark.parametrize("backend", EAGER)
def test_partial_non_convergence_counts(backend):
    """Only the unconverged samples are reported; the mixed NaN + max_iter message has both."""
    cell = _cell()

    def f(z):
        from array_api_compat import array_namespace

        xp = array_namespace(z)
        # row 0 NaN after a few steps, row 1 a slow 0.999-contraction, rows 2-3 the cell
        out = xp.where(_row_mask(xp, z, 1), 0.999 * z + 1.0, cell(z))
        return xp.where(_row_mask(xp, z, 0), drifting_nan_map(cell)(z), out)

    with pytest.warns(ConvergenceWarning) as record:
        sol = eqsolve.solve(
            f, from_numpy(cell.z0(), backend), solver="picard", tol=1e-10, max_iter=40
        )
    msgs = [str(w.message) for w in record if issubclass(w.category, ConvergenceWarning)]
    assert len(msgs) == 1
    assert "1 of 4 samples did not converge within max_iter=40" in msgs[0]
    assert "1 of 4 samples hit NaN/inf" in msgs[0]
    assert _status(sol) == [int(Status.NONFINITE), int(Status.MAX_ITER), 0, 0]


# --------------------------------------------------------------------------- jax.jit


@pytest.fixture
def jax_mod():
    if "jax" not in AVAILABLE:
        pytest.skip("jax not installed (or not selected by EQSOLVE_TEST_BACKENDS)")
    import jax

    return jax


def test_jit_nan_no_exception_no_warning(jax_mod):
    """Under jax.jit, NaN and inf from f, and the ill-posed Anderson mixing cases, each as a
    row of one batch (one compile): no exception and no warning even with
    ``on_failure="raise"``; the statuses are in the returned arrays."""
    jax = jax_mod
    import jax.numpy as jnp

    cell = tanh_cell(d=DIM, batch=8, radius=0.5, seed=4)
    W = jnp.asarray(cell.W)

    def f(z):
        sh = z + 1.0
        tanh_row = lambda i: jnp.tanh(z[i] @ W.T + cell.inj[i])  # noqa: E731
        rows = [
            jnp.where(sh[0] > THRESHOLD, jnp.nan, sh[0]),  # NaN after a few steps
            jnp.where(sh[1] > THRESHOLD, jnp.inf, sh[1]),  # inf after a few steps
            tanh_row(2),  # a normal sample
            jnp.zeros_like(z[3]) + 0.25,  # constant: zero residual after one step
            z[4],  # identity: a fixed point from the start
            jnp.tanh(z[5] @ W.T + cell.inj[2]),  # duplicate of row 2
            sh[6],  # shift: constant residual, rank-one Gram matrix
            0.5 * z[7],  # zero fixed point: collinear residuals shrinking to 0
        ]
        return jnp.stack(rows)

    @jax.jit
    def solve(z0):
        return eqsolve.solve(
            f, z0, solver="anderson", tol=1e-10, max_iter=60, on_failure="raise"
        )

    z0_np = np.zeros((8, DIM))
    z0_np[[4, 7]] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = solve(jnp.asarray(z0_np))
        sol2 = solve(jnp.asarray(z0_np))  # cached executable, still silent
    for s in (sol, sol2):
        assert isinstance(s.status, jax.Array)
        status, its = _status(s), to_numpy(s.iterations).tolist()
        value, res = to_numpy(s.value), to_numpy(s.residual)
        nf, cv, mx = int(Status.NONFINITE), int(Status.CONVERGED), int(Status.MAX_ITER)
        assert status[:7] == [nf, nf, cv, cv, cv, cv, mx]
        assert status[7] in (cv, mx)
        assert np.all(np.isfinite(value)) and np.all(np.isfinite(res))
        assert np.all(value[:2] + 1.0 <= THRESHOLD)  # best finite iterates
        assert its[3] == 1 and its[4] == 0
        np.testing.assert_allclose(value[3], 0.25)
        np.testing.assert_array_equal(value[4], 1.0)
        np.testing.assert_allclose(value[5], value[2], rtol=0, atol=1e-12)


def test_jit_max_iter_no_exception_no_warning(jax_mod):
    jax = jax_mod
    import jax.numpy as jnp

    cell = _slow_cell()

    @jax.jit
    def solve(z0):
        return eqsolve.solve(
            cell, z0, solver="picard", tol=1e-12, max_iter=3, on_failure="raise"
        )

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = solve(jnp.asarray(cell.z0()))
    assert _status(sol) == [int(Status.MAX_ITER)] * 3
    assert int(sol.nfev) == 4


# --------------------------------------------------------------------------- no mutation


def _closure_problem(backend: str, seed: int = 0):
    """A tanh cell whose weights are backend arrays closed over by f (plus numpy copies)."""
    cell = tanh_cell(d=DIM, batch=BATCH, radius=0.7, seed=seed)
    xp = get_backend(backend).xp
    W = from_numpy(cell.W, backend)
    inj = from_numpy(cell.inj, backend)

    def f(z):
        return xp.tanh(z @ xp.matrix_transpose(W) + inj)

    z0_np = np.random.default_rng(seed + 10).standard_normal((BATCH, DIM))
    return f, (W, inj), z0_np


@pytest.mark.parametrize("backend, solver", PAIRS)
def test_inputs_not_mutated(backend, solver):
    f, closed, z0_np = _closure_problem(backend)
    z0 = from_numpy(z0_np, backend)
    before = [to_numpy(a).copy() for a in (z0, *closed)]
    sol = eqsolve.solve(f, z0, solver=solver, tol=1e-10, max_iter=100)
    after = [to_numpy(a) for a in (z0, *closed)]
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.all(to_numpy(sol.converged))
    # and the result moved away from z0 (the solve did work on these arrays)
    assert not np.allclose(to_numpy(sol.value), z0_np)


@pytest.mark.parametrize("backend", EAGER)
@pytest.mark.parametrize("solver", SOLVERS)
def test_tuple_inputs_not_mutated(backend, solver):
    f1, _, a_np = _closure_problem(backend, seed=0)
    f2, _, b_np = _closure_problem(backend, seed=1)
    z0 = [from_numpy(a_np, backend), from_numpy(b_np[:, :3].copy(), backend)]
    xp = get_backend(backend).xp

    def f(z):
        a, b = z
        return [f1(a), 0.5 * xp.tanh(b) + 0.1 * a[:, :3]]

    before = [to_numpy(x).copy() for x in z0]
    sol = eqsolve.solve(f, z0, solver=solver, tol=1e-10, max_iter=100)
    assert isinstance(sol.value, list)
    for x, b in zip(z0, before, strict=True):
        np.testing.assert_array_equal(to_numpy(x), b)


@pytest.mark.parametrize("backend", EAGER)  # (JAX arrays are immutable)
def test_numpy_input_not_mutated_with_backend_conversion(backend):
    """``backend=`` converts through DLPack (possibly sharing memory with the input): the
    caller's NumPy array must still be untouched, also when the solve stops on NaN."""
    cell = _cell()
    z0_np = np.random.default_rng(5).standard_normal((BATCH, DIM)) * 0.1
    keep = z0_np.copy()
    solver = "picard" if backend == "jax" else "anderson"
    with pytest.warns(ConvergenceWarning):
        sol = eqsolve.solve(
            drifting_nan_map(cell), z0_np, backend=backend, solver=solver, max_iter=200
        )
    np.testing.assert_array_equal(z0_np, keep)
    assert _status(sol)[0] == int(Status.NONFINITE)


# --------------------------------------------------------------------------- Anderson safeguards


def _zoo_map(cell: TanhCell, case: str):
    """Ill-posed problems for the Anderson least squares (Gram matrix zero, rank one, ...)."""

    def f(z):
        from array_api_compat import array_namespace

        xp = array_namespace(z)
        if case == "constant":  # after one step every residual is exactly zero
            return xp.zeros_like(z) + 0.25
        if case == "identity":  # z0 is already a fixed point
            return z + 0.0
        if case == "duplicates":  # identical samples
            return cell(z)
        if case == "shift":  # constant residual: all history residuals equal (rank-one Gram)
            return z + 1.0
        if case == "early_stop":  # row 0 stops after one step, the others keep iterating
            return xp.where(_row_mask(xp, z), xp.zeros_like(z) + 0.25, cell(z))
        if case == "zero_fixed_point":  # collinear residuals shrinking to 0 (atol = 0)
            return 0.5 * z
        raise AssertionError(case)

    return f


CASES = ["constant", "identity", "duplicates", "shift", "early_stop", "zero_fixed_point"]


def _check_case(case, sol, z0_np, cell, alone=None):
    # duplicates: f itself (a BLAS matmul) need not give bit-identical rows in float32
    atol = 1e-12 if z0_np.dtype == np.float64 else 1e-5
    status = _status(sol)
    value = to_numpy(sol.value)
    its = to_numpy(sol.iterations).tolist()
    assert np.all(np.isfinite(value))
    if case == "constant":
        assert status == [0] * BATCH and its == [1] * BATCH
        np.testing.assert_allclose(value, 0.25)
    elif case == "identity":
        assert status == [0] * BATCH and its == [0] * BATCH and int(sol.nfev) == 1
        np.testing.assert_array_equal(value, z0_np)
    elif case == "duplicates":
        assert status == [0] * BATCH
        for row in value[1:]:
            np.testing.assert_allclose(row, value[0], rtol=0, atol=atol)
    elif case == "shift":
        assert status == [int(Status.MAX_ITER)] * BATCH
        assert np.all(np.isfinite(to_numpy(sol.residual)))
    elif case == "early_stop":
        assert status == [0] * BATCH and its[0] == 1 and min(its[1:]) > 2
        np.testing.assert_allclose(value[0], 0.25)
        if alone is not None:
            np.testing.assert_allclose(value[1:], to_numpy(alone.value), rtol=0, atol=atol)
    elif case == "zero_fixed_point":
        assert set(status) <= {int(Status.CONVERGED), int(Status.MAX_ITER)}
        assert np.all(np.abs(value) <= np.abs(z0_np) + 1e-12)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backend", EAGER)
def test_ill_posed_mixing_eager(backend, solver, dtype, case):
    """No exception (torch.linalg.solve raises on singular matrices) and no RuntimeWarning
    (NumPy overflow/invalid) on ill-posed mixing problems."""
    cell = tanh_cell(d=DIM, batch=BATCH, radius=0.5, seed=4)
    if case == "duplicates":
        cell = TanhCell(cell.W, np.repeat(cell.inj[:1], BATCH, axis=0))
    z0_np = np.ones((BATCH, DIM), dtype=dtype) if case != "early_stop" else cell.z0(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        sol = eqsolve.solve(
            _zoo_map(cell, case),
            from_numpy(z0_np, backend),
            solver=solver,
            tol=1e-5 if dtype == "float32" else 1e-10,
            max_iter=15 if case == "shift" else 60,
            on_failure="ignore",
        )
        alone = None
        if case == "early_stop":
            alone = _solve_rest_alone(
                TanhCell(cell.W, cell.inj.astype(dtype)),
                backend,
                solver,
                tol=1e-5 if dtype == "float32" else 1e-10,
                max_iter=60,
            )
    _check_case(case, sol, z0_np, cell, alone)


@pytest.mark.parametrize("m", [1, 2, 100])
@pytest.mark.parametrize("backend", EAGER)
def test_anderson_history_sizes(backend, m):
    """m = 1 (a single history entry) and m > max_iter (never wraps) are both valid."""
    cell = _cell()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        sol = eqsolve.solve(
            cell, from_numpy(cell.z0(), backend), solver=eqsolve.Anderson(m=m), tol=1e-10
        )
    assert _status(sol) == [0] * BATCH
