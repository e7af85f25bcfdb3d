"""The adjoint solve ``(I - J^T) u = g`` on every installed backend, in float64 and float32.

Every method ("auto", "neumann", "anderson", "broyden" -- the forward solvers reused on the linear
map -- and restarted "gmres") is compared with a dense float64 NumPy solve
(``TanhCell.reference_adjoint``). The VJP is a batched product with the dense per-sample
Jacobian, built with the backend's own arrays. Threads are pinned to one (a small VM stalls
with more).
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

import numpy as np
import pytest

import eqsolve.core.anderson
import eqsolve.core.broyden
import eqsolve.core.driver
import eqsolve.core.picard
from conftest import AVAILABLE, from_numpy, to_numpy
from eqsolve.backends import get_backend
from eqsolve.core.adjoint import adjoint_solve, default_adjoint_tol
from eqsolve.core.solution import Status
from problems import tanh_cell

try:  # keep the suite single-threaded (a small VM stalls with >1 thread)
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is optional
    torch = None

#: (method, options, max_iter): max_iter counts updates, or restart cycles for gmres
METHODS = {
    "auto": ("auto", {}, 500),
    "neumann": ("neumann", {}, 3000),
    "anderson": ("anderson", {}, 500),
    "broyden": ("broyden", {}, 500),
    "gmres": ("gmres", {}, 10),  # restart 20 >= n = 16: one cycle is the full Krylov space
    "gmres-r4": ("gmres", {"restart": 4}, 200),  # exercises the restarts
}
FIXED_POINT = ["auto", "neumann", "anderson", "broyden"]
BASIC = [*FIXED_POINT, "gmres"]  # edge cases: the restart variant adds nothing there
#: max relative error vs the dense float64 reference at the solve tolerance below
ACCURACY = {"float64": 1e-9, "float32": 1e-4}
#: every test uses this (B, n) = (12, 16) batch (JAX compiles each shape once)
ALL = "P1+P2+P4"


def solve_tol(dtype_name: str) -> float:
    """1e-12 in float64; in float32 the default tolerance tied to the dtype (~1.2e-6)."""
    return default_adjoint_tol(1e-12, float(np.finfo(dtype_name).eps))


@functools.cache
def problem(name: str):
    """``(J, g, reference u)`` in float64 NumPy: ``J`` is ``(B, n, n)``, per sample.

    "P1+P2+P4" stacks the three problems into one batch of 12 independent samples (rows
    0-3, 4-7, 8-11): one solve checks all three, and that a batch mixing easy and slow
    samples still gives each its own answer.
    """
    if name == "P1+P2+P4":
        parts = [problem(p) for p in PROBLEMS]
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))
    if name == "P1":  # non-symmetric, ||W|| = 0.9
        cell = tanh_cell(radius=0.9)
    elif name in ("P2", "P2-lin"):  # ||W|| = 2: f itself is not a contraction
        cell = tanh_cell(radius=2.0)
    elif name == "P4":  # symmetric, real spectrum up to 0.99: slow for plain iteration
        cell = tanh_cell(radius=0.99, sym=True)
    else:
        raise KeyError(name)
    if name == "P2-lin":
        # linearise where the pre-activation is 0, so J = W: spectral radius ~1.29 > 1,
        # the Neumann series diverges; I - W^T is still well conditioned (cond ~13).
        # 12 right-hand sides (the batch size of the other tests: JAX compiles once)
        J = np.broadcast_to(cell.W, (12, *cell.W.shape)).copy()
        g = np.random.default_rng(8).standard_normal((12, cell.W.shape[0]))
        A = np.eye(cell.W.shape[0]) - cell.W.T
        return J, g, np.linalg.solve(A, g.T).T
    z = cell.reference_fixed_point()
    J = cell.jacobian(z)
    g = np.random.default_rng(7).standard_normal(z.shape)
    return J, g, cell.reference_adjoint(z, g)


PROBLEMS = ("P1", "P2", "P4")


def make_vjp(xp, J):
    """``v -> J_b^T v_b`` per sample, as ``v[:, None, :] @ J`` with the backend's arrays."""

    def vjp(v):
        return xp.matmul(v[:, None, :], J)[:, 0, :]

    return vjp


def setup(backend: str, name: str, dtype_name: str = "float64", g_factor: float = 1.0):
    J, g, ref = problem(name)
    xp = get_backend(backend).xp
    Jb = from_numpy(J.astype(dtype_name), backend)
    gb = from_numpy((g * g_factor).astype(dtype_name), backend)
    return xp, make_vjp(xp, Jb), gb, ref * g_factor


def solve(xp, vjp, g, key: str, tol: float, **kw):
    method, options, max_iter = METHODS[key]
    kw.setdefault("max_iter", max_iter)
    return adjoint_solve(xp, vjp, g, method=method, tol=tol, **options, **kw)


def rel_err(u, ref) -> np.ndarray:
    u = np.asarray(to_numpy(u), dtype=np.float64)
    return np.linalg.norm(u - ref, axis=1) / np.linalg.norm(ref, axis=1)


def info_np(info):
    return {k: to_numpy(v) for k, v in info._asdict().items()}


# --- accuracy against the dense reference ------------------------------------------------


@pytest.mark.parametrize("key", list(METHODS))
def test_matches_dense_reference(backend, dtype_name, key):
    """P1 (||W|| 0.9), P2 (||W|| 2) and P4 (symmetric, 0.99) in one batch of 12 samples."""
    xp, vjp, g, ref = setup(backend, "P1+P2+P4", dtype_name)
    u, info = solve(xp, vjp, g, key, solve_tol(dtype_name))
    i = info_np(info)
    assert u.shape == g.shape and u.dtype == g.dtype
    assert i["converged"].all(), i
    assert (i["status"] == int(Status.CONVERGED)).all()
    assert (i["residual"] <= solve_tol(dtype_name)).all(), i["residual"]
    assert (i["iterations"] >= 1).all()
    err = rel_err(u, ref)
    by_problem = dict(zip(PROBLEMS, err.reshape(3, 4).max(axis=1), strict=True))
    assert err.max() <= ACCURACY[dtype_name], by_problem


def test_gmres_counts_arnoldi_steps(backend):
    # restart 20 is capped at n = 16: the full Krylov space in one cycle
    xp, vjp, g, ref = setup(backend, ALL)
    u, info = adjoint_solve(xp, vjp, g, method="gmres", tol=1e-12, max_iter=10)
    assert (info_np(info)["iterations"] == 16).all()
    assert rel_err(u, ref).max() <= 1e-12
    _, info = adjoint_solve(xp, vjp, g, method="gmres", tol=1e-12, max_iter=200, restart=4)
    it = info_np(info)["iterations"]
    assert (it % 4 == 0).all() and (it > 16).all(), it


@pytest.mark.parametrize("key", list(METHODS))
def test_non_contraction(backend, key):
    """J = W with spectral radius ~1.29: Neumann must not report a wrong answer as converged.

    Full GMRES solves it; GMRES(4) stagnates here (as scipy's does: 0 is in the field of
    values of I - W^T), which it must report honestly, like any other method.
    """
    J, g, ref = problem("P2-lin")
    xp, vjp, gb, _ = setup(backend, "P2-lin")
    u, info = solve(xp, vjp, gb, key, 1e-12, max_iter=100 if key != "gmres-r4" else 20)
    i = info_np(info)
    u_np = to_numpy(u)
    err = rel_err(u, ref)
    if key == "neumann":
        assert not i["converged"].any(), i
        # the truncated Neumann series grows without bound: DIVERGED (or stopped earlier)
        failed = [int(Status.MAX_ITER), int(Status.NONFINITE), int(Status.DIVERGED)]
        assert np.isin(i["status"], failed).all()
    if key == "gmres":
        assert i["converged"].all(), i
        assert err.max() <= 1e-9, err
    # whatever the method: converged implies the right answer, never a silent wrong one
    assert (err[i["converged"]] <= 1e-9).all(), (err, i)
    # and the reported residual is the true one of the returned u (where it is finite)
    hu = g + np.matmul(u_np[:, None, :], J)[:, 0, :]
    true = np.linalg.norm(hu - u_np, axis=1) / np.linalg.norm(hu, axis=1)
    fin = np.isfinite(true)
    np.testing.assert_allclose(i["residual"][fin], true[fin], rtol=1e-6, atol=1e-15)


# --- right-hand side scaling -------------------------------------------------------------


@pytest.mark.parametrize("key", BASIC)
def test_tiny_cotangent(backend, dtype_name, key):
    """g * 1e-30 (its float32 squared norm underflows): no NaN, the scaled answer."""
    xp, vjp, g, ref = setup(backend, ALL, dtype_name, g_factor=1e-30)
    u, info = solve(xp, vjp, g, key, solve_tol(dtype_name))
    u_np = to_numpy(u)
    assert np.isfinite(u_np).all()
    assert info_np(info)["converged"].all()
    assert rel_err(u, ref).max() <= ACCURACY[dtype_name]


@pytest.mark.parametrize("key", BASIC)
def test_zero_cotangent(backend, key):
    """A zero row gives exactly 0 (and no NaN), the other rows are unaffected."""
    J, g, ref = problem(ALL)
    g = g.copy()
    g[1] = 0.0
    xp = get_backend(backend).xp
    vjp = make_vjp(xp, from_numpy(J, backend))
    u, info = solve(xp, vjp, from_numpy(g, backend), key, 1e-12)
    u_np = to_numpy(u)
    assert not np.isnan(u_np).any()
    assert (u_np[1] == 0.0).all()
    assert info_np(info)["converged"].all()
    keep = [b for b in range(12) if b != 1]
    assert rel_err(u, ref)[keep].max() <= 1e-9

    u0, info0 = solve(xp, vjp, from_numpy(np.zeros_like(g), backend), key, 1e-12)
    assert (to_numpy(u0) == 0.0).all()
    assert info_np(info0)["converged"].all()


# --- failure reporting -------------------------------------------------------------------


@pytest.mark.parametrize("key", list(METHODS))
def test_nonconvergent_reports_false(backend, key):
    xp, vjp, g, ref = setup(backend, ALL)
    method, options, _ = METHODS[key]
    if method == "gmres":
        options = {"restart": 4}  # 2 cycles x 4 Arnoldi steps < 16 = n
    u, info = adjoint_solve(xp, vjp, g, method=method, tol=1e-12, max_iter=2, **options)
    i = info_np(info)
    assert not i["converged"].any(), i
    assert (i["status"] == int(Status.MAX_ITER)).all()
    assert (i["iterations"] == (8 if method == "gmres" else 2)).all(), i["iterations"]
    assert (i["residual"] > 1e-12).all()
    assert np.isfinite(to_numpy(u)).all()


@pytest.mark.parametrize("key", BASIC)
def test_nonfinite_sample_is_isolated(backend, key):
    """A VJP that returns NaN for sample 0 marks it NONFINITE; the others still converge."""
    J, g, ref = problem(ALL)
    J = J.copy()
    J[0, 0, 0] = np.nan
    xp, vjp, gb, _ = setup(backend, ALL)
    vjp = make_vjp(xp, from_numpy(J, backend))
    u, info = solve(xp, vjp, gb, key, 1e-12)
    i = info_np(info)
    assert i["status"][0] == int(Status.NONFINITE)
    assert not i["converged"][0]
    assert i["converged"][1:].all(), i
    assert rel_err(u, ref)[1:].max() <= 1e-9


# --- gmres specifics ---------------------------------------------------------------------


def test_gmres_happy_breakdown(backend):
    """J = 0 and J = c I: the Krylov space is invariant after one step (no NaN)."""
    g = problem(ALL)[1].copy()
    g[2] = 0.0
    xp = get_backend(backend).xp
    gb = from_numpy(g, backend)
    for c in (0.0, 0.5, -3.0):
        u, info = adjoint_solve(
            xp, lambda v, c=c: c * v, gb, method="gmres", tol=1e-14, max_iter=3, restart=4
        )
        i = info_np(info)
        np.testing.assert_allclose(to_numpy(u), g / (1.0 - c), rtol=1e-14, atol=0)
        assert i["converged"].all(), i
        assert np.isfinite(i["residual"]).all()


def test_gmres_samples_are_independent(backend):
    """A sample's result does not depend on the rest of the batch (own basis, own stop):
    permuting the batch permutes the results, iteration counts included."""
    J, g, ref = problem(ALL)
    xp = get_backend(backend).xp
    kw = dict(method="gmres", tol=1e-12, max_iter=200, restart=4)
    perm = np.random.default_rng(0).permutation(g.shape[0])
    runs = []
    for p in (np.arange(g.shape[0]), perm):
        vjp = make_vjp(xp, from_numpy(J[p], backend))
        u, info = adjoint_solve(xp, vjp, from_numpy(g[p], backend), **kw)
        runs.append((to_numpy(u), info_np(info)))
    (u_a, i_a), (u_b, i_b) = runs
    np.testing.assert_allclose(u_b, u_a[perm], rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(i_b["iterations"], i_a["iterations"][perm])
    assert len(set(i_a["iterations"].tolist())) > 1  # the samples did not stop together
    assert rel_err(u_a, ref).max() <= 1e-9


def test_gmres_imports_only_array_api():
    """core/gmres.py is written against the Array API: no numpy/torch/jax/cupy import."""
    import eqsolve.core.gmres as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    allowed = {"array_api_compat", "array_api_extra"} | set(sys.stdlib_module_names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 0:  # relative: inside eqsolve.core
                assert node.module is None or not node.module.startswith("..")
                continue
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in allowed, name


def test_gmres_under_jit():
    jax = pytest.importorskip("jax", reason="JAX not installed")
    import jax.numpy as jnp

    if "jax" not in AVAILABLE:
        pytest.skip("jax backend not requested (EQSOLVE_TEST_BACKENDS)")
    J, g, ref = problem(ALL)
    Jj, gj = jnp.asarray(J), jnp.asarray(g)
    run = get_backend("jax").run

    def solve_j(J, g, driver=None):
        return adjoint_solve(
            jnp,
            make_vjp(jnp, J),
            g,
            method="gmres",
            tol=1e-12,
            max_iter=100,
            restart=4,
            driver=driver,
        )

    u_e, info_e = solve_j(Jj, gj)  # eager: Python loop
    u_j, info_j = jax.jit(lambda J, g: solve_j(J, g, driver=run))(Jj, gj)
    np.testing.assert_allclose(np.asarray(u_j), np.asarray(u_e), rtol=1e-12, atol=1e-14)
    assert rel_err(u_j, ref).max() <= 1e-9
    np.testing.assert_array_equal(np.asarray(info_j.iterations), np.asarray(info_e.iterations))
    assert np.asarray(info_j.converged).all()


# --- one code path with the forward solvers ----------------------------------------------


def _count_shared_loop_steps(monkeypatch, calls: dict) -> None:
    """Count the eager driver's steps (general and eager ones) in ``calls["loop_step"]``."""
    for name in ("loop_step", "loop_step_eager"):
        step = getattr(eqsolve.core.driver, name)

        def counting(*args, _step=step, **kwargs):
            calls["loop_step"] += 1
            return _step(*args, **kwargs)

        monkeypatch.setattr(eqsolve.core.driver, name, counting)


@pytest.mark.parametrize(
    "method, cls",
    [
        ("neumann", eqsolve.core.picard.Picard),
        ("anderson", eqsolve.core.anderson.Anderson),
        ("auto", eqsolve.core.auto.AutoAnderson),
        ("broyden", eqsolve.core.broyden.Broyden),
    ],
)
def test_fixed_point_methods_reuse_forward_solvers(monkeypatch, method, cls):
    calls = {"propose": 0, "loop_step": 0}
    propose = cls.propose
    _count_shared_loop_steps(monkeypatch, calls)

    def counting_propose(self, *args, **kwargs):
        calls["propose"] += 1
        return propose(self, *args, **kwargs)

    monkeypatch.setattr(cls, "propose", counting_propose)
    xp, vjp, g, ref = setup("numpy", ALL)
    u, info = adjoint_solve(xp, vjp, g, method=method, tol=1e-12, max_iter=500)
    n_iter = int(np.max(info.iterations))
    assert calls["propose"] == n_iter >= 1
    assert calls["loop_step"] == n_iter
    assert rel_err(u, ref).max() <= 1e-9


def test_gmres_cycles_run_in_the_shared_loop(monkeypatch):
    calls = {"loop_step": 0}
    _count_shared_loop_steps(monkeypatch, calls)
    xp, vjp, g, ref = setup("numpy", ALL)
    u, info = adjoint_solve(xp, vjp, g, method="gmres", tol=1e-12, max_iter=100, restart=4)
    assert calls["loop_step"] == int(np.max(info.iterations)) // 4 >= 2


# --- arguments ---------------------------------------------------------------------------


def test_unknown_method():
    xp, vjp, g, _ = setup("numpy", ALL)
    with pytest.raises(ValueError, match="'conjugate-gradient'"):
        adjoint_solve(xp, vjp, g, method="conjugate-gradient")


def test_gmres_bad_options():
    xp, vjp, g, _ = setup("numpy", ALL)
    with pytest.raises(ValueError, match="restart"):
        adjoint_solve(xp, vjp, g, method="gmres", restart=0)
    with pytest.raises(TypeError, match="restrat"):
        adjoint_solve(xp, vjp, g, method="gmres", restrat=5)
