"""Regression tests for each way a Solution used to claim what was not true (issue 10).

Every result is checked independently in float64 (``tests/contract.py``) besides the
specific figure of each defect.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import eqsolve
from conftest import AVAILABLE, from_numpy, to_numpy
from contract import CONVERGED, DIVERGED, MAX_ITER, NONFINITE, check_contract
from eqsolve.backends import get_backend

SOLVERS = ["picard", "anderson", "broyden", "auto"]
JAX = pytest.mark.skipif("jax" not in AVAILABLE, reason="jax is not installed (or not selected)")
TORCH = pytest.mark.skipif(
    "torch" not in AVAILABLE, reason="torch is not installed (or not selected)"
)


def _solve(backend, f, z0_np, *, jit=False, **kw):
    kw.setdefault("on_failure", "ignore")
    if jit:
        import jax

        return jax.jit(lambda z: eqsolve.fixed_point(f, z, **kw))(from_numpy(z0_np, "jax"))
    return eqsolve.fixed_point(f, from_numpy(z0_np, backend), **kw)


def _modes():
    out = list(AVAILABLE)
    if "jax" in AVAILABLE:
        out.append("jax-jit")
    return out


def _run(mode, f, z0_np, **kw):
    if mode == "jax-jit":
        return _solve("jax", f, z0_np, jit=True, **kw)
    return _solve(mode, f, z0_np, **kw)


# ------------------------------------------------------------------ 1. atol: the point that met it


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("mode", _modes())
def test_atol_returns_the_point_that_met_the_rule(mode, solver):
    """The issue's reproducer: the zero fixed point of 0.5 z with atol; z0 used to come back."""
    z0 = np.arange(1.0, 4.0)
    sol = _run(mode, lambda z: 0.5 * z, z0, solver=solver, tol=1e-8, atol=1e-8, batch_axis=None)
    assert int(to_numpy(sol.status)) == CONVERGED
    value = to_numpy(sol.value)
    assert np.abs(value).max() <= 4e-8, value  # ||0.5 v|| <= 1e-8 ||0.5 v|| + 1e-8
    check_contract(sol, lambda v: 0.5 * v, tol=1e-8, atol=1e-8, dtype="float64", one_system=True)


@pytest.mark.parametrize("mode", _modes())
def test_atol_batch_each_sample_returns_its_converged_point(mode):
    rng = np.random.default_rng(0)
    A = 0.6 * np.linalg.qr(rng.standard_normal((5, 5)))[0]
    z0 = rng.standard_normal((4, 5)) * np.array([[1.0], [1e-3], [1e3], [0.0]])

    def f(z):
        return z @ from_numpy(A.T.copy(), "jax" if mode.startswith("jax") else mode)

    sol = _run(mode, f, z0, solver="anderson", tol=1e-6, atol=1e-7)
    out = check_contract(sol, lambda v: v @ A.T, tol=1e-6, atol=1e-7, dtype="float64")
    assert (out["status"] == CONVERGED).all()
    assert (out["g"] <= 1e-6 * out["f"] + 1e-7).all()


@JAX
def test_jax_gradient_at_an_atol_fixed_point_is_taken_at_that_point():
    """z* = 0 for every W with ||W|| < 1, so dL/dW = 0; at z0 it would not be."""
    import jax
    import jax.numpy as jnp

    from eqsolve.jax import fixed_point

    rng = np.random.default_rng(1)
    W0 = 0.5 * np.linalg.qr(rng.standard_normal((6, 6)))[0]
    z0 = jnp.asarray(rng.standard_normal((3, 6)))
    c = jnp.asarray(rng.standard_normal((3, 6)))

    def loss(W):
        sol = fixed_point(lambda z, W: jnp.tanh(z @ W.T), z0, W, tol=1e-8, atol=1e-8)
        return jnp.sum(sol.value * c)

    for solver_grad in (jax.grad(loss), jax.jit(jax.grad(loss))):
        g = np.asarray(solver_grad(jnp.asarray(W0)))
        assert np.abs(g).max() <= 1e-6, np.abs(g).max()


# ------------------------------------------------------------------ 2. norms: no under/overflow


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(
    "dtype, c", [("float32", 2e-30), ("float64", 2e-170), ("float32", 1e19), ("float64", 1e154)]
)
@pytest.mark.parametrize("mode", _modes())
def test_tiny_and_huge_fixed_points_are_solved(mode, dtype, c, solver):
    """f(z) = 0.5 z + c from z0 = 0: z* = 2c. Tiny c used to be 'converged' at z0 after 0
    iterations (the squares underflow); huge c was reported NONFINITE (they overflow)."""
    if mode == "array_api_strict" and solver == "broyden":
        pytest.skip("covered on numpy (same arithmetic); keeps the strict session short")
    backend = "jax" if mode.startswith("jax") else mode
    cc = from_numpy(np.full((2, 4), c, dtype=dtype), backend)
    tol = 1e-5 if dtype == "float32" else 1e-10
    sol = _run(mode, lambda z: 0.5 * z + cc, np.zeros((2, 4), dtype=dtype), solver=solver, tol=tol)
    out = check_contract(sol, lambda v: 0.5 * v + c, tol=tol, atol=0.0, dtype=dtype)
    assert (out["status"] == CONVERGED).all()
    np.testing.assert_allclose(to_numpy(sol.value), 2 * c, rtol=10 * tol)
    assert (to_numpy(sol.iterations) > 0).all()


@JAX
@pytest.mark.parametrize("solver", SOLVERS)
def test_jax_flush_to_zero_never_fakes_a_zero_fixed_point(solver):
    """XLA on the CPU flushes subnormal results: at z ~ 1e-307, f(z) - z of f = 0.9 z is
    computed as 0. With atol = 0 the rule must not hold there (numpy says it does not)."""
    z0 = np.full((2, 3), 1e-300)
    for jit in (False, True):
        sol = _solve("jax", lambda z: 0.9 * z, z0, jit=jit, solver=solver, tol=1e-8,
                     max_iter=3000)
        out = check_contract(sol, lambda v: 0.9 * v, tol=1e-8, atol=0.0, dtype="float64")
        conv = out["status"] == CONVERGED
        # converged only at the exact zero fixed point
        assert (np.abs(to_numpy(sol.value))[conv] == 0).all()


# ------------------------------------------------------------------ 3. a 1-D state is one system


@pytest.mark.parametrize("mode", _modes())
def test_one_dimensional_state_is_one_system(mode):
    A = np.array([[0.0, 0.5], [0.5, 0.0]])
    c = np.array([1.0, 2.0])
    backend = "jax" if mode.startswith("jax") else mode
    Ab, cb = from_numpy(A, backend), from_numpy(c, backend)
    sol = _run(mode, lambda z: Ab @ z + cb, np.zeros(2), tol=1e-10)
    assert to_numpy(sol.status).shape == ()  # one system: 0-d per-sample fields
    np.testing.assert_allclose(to_numpy(sol.value), np.linalg.solve(np.eye(2) - A, c), rtol=1e-8)
    check_contract(sol, lambda v: A @ v + c, tol=1e-10, atol=0.0, dtype="float64",
                   one_system=True)


# ------------------------------------------------------------------ 4. coupled samples


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backend", [b for b in AVAILABLE if b != "jax"])
def test_coupled_samples_are_rechecked_and_reported(backend, solver):
    """Centring over the batch (what BatchNorm does) couples the samples. Sample 0
    contracts fast and stops first; the others keep moving the batch mean afterwards, so
    its stopping rule stops holding at its parked point. Every status must still hold at
    the returned batch, and a CouplingWarning says why."""
    rng = np.random.default_rng(2)
    B, n = 4, 5
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    rho = np.array([0.01, 0.9, 0.85, 0.9])[:, None]
    c = rng.standard_normal((B, n))

    def f_np(z):
        return rho * ((z - 0.5 * z.mean(axis=0, keepdims=True)) @ Q.T) + c

    xp = get_backend(backend).xp
    Qb, cb, rb = (from_numpy(a, backend) for a in (Q.T.copy(), c, rho))

    def f(z):
        return rb * ((z - 0.5 * xp.mean(z, axis=0, keepdims=True)) @ Qb) + cb

    z0 = rng.standard_normal((B, n))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol = eqsolve.fixed_point(f, from_numpy(z0, backend), solver=solver, tol=1e-9,
                                  max_iter=300)
    coupling = [w for w in caught if issubclass(w.category, eqsolve.CouplingWarning)]
    assert coupling and "batch_axis=None" in str(coupling[0].message)
    out = check_contract(sol, f_np, tol=1e-9, atol=0.0, dtype="float64")
    if solver != "broyden":  # per-sample secant models cannot see the coupling: MAX_ITER
        assert (out["status"] == CONVERGED).all()
        # the same batch solved as one system agrees
        one = eqsolve.fixed_point(f, from_numpy(z0, backend), solver=solver, tol=1e-12,
                                  max_iter=300, batch_axis=None)
        np.testing.assert_allclose(to_numpy(sol.value), to_numpy(one.value), rtol=1e-6,
                                   atol=1e-8)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("mode", _modes())
def test_coupled_samples_with_a_short_budget(mode, solver):
    """A budget that runs out while samples are coupled: the final statuses are decided on
    the returned batch (one more evaluation of f), whatever stopped when."""
    rng = np.random.default_rng(3)
    B, n = 5, 4
    A = 0.9 * np.linalg.qr(rng.standard_normal((n, n)))[0]
    P = rng.uniform(0, 1, (B, B))
    P = 0.09 * P / P.sum(axis=1, keepdims=True)
    c = rng.standard_normal((B, n)) * np.array([[1e-6], [1.0], [1.0], [1e3], [0.0]])
    backend = "jax" if mode.startswith("jax") else mode
    Ab, Pb, cb = (from_numpy(a, backend) for a in (A.T.copy(), P, c))
    # (JAX compiles every budget: fewer there)
    for max_iter in (2, 9, 30) if mode.startswith("jax") else (2, 5, 9, 30):
        sol = _run(mode, lambda z: z @ Ab + Pb @ z + cb, np.zeros((B, n)), solver=solver,
                   tol=1e-8, max_iter=max_iter)
        check_contract(sol, lambda v: v @ A.T + P @ v + c, tol=1e-8, atol=0.0, dtype="float64")


@TORCH
def test_torch_deq_with_batchnorm_tells_the_truth():
    """A DEQ cell with BatchNorm in training mode (batch statistics) couples the samples."""
    import torch

    import eqsolve.torch

    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.mul_(0.5 / torch.linalg.matrix_norm(lin.weight, 2))
    bn = torch.nn.BatchNorm1d(8, dtype=torch.float64, affine=False, track_running_stats=False)
    x = torch.randn(6, 8, dtype=torch.float64)

    def cell(z):
        return 0.5 * torch.tanh(bn(lin(z)) + x)

    z0 = torch.zeros(6, 8, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:  # per sample: whatever it says...
        warnings.simplefilter("always")
        sol = eqsolve.torch.fixed_point(cell, z0, tol=1e-9, max_iter=60)
    with torch.no_grad():  # ... holds at the returned batch
        check_contract(sol, lambda v: cell(torch.tensor(v)).numpy(), tol=1e-9, atol=0.0,
                       dtype="float64")
    if not bool(sol.converged.all()):
        assert any(issubclass(w.category, eqsolve.ConvergenceWarning) for w in caught)
    one = eqsolve.torch.fixed_point(cell, z0, tol=1e-9, max_iter=200, batch_axis=None)
    with torch.no_grad():  # as one system, it converges
        out = check_contract(one, lambda v: cell(torch.tensor(v)).numpy(), tol=1e-9, atol=0.0,
                             dtype="float64", one_system=True)
    assert (out["status"] == CONVERGED).all()


# ------------------------------------------------------------------ 5. divergence


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("mode", _modes())
def test_a_map_without_fixed_point_is_never_converged(mode, solver):
    """f(z) = z + 1 + 0.1 sin z has no fixed point; at |z| ~ 1e6 the relative residual test
    holds with the default tol, and every backend used to report CONVERGED there."""
    backend = "jax" if mode.startswith("jax") else mode
    xp = get_backend(backend).xp
    # (plain iteration moves by ~1 per step: it cannot reach |z| ~ 1e6 in a test's time)
    sol = _run(mode, lambda z: z + 1.0 + 0.1 * xp.sin(z), np.zeros((2, 1)), solver=solver,
               max_iter=200 if solver == "picard" else 5000)
    out = check_contract(sol, lambda v: v + 1.0 + 0.1 * np.sin(v), tol=1e-6, atol=0.0,
                         dtype="float64")
    assert (out["status"] != CONVERGED).all()
    if solver != "picard":  # the accelerated solvers reach the deceptive region: DIVERGED
        assert (out["status"] == DIVERGED).all(), out["status"]


@pytest.mark.parametrize("mode", _modes())
def test_exponential_divergence_is_diverged(mode):
    """Plain iteration of 2z + 1 runs away from the fixed point -1: DIVERGED once the
    residual has grown 1e10-fold (about 34 steps), not MAX_ITER or NONFINITE later."""
    sol = _run(mode, lambda z: 2.0 * z + 1.0, np.zeros((3, 2)), solver="picard", max_iter=500)
    out = check_contract(sol, lambda v: 2.0 * v + 1.0, tol=1e-6, atol=0.0, dtype="float64")
    assert (out["status"] == DIVERGED).all()
    assert int(to_numpy(sol.iterations).max()) < 40


@pytest.mark.parametrize("mode", _modes())
def test_noncontractive_map_with_a_fixed_point_is_still_solved(mode):
    """Anderson finds the fixed point of a linear map with spectral radius 1.5 (the
    determinacy test must not call that divergence)."""
    rng = np.random.default_rng(4)
    Q = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    A = Q @ np.diag([1.5, -1.2, 0.3, -0.7]) @ Q.T
    c = rng.standard_normal((2, 4))
    backend = "jax" if mode.startswith("jax") else mode
    Ab, cb = from_numpy(A.T.copy(), backend), from_numpy(c, backend)
    sol = _run(mode, lambda z: z @ Ab + cb, np.zeros((2, 4)), solver="anderson", tol=1e-10)
    out = check_contract(sol, lambda v: v @ A.T + c, tol=1e-10, atol=0.0, dtype="float64")
    assert (out["status"] == CONVERGED).all()
    np.testing.assert_allclose(to_numpy(sol.value), np.linalg.solve(np.eye(4) - A, c.T).T,
                               rtol=1e-8)


# ------------------------------------------------------------------ 6. max_iter limits


@pytest.mark.parametrize("backend", AVAILABLE)
def test_max_iter_beyond_int32_names_the_argument(backend):
    z0 = from_numpy(np.zeros((2, 3)), backend)
    for bad in (2**31, 2**40):
        with pytest.raises(ValueError, match=r"max_iter=\d+ is too large.*int32"):
            eqsolve.fixed_point(lambda z: 0.5 * z + 1.0, z0, max_iter=bad)


@JAX
def test_jax_max_iter_limits_with_x64_off():
    code = textwrap.dedent(
        """
        import jax.numpy as jnp, eqsolve, eqsolve.jax as ej
        z0 = jnp.zeros((2, 3), jnp.float32)
        for call in (eqsolve.fixed_point, ej.fixed_point):
            try:
                call(lambda z: 0.5 * z + 1.0, z0, max_iter=2**31)
            except ValueError as exc:
                assert "max_iter=2147483648 is too large" in str(exc), exc
            else:
                raise SystemExit("no error")
        try:
            ej.fixed_point(lambda z: 0.5 * z + 1.0, z0,
                           backward=eqsolve.Implicit(max_iter=2**33))
        except ValueError as exc:
            assert "Implicit.max_iter" in str(exc), exc
        sol = eqsolve.fixed_point(lambda z: 0.5 * z + 1.0, z0, max_iter=2**31 - 3)
        assert bool(sol.converged.all()) and int(sol.nfev) < 100
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# ------------------------------------------------------------------ 7. half precision


def _half_dtypes(backend):
    if backend == "numpy":
        return ["float16"]
    if backend in ("torch", "jax"):
        return ["float16", "bfloat16"]
    return []


#: unit roundoff of f's arithmetic: XLA may evaluate a chain of half-precision ops in float32
#: and round once, eager libraries round after every op, so two evaluations of f differ by a
#: few units of it
HALF_EPS = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backend", [b for b in AVAILABLE if _half_dtypes(b)])
def test_half_precision_states_are_solved_on_their_grid(backend, solver):
    """float16/bfloat16 states used to crash inside the mixing solve. The solver iterates in
    float32 and evaluates f on points of the state's dtype, so the returned value is a point
    f was evaluated at, and the rule holds there (checked with f evaluated in that dtype, as
    the solver did, and the residual in float64)."""
    for name in _half_dtypes(backend):
        _check_half(backend, solver, name)


def _check_half(backend, solver, name):
    rng = np.random.default_rng(5)
    W = 0.5 * np.linalg.qr(rng.standard_normal((8, 8)))[0]
    x = rng.standard_normal((3, 8))
    xp = get_backend(backend).xp
    dt = getattr(xp, name)
    Wb = xp.astype(from_numpy(W.T.copy(), backend), dt)
    xb = xp.astype(from_numpy(x, backend), dt)

    def f(z):
        return xp.tanh(z @ Wb + xb)

    tol = 0.05
    sol = eqsolve.fixed_point(f, xp.zeros((3, 8), dtype=dt), solver=solver, tol=tol)
    assert sol.value.dtype == dt

    def as64(a):
        return to_numpy(xp.astype(a, xp.float32)).astype(np.float64)

    def f_half_then_64(v):  # f in the state's dtype, then widened exactly
        return as64(f(xp.astype(from_numpy(v.astype(np.float32), backend), dt)))

    sol64 = sol._replace(value=as64(sol.value), residual=as64(sol.residual))
    out = check_contract(sol64, f_half_then_64, tol=tol, atol=0.0, dtype="float32",
                         eps=HALF_EPS[name], slack_ulps=2.0 / np.sqrt(8))
    assert (out["status"] == CONVERGED).all(), (name, out)


# ------------------------------------------------------------------ 8. f writing into its argument


def _inplace(z):
    z *= 0.5
    z += 1.0
    return z


def _inplace_new_output(z):
    z *= 0.5
    return z + 1.0


@pytest.mark.parametrize("backend", [b for b in ("numpy", "torch") if b in AVAILABLE])
@pytest.mark.parametrize("f", [_inplace, _inplace_new_output])
def test_f_writing_into_its_argument_is_an_error(backend, f):
    z0 = from_numpy(np.zeros((2, 3)), backend)
    with pytest.raises(ValueError, match="f modified its argument in place"):
        eqsolve.fixed_point(f, z0)
    with pytest.raises(ValueError, match="f modified its argument in place"):  # a tuple state
        eqsolve.fixed_point(lambda t: (_inplace(t[0]), t[1] + 1.0), (z0, z0 + 1.0))
    np.testing.assert_array_equal(to_numpy(z0), 0.0)  # the caller's z0 is untouched


@pytest.mark.parametrize("backend", [b for b in AVAILABLE if b in ("array_api_strict", "cupy")])
def test_f_returning_its_argument_is_an_error_where_writes_cannot_be_seen(backend):
    with pytest.raises(ValueError, match="f modified its argument in place"):
        eqsolve.fixed_point(_inplace, from_numpy(np.zeros((2, 3)), backend))


@pytest.mark.parametrize("backend", [b for b in AVAILABLE if b in ("numpy", "torch", "jax")])
def test_identity_map_is_a_fixed_point_everywhere(backend):
    """Returning the argument unchanged is no write: every z0 is a fixed point of z -> z."""
    z0 = from_numpy(np.arange(6.0).reshape(2, 3), backend)
    sol = eqsolve.solve(lambda z: z, z0)
    assert bool(np.all(to_numpy(sol.converged))) and int(sol.nfev) == 1
    np.testing.assert_array_equal(to_numpy(sol.value), np.arange(6.0).reshape(2, 3))


# ------------------------------------------------------------------ 9. eager JAX: no recompiles


@JAX
def test_eager_jax_solves_reuse_one_compiled_loop():
    """200 eager solves, each with a fresh closure over fresh weights: the loop compiles
    once per entry point, and memory stays bounded (it grew by ~3 MB per call before)."""
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np, eqsolve, eqsolve.jax as ej
        from jax import monitoring

        def rss_mb():
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * 4096 / 2**20

        compiles = []
        monitoring.register_event_duration_secs_listener(
            lambda event, secs, **kw: compiles.append(event)
            if event == "/jax/core/compile/backend_compile_duration" else None)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)

        def call(entry):
            W = jnp.asarray(0.1 * rng.standard_normal((16, 16)), jnp.float32)
            sol = entry(lambda z: jnp.tanh(z @ W + x), jnp.zeros((8, 16), jnp.float32))
            sol.value.block_until_ready()
            assert bool(sol.converged.all())

        for entry in (eqsolve.fixed_point, ej.fixed_point):
            for _ in range(20):  # warm up: every primitive compiled once
                call(entry)
        before, n_before = rss_mb(), len(compiles)
        for _ in range(100):
            call(eqsolve.fixed_point)
            call(ej.fixed_point)
        print(len(compiles) - n_before, rss_mb() - before)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    new_compiles, grown_mb = out.stdout.split()
    assert int(new_compiles) == 0, out.stdout
    assert float(grown_mb) < 60, out.stdout


# ------------------------------------------------------------------ 10. meta tensors


@TORCH
def test_meta_device_z0_is_named():
    import torch

    import eqsolve.torch

    with pytest.raises(ValueError, match=r"z0 is on the 'meta' device"):
        eqsolve.fixed_point(lambda z: 0.5 * z, torch.zeros(2, 3, device="meta"))
    with pytest.raises(ValueError, match=r"z0 is on the 'meta' device"):
        eqsolve.torch.fixed_point(lambda z: 0.5 * z, torch.zeros(2, 3, device="meta"))


def test_statuses_are_the_documented_codes():
    assert (CONVERGED, MAX_ITER, NONFINITE, DIVERGED) == tuple(int(s) for s in eqsolve.Status)
