"""Fixed-point correction: ``states=(k_1, ..., k_S)`` returns the solver's own iterates at
those iterations, each with a gradient (Bai, Koltun & Kolter, "Deep Equilibrium Optical Flow
Estimation", CVPR 2022).

References independent of eqsolve's recording: the points ``f`` itself was called at (the
loop calls ``f`` once per iteration, at that iteration's iterate), plain iteration computed
by hand in NumPy, cross-backend agreement for the traced JAX loop; gradients against the
dense implicit-function theorem in float64 (``u = (I - J^T)^{-1} g`` per sample with NumPy)
and, for phantom, the framework's own autodiff of the unrolled steps.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import AVAILABLE, from_numpy, to_numpy

needs_torch = pytest.mark.skipif("torch" not in AVAILABLE, reason="torch backend not selected")
needs_jax = pytest.mark.skipif("jax" not in AVAILABLE, reason="jax backend not selected")

B, D, STATES = 6, 10, (0, 2, 5, 9, 60)


def _problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((D, D))
    W *= 0.8 / np.linalg.norm(W, 2)
    x = rng.standard_normal((B, D))
    x[0] *= 20  # saturates tanh: a small Jacobian, so sample 0 stops well before the rest
    return W, x


def _ift_grad_W(W: np.ndarray, x: np.ndarray, z: np.ndarray, g: np.ndarray) -> np.ndarray:
    """dL/dW for L with cotangent g on a point z treated as the fixed point of
    tanh(z W^T + x): u_b = (I - J_b^T)^{-1} g_b, dL/dW = sum_b (s_b * u_b) z_b^T."""
    s = 1 - np.tanh(z @ W.T + x) ** 2
    J = s[:, :, None] * W[None]
    u = np.stack([np.linalg.solve(np.eye(D) - J[b].T, g[b]) for b in range(len(z))])
    return np.einsum("bi,bj->ij", s * u, z)


def test_states_are_the_solvers_own_iterates(backend: str) -> None:
    import array_api_compat

    import eqsolve

    W, x = _problem()
    Wb, xb = from_numpy(W, backend), from_numpy(x, backend)
    seen: list[np.ndarray] = []

    def f(z):  # type: ignore[no-untyped-def]
        if backend != "jax":  # traced under JAX: compared across backends below instead
            seen.append(to_numpy(z).copy())
        a = z @ Wb.T + xb
        return array_api_compat.array_namespace(a).tanh(a)

    sol = eqsolve.fixed_point(f, from_numpy(np.zeros((B, D)), backend), solver="anderson",
                              tol=1e-10, max_iter=60, states=STATES)
    assert bool(np.all(to_numpy(sol.converged)))
    states = [to_numpy(s) for s in sol.states]
    value = to_numpy(sol.value)
    iters = to_numpy(sol.iterations)
    assert iters[0] < iters[1:].min()  # sample 0 stops first: it must be parked
    if backend != "jax":
        last = int(np.max(iters))  # iterations evaluated by the loop (no re-check call)
        for k, s in zip(STATES, states, strict=True):
            ref = seen[k] if k <= last else seen[last]
            np.testing.assert_array_equal(s, ref)
    for k, s in zip(STATES, states, strict=True):
        done = iters < k  # stopped before k: parked at the returned value
        np.testing.assert_array_equal(s[done], value[done])
    np.testing.assert_array_equal(states[0], 0.0)
    # the same iterates on NumPy (computed in the same float64 arithmetic up to BLAS order)
    ref = eqsolve.fixed_point(lambda z: np.tanh(z @ W.T + x), np.zeros((B, D)),
                              solver="anderson", tol=1e-10, max_iter=60, states=STATES)
    for s, r in zip(states, ref.states, strict=True):
        np.testing.assert_allclose(s, r, rtol=1e-9, atol=1e-12)


def test_picard_states_by_hand() -> None:
    import eqsolve

    W, x = _problem()
    sol = eqsolve.fixed_point(lambda z: np.tanh(z @ W.T + x), np.zeros((B, D)),
                              solver="picard", tol=1e-12, max_iter=200, states=(1, 3, 7))
    z = np.zeros((B, D))
    by_hand = {}
    for k in range(1, 8):
        z = np.tanh(z @ W.T + x)
        by_hand[k] = z
    for k, s in zip((1, 3, 7), sol.states, strict=True):
        # (picard forms z + (f(z) - z): a few units of roundoff from f(z) itself)
        np.testing.assert_allclose(s, by_hand[k], rtol=0, atol=1e-13)


def test_states_arguments_and_shapes() -> None:
    import eqsolve

    f = np.cos
    z0 = np.zeros((3, 2))
    for bad, err in [(5, TypeError), ((1.5,), TypeError), ((True,), TypeError),
                     ((-1,), ValueError), ((101,), ValueError), ((2, 2), ValueError)]:
        with pytest.raises(err, match="states"):
            eqsolve.fixed_point(f, z0, states=bad)
    assert eqsolve.fixed_point(f, z0).states is None
    # an iterator is read once (it used to pass the checks and then give no states)
    assert len(eqsolve.fixed_point(f, z0, states=iter((1, 2)), tol=1e-8).states) == 2
    # a tuple state gives tuple states; a float16 state gives float16 states
    sol = eqsolve.fixed_point(lambda t: (np.cos(t[0]), 0.5 * t[1]),
                              (np.zeros((3, 2)), np.ones((3, 4))), states=(1,), tol=1e-8)
    assert isinstance(sol.states[0], tuple) and sol.states[0][1].shape == (3, 4)
    np.testing.assert_allclose(sol.states[0][1], 0.5)
    low = eqsolve.fixed_point(np.cos, np.zeros((3, 2), np.float16), states=(1, 2), tol=1e-3)
    assert low.states[1].dtype == np.float16


@needs_torch
def test_torch_state_gradients_implicit_and_phantom() -> None:
    import torch

    import eqsolve
    import eqsolve.torch as et

    W, x = _problem()
    Wt = torch.nn.Parameter(torch.from_numpy(W))
    xt = torch.from_numpy(x)
    weights = (0.1, 0.2, 0.3, 0.4, 0.5)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ Wt.T + xt)

    sol = et.fixed_point(f, torch.zeros(B, D, dtype=torch.float64), solver="anderson",
                         tol=1e-12, max_iter=60, states=STATES)
    loss = sol.value.square().sum() + sum(
        w * s.square().sum() for w, s in zip(weights, sol.states, strict=True))
    loss.backward()
    ref = _ift_grad_W(W, x, sol.value.detach().numpy(), 2 * sol.value.detach().numpy())
    for w, s in zip(weights, sol.states, strict=True):
        zs = s.detach().numpy()
        ref += _ift_grad_W(W, x, zs, 2 * w * zs)
    np.testing.assert_allclose(Wt.grad.numpy(), ref, rtol=1e-8, atol=1e-10)

    # phantom: each state's gradient is that of k damped steps from the detached state
    Wt.grad = None
    spec = eqsolve.Phantom(steps=3, damping=0.7)
    sol = et.fixed_point(f, torch.zeros(B, D, dtype=torch.float64), tol=1e-12, max_iter=60,
                         states=(2, 5), backward=spec)
    assert sol.nfev >= 3 * 3  # three points, three phantom steps each
    (sol.states[0].sum() + 2 * sol.states[1].sum()).backward()
    got = Wt.grad.clone()
    Wt.grad = None
    total = 0.0
    for c, s in zip((1.0, 2.0), sol.states, strict=True):
        z = s.detach()
        for _ in range(3):
            z = 0.3 * z + 0.7 * f(z)
        total = total + c * z.sum()
    total.backward()
    torch.testing.assert_close(got, Wt.grad, rtol=1e-12, atol=1e-14)

    # the DEQ layer returns (value, states); last_solution keeps them detached
    layer = et.DEQ(states=(1, 4), tol=1e-10)
    value, states = layer(f, torch.zeros(B, D, dtype=torch.float64))
    assert len(states) == 2 and states[1].requires_grad
    assert not layer.last_solution.states[1].requires_grad
    with pytest.raises(ValueError, match="states"):
        et.DEQ(states=(500,), max_iter=100)


@needs_jax
def test_jax_state_gradients_implicit_jit_and_phantom() -> None:
    import jax
    import jax.numpy as jnp

    import eqsolve
    from eqsolve.jax import fixed_point

    W, x = _problem()
    weights = (0.1, 0.2, 0.3, 0.4, 0.5)

    def f(z, W):  # type: ignore[no-untyped-def]
        return jnp.tanh(z @ W.T + x)

    def loss(W):  # type: ignore[no-untyped-def]
        sol = fixed_point(f, jnp.zeros((B, D)), W, solver="anderson", tol=1e-12,
                          max_iter=60, states=STATES)
        return jnp.sum(sol.value**2) + sum(
            w * jnp.sum(s**2) for w, s in zip(weights, sol.states, strict=True))

    sol = fixed_point(f, jnp.zeros((B, D)), W, solver="anderson", tol=1e-12, max_iter=60,
                      states=STATES)
    z = np.asarray(sol.value)
    ref = _ift_grad_W(W, x, z, 2 * z)
    for w, s in zip(weights, sol.states, strict=True):
        zs = np.asarray(s)
        ref += _ift_grad_W(W, x, zs, 2 * w * zs)
    g = jax.grad(loss)(W)
    np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(loss))(W)), ref, rtol=1e-8,
                               atol=1e-10)

    def phantom_loss(W):  # type: ignore[no-untyped-def]
        sol = fixed_point(f, jnp.zeros((B, D)), W, tol=1e-12, max_iter=60, states=(2, 5),
                          backward=eqsolve.Phantom(steps=3, damping=0.7))
        return jnp.sum(sol.states[0]) + 2 * jnp.sum(sol.states[1])

    def by_hand(W):  # type: ignore[no-untyped-def]
        sol = fixed_point(f, jnp.zeros((B, D)), W, tol=1e-12, max_iter=60, states=(2, 5),
                          backward=None)
        total = 0.0
        for c, s in zip((1.0, 2.0), sol.states, strict=True):
            zz = jax.lax.stop_gradient(s)
            for _ in range(3):
                zz = 0.3 * zz + 0.7 * f(zz, W)
            total = total + c * jnp.sum(zz)
        return total

    np.testing.assert_allclose(np.asarray(jax.grad(phantom_loss)(W)),
                               np.asarray(jax.grad(by_hand)(W)), rtol=1e-12, atol=1e-14)


@needs_jax
def test_jax_states_under_vmap_and_grad() -> None:
    import jax
    import jax.numpy as jnp

    from eqsolve.jax import fixed_point

    W = 0.5 * np.eye(3)

    def f(z, x):  # type: ignore[no-untyped-def]
        return jnp.tanh(z @ W.T + x)

    xs = jnp.asarray(np.random.default_rng(0).standard_normal((5, 1, 3)))

    def first_state(x):  # type: ignore[no-untyped-def]
        return fixed_point(f, jnp.zeros((1, 3)), x, states=(1, 2)).states

    s1, s2 = jax.vmap(first_state)(xs)  # the same as the unbatched calls, sample by sample
    for i in range(5):
        a, b = first_state(xs[i])
        np.testing.assert_allclose(np.asarray(s1[i]), np.asarray(a), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(s2[i]), np.asarray(b), rtol=1e-12)
    g = jax.grad(lambda x: jnp.sum(jax.vmap(first_state)(x)[1]))(xs)
    g_one = jax.grad(lambda x: jnp.sum(first_state(x)[1]))(xs[0])
    np.testing.assert_allclose(np.asarray(g[0]), np.asarray(g_one), rtol=1e-10)


@pytest.mark.parametrize("case", ["zero", "tiny", "huge", "coupled"])
def test_states_leave_the_contract_alone(backend: str, case: str) -> None:
    """Requesting states changes nothing the Solution claims: the same value, statuses,
    residuals and f-evals as without them, and the contract checked independently in
    float64 (tests/contract.py) on a zero fixed point, 1e-30 and 1e30 scales and samples
    coupled through the batch mean."""
    import array_api_compat

    import eqsolve
    from contract import check_contract

    rng = np.random.default_rng(3)
    scale = {"zero": 0.0, "tiny": 1e-30, "huge": 1e30, "coupled": 1.0}[case]
    c = scale * rng.standard_normal((4, 5))
    coupling = 0.2 if case == "coupled" else 0.0
    atol = 1e-300 if case == "zero" else 0.0
    cb = from_numpy(c, backend)

    def f(z):  # type: ignore[no-untyped-def]
        xp = array_api_compat.array_namespace(z)
        return 0.5 * z + coupling * xp.mean(z, axis=0, keepdims=True) + cb

    def f64(z: np.ndarray) -> np.ndarray:
        return 0.5 * z + coupling * z.mean(axis=0, keepdims=True) + c

    z0 = from_numpy(np.ones((4, 5)), backend)
    kw = {"tol": 1e-10, "atol": atol, "max_iter": 200, "on_failure": "ignore"}
    plain = eqsolve.fixed_point(f, z0, **kw)
    with_states = eqsolve.fixed_point(f, z0, states=(1, 3, 200), **kw)
    for field in ("value", "status", "residual", "iterations"):
        np.testing.assert_array_equal(to_numpy(getattr(with_states, field)),
                                      to_numpy(getattr(plain, field)))
    assert int(with_states.nfev) == int(plain.nfev)
    check_contract(with_states, f64, tol=1e-10, atol=atol, dtype="float64")
    # a sample that stopped (converged) is parked at its value; an unconverged one (the zero
    # fixed point: the relative residual stays 1 until atol=1e-300 is reached) gives its
    # iterate at max_iter, which need not be its best (returned) point
    done = np.atleast_1d(to_numpy(with_states.converged))
    np.testing.assert_array_equal(to_numpy(with_states.states[2])[done],
                                  to_numpy(with_states.value)[done])
    assert done.all() == (case != "zero")
