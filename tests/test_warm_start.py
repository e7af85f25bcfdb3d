"""Warm starts: a previous fixed point as ``z0`` gives the same answer in fewer f-evals.

The workload is consecutive frames (or training steps on the same samples): the input
injection drifts a little between solves, ``x_t = x_0 + 0.02 t d``. Each frame is solved
cold (from zeros) and warm (from the previous frame's ``z*``); both must converge, agree
within what the stopping rule allows (``||z - z*|| <= tol ||f(z)|| / (1 - L)`` for a map of
Lipschitz constant ``L = 0.8``; checked in float64 with NumPy), and the warm one must use
fewer calls of ``f``.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import AVAILABLE, from_numpy, to_numpy

needs_torch = pytest.mark.skipif("torch" not in AVAILABLE, reason="torch backend not selected")
needs_jax = pytest.mark.skipif("jax" not in AVAILABLE, reason="jax backend not selected")

B, D, FRAMES, TOL, L = 16, 24, 8, 1e-8, 0.8


def _frames() -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    W = rng.standard_normal((D, D))
    W *= L / np.linalg.norm(W, 2)
    x0, drift = rng.standard_normal((B, D)), rng.standard_normal((B, D))
    return W, [x0 + 0.02 * t * drift for t in range(FRAMES)]


def _check(cold: list[tuple[np.ndarray, int]], warm: list[tuple[np.ndarray, int]]) -> None:
    for (zc, nc), (zw, nw) in zip(cold[1:], warm[1:], strict=True):
        bound = 2 * TOL * np.linalg.norm(zc, axis=-1) / (1 - L)
        assert np.all(np.linalg.norm(zc - zw, axis=-1) <= bound + 1e-15)
        assert nw < nc, (nw, nc)


def test_warm_start_any_backend(backend: str) -> None:
    import array_api_compat

    import eqsolve

    W, xs = _frames()
    Wb = from_numpy(W, backend)
    cold, warm = [], []
    z_prev = None
    for x in xs:
        xb = from_numpy(x, backend)

        def f(z, xb=xb):  # type: ignore[no-untyped-def]
            a = z @ Wb.T + xb
            return array_api_compat.array_namespace(a).tanh(a)

        zeros = from_numpy(np.zeros((B, D)), backend)
        sc = eqsolve.fixed_point(f, zeros, tol=TOL, backend=backend, max_iter=200)
        sw = eqsolve.fixed_point(f, zeros if z_prev is None else z_prev, tol=TOL,
                                 backend=backend, max_iter=200)
        assert bool(np.all(to_numpy(sc.converged))) and bool(np.all(to_numpy(sw.converged)))
        cold.append((to_numpy(sc.value), int(sc.nfev)))
        warm.append((to_numpy(sw.value), int(sw.nfev)))
        z_prev = sw.value
    _check(cold, warm)


@needs_torch
def test_warm_start_torch_deq_layer() -> None:
    """Warm start from ``DEQ.last_solution.value`` (detached), with gradients on."""
    import torch

    import eqsolve.torch as et

    W, xs = _frames()
    Wt = torch.nn.Parameter(torch.from_numpy(W))
    layer = et.DEQ(tol=TOL, max_iter=200)
    cold, warm = [], []
    for x in xs:
        xt = torch.from_numpy(x)

        def f(z: torch.Tensor, xt: torch.Tensor = xt) -> torch.Tensor:
            return torch.tanh(z @ Wt.T + xt)

        zeros = torch.zeros(B, D, dtype=torch.float64)
        zc = layer(f, zeros)
        cold.append((zc.detach().numpy(), int(layer.last_solution.nfev)))
        z0 = zeros if len(warm) == 0 else torch.from_numpy(warm[-1][0])
        zw = layer(f, z0)
        warm.append((zw.detach().numpy(), int(layer.last_solution.nfev)))
        zw.sum().backward()  # the warm-started value carries the implicit gradient
    assert Wt.grad is not None and bool(torch.isfinite(Wt.grad).all())
    _check(cold, warm)


@needs_jax
def test_warm_start_jax_jit() -> None:
    import jax
    import jax.numpy as jnp

    from eqsolve.jax import fixed_point

    W, xs = _frames()

    @jax.jit
    def solve(z0, x):  # type: ignore[no-untyped-def]
        sol = fixed_point(lambda z, x: jnp.tanh(z @ W.T + x), z0, x, tol=TOL, max_iter=200)
        return sol.value, sol.nfev, sol.converged

    cold, warm = [], []
    z_prev = jnp.zeros((B, D))
    for x in xs:
        zc, nc, cc = solve(jnp.zeros((B, D)), x)
        zw, nw, cw = solve(z_prev, x)
        assert bool(cc.all()) and bool(cw.all())
        cold.append((np.asarray(zc), int(nc)))
        warm.append((np.asarray(zw), int(nw)))
        z_prev = zw
    _check(cold, warm)
