"""Dropout that keeps a fixed point (``eqsolve.torch.VariationalDropout``,
``eqsolve.jax.variational_dropout``) and the warning for ordinary dropout inside ``f``.

Checked independently of eqsolve: the mask each call of ``f`` used is recorded from inside
``f``; the returned value is checked to be a fixed point of the map with that mask in
float64 by plain arithmetic; gradients are compared with those of the framework's own
autodiff through a long unrolled loop of the same fixed-mask map.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from conftest import AVAILABLE

needs_torch = pytest.mark.skipif("torch" not in AVAILABLE, reason="torch backend not selected")
needs_jax = pytest.mark.skipif("jax" not in AVAILABLE, reason="jax backend not selected")

B, D, P_DROP = 8, 16, 0.3


def _problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((D, D))
    W *= 0.5 / np.linalg.norm(W, 2)  # contraction <= 0.5 / (1 - p) < 1 with the mask
    return W, rng.standard_normal((B, D))


# --------------------------------------------------------------------------- torch


@needs_torch
def test_torch_one_mask_per_solve_and_a_true_fixed_point() -> None:
    import torch

    import eqsolve.torch as et

    torch.manual_seed(0)
    W, x = (torch.from_numpy(a) for a in _problem())
    W.requires_grad_(True)
    drop = et.VariationalDropout(P_DROP).train()
    masks: list[torch.Tensor] = []

    def f(z: torch.Tensor) -> torch.Tensor:
        masks.append(drop(torch.ones_like(z)).detach().clone())
        return torch.tanh(drop(z @ W.T) + x)

    sol = et.fixed_point(f, torch.zeros(B, D, dtype=torch.float64), tol=1e-12, max_iter=200)
    assert bool(sol.converged.all())
    assert len(masks) == int(sol.nfev) >= 3  # includes the differentiable call f(z*)
    assert all(torch.equal(m, masks[0]) for m in masks)
    assert 0 < float((masks[0] == 0).double().mean()) < 1
    # independent check: value is a fixed point of tanh(m * (z W^T) / (1 - p) + x)
    m = masks[0].numpy() * (1 - P_DROP)  # the 0/1 mask
    z = sol.value.detach().numpy()
    fz = np.tanh(m * (z @ W.detach().numpy().T) / (1 - P_DROP) + x.numpy())
    assert np.linalg.norm(fz - z) <= 1e-10 * np.linalg.norm(fz)
    # the gradient is that of the solved (fixed-mask) map: unrolled autograd reference
    sol.value.square().sum().backward()
    g_implicit = W.grad.clone()
    W.grad = None
    mask_t = masks[0]
    zz = torch.zeros(B, D, dtype=torch.float64)
    for _ in range(200):
        zz = torch.tanh(mask_t * (zz @ W.T) + x)
    zz.square().sum().backward()
    torch.testing.assert_close(g_implicit, W.grad, rtol=1e-8, atol=1e-10)
    # a new solve draws a new mask; outside any solve the latest is kept
    first = masks[0]
    masks.clear()
    et.fixed_point(f, torch.zeros(B, D, dtype=torch.float64), backward=None)
    assert not torch.equal(masks[0], first)
    kept = masks[0]
    masks.clear()
    f(torch.zeros(B, D, dtype=torch.float64))
    assert torch.equal(masks[0], kept)


@needs_torch
def test_torch_nested_solves_share_the_outer_solve_masks() -> None:
    """A solve inside the outer f (each outer iteration solves it again) draws its mask once
    per *outer* solve: otherwise the outer f would change at every outer iteration."""
    import torch

    import eqsolve.torch as et

    torch.manual_seed(1)
    outer_drop, inner_drop = et.VariationalDropout(0.2), et.VariationalDropout(0.2)
    outer_masks: list[torch.Tensor] = []
    inner_masks: list[torch.Tensor] = []

    def outer(z: torch.Tensor) -> torch.Tensor:
        outer_masks.append(outer_drop(torch.ones_like(z)))
        inner_masks.append(inner_drop(torch.ones_like(z)))
        inner = et.fixed_point(lambda u: 0.3 * torch.tanh(inner_drop(u) + z), torch.zeros_like(z),
                               backward=None, tol=1e-10)
        return 0.5 * torch.tanh(outer_drop(z) + inner.value + 1.0)

    sol = et.fixed_point(outer, torch.zeros(4, 6, dtype=torch.float64), tol=1e-10,
                         backward=None)
    assert bool(sol.converged.all())
    assert len(outer_masks) >= 3 and all(torch.equal(m, outer_masks[0]) for m in outer_masks)
    assert all(torch.equal(m, inner_masks[0]) for m in inner_masks)
    # a new top-level solve draws new masks
    et.fixed_point(lambda z: 0.5 * torch.tanh(inner_drop(z) + 1.0),
                   torch.zeros(4, 6, dtype=torch.float64), backward=None)
    assert not torch.equal(inner_drop(torch.ones(4, 6, dtype=torch.float64)), inner_masks[0])


@needs_torch
def test_torch_ordinary_dropout_is_named_and_eval_is_quiet() -> None:
    import torch

    import eqsolve.torch as et

    torch.manual_seed(2)
    W, x = (torch.from_numpy(a) for a in _problem())
    cell = torch.nn.Sequential(torch.nn.Linear(D, D).double(), torch.nn.Dropout(P_DROP))

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(cell(z) + x)

    with pytest.warns(RuntimeWarning, match="Dropout in training mode"):
        sol = et.fixed_point(f, torch.zeros(B, D, dtype=torch.float64), on_failure="ignore",
                             backward=None, max_iter=50)
    assert not bool(sol.converged.any())  # the reason for the warning: no fixed point
    cell.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = et.fixed_point(f, torch.zeros(B, D, dtype=torch.float64), backward=None)
    assert bool(sol.converged.all())
    # the DEQ layer goes through the same path
    layer = et.DEQ(on_failure="ignore", max_iter=20, backward=None)
    cell.train()
    with pytest.warns(RuntimeWarning, match="Dropout"):
        layer(f, torch.zeros(B, D, dtype=torch.float64))


@needs_torch
def test_torch_variational_dropout_module() -> None:
    import torch

    import eqsolve.torch as et

    torch.manual_seed(3)
    drop = et.VariationalDropout(0.25, shared_dims=(2, 3))
    x = torch.ones(64, 32, 5, 5)
    y = drop(x)
    assert y.shape == x.shape
    # one entry per (n, c), shared over the spatial dims; scaled by 1 / (1 - p)
    assert torch.all(y == y[:, :, :1, :1])
    assert set(torch.unique(y).tolist()) <= {0.0, float(torch.tensor(1 / 0.75))}
    # expectation x: 2048 Bernoulli entries, within 5 standard deviations
    keep = (y[:, :, 0, 0] > 0).double()
    assert abs(float(keep.mean()) - 0.75) < 5 * (0.75 * 0.25 / keep.numel()) ** 0.5
    drop.eval()
    assert torch.equal(drop(x), x)
    assert torch.equal(et.VariationalDropout(0.0)(x), x)
    bf = et.VariationalDropout(0.5).train()(torch.ones(3, 4, dtype=torch.bfloat16))
    assert bf.dtype == torch.bfloat16 and set(torch.unique(bf.float()).tolist()) <= {0.0, 2.0}
    with pytest.raises(ValueError, match="p must be"):
        et.VariationalDropout(1.0)
    with pytest.raises(TypeError, match="shared_dims"):
        et.VariationalDropout(0.1, shared_dims=(1.5,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shared_dims entry 4"):
        et.VariationalDropout(0.1, shared_dims=(4,)).train()(torch.ones(2, 3))


# --------------------------------------------------------------------------- JAX


@needs_jax
def test_jax_variational_dropout_fixed_point_and_gradient() -> None:
    import jax
    import jax.numpy as jnp

    from eqsolve.jax import fixed_point, variational_dropout

    W, x = _problem()
    key = jax.random.key(7)

    def f(z, W, x, key):  # type: ignore[no-untyped-def]
        return jnp.tanh(variational_dropout(key, z @ W.T, P_DROP) + x)

    def solved(W, x, key):  # type: ignore[no-untyped-def]
        return fixed_point(f, jnp.zeros((B, D)), W, x, key, tol=1e-12, max_iter=200).value

    sol = fixed_point(f, jnp.zeros((B, D)), W, x, key, tol=1e-12, max_iter=200)
    assert bool(sol.converged.all())
    mask = np.asarray(variational_dropout(key, jnp.ones((B, D)), P_DROP)) * (1 - P_DROP)
    assert 0 < (mask == 0).mean() < 1
    z = np.asarray(sol.value)
    fz = np.tanh(mask * (z @ W.T) / (1 - P_DROP) + x)
    assert np.linalg.norm(fz - z) <= 1e-10 * np.linalg.norm(fz)

    def unrolled(W, x, key):  # type: ignore[no-untyped-def]
        zz = jnp.zeros((B, D))
        for _ in range(200):
            zz = f(zz, W, x, key)
        return jnp.sum(zz**2)

    g = jax.jit(jax.grad(lambda W: jnp.sum(solved(W, x, key) ** 2)))(W)
    np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(unrolled)(W, x, key)),
                               rtol=1e-8, atol=1e-10)
    other = variational_dropout(jax.random.key(8), jnp.ones((B, D)), P_DROP)
    assert not np.array_equal(np.asarray(other) * (1 - P_DROP), mask)


@needs_jax
def test_jax_variational_dropout_arguments() -> None:
    import jax
    import jax.numpy as jnp

    from eqsolve.jax import variational_dropout

    key = jax.random.key(0)
    y = variational_dropout(key, jnp.ones((64, 5, 5, 32)), 0.25, shared_axes=(1, 2))
    assert bool(jnp.all(y == y[:, :1, :1, :]))
    np.testing.assert_array_equal(np.asarray(variational_dropout(key, y, 0.5,
                                                                 deterministic=True)), y)
    with pytest.raises(ValueError, match="p must be"):
        variational_dropout(key, y, -0.1)
    with pytest.raises(ValueError, match="shared_axes entry 7"):
        variational_dropout(key, y, 0.1, shared_axes=(7,))


@needs_torch
def test_backward_after_another_solve_uses_that_solves_mask():
    """A shared VariationalDropout redrawn by a second solve before the first solve's
    backward: the first backward still differentiates the map it solved (its own mask), on
    the explicit-args path (f is called again in backward) and on the closure path."""
    import torch

    import eqsolve.torch as et

    torch.manual_seed(3)
    drop = et.VariationalDropout(0.5)
    W = (0.4 * torch.randn(6, 6, dtype=torch.float64)).requires_grad_(True)
    x = torch.randn(3, 6, dtype=torch.float64)
    z0 = torch.zeros(3, 6, dtype=torch.float64)

    def f(z, W, x):
        return torch.tanh(drop(z @ W.T) + x)

    for explicit in (True, False):
        first = (et.fixed_point(f, z0, W, x, tol=1e-12) if explicit
                 else et.fixed_point(lambda z: f(z, W, x), z0, tol=1e-12))
        mask = drop._mask.clone()
        et.fixed_point(f, z0, W.detach(), x, tol=1e-12)  # draws a new mask
        assert not torch.equal(mask, drop._mask)
        (g,) = torch.autograd.grad(first.value.sum(), W)

        def frozen(z, W, x, mask=mask):
            return torch.tanh((z @ W.T).masked_fill(~mask, 0) / 0.5 + x)

        (g_ref,) = torch.autograd.grad(
            et.fixed_point(frozen, z0, W, x, tol=1e-12).value.sum(), W)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
