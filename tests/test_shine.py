"""SHINE backward (eqsolve.SHINE): the adjoint ``u = -H^T g`` from the forward Broyden estimate.

Checked: the value, residual and status are the forward solve's; the gradient is exactly
``u^T df/dtheta`` with ``u = -H^T g`` built here from the forward's factors (dense ``H``);
torch and JAX agree (reverse mode, and forward mode as its transpose); the bias against the
exact implicit gradient is measured (printed; run with ``-s``) beside Phantom(5, 0.5) and JFB,
and bounded loosely; bad arguments are refused naming the argument.
"""

from __future__ import annotations

import numpy as np
import pytest

import eqsolve
from conftest import AVAILABLE
from eqsolve.adapters.backward import backward_spec
from eqsolve.adapters.shine import solve_with_factors

TORCH = pytest.mark.skipif("torch" not in AVAILABLE, reason="torch is not installed")
JAX = pytest.mark.skipif("jax" not in AVAILABLE, reason="jax is not installed")

B, D = 8, 32


def _tanh_problem(norm: float = 0.9, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((D, D))
    W *= norm / np.linalg.norm(W, 2)
    return W, rng.standard_normal((B, D)), rng.standard_normal((B, D))


def _linear_problem(n: int = 6, seed: int = 1) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((4, n, n))
    A *= 0.6 / np.linalg.norm(A, 2, axis=(1, 2))[:, None, None]
    return A, rng.standard_normal((4, n)), rng.standard_normal((4, n))


def _errors(g: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    rel = float(np.linalg.norm(g - exact) / np.linalg.norm(exact))
    cos = float(np.sum(g * exact) / (np.linalg.norm(g) * np.linalg.norm(exact)))
    return rel, cos


def test_shorthand_and_solver_check():
    assert backward_spec("shine") == eqsolve.SHINE()
    assert "shine" in eqsolve.SHINE.__doc__.lower() and "biased" in eqsolve.SHINE.__doc__
    with pytest.raises(ValueError, match="solver='anderson'"):
        eqsolve.fixed_point(np.cos, np.zeros((2, 1)), solver="anderson", backward="shine")
    with pytest.raises(ValueError, match="solver='auto'"):  # the default solver is not Broyden
        eqsolve.fixed_point(np.cos, np.zeros((2, 1)), backward=eqsolve.SHINE())
    eqsolve.fixed_point(np.cos, np.zeros((2, 1)), solver=eqsolve.Broyden(memory=5),
                        backward=eqsolve.SHINE())


def test_cupy_refuses_shine():
    from eqsolve.adapters import cupy as ac  # the CuPy pullback, run on NumPy arrays

    with pytest.raises(ValueError, match="eqsolve.cupy supports backward=eqsolve.Implicit"):
        ac._fixed_point_on("numpy", np.cos, np.zeros((2, 1)), vjp=lambda z, v: v,
                           solver="broyden", backward=eqsolve.SHINE())


def test_factors_do_not_change_the_solve():
    A, b, _ = _linear_problem()

    def f(z):
        return np.einsum("bij,bj->bi", A, z) + b

    plain = eqsolve.solve(f, np.zeros_like(b), solver="broyden", tol=1e-10, max_iter=50)
    sol, factors = solve_with_factors(f, np.zeros_like(b), solver="broyden", tol=1e-10,
                                      max_iter=50)
    assert np.array_equal(sol.value, plain.value) and sol.nfev == plain.nfev
    assert np.array_equal(sol.status, plain.status)
    assert factors.U.shape == (4, 30, 6) and factors.mask.shape == (30,)
    # a memory shorter than the run restarts: the mask counts the terms since then
    _, small = solve_with_factors(f, np.zeros_like(b), solver=eqsolve.Broyden(memory=4),
                                  tol=1e-10, max_iter=50)
    assert 1 <= small.mask.sum() <= 4


# ---------------------------------------------------------------- torch


@TORCH
def test_torch_linear_map_gradient_is_minus_HT_g():
    """(a) linear f = A z + b: value/status are the forward's, bias vs the dense exact one;
    (b) the gradient is exactly u^T df/dtheta with u = -H^T g from the forward's factors."""
    import torch

    import eqsolve.torch as et

    A, b, c = _linear_problem()
    At, ct = torch.tensor(A), torch.tensor(c)
    bt = torch.tensor(b, requires_grad=True)

    def f(z):
        return torch.einsum("bij,bj->bi", At, z) + bt

    kw = dict(solver="broyden", tol=1e-10, max_iter=50)
    sol = et.fixed_point(f, torch.zeros(4, 6, dtype=torch.float64), backward="shine", **kw)
    (sol.value * ct).sum().backward()
    with torch.no_grad():
        ref, factors = solve_with_factors(f, torch.zeros(4, 6, dtype=torch.float64),
                                          backend="torch", **kw)
    assert torch.equal(sol.value.detach(), ref.value)  # z* bit for bit
    assert torch.equal(sol.residual, ref.residual) and torch.equal(sol.status, ref.status)
    assert sol.nfev == ref.nfev + 1  # one call of f at z*
    # dense H = -I + sum_i mask_i u_i v_i^T, per sample, built here
    U, V, mask = (np.asarray(t) for t in factors)
    H = -np.eye(6) + np.einsum("bmi,m,bmj->bij", U, mask, V)
    u = -np.einsum("bji,bj->bi", H, c)  # -H^T g
    np.testing.assert_allclose(bt.grad.numpy(), u, rtol=1e-12, atol=1e-12)  # df/db = I
    exact = np.linalg.solve(np.eye(6) - A.transpose(0, 2, 1), c[..., None])[..., 0]
    rel, cos = _errors(bt.grad.numpy(), exact)
    print(f"\n[SHINE linear n=6, ||A||=0.6] rel error {rel:.3g}, cosine {cos:.4f}")
    assert np.isfinite(rel) and rel < 1.0


def _torch_tanh_grad(W, X, c, backward, tol, **kw):
    import torch

    import eqsolve.torch as et

    Wt = torch.tensor(W, requires_grad=True)
    Xt = torch.tensor(X)
    sol = et.fixed_point(lambda z: torch.tanh(z @ Wt.T + Xt),
                         torch.zeros(B, D, dtype=torch.float64), solver="broyden", tol=tol,
                         max_iter=300, backward=backward, **kw)
    (sol.value * torch.tensor(c)).sum().backward()
    return Wt.grad.numpy(), sol


@TORCH
@pytest.mark.parametrize("tol, norm, scale", [(1e-4, 0.9, 1.0), (1e-6, 0.9, 1.0),
                                              (1e-6, 0.99, 0.1)])
def test_torch_tanh_bias_against_exact(tol, norm, scale):
    """(c) measured bias of SHINE, Phantom(5, 0.5) and JFB against the exact gradient; the
    last case (||W|| = 0.99, inputs x0.1: tanh nearly linear) contracts slowly."""
    W, X, c = _tanh_problem(norm)
    X = scale * X
    exact, _ = _torch_tanh_grad(W, X, c, eqsolve.Implicit(tol=1e-13), 1e-13)
    out = {}
    for name, spec in [("SHINE", eqsolve.SHINE()), ("Phantom(5,0.5)", eqsolve.Phantom(5, 0.5)),
                       ("JFB", eqsolve.JFB())]:
        g, sol = _torch_tanh_grad(W, X, c, spec, tol)
        assert bool(sol.converged.all())
        out[name] = _errors(g, exact)
    print(f"\n[torch tanh d={D} B={B} ||W||={norm} x*{scale} tol={tol:g}] " + ", ".join(
        f"{k}: rel {r:.3f} cos {s:.4f}" for k, (r, s) in out.items()))
    rel, cos = out["SHINE"]
    assert rel < 1.0 and cos > 0.5


@TORCH
def test_torch_refusals():
    import torch

    import eqsolve.torch as et

    W = torch.eye(3, dtype=torch.float64, requires_grad=True) * 0.5
    z0 = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="solver='anderson'"):
        et.fixed_point(lambda z: torch.tanh(z @ W), z0, solver="anderson", backward="shine")
    with pytest.raises(ValueError, match="solver="):
        et.DEQ(backward=eqsolve.SHINE())
    with pytest.raises(NotImplementedError, match="closure f"):
        et.fixed_point(lambda z, w: torch.tanh(z @ w), z0, W, solver="broyden",
                       backward="shine")
    with pytest.raises(NotImplementedError, match="states="):
        et.fixed_point(lambda z: torch.tanh(z @ W + 1.0), z0, solver="broyden",
                       backward="shine", states=(1,))
    sol = et.fixed_point(lambda z: torch.tanh(z @ W + 1.0), z0, solver="broyden",
                         backward="shine", tol=1e-10)
    with pytest.raises(RuntimeError, match="create_graph=True.*SHINE"):
        torch.autograd.grad(sol.value.sum(), W, create_graph=True)
    # no gradient wanted: the plain solve
    with torch.no_grad():
        plain = et.fixed_point(lambda z: torch.tanh(z @ W + 1.0), z0, solver="broyden",
                               backward="shine", tol=1e-10)
    assert plain.nfev == sol.nfev - 1 and torch.equal(plain.value, sol.value.detach())


# ---------------------------------------------------------------- jax


def _jax_loss(W, X, c, backward, tol):
    import jax.numpy as jnp

    import eqsolve.jax as ej

    def loss(w):
        sol = ej.fixed_point(lambda z, w: jnp.tanh(z @ w.T + X), jnp.zeros((B, D)), w,
                             solver="broyden", tol=tol, max_iter=300, backward=backward)
        return jnp.sum(sol.value * c)

    return loss


@JAX
@pytest.mark.parametrize("tol", [1e-4, 1e-6])
def test_jax_tanh_grad_and_jvp(tol):
    """(c) on JAX: grad's bias, jvp = grad's transpose, the value is the forward's."""
    import jax
    import jax.numpy as jnp

    import eqsolve.jax as ej

    W, X, c = _tanh_problem()
    Wj = jnp.asarray(W)
    exact = np.asarray(jax.grad(_jax_loss(W, X, c, eqsolve.Implicit(tol=1e-13), 1e-13))(Wj))
    out = {}
    for name, spec in [("SHINE", eqsolve.SHINE()), ("Phantom(5,0.5)", eqsolve.Phantom(5, 0.5)),
                       ("JFB", eqsolve.JFB())]:
        out[name] = _errors(np.asarray(jax.grad(_jax_loss(W, X, c, spec, tol))(Wj)), exact)
    print(f"\n[jax tanh d={D} B={B} ||W||=0.9 tol={tol:g}] " + ", ".join(
        f"{k}: rel {r:.3f} cos {s:.4f}" for k, (r, s) in out.items()))
    rel, cos = out["SHINE"]
    assert rel < 1.0 and cos > 0.5

    loss = _jax_loss(W, X, c, "shine", tol)
    g = np.asarray(jax.jit(jax.grad(loss))(Wj))
    dW = np.random.default_rng(5).standard_normal(W.shape)
    primal, tangent = jax.jvp(loss, (Wj,), (jnp.asarray(dW),))
    np.testing.assert_allclose(float(tangent), float(np.sum(g * dW)), rtol=1e-10)
    sol = ej.fixed_point(lambda z, w: jnp.tanh(z @ w.T + X), jnp.zeros((B, D)), Wj,
                         solver="broyden", tol=tol, max_iter=300, backward="shine")
    plain = eqsolve.solve(lambda z: jnp.tanh(z @ Wj.T + X), jnp.zeros((B, D)), solver="broyden",
                          tol=tol, max_iter=300)
    assert np.array_equal(np.asarray(sol.value), np.asarray(plain.value))
    assert np.array_equal(np.asarray(sol.status), np.asarray(plain.status))
    assert float(primal) == pytest.approx(float(jnp.sum(plain.value * c)), rel=1e-14)


@JAX
@TORCH
def test_jax_matches_torch():
    import jax
    import jax.numpy as jnp

    W, X, c = _tanh_problem()
    gj = np.asarray(jax.grad(_jax_loss(W, X, c, eqsolve.SHINE(), 1e-6))(jnp.asarray(W)))
    gt, _ = _torch_tanh_grad(W, X, c, eqsolve.SHINE(), 1e-6)
    np.testing.assert_allclose(gj, gt, rtol=1e-7, atol=1e-9)


@JAX
def test_jax_refusals():
    import jax.numpy as jnp

    import eqsolve.jax as ej

    with pytest.raises(ValueError, match="solver='anderson'"):
        ej.fixed_point(lambda z: jnp.tanh(z), jnp.zeros((2, 3)), solver="anderson",
                       backward="shine")
    with pytest.raises(NotImplementedError, match="states="):
        ej.fixed_point(lambda z: jnp.tanh(z + 1.0), jnp.zeros((2, 3)), solver="broyden",
                       backward="shine", states=(1,))
