"""The default solver ``"auto"``: plain steps while plain iteration is fast, Anderson after.

Checked against the two solvers it is made of: on a fast-contracting cell it takes exactly
the plain-iteration iterates; on a slow one it starts mixing within the first steps and needs
about as many evaluations as Anderson (far fewer than plain iteration); per sample, so a
batch mixing both kinds gives each sample what it gets alone.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import eqsolve
from conftest import AVAILABLE, from_numpy, to_numpy
from problems import tanh_cell


def _solve(backend, cell, solver, **kw):
    W, inj = from_numpy(cell.W.T.copy(), backend), from_numpy(cell.inj, backend)
    xp = eqsolve.backends.get_backend(backend).xp
    z0 = from_numpy(np.zeros(cell.inj.shape), backend)
    return eqsolve.solve(lambda z: xp.tanh(z @ W + inj), z0, solver=solver, tol=1e-10, **kw)


def test_default_solver_is_auto():
    for fn in (eqsolve.solve, eqsolve.fixed_point):
        assert inspect.signature(fn).parameters.get("solver") is None or (
            inspect.signature(fn).parameters["solver"].default == "auto"
        )
    assert inspect.signature(eqsolve.solve).parameters["solver"].default == "auto"


@pytest.mark.parametrize("backend", AVAILABLE)
def test_fast_contraction_is_plain_iteration(backend):
    cell = tanh_cell(d=16, batch=4, radius=0.3, seed=0)  # g shrinks >= 3x per step
    auto, plain = _solve(backend, cell, "auto"), _solve(backend, cell, "picard")
    assert int(auto.nfev) == int(plain.nfev)
    np.testing.assert_array_equal(to_numpy(auto.value), to_numpy(plain.value))


@pytest.mark.parametrize("backend", AVAILABLE)
def test_slow_contraction_is_accelerated(backend):
    cell = tanh_cell(d=32, batch=3, radius=0.99, seed=1, sym=True)
    auto = _solve(backend, cell, "auto", max_iter=2000)
    anderson = _solve(backend, cell, "anderson", max_iter=2000)
    plain = _solve(backend, cell, "picard", max_iter=2000)
    assert bool(np.all(to_numpy(auto.converged)))
    assert int(auto.nfev) <= int(anderson.nfev) + 3
    assert int(auto.nfev) < 0.5 * int(plain.nfev)
    np.testing.assert_allclose(to_numpy(auto.value), to_numpy(anderson.value), atol=1e-8)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_decision_is_per_sample(backend):
    fast = tanh_cell(d=16, batch=2, radius=0.3, seed=0)
    slow = tanh_cell(d=16, batch=2, radius=0.99, seed=1, sym=True)
    # one batch where sample 0 uses the fast cell's map and sample 1 the slow one's
    Ws = from_numpy(np.stack([fast.W.T, slow.W.T]), backend)
    inj = from_numpy(np.stack([fast.inj[0], slow.inj[0]]), backend)
    xp = eqsolve.backends.get_backend(backend).xp
    z0 = from_numpy(np.zeros((2, 16)), backend)

    def f(z):
        return xp.tanh(xp.matmul(z[:, None, :], Ws)[:, 0, :] + inj)

    both = eqsolve.solve(f, z0, solver="auto", tol=1e-10, max_iter=2000)
    alone = [
        eqsolve.solve(
            lambda z, i=i: xp.tanh(z @ Ws[i, ...] + inj[i : i + 1, ...]),
            z0[i : i + 1, ...],
            solver="auto",
            tol=1e-10,
            max_iter=2000,
        )
        for i in range(2)
    ]
    for i in range(2):
        np.testing.assert_allclose(
            to_numpy(both.value)[i], to_numpy(alone[i].value)[0], rtol=0, atol=1e-12
        )
        assert int(to_numpy(both.iterations)[i]) == int(to_numpy(alone[i].iterations)[0])


def test_start_ratio_is_checked():
    with pytest.raises(ValueError, match="start_ratio"):
        eqsolve.AutoAnderson(start_ratio=0.0)


@pytest.mark.parametrize("m", [1, 3, 5])
@pytest.mark.parametrize("start", [1, 2, 7])
def test_eager_plain_phase_writes_the_same_history(m, start):
    """Eagerly, while no sample has started, the history is kept by reference and written at
    the first start (one Gram product); under a trace it is written every step. Both give the
    same ring, Gram matrix and started samples (numpy, the traced path taken with ``k`` a 0-d
    array), at scales where plain squares would overflow or underflow."""
    xp = eqsolve.backends.get_backend("numpy").xp
    solver = eqsolve.AutoAnderson(m=m)
    rng = np.random.default_rng(start)
    B, n = 4, 6
    scale = np.array([1e-160, 1.0, 1e150, 3.0])[:, None]
    z, g = rng.standard_normal((B, n)) * scale, rng.standard_normal((B, n)) * scale
    lazy, ring = solver.init(xp, z, g), solver.init(xp, z.copy(), g.copy())
    for k in range(9):
        # residuals shrink 50x per step; at step `start` sample 1 (and from step 7 on,
        # sample 2) shrinks by less than start_ratio = 0.4
        shrink = np.full((B, 1), 0.02)
        shrink[1] = 0.9 if k + 1 >= start else 0.02
        shrink[2] = 0.9 if k + 1 >= 7 else 0.02
        z_new = z + g
        g_new = rng.standard_normal((B, n)) * scale * shrink ** (k + 1)
        lazy = solver.update(xp, lazy, z, g, z_new, g_new, k)
        ring = solver.update(xp, ring, z, g, z_new, g_new, np.asarray(k))
        z, g = z_new, g_new
        np.testing.assert_array_equal(lazy.started, ring.started)
        assert (lazy.pending is None) == bool(np.any(ring.started)), k
        if lazy.pending is None:
            np.testing.assert_array_equal(lazy.F, ring.F)
            np.testing.assert_array_equal(lazy.G, ring.G)
            np.testing.assert_allclose(lazy.H, ring.H, rtol=1e-13, atol=0)
        proposal = solver.propose(xp, lazy, z, g, k + 1)
        np.testing.assert_allclose(
            proposal, solver.propose(xp, ring, z, g, np.asarray(k + 1)), rtol=1e-9, atol=0
        )
    assert lazy.pending is None and list(lazy.started) == [False, True, True, False]
