"""``eqsolve.jax.fixed_point``: implicit gradients under jit / vmap / grad, checked against
dense float64 references, finite differences and backprop through an unrolled solve.

Problem: the DEQ cell ``f(z, params, x) = tanh(z W^T + x U^T + b)`` (tests/problems.py
builds ``W``); loss ``sum(c * z*)``. Reference gradient: the fixed point polished by Newton
in NumPy float64, ``u_b = (I - J_b^T)^{-1} c_b`` (dense, per sample), then
``s = u * (1 - z*^2)``: ``dW = s^T z*``, ``dU = s^T x``, ``db = sum_b s_b``.
"""

from __future__ import annotations

import importlib.util
import warnings
from functools import partial

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

from eqsolve import ConvergenceWarning, Status  # noqa: E402
from eqsolve.jax import JFB, Implicit, Phantom, fixed_point  # noqa: E402
from problems import tanh_cell  # noqa: E402

jax.config.update("jax_enable_x64", True)  # conftest does this too; keep the file standalone

HAS_GMRES = importlib.util.find_spec("eqsolve.core.gmres") is not None
IMPLICIT = ["neumann", "anderson", "broyden", "gmres"]
# XLA compile time dominates this file; most tests use the cheap-to-compile Picard forward
# (the forward solvers have their own tests) and GMRES(5) (compile time grows fast with the
# Krylov dimension; the default restart=20 is capped at n=10 here and compiles in ~10 s)
FAST = {"solver": "picard", "max_iter": 3000}
BACKWARD_OPTIONS = {"gmres": {"restart": 5}}


def _needs(method: str) -> None:
    if method == "gmres" and not HAS_GMRES:
        pytest.skip("eqsolve.core.gmres (backward='gmres') is not available in this checkout")


# ----------------------------------------------------------------------------- problems

PROBLEMS = {  # name: (radius of W, symmetric spectrum)
    "P1": (0.9, False),
    "P2": (2.0, False),
    "P4": (0.99, True),
}


def make(name: str, d: int = 10, p: int = 3, batch: int = 4, seed: int = 0):
    radius, sym = PROBLEMS[name]
    cell = tanh_cell(d, batch, radius, seed=seed, sym=sym)
    rng = np.random.default_rng(seed + 100)
    scale = 0.1 if sym else 1.0
    params = {
        "W": cell.W,
        "U": scale * rng.standard_normal((d, p)) / np.sqrt(p),
        "b": scale * 0.1 * rng.standard_normal(d),
    }
    x = rng.standard_normal((batch, p))
    c = rng.standard_normal((batch, d))
    return params, x, c


def cell(z, params, x):
    return jnp.tanh(z @ params["W"].T + x @ params["U"].T + params["b"])


def _np_f(z, params, x):
    return np.tanh(z @ params["W"].T + x @ params["U"].T + params["b"])


def reference(params, x, c, z_start):
    """Float64 fixed point (Newton-polished from ``z_start``) and dense implicit gradient."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(x, np.float64)
    z = np.asarray(z_start, np.float64)
    d = z.shape[-1]
    eye = np.eye(d)
    for _ in range(50):
        fz = _np_f(z, params, x)
        J = (1.0 - fz**2)[:, :, None] * params["W"][None]
        z = z - np.linalg.solve(eye[None] - J, (z - fz)[..., None])[..., 0]
    fz = _np_f(z, params, x)
    assert np.max(np.abs(fz - z)) < 1e-13, "reference fixed point did not polish"
    J = (1.0 - fz**2)[:, :, None] * params["W"][None]
    A = eye[None] - np.transpose(J, (0, 2, 1))
    u = np.linalg.solve(A, np.asarray(c, np.float64)[..., None])
    s = u[..., 0] * (1.0 - fz**2)
    return fz, {"W": s.T @ fz, "U": s.T @ x, "b": s.sum(0)}


def rel_err(grads, ref) -> float:
    num = sum(np.sum((np.asarray(grads[k], np.float64) - ref[k]) ** 2) for k in ref)
    den = sum(np.sum(ref[k] ** 2) for k in ref)
    return float(np.sqrt(num / den))


def to_jax(tree, dtype=jnp.float64):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=dtype), tree)


def loss_fn(x, c, **kw):
    def loss(params):
        z0 = jnp.zeros(c.shape, dtype=c.dtype)
        return jnp.sum(c * fixed_point(cell, z0, params, x, **kw).value)

    return loss


# --------------------------------------------------------------- accuracy vs dense reference


# every method on P1/P4 in float64; float32 on P1 for every method and P4 for the default
# (the compile time of each case, not the run, is what this file spends its time on)
ACCURACY_CASES = [
    (dtype, problem, method)
    for dtype in ("float64", "float32")
    for problem in ("P1", "P4")
    for method in IMPLICIT
    if not (dtype == "float32" and problem == "P4" and method != "anderson")
]


@pytest.mark.parametrize("dtype, problem, method", ACCURACY_CASES)
def test_implicit_gradient_matches_dense_reference(method, problem, dtype):
    _needs(method)
    params_np, x_np, c_np = make(problem)
    dt = jnp.float64 if dtype == "float64" else jnp.float32
    params, x, c = to_jax(params_np, dt), jnp.asarray(x_np, dt), jnp.asarray(c_np, dt)
    tol, bound = (1e-10, 1e-7) if dtype == "float64" else (1e-5, 1e-3)

    def loss(params):
        spec = Implicit(method, options=BACKWARD_OPTIONS.get(method, {}))
        sol = fixed_point(cell, jnp.zeros_like(c), params, x, tol=tol, backward=spec, **FAST)
        return jnp.sum(c * sol.value), sol

    grads, sol = jax.jit(jax.grad(loss, has_aux=True))(params)
    assert bool(jnp.all(sol.converged))
    assert all(g.dtype == dt for g in jax.tree_util.tree_leaves(grads))
    _, ref = reference(params_np, x_np, c_np, np.asarray(sol.value, np.float64))
    assert rel_err(grads, ref) <= bound


@pytest.mark.parametrize("method", IMPLICIT)
def test_wide_problem_gradient_is_right_or_reported(method):
    """P2 (||W|| = 2): J(z*) has spectral radius > 1 for some samples, so the Neumann series
    diverges. Any method must then give the right gradient or say it failed."""
    _needs(method)
    params_np, x_np, c_np = make("P2", d=8)
    params, x, c = to_jax(params_np), jnp.asarray(x_np), jnp.asarray(c_np)

    def loss(params, on_failure=None):
        spec = Implicit(method, max_iter=300, options=BACKWARD_OPTIONS.get(method, {}),
                        on_failure=on_failure)
        sol = fixed_point(cell, jnp.zeros_like(c), params, x, tol=1e-12, max_iter=500,
                          backward=spec)
        return jnp.sum(c * sol.value), sol

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads, sol = jax.jit(jax.grad(loss, has_aux=True))(params)
        jax.block_until_ready(grads)
        jax.effects_barrier()
    assert bool(jnp.all(sol.converged))  # the forward (Anderson) solves P2
    z_ref, ref = reference(params_np, x_np, c_np, np.asarray(sol.value))
    J = (1.0 - z_ref**2)[:, :, None] * params_np["W"][None]
    assert np.max(np.abs(np.linalg.eigvals(J))) > 1.0  # the problem is what it claims

    warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    accurate = rel_err(grads, ref) <= 1e-6
    assert warned or accurate, f"{method}: wrong gradient ({rel_err(grads, ref):.3g}) and no report"
    if method == "neumann":
        assert warned and not accurate
    if method == "anderson":
        assert accurate and not warned

    if method == "neumann":  # the "nan" policy: a failed sample poisons the gradient
        nan_loss = partial(loss, on_failure="nan")
        grads_nan, _ = jax.jit(jax.grad(nan_loss, has_aux=True))(params)
        leaves = jax.tree_util.tree_leaves(grads_nan)
        finite = all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
        assert not finite


def test_check_grads_rev():
    params_np, x_np, _ = make("P1", d=5, p=2, batch=2)
    x = jnp.asarray(x_np)

    def fn(W, U, b):
        sol = fixed_point(cell, jnp.zeros((2, 5)), {"W": W, "U": U, "b": b}, x, tol=1e-13,
                          **FAST)
        return sol.value

    primals = tuple(jnp.asarray(params_np[k]) for k in "WUb")
    check_grads(jax.jit(fn), primals, order=1, modes=["rev"])


def test_eager_grad_equals_jit_grad():
    params_np, x_np, c_np = make("P1")
    params, x, c = to_jax(params_np), jnp.asarray(x_np), jnp.asarray(c_np)
    loss = loss_fn(x, c, tol=1e-11, backward="neumann", **FAST)
    eager = jax.grad(loss)(params)
    jitted = jax.jit(jax.grad(loss))(params)
    for k in params:
        np.testing.assert_allclose(eager[k], jitted[k], rtol=1e-9, atol=1e-12)
    _, ref = reference(params_np, x_np, c_np, np.zeros_like(c_np))
    assert rel_err(eager, ref) <= 1e-8


# ------------------------------------------------------------------------------- vmap


def test_vmap_over_parameter_sets_single_system():
    """vmap over K parameter sets; each instance solves one system (batch_axis=None)."""
    K, d, p = 3, 6, 2
    sets = [make("P1", d=d, p=p, batch=1, seed=s) for s in range(K)]
    stacked = {k: jnp.stack([jnp.asarray(s[0][k]) for s in sets]) for k in "WUb"}
    xs = jnp.stack([jnp.asarray(s[1][0]) for s in sets])  # (K, p)
    cs = jnp.stack([jnp.asarray(s[2][0]) for s in sets])  # (K, d)

    def loss(params, x, c):
        f = lambda z, prm, x: jnp.tanh(prm["W"] @ z + prm["U"] @ x + prm["b"])  # noqa: E731
        sol = fixed_point(f, jnp.zeros(d), params, x, tol=1e-11, batch_axis=None, **FAST)
        return jnp.sum(c * sol.value)

    grads = jax.jit(jax.vmap(jax.grad(loss)))(stacked, xs, cs)
    for i, (params_np, x_np, c_np) in enumerate(sets):
        z0 = np.zeros((1, d))
        _, ref = reference(params_np, x_np, c_np, z0)
        assert rel_err({k: grads[k][i] for k in "WUb"}, ref) <= 1e-8

    # vmapping the solve itself, then differentiating the sum
    def total(params):
        return jnp.sum(jax.vmap(loss)(params, xs, cs))

    g2 = jax.jit(jax.grad(total))(stacked)
    for k in "WUb":
        np.testing.assert_allclose(g2[k], grads[k], rtol=1e-9, atol=1e-12)


def test_vmap_over_batched_solves():
    """vmap over a leading axis of inputs with a per-instance batch (batch_axis=0)."""
    params_np, x_np, c_np = make("P1", d=6, batch=4)
    params = to_jax(params_np)
    xs = jnp.stack([jnp.asarray(x_np), 0.5 * jnp.asarray(x_np)])

    def loss(params, x):
        sol = fixed_point(cell, jnp.zeros((4, 6)), params, x, tol=1e-11, **FAST)
        return jnp.sum(jnp.asarray(c_np) * sol.value)

    grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(params, xs)
    for i in range(2):
        _, ref = reference(params_np, np.asarray(xs[i]), c_np, np.zeros((4, 6)))
        assert rel_err({k: grads[k][i] for k in "WUb"}, ref) <= 1e-8


# ------------------------------------------------------------------- closures and pytrees


def test_gradient_through_closure_over_array():
    """f closes over W (not in args): closure conversion makes W differentiable."""
    params_np, x_np, c_np = make("P1")
    x, c = jnp.asarray(x_np), jnp.asarray(c_np)
    U, b = jnp.asarray(params_np["U"]), jnp.asarray(params_np["b"])
    inj = x @ U.T + b

    def loss(W, **kw):
        def f(z, inj):  # W captured, not passed
            return jnp.tanh(z @ W.T + inj)

        return jnp.sum(c * fixed_point(f, jnp.zeros_like(c), inj, tol=1e-11, **kw).value)

    def loss_all(W, U, b):
        def f(z):  # nothing explicit at all
            return jnp.tanh(z @ W.T + x @ U.T + b)

        return jnp.sum(c * fixed_point(f, jnp.zeros_like(c), tol=1e-11, **FAST).value)

    W = jnp.asarray(params_np["W"])
    _, ref = reference(params_np, x_np, c_np, np.zeros_like(c_np))
    eager = jax.grad(partial(loss, backward="neumann", **FAST))(W)  # JVPTracer closure
    jitted = jax.jit(jax.grad(loss))(W)  # default solvers; W a jit tracer too
    for g in (eager, jitted):  # the solves' tol 1e-11 bounds the error to ~1e-11 x ||ref||
        np.testing.assert_allclose(g, ref["W"], rtol=1e-8, atol=1e-10)
    gW, gU, gb = jax.jit(jax.grad(loss_all, argnums=(0, 1, 2)))(W, U, b)
    assert rel_err({"W": gW, "U": gU, "b": gb}, ref) <= 1e-8


def test_nested_pytree_params_and_integer_leaves():
    params_np, x_np, c_np = make("P1")
    x, c = jnp.asarray(x_np), jnp.asarray(c_np)
    tree = {"layer": ({"W": jnp.asarray(params_np["W"])}, [jnp.asarray(params_np["U"])]),
            "b": jnp.asarray(params_np["b"]), "sign": jnp.asarray(1, dtype=jnp.int32)}

    def f(z, tree, x):
        W = tree["layer"][0]["W"]
        U = tree["layer"][1][0]
        return jnp.tanh(z @ W.T + x @ U.T + tree["b"] * tree["sign"])

    def loss(tree):
        return jnp.sum(c * fixed_point(f, jnp.zeros_like(c), tree, x, tol=1e-11, **FAST).value)

    g = jax.jit(jax.grad(loss, allow_int=True))(tree)
    assert g["sign"].dtype == jax.dtypes.float0
    _, ref = reference(params_np, x_np, c_np, np.zeros_like(c_np))
    got = {"W": g["layer"][0]["W"], "U": g["layer"][1][0], "b": g["b"]}
    assert rel_err(got, ref) <= 1e-8


def test_tuple_state_gradients():
    """Multi-scale state (z1 (B, 4), z2 (B, 2, 3)): same math as the flat (B, 10) cell."""
    params_np, x_np, c_np = make("P1", d=10)
    x, c = jnp.asarray(x_np), jnp.asarray(c_np)
    B = c.shape[0]

    def f(zs, params, x):
        z = jnp.concatenate([zs[0], zs[1].reshape(B, 6)], axis=1)
        out = cell(z, params, x)
        return out[:, :4], out[:, 4:].reshape(B, 2, 3)

    def loss(params, method):
        sol = fixed_point(f, (jnp.zeros((B, 4)), jnp.zeros((B, 2, 3))), params, x, tol=1e-11,
                          backward=method, **FAST)
        z1, z2 = sol.value
        assert isinstance(sol.value, tuple) and z2.shape == (B, 2, 3)
        return jnp.sum(c[:, :4] * z1) + jnp.sum(c[:, 4:].reshape(B, 2, 3) * z2)

    _, ref = reference(params_np, x_np, c_np, np.zeros_like(c_np))
    for method in ("anderson",):
        g = jax.jit(jax.grad(loss), static_argnums=1)(to_jax(params_np), method)
        assert rel_err(g, ref) <= 1e-8


# ------------------------------------------------------- agreement with unrolled backprop


def test_matches_backprop_through_unrolled_solve():
    params_np, x_np, c_np = make("P1")
    params, x, c = to_jax(params_np), jnp.asarray(x_np), jnp.asarray(c_np)

    def unrolled_loss(params):
        z = jax.lax.fori_loop(0, 500, lambda i, z: cell(z, params, x), jnp.zeros_like(c))
        return jnp.sum(c * z)

    g_unrolled = jax.jit(jax.grad(unrolled_loss))(params)
    g_implicit = jax.jit(jax.grad(loss_fn(x, c, tol=1e-12)))(params)  # default solvers
    ref = {k: np.asarray(v) for k, v in g_unrolled.items()}
    assert rel_err(g_implicit, ref) <= 1e-9


# ------------------------------------------------------------------- phantom and JFB


@pytest.mark.parametrize("mode, steps, lam", [("phantom", 5, 0.5), ("phantom", 3, 0.8),
                                               ("jfb", 1, 1.0)])
def test_inexact_modes_match_their_definition(mode, steps, lam):
    params_np, x_np, c_np = make("P4")
    params, x, c = to_jax(params_np), jnp.asarray(x_np), jnp.asarray(c_np)
    kw = dict(tol=1e-10, **FAST)
    z_star = jax.lax.stop_gradient(fixed_point(cell, jnp.zeros_like(c), params, x, **kw).value)

    def explicit(params):  # k damped steps from the (constant) z*, plain autodiff
        z = z_star
        for _ in range(steps):
            z = (1.0 - lam) * z + lam * cell(z, params, x)
        return jnp.sum(c * z)

    spec = Phantom(steps, lam) if mode == "phantom" else JFB()
    g = jax.jit(jax.grad(loss_fn(x, c, backward=spec, **kw)))(params)
    g_def = jax.grad(explicit)(params)
    for k in params:
        np.testing.assert_allclose(g[k], g_def[k], rtol=1e-12, atol=1e-12)
    # and they are biased: not the implicit gradient on this slowly contracting problem
    _, ref = reference(params_np, x_np, c_np, np.asarray(z_star))
    assert rel_err(g, ref) > 1e-3


# -------------------------------------------------------------- diagnostics and failure


def test_diagnostics_are_not_differentiated_and_z0_gets_zero():
    params_np, x_np, c_np = make("P1")
    params, x, c = to_jax(params_np), jnp.asarray(x_np), jnp.asarray(c_np)

    def loss(params, z0):
        sol = fixed_point(cell, z0, params, x, tol=1e-11, **FAST)
        extra = jnp.sum(sol.residual) + jnp.sum(sol.iterations) + jnp.sum(sol.nfev)
        return jnp.sum(c * sol.value) + 0.0 * extra + jnp.sum(sol.residual)

    gp, gz = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, 0.1 * jnp.ones_like(c))
    _, ref = reference(params_np, x_np, c_np, np.zeros_like(c_np))
    assert rel_err(gp, ref) <= 1e-8
    assert bool(jnp.all(gz == 0))


def test_non_convergence_warns_eagerly_and_not_under_jit():
    params_np, x_np, c_np = make("P4")
    params, x, c = to_jax(params_np), jnp.asarray(x_np), jnp.asarray(c_np)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        fixed_point(cell, jnp.zeros_like(c), params, x, tol=1e-12, max_iter=2, solver="picard")
    sol = jax.jit(lambda p: fixed_point(cell, jnp.zeros_like(c), p, x, tol=1e-12, max_iter=2,
                                        solver="picard"))(params)
    assert bool(jnp.all(sol.status == int(Status.MAX_ITER)))
    with pytest.raises(Exception, match="did not converge"):
        fixed_point(cell, jnp.zeros_like(c), params, x, tol=1e-12, max_iter=2,
                    solver="picard", on_failure="raise")


def test_forward_mode_matches_dense_reference():
    """jax.jvp (custom_jvp: the tangent system (I - J_f) dz = J_theta dtheta) against the
    dense float64 IFT: dz_b = (I - J_b)^{-1} (df/dtheta)_b dtheta, per sample."""
    params_np, x_np, c_np = make("P1")
    params, x = to_jax(params_np), jnp.asarray(x_np)
    rng = np.random.default_rng(7)
    dparams = {k: rng.standard_normal(np.shape(v)) for k, v in params_np.items()}
    z, dz = jax.jit(lambda p, t: jax.jvp(
        lambda q: fixed_point(cell, jnp.zeros((4, 10)), q, x, tol=1e-12, **FAST).value,
        (p,), (t,)))(params, to_jax(dparams))
    zs, _ = reference(params_np, x_np, c_np, np.asarray(z))
    s = 1.0 - zs**2  # df = s * (dW z + dU x + db)
    rhs = s * (zs @ dparams["W"].T + x_np @ dparams["U"].T + dparams["b"])
    J = s[:, :, None] * params_np["W"][None]
    ref = np.linalg.solve(np.eye(10)[None] - J, rhs[..., None])[..., 0]
    np.testing.assert_allclose(np.asarray(dz), ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"backward": "newton"}, ValueError, "backward must be one of"),
        ({"backward": 3}, TypeError, "backward must be"),
        ({"tol": 0.0}, ValueError, "tol"),
        ({"bogus": 1}, TypeError, "bogus"),
    ],
)
def test_argument_validation(kwargs, exc, match):
    params_np, x_np, _ = make("P1")
    with pytest.raises(exc, match=match):
        fixed_point(cell, jnp.zeros((4, 10)), to_jax(params_np), jnp.asarray(x_np), **kwargs)


def test_z0_must_be_an_array():
    with pytest.raises(TypeError, match="z0"):
        fixed_point(lambda z: z, [1.0, 2.0])
