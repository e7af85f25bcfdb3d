"""Spectral radius of ``J_f(z*)`` (``eqsolve.core.spectral``, ``eqsolve.torch.spectral_radius``,
``eqsolve.jax.spectral_radius``).

References, all independent of eqsolve: ``numpy.linalg.eigvals`` of the dense per-sample
Jacobian in float64 (analytic for the tanh cell: ``J_b = diag(1 - z_b^2) W``), matrices with
known spectra (rotations: a complex-conjugate dominant pair; ``diag(0.9, -0.9, ...)``:
two real eigenvalues of equal modulus; the zero matrix), and Bauer-Fike for symmetric
matrices (a Ritz value with residual ``r`` lies within ``r`` of an eigenvalue).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import AVAILABLE
from eqsolve.core.solution import ConvergenceWarning
from eqsolve.core.spectral import spectral_radius_from_matvec

needs_torch = pytest.mark.skipif("torch" not in AVAILABLE, reason="torch backend not selected")
needs_jax = pytest.mark.skipif("jax" not in AVAILABLE, reason="jax backend not selected")


def _dense(J: np.ndarray, iters: int, rtol: float, seed: int = 0, krylov: int = 0):
    B, n, _ = J.shape
    v0 = np.random.default_rng(seed).standard_normal((B, n))
    return spectral_radius_from_matvec(
        np, lambda v: np.einsum("bij,bj->bi", J, v), v0, iters=iters, krylov=krylov, rtol=rtol
    )


def _true_radius(J: np.ndarray) -> np.ndarray:
    return np.abs(np.linalg.eigvals(J)).max(axis=-1)


def _tanh_cell(B: int = 48, d: int = 12, seed: int = 0, norm: float = 0.9):
    """A DEQ cell ``tanh(z W^T + x)``, its fixed point (300 plain steps, contraction 0.9)
    and the dense per-sample Jacobians there."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d, d))
    W *= norm / np.linalg.norm(W, 2)
    x = rng.standard_normal((B, d))
    z = np.zeros((B, d))
    for _ in range(300):
        z = np.tanh(z @ W.T + x)
    J = (1 - z**2)[:, :, None] * W[None]
    return W, x, z, J


# --------------------------------------------------------------------------- core (NumPy)


def test_deq_cells_match_dense_eigenvalues() -> None:
    """Power iteration alone (krylov=0) converges slowly on these circular spectra, and its
    flag says so; with the Arnoldi stage (the defaults: 50 + 30 products) every sample
    converges to the dense value."""
    W, x, z, J = _tanh_cell(B=256, d=32)
    true = _true_radius(J)
    power = _dense(J, iters=80, rtol=1e-4)
    c = power.converged
    assert 0.05 < c.mean() < 0.9, c.mean()
    err = np.abs(power.radius - true) / true
    assert err[c].max() < 1e-3, err[c].max()
    assert np.median(err[~c]) > np.median(err[c])  # the flag carries information
    res = _dense(J, iters=50, krylov=30, rtol=1e-4)
    assert res.converged.all()
    np.testing.assert_allclose(res.radius, true, rtol=1e-6)


@pytest.mark.parametrize("kind", ["gaussian", "symmetric", "nonnormal"])
def test_arnoldi_stage_on_random_spectra(kind: str) -> None:
    rng = np.random.default_rng(5)
    B, n = 64, 48
    A = rng.standard_normal((B, n, n)) / np.sqrt(n)
    if kind == "symmetric":
        A = (A + A.transpose(0, 2, 1)) / np.sqrt(2)
    if kind == "nonnormal":  # moderately non-normal: a triangular part of size 0.3
        A = np.triu(0.3 * A, 1) + np.diag(rng.uniform(-1, 1, n))[None]
    res = _dense(A, iters=50, krylov=30, rtol=1e-3)
    true = _true_radius(A)
    c = res.converged
    assert c.mean() >= 0.9, c.mean()
    # a converged estimate of a normal J is within its residual of an eigenvalue; in
    # general it is accurate to rtol-ish here (the dense check is the independent one)
    np.testing.assert_allclose(res.radius[c], true[c], rtol=1e-3 if kind != "nonnormal"
                               else 2e-2)


def test_complex_pair_is_exact() -> None:
    """A rotation-like block with eigenvalues 0.7 e^{+-i} plus a smaller block: plain power
    iteration never settles (||Jv|| oscillates), the Ritz step gives sqrt(det H) = 0.7."""
    B, n = 8, 6
    J = np.zeros((B, n, n))
    c, s = np.cos(1.0), np.sin(1.0)
    # similar to a rotation (eigenvalues 0.7 e^{+-i}) but not normal, so ||J v|| oscillates
    J[:, :2, :2] = 0.7 * np.array([[c, -4 * s], [s / 4, c]])
    # the rest: eigenvalues 0.3, -0.2, 0.1, 0.05 (triangular, non-normal)
    rest = np.diag([0.3, -0.2, 0.1, 0.05]) + 0.2 * np.triu(np.ones((n - 2, n - 2)), 1)
    J[:, 2:, 2:] = rest
    J[:, :2, 2:] = 0.1 * np.random.default_rng(3).standard_normal((B, 2, n - 2))
    res = _dense(J, iters=60, rtol=1e-6)
    assert res.converged.all()
    np.testing.assert_allclose(res.radius, 0.7, rtol=1e-8)
    with_arnoldi = _dense(J, iters=0, krylov=6, rtol=1e-6)
    np.testing.assert_allclose(with_arnoldi.radius, 0.7, rtol=1e-8)
    # the plain power-iteration ratio is not 0.7: what the Ritz step is for
    v = np.random.default_rng(0).standard_normal((B, n))
    for _ in range(60):
        v = np.einsum("bij,bj->bi", J, v)
        v /= np.linalg.norm(v, axis=-1, keepdims=True)
    ratio = np.linalg.norm(np.einsum("bij,bj->bi", J, v), axis=-1)
    assert np.abs(ratio - 0.7).max() > 1e-3


def test_equal_modulus_real_pair_and_zero() -> None:
    B, n = 8, 7
    J = np.zeros((B, n, n))
    J[:, range(n), range(n)] = np.random.default_rng(1).uniform(-0.5, 0.5, (B, n))
    J[:, 0, 0], J[:, 1, 1] = 0.9, -0.9
    for krylov in (0, 7):
        res = _dense(J, iters=80, rtol=1e-6, krylov=krylov)
        assert res.converged.all()
        np.testing.assert_allclose(res.radius, 0.9, rtol=1e-8)
        zero = _dense(np.zeros((3, 5, 5)), iters=5, rtol=1e-3, krylov=krylov)
        assert np.all(zero.radius == 0) and zero.converged.all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 12), iters=st.integers(0, 60),
       krylov=st.sampled_from([0, 2, 3, 8, 20]))
def test_symmetric_converged_is_an_eigenvalue(seed: int, n: int, iters: int,
                                              krylov: int) -> None:
    """Bauer-Fike for a symmetric J: a converged estimate is within its residual (<= rtol *
    radius) of the modulus of an eigenvalue, and never above rho by more than that."""
    rng = np.random.default_rng(seed)
    S = rng.standard_normal((16, n, n))
    J = (S + S.transpose(0, 2, 1)) / 2
    res = _dense(J, iters=iters, rtol=1e-3, seed=seed % 1000, krylov=krylov)
    ev = np.abs(np.linalg.eigvalsh(J))
    gap = np.abs(ev - res.radius[:, None]).min(axis=-1)
    c = res.converged
    assert np.all(gap[c] <= res.residual[c] * (1 + 1e-9) + 1e-12)
    assert np.all(res.radius[c] <= ev.max(axis=-1)[c] * (1 + 1e-3) + 1e-12)


# --------------------------------------------------------------------------- torch


@needs_torch
def test_torch_matches_dense_and_warns() -> None:
    import torch

    import eqsolve.torch as et

    W, x, z, J = _tanh_cell()
    Wt, xt, zt = (torch.from_numpy(a) for a in (W, x, z))

    def f(s: torch.Tensor) -> torch.Tensor:
        return torch.tanh(s @ Wt.T + xt)

    g = torch.Generator().manual_seed(0)
    res = et.spectral_radius(f, zt, rtol=1e-4, generator=g)  # defaults: every sample converges
    true = _true_radius(J)
    assert bool(res.converged.all())
    np.testing.assert_allclose(res.radius.numpy(), true, rtol=1e-6)
    assert res.radius.dtype == torch.float64 and not res.radius.requires_grad
    with pytest.warns(ConvergenceWarning, match="iters=0 power steps and krylov=0"):
        et.spectral_radius(f, zt, iters=0, krylov=0, generator=g)
    # one sample, the whole state: batch_axis=None on sample 0 gives its own radius
    one = et.spectral_radius(lambda s: torch.tanh(s @ Wt.T + xt[0]), zt[0], rtol=1e-4,
                             batch_axis=None)
    assert one.radius.shape == () and bool(one.converged)
    np.testing.assert_allclose(float(one.radius), true[0], rtol=1e-6)


@needs_torch
def test_torch_tuple_state_low_precision_and_no_grad() -> None:
    """A two-part state with a block-triangular Jacobian (spectrum = union of the blocks),
    float32 parameters with requires_grad under no_grad, and bfloat16."""
    import torch

    import eqsolve.torch as et

    W = torch.nn.Parameter(torch.tensor([[0.0, -0.6], [0.6, 0.0]]))  # eigenvalues +-0.6i

    def f(zz: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = zz
        return a @ W.T, 0.3 * b + a.sum(dim=1, keepdim=True)

    z = (torch.randn(5, 2), torch.randn(5, 3))
    with torch.no_grad():
        res = et.spectral_radius(f, z, iters=20, rtol=1e-5)
    assert bool(res.converged.all())
    np.testing.assert_allclose(res.radius.numpy(), 0.6, rtol=1e-5)
    zb = tuple(t.to(torch.bfloat16) for t in z)
    Wb = W.detach().to(torch.bfloat16)
    res16 = et.spectral_radius(lambda zz: (zz[0] @ Wb.T, 0.3 * zz[1]), zb, iters=20,
                               rtol=1e-2)
    assert res16.radius.dtype == torch.bfloat16
    np.testing.assert_allclose(res16.radius.float().numpy(), 0.6, rtol=1e-2)


@needs_torch
def test_torch_bad_arguments() -> None:
    import torch

    import eqsolve.torch as et

    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="iters"):
        et.spectral_radius(lambda s: s, z, iters=-1)
    with pytest.raises(ValueError, match="krylov"):
        et.spectral_radius(lambda s: s, z, krylov=1)
    with pytest.raises(ValueError, match="rtol"):
        et.spectral_radius(lambda s: s, z, rtol=float("nan"))
    with pytest.raises(TypeError, match="batch_axis"):
        et.spectral_radius(lambda s: s, z, batch_axis=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_axis=3"):
        et.spectral_radius(lambda s: s, z, batch_axis=3)
    with pytest.raises(TypeError, match="z_star"):
        et.spectral_radius(lambda s: s, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="structure and shapes"):
        et.spectral_radius(lambda s: s[:, :2], z)
    with pytest.raises(RuntimeError, match="no autograd graph"):
        et.spectral_radius(lambda s: s.detach(), z)


# --------------------------------------------------------------------------- JAX


@needs_jax
def test_jax_matches_dense_jit_vmap() -> None:
    import jax
    import jax.numpy as jnp

    from eqsolve.jax import spectral_radius

    W, x, z, J = _tanh_cell()

    def f(s, W, x):  # type: ignore[no-untyped-def]
        return jnp.tanh(s @ W.T + x)

    true = _true_radius(J)
    res = spectral_radius(f, jnp.asarray(z), W, x, rtol=1e-4)
    assert bool(res.converged.all())
    np.testing.assert_allclose(np.asarray(res.radius), true, rtol=1e-6)
    jitted = jax.jit(lambda z, W, x: spectral_radius(f, z, W, x, rtol=1e-4))
    rj = jitted(jnp.asarray(z), W, x)
    np.testing.assert_allclose(np.asarray(rj.radius), np.asarray(res.radius), rtol=1e-10)
    per = jax.vmap(lambda zi, xi: spectral_radius(f, zi, W, xi, rtol=1e-4,
                                                  batch_axis=None))(jnp.asarray(z), x)
    assert bool(per.converged.all())
    np.testing.assert_allclose(np.asarray(per.radius), true, rtol=1e-6)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        spectral_radius(f, jnp.asarray(z), W, x, iters=0, krylov=0)
    # under jit nothing is warned: the flags say it
    flags = jax.jit(lambda z: spectral_radius(f, z, W, x, iters=0, krylov=0).converged)(
        jnp.asarray(z))
    assert not bool(flags.all())


@needs_jax
def test_jax_tuple_state_and_bad_arguments() -> None:
    import jax.numpy as jnp

    from eqsolve.jax import spectral_radius

    R = jnp.array([[0.0, -0.6], [0.6, 0.0]])

    def f(zz, R):  # type: ignore[no-untyped-def]
        a, b = zz
        return a @ R.T, 0.3 * b + a.sum(axis=1, keepdims=True)

    z = (jnp.ones((5, 2)), jnp.ones((5, 3)))
    res = spectral_radius(f, z, R, iters=20, rtol=1e-5)
    assert bool(res.converged.all())
    np.testing.assert_allclose(np.asarray(res.radius), 0.6, rtol=1e-5)
    with pytest.raises(ValueError, match="iters"):
        spectral_radius(f, z, R, iters=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="structure and shapes"):
        spectral_radius(lambda s: s[:, :1], jnp.ones((2, 3)))
    with pytest.raises(TypeError, match="z_star"):
        spectral_radius(lambda s: s, jnp.ones((2, 3), dtype=jnp.int32))


@needs_torch
def test_torch_adversarial_scales_nan_float16() -> None:
    """NaN in one sample stays in that sample (unconverged, warned); scales of 1e-30 and
    1e30 and a float16 state give the dense radius."""
    import torch

    import eqsolve.torch as et

    z = torch.zeros(3, 4)
    z[1, 0] = float("nan")
    with pytest.warns(ConvergenceWarning, match="1 of 3"):
        r = et.spectral_radius(lambda s: torch.tanh(0.5 * s), z)
    assert r.converged.tolist() == [True, False, True]
    np.testing.assert_allclose(r.radius[[0, 2]].numpy(), 0.5, rtol=1e-5)
    A = torch.from_numpy(np.random.default_rng(4).standard_normal((4, 4)))
    rho = float(torch.linalg.eigvals(A).abs().max())
    for scale in (1e-30, 1e30):
        r = et.spectral_radius(lambda s, c=scale: c * (s @ A.T),
                               torch.ones(2, 4, dtype=torch.float64))
        assert bool(r.converged.all())
        np.testing.assert_allclose(r.radius.numpy() / scale, rho, rtol=1e-8)
    half = et.spectral_radius(lambda s: 0.5 * s, torch.ones(2, 4, dtype=torch.float16))
    assert half.radius.dtype == torch.float16
    np.testing.assert_allclose(half.radius.float().numpy(), 0.5, rtol=1e-3)
