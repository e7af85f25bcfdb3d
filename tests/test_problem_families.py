"""Problems users bring from other libraries, as a scipy or optimistix user would pose them.

Each family is solved on every installed eager backend and JAX with every solver, checked
against the Solution contract in float64 (``tests/contract.py``) and, where it converged,
against an independent reference (dense linear algebra or ``scipy.optimize``):

* zero fixed points (``atol`` > 0 and = 0);
* implicit-midpoint steps of a stiff linear ODE and of Robertson's chemical kinetics;
* root problems ``F(x) = 0`` turned into fixed points ``x + alpha F(x)``, with the state a
  tuple of scalars (a small pytree);
* non-normal linear maps (plain iteration grows for a while before it converges).

1-D and tuple-of-scalar states use the default ``batch_axis="auto"``: one system.
"""

from __future__ import annotations

import numpy as np
import pytest

import eqsolve
from conftest import AVAILABLE, from_numpy, to_numpy
from contract import CONVERGED, check_contract
from eqsolve.backends import get_backend

SOLVERS = ["picard", "anderson", "broyden", "auto"]
BACKENDS = [b for b in ("numpy", "torch", "jax") if b in AVAILABLE]
pytestmark = pytest.mark.skipif(not BACKENDS, reason="numpy, torch and jax are not selected")


def _xp(backend):
    return get_backend(backend).xp


# ------------------------------------------------------------------ zero fixed points


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_fixed_point(backend, solver):
    rng = np.random.default_rng(0)
    W = 0.8 * np.linalg.qr(rng.standard_normal((6, 6)))[0]
    xp = _xp(backend)
    Wb = from_numpy(W.T.copy(), backend)
    z0 = rng.standard_normal((3, 6))

    def f(z):
        return xp.tanh(z @ Wb)

    def f64(v):
        return np.tanh(v @ W.T)

    with_atol = eqsolve.fixed_point(f, from_numpy(z0, backend), solver=solver, tol=1e-8,
                                    atol=1e-10, max_iter=500, on_failure="ignore")
    out = check_contract(with_atol, f64, tol=1e-8, atol=1e-10, dtype="float64")
    assert (out["status"] == CONVERGED).all()
    assert np.abs(to_numpy(with_atol.value)).max() <= 1e-8
    # atol = 0: converged only at the exact zero (where the relative residual is 0/0 := 0)
    exact = eqsolve.fixed_point(f, from_numpy(z0, backend), solver=solver, tol=1e-8,
                                max_iter=60, on_failure="ignore")
    out = check_contract(exact, f64, tol=1e-8, atol=0.0, dtype="float64")
    value = to_numpy(exact.value)
    assert (np.abs(value[out["status"] == CONVERGED]) == 0).all()


# ------------------------------------------------------------------ implicit midpoint steps


def _midpoint_linear(h):
    """Stiff linear ODE y' = L y, eigenvalues -1 and -1000 (rotated), one midpoint step."""
    rng = np.random.default_rng(1)
    Q = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    L = Q @ np.diag([-1.0, -10.0, -100.0, -1000.0]) @ Q.T
    y = rng.standard_normal(4)
    ref = np.linalg.solve(np.eye(4) - 0.5 * h * L, (np.eye(4) + 0.5 * h * L) @ y)
    return L, y, ref


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h", [1e-3, 1e-1])  # contractive (h ||L|| / 2 = 0.5) and not (50)
def test_implicit_midpoint_step_of_a_stiff_linear_ode(backend, solver, h):
    L, y, ref = _midpoint_linear(h)
    Lb, yb = from_numpy(L, backend), from_numpy(y, backend)

    def f(z):  # z = y + h L (y + z) / 2
        return yb + 0.5 * h * (Lb @ (yb + z))

    def f64(v):
        return y + 0.5 * h * (L @ (y + v))

    sol = eqsolve.fixed_point(f, from_numpy(y, backend), solver=solver, tol=1e-12,
                              max_iter=200, on_failure="ignore")
    out = check_contract(sol, f64, tol=1e-12, atol=0.0, dtype="float64", one_system=True)
    if out["status"][0] == CONVERGED:
        np.testing.assert_allclose(to_numpy(sol.value), ref, rtol=1e-8, atol=1e-10)
    if h == 1e-3 or solver in ("anderson", "auto"):  # linear, n = 4: Anderson is exact
        assert out["status"][0] == CONVERGED, (h, solver, out)


def _robertson(y):
    y1, y2, y3 = y[0], y[1], y[2]
    return [
        -0.04 * y1 + 1e4 * y2 * y3,
        0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 * y2,
        3e7 * y2 * y2,
    ]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_robertson_implicit_midpoint_steps(backend, solver):
    """Robertson's stiff kinetics, 25 midpoint steps of h = 2e-4 from (1, 0, 0); each step's
    implicit equation solved by eqsolve from the previous state and checked against
    scipy.optimize.fsolve. Early steps are contractions; once y2 ~ 3e-5 the map's Lipschitz
    constant passes 1 (h/2 * 6e7 y2), where plain iteration has to fail honestly."""
    fsolve = pytest.importorskip("scipy.optimize", reason="scipy is not installed").fsolve
    xp = _xp(backend)
    h = 2e-4
    y = np.array([1.0, 0.0, 0.0])
    for _ in range(25):
        yb = from_numpy(y, backend)

        def f(z, yb=yb):
            m = 0.5 * (yb + z)
            return yb + h * xp.stack(_robertson(m))

        def f64(v, y=y):
            return y + h * np.array(_robertson(0.5 * (y + v)))

        sol = eqsolve.fixed_point(f, from_numpy(y, backend), solver=solver, tol=1e-12,
                                  max_iter=300, on_failure="ignore")
        out = check_contract(sol, f64, tol=1e-12, atol=0.0, dtype="float64", one_system=True)
        ref = fsolve(lambda v, y=y: v - y - h * np.array(_robertson(0.5 * (y + v))), y,
                     xtol=1e-13)
        if out["status"][0] != CONVERGED:
            assert solver == "picard", out
            y = ref
            continue
        np.testing.assert_allclose(to_numpy(sol.value), ref, rtol=1e-9, atol=1e-12)
        y = to_numpy(sol.value)
    assert 2e-5 < y[1] < 4e-5  # the fast transient of y2 is resolved


# ------------------------------------------------------------------ root problems, pytrees


@pytest.mark.parametrize("solver", ["anderson", "broyden", "auto"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_root_problem_as_fixed_point_on_a_tuple_of_scalars(backend, solver):
    """F(x, y) = (x^2 + y^2 - 4, exp(x) + y - 1) = 0 (scipy.optimize's tutorial kind), posed
    as the fixed point of (x, y) + alpha F(x, y) on a tuple of two 0-d arrays."""
    root = pytest.importorskip("scipy.optimize", reason="scipy is not installed").root
    xp = _xp(backend)
    alpha = -0.15

    def F(x, y, exp):
        return x * x + y * y - 4.0, exp(x) + y - 1.0

    def f(state):
        x, y = state
        fx, fy = F(x, y, xp.exp)
        return (x + alpha * fx, y + alpha * fy)

    start = (-1.0, 1.5)
    z0 = tuple(xp.asarray(v, dtype=xp.float64) for v in start)  # two 0-d arrays
    sol = eqsolve.fixed_point(f, z0, solver=solver, tol=1e-12, max_iter=200,
                              on_failure="ignore")
    assert isinstance(sol.value, tuple) and sol.status.shape == ()
    assert all(tuple(v.shape) == () for v in sol.value)
    vec = sol._replace(value=np.array([float(to_numpy(v)) for v in sol.value]))

    def f64(v):
        fx, fy = F(v[0], v[1], np.exp)
        return np.array([v[0] + alpha * fx, v[1] + alpha * fy])

    out = check_contract(vec, f64, tol=1e-12, atol=0.0, dtype="float64", one_system=True)
    assert out["status"][0] == CONVERGED
    ref = root(lambda v: F(v[0], v[1], np.exp), start, tol=1e-14).x
    np.testing.assert_allclose(vec.value, ref, rtol=1e-9)


# ------------------------------------------------------------------ non-normal linear maps


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_normal_linear_map(backend, solver):
    """A = 0.5 I + 1.5 N (N the shift): spectral radius 0.5, but ||A^k|| grows to ~3e3
    before it decays, so plain iteration's residual rises for a while."""
    n, B = 10, 3
    A = 0.5 * np.eye(n) + 1.5 * np.eye(n, k=1)
    c = np.random.default_rng(2).standard_normal((B, n))
    Ab, cb = from_numpy(A.T.copy(), backend), from_numpy(c, backend)
    sol = eqsolve.fixed_point(lambda z: z @ Ab + cb, from_numpy(np.zeros((B, n)), backend),
                              solver=solver, tol=1e-10, max_iter=300, on_failure="ignore")
    out = check_contract(sol, lambda v: v @ A.T + c, tol=1e-10, atol=0.0, dtype="float64")
    assert (out["status"] == CONVERGED).all(), out["status"]
    ref = np.linalg.solve(np.eye(n) - A, c.T).T
    # what the stopping rule guarantees: z - z* = (I - A)^{-1} (f(z) - z), so the error is at
    # most ||(I - A)^{-1}||_2 * tol * ||f(z)|| -- here ||(I - A)^{-1}|| ~ 4e4 (a fixed rtol of
    # 1e-7 passed or failed with the summation order of the array library's matmul)
    z = to_numpy(sol.value)
    fz = z @ A.T + c
    bound = np.linalg.norm(np.linalg.inv(np.eye(n) - A), 2) * 1e-10 * np.linalg.norm(fz, axis=1)
    assert np.all(np.linalg.norm(z - ref, axis=1) <= 1.01 * bound), (z - ref, bound)
    # and the bound is tight enough to mean something: far below the solution's size
    assert np.all(bound < 1e-4 * np.linalg.norm(ref, axis=1))
