"""Mixed precision: ``f`` evaluated in bfloat16/float16, solver state and residuals in float32.

Problem: ``f(z) = tanh(z W^T + x)`` with ``||W||_2 = 0.5`` (contraction factor ``L <= 0.5``),
``d = 64``, 16 samples, float32 state.

Tolerances. Evaluating ``f`` in bfloat16 perturbs each output by about its unit roundoff
``u = 2**-8 ~ 3.9e-3`` (relative), so a relative residual ``||f(z) - z|| / ||f(z)||`` much
below ``u`` is not reachable; ``tol = 1e-2`` (~2.5 u) is. For a contraction the distance to
the exact (float32) fixed point is at most ``(residual + perturbation of f) / (1 - L)``, i.e.
``(1e-2 + 3.9e-3) / 0.5 ~ 2.8e-2``: the tests require ``3e-2``. float16 (``u = 2**-11``) gets
``tol = 2e-3`` and the bound ``(2e-3 + 4.9e-4) / 0.5 ~ 5e-3``. Gradients come from the same
perturbed map (forward and adjoint), so they are compared with the float32 gradient to
``5e-2`` relative (bfloat16) and are checked to *be* float32.
"""

from __future__ import annotations

import numpy as np
import pytest

D, B, RADIUS = 64, 16, 0.5

BF16_TOL, BF16_ERR = 1e-2, 3e-2
F16_TOL, F16_ERR = 2e-3, 5e-3


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((D, D))
    W *= RADIUS / np.linalg.norm(W, 2)
    x = rng.standard_normal((B, D))
    c = rng.standard_normal((B, D))
    return W.astype(np.float32), x.astype(np.float32), c.astype(np.float32)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)))


# ================================================================================ PyTorch


@pytest.fixture(scope="module")
def tt():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


def _torch_case(torch):
    W_np, x_np, c_np = _problem()
    W = torch.nn.Parameter(torch.tensor(W_np))
    x = torch.tensor(x_np)
    c = torch.tensor(c_np)
    return W, x, c


def _torch_reference(torch, W, x, c):
    """float32 fixed point and gradient of ``sum(c * z*)`` w.r.t. W (tight tolerances)."""
    import eqsolve.torch as et

    W.grad = None
    sol = et.fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros(B, D), tol=1e-6)
    (c * sol.value).sum().backward()
    grad = W.grad.clone()
    W.grad = None
    return sol.value.detach(), grad


@pytest.mark.parametrize(
    "f_dtype_name, tol, err_bound",
    [("bfloat16", BF16_TOL, BF16_ERR), ("float16", F16_TOL, F16_ERR)],
)
@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_torch_f_dtype_converges_in_float32(tt, f_dtype_name, tol, err_bound, solver):
    torch = tt
    import eqsolve.torch as et

    f_dtype = getattr(torch, f_dtype_name)
    W, x, c = _torch_case(torch)
    z_ref, g_ref = _torch_reference(torch, W, x, c)
    seen = []

    def f(z):
        h = z @ W.T  # under autocast: computed in f_dtype
        seen.append((z.dtype, h.dtype, torch.is_autocast_enabled("cpu")))
        return torch.tanh(h + x)

    sol = et.fixed_point(f, torch.zeros(B, D), tol=tol, solver=solver, f_dtype=f_dtype)
    assert {s[1] for s in seen} == {f_dtype} and all(s[2] for s in seen)
    assert {s[0] for s in seen} == {torch.float32}  # f receives the float32 state
    assert sol.value.dtype == torch.float32 and sol.residual.dtype == torch.float32
    assert bool(sol.converged.all()) and float(sol.residual.max()) <= tol
    assert _rel(sol.value.detach(), z_ref) <= err_bound

    (c * sol.value).sum().backward()
    assert W.grad is not None and W.grad.dtype == torch.float32
    assert torch.isfinite(W.grad).all()
    assert float((W.grad - g_ref).norm() / g_ref.norm()) <= 5e-2


def test_torch_enclosing_autocast_is_honoured(tt):
    """Inside ``torch.autocast`` (no f_dtype) f runs in bf16 and its output is cast back."""
    torch = tt
    import eqsolve.torch as et

    W, x, c = _torch_case(torch)
    z_ref, g_ref = _torch_reference(torch, W, x, c)
    deq = et.DEQ(tol=BF16_TOL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = deq(lambda z: torch.tanh(z @ W.T + x), torch.zeros(B, D))
        assert (z @ W.T).dtype == torch.bfloat16  # the region is still active for the caller
    assert z.dtype == torch.float32
    assert bool(deq.last_solution.converged.all())
    assert _rel(z.detach(), z_ref) <= BF16_ERR
    (c * z).sum().backward()
    assert W.grad.dtype == torch.float32
    assert float((W.grad - g_ref).norm() / g_ref.norm()) <= 5e-2


def test_torch_solver_arithmetic_ignores_autocast(tt):
    """The solver's own matmuls never run in bf16, even inside an autocast region.

    ``f`` opts out of autocast, so any difference would come from the solver. (Measured
    before this was fixed: Anderson's Gram matrix in bf16 stalled at max_iter.)
    """
    torch = tt
    import eqsolve

    W_np, x_np, _ = _problem()
    W, x = torch.tensor(W_np), torch.tensor(x_np)

    def f(z):
        with torch.autocast("cpu", enabled=False):
            return torch.tanh(z @ W.T + x)

    for solver in ("anderson", "broyden", "picard"):
        plain = eqsolve.solve(f, torch.zeros(B, D), tol=1e-6, solver=solver)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = eqsolve.solve(f, torch.zeros(B, D), tol=1e-6, solver=solver)
        assert plain.nfev == amp.nfev
        assert torch.equal(plain.value, amp.value)


def test_torch_f_dtype_with_float64_state_and_phantom(tt):
    torch = tt
    import eqsolve.torch as et

    W_np, x_np, _ = _problem()
    W = torch.nn.Parameter(torch.tensor(W_np, dtype=torch.float64))
    x = torch.tensor(x_np, dtype=torch.float64)
    for backward in ("anderson", "phantom", "jfb"):
        W.grad = None
        sol = et.fixed_point(
            lambda z: torch.tanh(z @ W.T + x),
            torch.zeros(B, D, dtype=torch.float64),
            tol=BF16_TOL,
            f_dtype=torch.bfloat16,
            backward=backward,
        )
        assert sol.value.dtype == torch.float64
        sol.value.sum().backward()
        assert W.grad.dtype == torch.float64 and bool(torch.isfinite(W.grad).all())


def test_torch_low_precision_output_without_opt_in_is_a_clear_error(tt):
    torch = tt
    import eqsolve.torch as et

    hint = r"f\(z0\) has dtype torch.bfloat16 .*f_dtype=torch.bfloat16"
    with pytest.raises(TypeError, match=hint):
        et.fixed_point(lambda z: (0.5 * z + 1.0).to(torch.bfloat16), torch.zeros(2, 3))


@pytest.mark.parametrize(
    "bad, exc",
    [("bfloat16", TypeError), ("float32", ValueError), ("float64", ValueError), (1, TypeError)],
)
def test_torch_bad_f_dtype(tt, bad, exc):
    torch = tt
    import eqsolve.torch as et

    value = getattr(torch, bad) if bad in ("float32", "float64") else bad
    with pytest.raises(exc, match="f_dtype"):
        et.fixed_point(lambda z: 0.5 * z, torch.zeros(2, 3), f_dtype=value)
    with pytest.raises(exc, match="f_dtype"):
        et.DEQ(f_dtype=value)


def test_torch_f_dtype_not_lower_than_state(tt):
    torch = tt
    import eqsolve.torch as et

    with pytest.raises(ValueError, match="not a lower precision"):
        et.fixed_point(
            lambda z: 0.5 * z, torch.zeros(2, 3, dtype=torch.float16), f_dtype=torch.bfloat16
        )


# ==================================================================================== JAX


@pytest.fixture(scope="module")
def jx():
    return pytest.importorskip("jax")


def test_jax_f_dtype_bfloat16(jx):
    jax = jx
    import jax.numpy as jnp

    import eqsolve.jax as ej

    W_np, x_np, c_np = _problem()
    W, x, c = jnp.asarray(W_np), jnp.asarray(x_np), jnp.asarray(c_np)
    z0 = jnp.zeros((B, D), jnp.float32)
    seen = []

    def cell(z, W, x):
        seen.append((z.dtype, W.dtype, x.dtype))
        return jnp.tanh(z @ W.T + x)

    def loss(W, x, **kw):
        sol = ej.fixed_point(cell, z0, W, x, **kw)
        return jnp.sum(c * sol.value), sol

    (_, ref), g_ref = jax.value_and_grad(loss, has_aux=True)(W, x, tol=1e-6)
    seen.clear()
    run = jax.jit(
        jax.value_and_grad(
            lambda W, x: loss(W, x, tol=BF16_TOL, f_dtype=jnp.bfloat16), has_aux=True
        )
    )
    (_, sol), grad = run(W, x)
    assert set(seen) == {(jnp.dtype(jnp.bfloat16),) * 3}  # z and args are cast for f
    assert sol.value.dtype == jnp.float32 and sol.residual.dtype == jnp.float32
    assert bool(sol.converged.all()) and float(sol.residual.max()) <= BF16_TOL
    assert _rel(sol.value, ref.value) <= BF16_ERR
    assert grad.dtype == jnp.float32 and bool(jnp.isfinite(grad).all())
    assert float(jnp.linalg.norm(grad - g_ref) / jnp.linalg.norm(g_ref)) <= 5e-2


@pytest.mark.parametrize(
    "bad, exc", [("not-a-dtype", TypeError), ("int32", ValueError), ("float64", ValueError)]
)
def test_jax_bad_f_dtype(jx, bad, exc):
    import jax.numpy as jnp

    import eqsolve.jax as ej

    with pytest.raises(exc, match="f_dtype"):
        ej.fixed_point(lambda z: 0.5 * z, jnp.zeros((2, 3), jnp.float32), f_dtype=bad)
