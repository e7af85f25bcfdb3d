"""Jacobian regularisation (``eqsolve.torch.jacobian_reg``, ``eqsolve.jax.jacobian_reg``).

Checked against the dense per-sample Jacobian ``J_b`` of a small non-symmetric tanh cell
(``torch.autograd.functional.jacobian`` / ``jax.jacrev``), in float64:

* per probe, exactly: with the probes re-drawn from the same generator / key, the estimate
  equals ``(1/(n d)) sum_k ||eps_k^T J_b||^2``. This pins the transpose (``J eps`` differs
  for a non-symmetric ``J``), the square and the ``1/d`` normalisation; each test also
  asserts that the wrong variants are far outside its tolerance, so it could fail.
* in expectation: ``N`` independent probes of one ``J`` (the same sample repeated ``N``
  times along the batch, so one VJP does it) average to ``||J||_F^2 / d`` within 5 standard
  deviations of the Gaussian Hutchinson estimator (``Var = 2 ||J J^T||_F^2`` per probe,
  computed from the dense ``J``). Seeds are fixed, so the test is deterministic; the
  tolerance is also asserted to be tighter than the gaps a wrong estimator would leave.
* gradients with respect to the parameters: ``torch.autograd.gradcheck`` and
  ``jax.test_util.check_grads`` (with fixed probes), and end to end with the ``z*`` of
  ``eqsolve.{torch,jax}.fixed_point``: ``z*`` is held constant by ``jacobian_reg``, so the
  gradient of ``loss + gamma * reg`` is the implicit gradient plus the partial derivative of
  the regulariser at fixed ``z*``.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import AVAILABLE

needs_torch = pytest.mark.skipif("torch" not in AVAILABLE, reason="torch backend not selected")
needs_jax = pytest.mark.skipif("jax" not in AVAILABLE, reason="jax backend not selected")

D, P, B = 6, 4, 3


def _params(seed: int = 0, scale: float = 0.7) -> dict[str, np.ndarray]:
    """Non-symmetric ``W`` (||W||_2 = scale), so ``eps^T J`` and ``J eps`` differ."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((D, D)) + 1.5 * np.triu(rng.standard_normal((D, D)), 1)
    W *= scale / np.linalg.norm(W, 2)
    return {
        "W": W,
        "U": rng.standard_normal((D, P)) / np.sqrt(P),
        "b": 0.1 * rng.standard_normal(D),
        "x": rng.standard_normal((B, P)),
        "z": 0.5 * rng.standard_normal((B, D)),  # a generic point (not only fixed points)
    }


def _estimates(J: np.ndarray, eps: np.ndarray) -> dict[str, np.ndarray]:
    """Right and wrong per-sample estimates from dense ``J`` ``(B, d, d)`` and probes
    ``eps`` ``(n, B, d)``: the tests assert they are told apart."""
    d = J.shape[-1]
    eJ = np.einsum("nbi,bij->nbj", eps, J)  # eps^T J  (right)
    Je = np.einsum("bij,nbj->nbi", J, eps)  # J eps    (transpose: wrong)
    sq = np.sum(eJ**2, axis=-1)
    return {
        "right": sq.mean(axis=0) / d,
        "transposed": np.sum(Je**2, axis=-1).mean(axis=0) / d,
        "no_square": np.sqrt(sq).mean(axis=0) / d,
        "not_divided_by_d": sq.mean(axis=0),
    }


def _assert_distinguishes(est: dict[str, np.ndarray], rtol: float) -> None:
    for name in ("transposed", "no_square", "not_divided_by_d"):
        gap = np.max(np.abs(est[name] - est["right"]) / np.abs(est["right"]))
        assert gap > 100 * rtol, (name, gap)  # the check below could really fail


def _hutchinson_bounds(J: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``||J_b||_F^2 / d`` and 5 standard deviations of the mean of ``n`` probes."""
    d = J.shape[-1]
    JJt = np.einsum("bij,bkj->bik", J, J)
    exact = np.einsum("bij,bij->b", J, J) / d
    std = np.sqrt(2.0 * np.einsum("bij,bij->b", JJt, JJt) / n) / d
    return exact, 5.0 * std


# ------------------------------------------------------------------------------------ torch


@pytest.fixture
def torch_cell():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    p = {k: torch.tensor(v, dtype=torch.float64) for k, v in _params().items()}

    def make(W, U, b, x):
        inj = x @ U.T + b
        return lambda z: torch.tanh(z @ W.T + inj)

    return torch, p, make


def _torch_dense(torch, f, z):
    J = torch.autograd.functional.jacobian(f, z)  # (B, d, B, d)
    return np.stack([J[i, :, i, :].numpy() for i in range(z.shape[0])])


@needs_torch
@pytest.mark.parametrize("n_samples", [1, 3])
def test_torch_exact_per_probe(torch_cell, n_samples):
    torch, p, make = torch_cell
    from eqsolve.torch import jacobian_reg

    f = make(p["W"], p["U"], p["b"], p["x"])
    z = p["z"]
    got = jacobian_reg(
        f, z, n_samples=n_samples, generator=torch.Generator().manual_seed(7), reduction="none"
    )
    assert got.shape == (B,) and got.dtype == torch.float64
    g = torch.Generator().manual_seed(7)  # the same probes, in the documented order
    eps = np.stack(
        [torch.randn(z.shape, generator=g, dtype=z.dtype).numpy() for _ in range(n_samples)]
    )
    est = _estimates(_torch_dense(torch, f, z), eps)
    _assert_distinguishes(est, 1e-12)
    np.testing.assert_allclose(got.detach().numpy(), est["right"], rtol=1e-12)
    mean = jacobian_reg(f, z, n_samples=n_samples, generator=torch.Generator().manual_seed(7))
    assert mean.shape == () and abs(mean.item() - est["right"].mean()) < 1e-12


@needs_torch
def test_torch_converges_to_frobenius_norm(torch_cell):
    torch, p, make = torch_cell
    from eqsolve.torch import jacobian_reg

    n = 20_000
    for i in range(B):  # each sample's J, probed n times (the sample repeated n times)
        xi, zi = p["x"][i : i + 1].expand(n, P), p["z"][i : i + 1].expand(n, D)
        f = make(p["W"], p["U"], p["b"], xi)
        got = jacobian_reg(f, zi, generator=torch.Generator().manual_seed(i)).item()
        J = _torch_dense(torch, make(p["W"], p["U"], p["b"], p["x"][i : i + 1]), zi[:1])
        exact, tol = _hutchinson_bounds(J, n)
        assert tol[0] < 0.06 * exact[0]  # tight: a wrong normalisation/square is far outside
        assert abs(got - exact[0]) < tol[0], (i, got, exact[0], tol[0])
    # and a handful of probes per sample gives the same mean through n_samples
    f = make(p["W"], p["U"], p["b"], p["x"])
    got = (
        jacobian_reg(
            f, p["z"], n_samples=4000, reduction="none", generator=torch.Generator().manual_seed(0)
        )
        .detach()
        .numpy()
    )
    exact, tol = _hutchinson_bounds(_torch_dense(torch, f, p["z"]), 4000)
    assert np.all(np.abs(got - exact) < tol), (got, exact, tol)


@needs_torch
def test_torch_tuple_state_and_whole_batch(torch_cell):
    torch, p, make = torch_cell
    from eqsolve.torch import jacobian_reg

    f = make(p["W"], p["U"], p["b"], p["x"])
    z = p["z"]

    def f_tuple(zs):  # the same cell on a state split in two leaves (2 + 4 features)
        out = f(torch.cat(zs, dim=1))
        return out[:, :2], out[:, 2:]

    got = jacobian_reg(
        f_tuple, (z[:, :2], z[:, 2:]), generator=torch.Generator().manual_seed(3), reduction="none"
    )
    g = torch.Generator().manual_seed(3)
    e1 = torch.randn((B, 2), generator=g, dtype=z.dtype)
    e2 = torch.randn((B, 4), generator=g, dtype=z.dtype)
    eps = torch.cat([e1, e2], dim=1).numpy()[None]
    J = _torch_dense(torch, f, z)
    np.testing.assert_allclose(got.detach().numpy(), _estimates(J, eps)["right"], rtol=1e-12)

    # batch_axis=None: the whole (B, d) array is one system of B*d unknowns
    whole = jacobian_reg(
        f, z, batch_axis=None, generator=torch.Generator().manual_seed(4), reduction="none"
    )
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(4), dtype=z.dtype)
    Jfull = torch.autograd.functional.jacobian(f, z).reshape(B * D, B * D).numpy()
    expected = np.sum((eps.numpy().reshape(-1) @ Jfull) ** 2) / (B * D)
    assert whole.shape == () and abs(whole.item() - expected) < 1e-12 * expected


@needs_torch
def test_torch_gradcheck(torch_cell):
    torch, p, make = torch_cell
    from eqsolve.torch import jacobian_reg

    z = p["z"]
    leaves = [p[k].clone().requires_grad_(True) for k in ("W", "U", "b", "x")]

    def reg(W, U, b, x):
        return jacobian_reg(
            make(W, U, b, x), z, n_samples=2, generator=torch.Generator().manual_seed(0)
        )

    assert torch.autograd.gradcheck(reg, leaves)
    assert torch.autograd.gradgradcheck(reg, leaves)


@needs_torch
def test_torch_with_fixed_point(torch_cell):
    torch, p, make = torch_cell
    import eqsolve.torch as et

    W = p["W"].clone().requires_grad_(True)
    U = p["U"].clone().requires_grad_(True)
    c = torch.linspace(-1.0, 1.0, D, dtype=torch.float64)
    gamma = 0.7

    def total(z_for_reg_detached: bool):
        f = make(W, U, p["b"], p["x"])
        z = et.fixed_point(f, torch.zeros(B, D, dtype=torch.float64), tol=1e-12).value
        assert z.grad_fn is not None
        zr = z.detach() if z_for_reg_detached else z
        reg = et.jacobian_reg(f, zr, generator=torch.Generator().manual_seed(5))
        return (z * c).sum(), reg

    loss, reg = total(False)
    (loss + gamma * reg).backward()
    grads = [W.grad.clone(), U.grad.clone()]
    W.grad = U.grad = None
    loss2, reg2 = total(True)
    assert reg.item() == reg2.item()  # the graph on z* is not used
    g_loss = torch.autograd.grad(loss2, [W, U], retain_graph=True)  # inj is shared
    g_reg = torch.autograd.grad(reg2, [W, U])
    for got, gl, gr in zip(grads, g_loss, g_reg, strict=True):
        torch.testing.assert_close(got, gl + gamma * gr, rtol=1e-10, atol=1e-12)
        assert gr.abs().max() > 1e-3  # the regulariser does contribute

    # the DEQ layer's output works the same way; under no_grad the value has no graph
    deq = et.DEQ(tol=1e-10)
    f = make(W, U, p["b"], p["x"])
    z = deq(f, torch.zeros(B, D, dtype=torch.float64))
    r = et.jacobian_reg(f, z, generator=torch.Generator().manual_seed(5))
    assert r.requires_grad
    with torch.no_grad():
        r0 = et.jacobian_reg(f, z, generator=torch.Generator().manual_seed(5))
    assert not r0.requires_grad and torch.allclose(r0, r.detach(), rtol=1e-8)


@needs_torch
def test_torch_bad_arguments(torch_cell):
    torch, p, make = torch_cell
    from eqsolve.torch import jacobian_reg

    f = make(p["W"], p["U"], p["b"], p["x"])
    with pytest.raises(ValueError, match="n_samples"):
        jacobian_reg(f, p["z"], n_samples=0)
    with pytest.raises(ValueError, match="reduction"):
        jacobian_reg(f, p["z"], reduction="sum")
    with pytest.raises(ValueError, match="shapes"):
        jacobian_reg(lambda z: z[:, :2], p["z"])
    with pytest.raises(TypeError, match="z_star"):
        jacobian_reg(f, np.zeros((B, D)))
    with pytest.raises(RuntimeError, match="no autograd graph"):
        jacobian_reg(lambda z: z.detach() * 2, p["z"])
    Wp = p["W"].clone().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="does not depend on z"):
        r = jacobian_reg(lambda z: z.detach() @ Wp.T, p["z"])
    assert r.item() == 0.0


# -------------------------------------------------------------------------------------- jax


@pytest.fixture
def jax_cell():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    p = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in _params().items()}

    def cell(z, params, x):
        return jnp.tanh(z @ params["W"].T + x @ params["U"].T + params["b"])

    params = {k: p[k] for k in ("W", "U", "b")}
    return jax, jnp, cell, params, p["x"], p["z"]


def _jax_dense(jax, cell, z, params, x):
    J = np.asarray(jax.jacrev(lambda zz: cell(zz, params, x))(z))  # (B, d, B, d)
    return np.stack([J[i, :, i, :] for i in range(z.shape[0])])


@needs_jax
@pytest.mark.parametrize("n_samples", [1, 3])
def test_jax_exact_per_probe(jax_cell, n_samples):
    jax, jnp, cell, params, x, z = jax_cell
    from eqsolve.jax import jacobian_reg

    key = jax.random.key(11)
    got = jacobian_reg(cell, z, params, x, key=key, n_samples=n_samples, reduction="none")
    assert got.shape == (B,) and got.dtype == jnp.float64
    keys = jax.random.split(key, n_samples)  # the documented probes
    eps = np.stack([np.asarray(jax.random.normal(k, z.shape, z.dtype)) for k in keys])
    est = _estimates(_jax_dense(jax, cell, z, params, x), eps)
    _assert_distinguishes(est, 1e-12)
    np.testing.assert_allclose(np.asarray(got), est["right"], rtol=1e-12)
    jitted = jax.jit(lambda z, p, x, k: jacobian_reg(cell, z, p, x, key=k, n_samples=n_samples))
    assert abs(float(jitted(z, params, x, key)) - est["right"].mean()) < 1e-12
    legacy = jacobian_reg(cell, z, params, x, key=jax.random.PRNGKey(0), n_samples=n_samples)
    assert legacy.shape == ()


@needs_jax
def test_jax_converges_to_frobenius_norm(jax_cell):
    jax, jnp, cell, params, x, z = jax_cell
    from eqsolve.jax import jacobian_reg

    n = 20_000
    for i in range(B):
        xi, zi = jnp.repeat(x[i : i + 1], n, axis=0), jnp.repeat(z[i : i + 1], n, axis=0)
        got = float(jacobian_reg(cell, zi, params, xi, key=jax.random.key(i)))
        J = _jax_dense(jax, cell, z[i : i + 1], params, x[i : i + 1])
        exact, tol = _hutchinson_bounds(J, n)
        assert tol[0] < 0.06 * exact[0]
        assert abs(got - exact[0]) < tol[0], (i, got, exact[0], tol[0])
    got = np.asarray(
        jacobian_reg(cell, z, params, x, key=jax.random.key(0), n_samples=4000, reduction="none")
    )
    exact, tol = _hutchinson_bounds(_jax_dense(jax, cell, z, params, x), 4000)
    assert np.all(np.abs(got - exact) < tol), (got, exact, tol)


@needs_jax
def test_jax_tuple_state_and_whole_batch(jax_cell):
    jax, jnp, cell, params, x, z = jax_cell
    from eqsolve.jax import jacobian_reg

    def cell_tuple(zs, params, x):
        out = cell(jnp.concatenate(zs, axis=1), params, x)
        return out[:, :2], out[:, 2:]

    key = jax.random.key(3)
    got = jacobian_reg(cell_tuple, (z[:, :2], z[:, 2:]), params, x, key=key, reduction="none")
    k1, k2 = jax.random.split(jax.random.split(key, 1)[0], 2)
    eps = jnp.concatenate(
        [jax.random.normal(k1, (B, 2), z.dtype), jax.random.normal(k2, (B, 4), z.dtype)], axis=1
    )
    J = _jax_dense(jax, cell, z, params, x)
    np.testing.assert_allclose(
        np.asarray(got), _estimates(J, np.asarray(eps)[None])["right"], rtol=1e-12
    )

    key = jax.random.key(4)
    whole = jacobian_reg(cell, z, params, x, key=key, batch_axis=None, reduction="none")
    eps = np.asarray(jax.random.normal(jax.random.split(key, 1)[0], z.shape, z.dtype))
    Jfull = np.asarray(jax.jacrev(lambda zz: cell(zz, params, x))(z)).reshape(B * D, B * D)
    expected = np.sum((eps.reshape(-1) @ Jfull) ** 2) / (B * D)
    assert whole.shape == () and abs(float(whole) - expected) < 1e-12 * expected


@needs_jax
def test_jax_check_grads(jax_cell):
    jax, jnp, cell, params, x, z = jax_cell
    from jax.test_util import check_grads

    from eqsolve.jax import jacobian_reg

    key = jax.random.key(0)

    def reg(params, x):
        return jacobian_reg(cell, z, params, x, key=key, n_samples=2)

    check_grads(jax.jit(reg), (params, x), order=2, modes=["rev"])
    # closed-over parameters are differentiated too
    check_grads(
        lambda W: jacobian_reg(lambda zz: jnp.tanh(zz @ W.T + x @ params["U"].T), z, key=key),
        (params["W"],),
        order=1,
        modes=["rev"],
    )


@needs_jax
def test_jax_with_fixed_point(jax_cell):
    jax, jnp, cell, params, x, z = jax_cell
    from eqsolve.jax import fixed_point, jacobian_reg

    c = jnp.linspace(-1.0, 1.0, D)
    gamma, key = 0.7, jax.random.key(5)
    z0 = jnp.zeros((B, D))

    def solve(params):  # Picard + Neumann: cheap to compile (the solvers have their own tests)
        return fixed_point(
            cell, z0, params, x, tol=1e-12, solver="picard", max_iter=1000, backward="neumann"
        ).value

    def loss(params):
        return jnp.sum(solve(params) * c)

    def total(params):
        zs = solve(params)
        return jnp.sum(zs * c) + gamma * jacobian_reg(cell, zs, params, x, key=key)

    got = jax.jit(jax.grad(total))(params)
    zs = jax.jit(solve)(params)
    g_loss = jax.jit(jax.grad(loss))(params)
    g_reg = jax.jit(jax.grad(lambda p: jacobian_reg(cell, zs, p, x, key=key)))(params)
    for k in params:
        np.testing.assert_allclose(
            np.asarray(got[k]), np.asarray(g_loss[k] + gamma * g_reg[k]), rtol=1e-9, atol=1e-12
        )
    assert float(jnp.max(jnp.abs(g_reg["W"]))) > 1e-3
    # the term is not differentiated through z*: the gradient with respect to z* is zero
    gz = jax.grad(lambda zz: jacobian_reg(cell, zz, params, x, key=key))(zs)
    assert float(jnp.max(jnp.abs(gz))) == 0.0


@needs_jax
def test_jax_bad_arguments(jax_cell):
    jax, jnp, cell, params, x, z = jax_cell
    from eqsolve.jax import jacobian_reg

    key = jax.random.key(0)
    with pytest.raises(ValueError, match="n_samples"):
        jacobian_reg(cell, z, params, x, key=key, n_samples=0)
    with pytest.raises(ValueError, match="reduction"):
        jacobian_reg(cell, z, params, x, key=key, reduction="sum")
    with pytest.raises(ValueError, match="shapes"):
        jacobian_reg(lambda zz, p, x: cell(zz, p, x)[:, :2], z, params, x, key=key)
    with pytest.raises(TypeError, match="key"):
        jacobian_reg(cell, z, params, x)  # the key is required
