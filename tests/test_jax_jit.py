"""``eqsolve.fixed_point`` inside ``jax.jit`` (and ``jax.vmap``)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed")
import jax.numpy as jnp  # noqa: E402
from array_api_compat import array_namespace  # noqa: E402

import eqsolve  # noqa: E402
from conftest import AVAILABLE  # noqa: E402
from eqsolve import Status  # noqa: E402
from problems import tanh_cell  # noqa: E402

if "jax" not in AVAILABLE:  # installed, but EQSOLVE_TEST_BACKENDS leaves it out
    pytest.skip("the jax backend is not selected (EQSOLVE_TEST_BACKENDS)", allow_module_level=True)

jax.config.update("jax_enable_x64", True)  # conftest does this too when jax is usable

SOLVERS = ["picard", "anderson", "broyden"]
FIELDS = ("value", "converged", "iterations", "residual", "status", "nfev")


def _cell_f(W, inj):
    return lambda z: jnp.tanh(z @ W.T + inj)


def _solve(z0, W, inj, solver):
    return eqsolve.solve(_cell_f(W, inj), z0, solver=solver, tol=1e-10)


# module level, so the compiled solves are reused by the transfer-guard test
_jit_solve = jax.jit(_solve, static_argnames="solver")


def _cell_inputs():
    cell = tanh_cell(d=16, batch=4, seed=3)
    z0 = jnp.asarray(0.1 * np.random.default_rng(0).standard_normal((4, 16)))
    return cell, z0, jnp.asarray(cell.W), jnp.asarray(cell.inj)


@pytest.mark.parametrize("solver", SOLVERS)
def test_jit_matches_eager(solver):
    cell, z0, W, inj = _cell_inputs()
    eager = _solve(z0, W, inj, solver)
    jitted = _jit_solve(z0, W, inj, solver=solver)
    assert isinstance(jitted, eqsolve.Solution)  # the NamedTuple pytree comes back from jit
    for name in FIELDS:
        a, b = getattr(jitted, name), getattr(eager, name)
        assert isinstance(a, jax.Array), name
        assert a.shape == jnp.shape(b) and a.dtype == jnp.asarray(b).dtype, name
    np.testing.assert_allclose(np.asarray(jitted.value), np.asarray(eager.value), rtol=0,
                               atol=1e-12)
    np.testing.assert_allclose(np.asarray(jitted.residual), np.asarray(eager.residual),
                               rtol=0, atol=1e-15)
    np.testing.assert_array_equal(np.asarray(jitted.iterations), np.asarray(eager.iterations))
    np.testing.assert_array_equal(np.asarray(jitted.status), np.asarray(eager.status))
    assert int(jitted.nfev) == int(eager.nfev) == 1 + int(np.max(np.asarray(jitted.iterations)))
    assert bool(np.all(np.asarray(jitted.converged)))
    # independent check of the fixed point
    v = np.asarray(jitted.value)
    fz = np.tanh(v @ cell.W.T + cell.inj)
    assert (np.linalg.norm(fz - v, axis=1) / np.linalg.norm(fz, axis=1) <= 3e-10).all()


def test_jitted_solve_needs_no_host_transfer():
    """Once compiled, running the solve moves nothing between host and device: the loop's
    continuation test and the stopping rule are traced, not read back."""
    _, z0, W, inj = _cell_inputs()
    _jit_solve(z0, W, inj, solver="anderson")  # compile (cached if test_jit_matches_eager ran)
    with jax.transfer_guard("disallow"):
        sol = _jit_solve(z0, W, inj, solver="anderson")
        sol.status.block_until_ready()
    assert (np.asarray(sol.status) == int(Status.CONVERGED)).all()


def test_jit_nonfinite_reports_status_without_raising():
    def f(z):  # NaN on the first call for sample 0 only; sample 1 converges
        bad = jnp.log(z[0:1] - 1.0)
        good = jnp.tanh(0.5 * z[1:2] + 1.0)
        return jnp.concatenate([bad, good], axis=0)

    z0 = jnp.zeros((2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for on_failure in ("warn", "raise"):
            sol = jax.jit(lambda z, on_failure=on_failure: eqsolve.solve(
                f, z, solver="picard", tol=1e-10, on_failure=on_failure))(z0)
            status = np.asarray(sol.status)
            assert status.tolist() == [int(Status.NONFINITE), int(Status.CONVERGED)]
            assert np.asarray(sol.converged).tolist() == [False, True]
            # the returned value is finite: sample 0 keeps its best finite iterate (z0)
            v = np.asarray(sol.value)
            assert np.isfinite(v).all()
            np.testing.assert_array_equal(v[0], 0.0)
            assert int(np.asarray(sol.iterations)[0]) == 0


def test_jit_tuple_state():
    rng = np.random.default_rng(4)
    B = 3
    Wa = 0.4 * rng.standard_normal((3, 3)) / 3
    Wb = 0.4 * rng.standard_normal((8, 8)) / 8
    ca, cb = rng.standard_normal((B, 3)), rng.standard_normal((B, 2, 4))

    def f(zs):  # written against the Array API: runs on NumPy and JAX alike
        a, b = zs
        xp = array_namespace(a, b)
        bf = xp.reshape(b, (B, 8))
        na = xp.tanh(a @ Wa.T + 0.1 * xp.sum(bf, axis=1, keepdims=True) + ca)
        nb = xp.tanh(xp.reshape(bf @ Wb.T, (B, 2, 4)) + 0.1 * a[:, 0:1, None] + cb)
        return (na, nb)

    z0 = (jnp.zeros((B, 3)), jnp.zeros((B, 2, 4)))
    eager = eqsolve.solve(f, (np.zeros((B, 3)), np.zeros((B, 2, 4))), tol=1e-10)  # NumPy
    jitted = jax.jit(lambda z: eqsolve.solve(f, z, tol=1e-10))(z0)
    assert isinstance(jitted.value, tuple) and len(jitted.value) == 2
    assert jitted.value[0].shape == (B, 3) and jitted.value[1].shape == (B, 2, 4)
    for a, b in zip(jitted.value, eager.value, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(jitted.iterations), eager.iterations)
    assert np.asarray(jitted.converged).all()
    fa, fb = f(tuple(np.asarray(v) for v in jitted.value))  # NumPy evaluation
    err = max(np.abs(np.asarray(fa) - np.asarray(jitted.value[0])).max(),
              np.abs(np.asarray(fb) - np.asarray(jitted.value[1])).max())
    assert err < 1e-9


def test_vmap_over_single_system_solves():
    """``vmap`` of a ``batch_axis=None`` solve: each mapped instance is its own system."""
    cs = jnp.asarray([0.5, 1.0, 2.0])

    def one(c):
        return eqsolve.solve(lambda v: jnp.cos(c * v), jnp.zeros((4,)), batch_axis=None,
                                   tol=1e-12, max_iter=200)

    sol = jax.jit(jax.vmap(one))(cs)
    assert sol.value.shape == (3, 4)
    assert sol.converged.shape == sol.iterations.shape == sol.status.shape == (3,)
    assert np.asarray(sol.converged).all()
    v = np.asarray(sol.value)
    np.testing.assert_allclose(np.cos(np.asarray(cs)[:, None] * v), v, rtol=0, atol=1e-11)
    # each instance matches its own solve (run on NumPy: no further compilation)
    for i, c in enumerate([0.5, 1.0, 2.0]):
        alone = eqsolve.solve(lambda v, c=c: np.cos(c * v), np.zeros((4,)), batch_axis=None,
                                    tol=1e-12, max_iter=200)
        np.testing.assert_allclose(v[i], alone.value, rtol=0, atol=1e-12)
        assert int(np.asarray(sol.iterations)[i]) == int(alone.iterations)
