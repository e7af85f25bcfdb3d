"""Shared by the fused CuPy driver's tests: problems, solvers and the iterate-for-iterate check.

Test helper, not a test file. :func:`run_both` runs the generic Array-API loop and the fused
driver (``eqsolve.backends.cupy.fused.run_fused``) on one executor and :func:`assert_same_run`
compares them: every point handed to ``f``, per-sample status / iterations / best iterate /
residual, and ``nfev``.
"""

from __future__ import annotations

import numpy as np

from conftest import to_numpy
from eqsolve import Anderson, Broyden, Picard
from eqsolve.backends.cupy import fused as drv
from eqsolve.core.driver import run_python_loop
from problems import tanh_cell

TRAJ_ATOL = {"float64": 1e-12, "float32": 1e-5}
TOL = {"float64": 1e-10, "float32": 1e-5}

SOLVERS = {
    "picard": Picard(),
    "picard-damped": Picard(beta=0.8),
    "anderson": Anderson(m=5),
    "anderson-m3-beta": Anderson(m=3, beta=0.7),  # the ring wraps; damped mixing
    "anderson-safeguard": Anderson(m=4, max_coefficient=1.3),  # some plain steps
    "broyden": Broyden(memory=30),
    "broyden-restart": Broyden(memory=4),  # restarts every 4 updates
}


class Recorder:
    """``f`` that keeps a copy of every point it is given."""

    def __init__(self, f):
        self.f = f
        self.inputs: list[np.ndarray] = []

    def __call__(self, z):
        self.inputs.append(to_numpy(z).copy())
        return self.f(z)


def run_both(executor, f, z0, solver, rule, sync_every=1, f_fused=None):
    """(generic state, its f inputs, fused state, its f inputs) for one problem.

    ``f_fused``: a separate copy of ``f`` for the fused run when ``f`` has state.
    """
    rg, rf = Recorder(f), Recorder(f if f_fused is None else f_fused)
    gen = run_python_loop(np, rg, z0, solver, rule)
    fused = drv.run_fused(executor, rf, z0, solver, rule, sync_every=sync_every)
    return gen, rg.inputs, fused, rf.inputs


def assert_same_run(gen, gen_in, fused, fused_in, dtype, sync_every=1):
    atol = TRAJ_ATOL[dtype]
    np.testing.assert_array_equal(fused.status, gen.status)
    np.testing.assert_array_equal(fused.iterations, gen.iterations)
    np.testing.assert_array_equal(fused.active, gen.active)
    assert fused.k == gen.k  # nfev = k + 1
    assert fused.status.dtype == gen.status.dtype == np.int32
    assert fused.iterations.dtype == np.int32 and fused.best_res.dtype == np.dtype(dtype)
    np.testing.assert_allclose(fused.best_z, gen.best_z, rtol=0, atol=atol)
    np.testing.assert_allclose(fused.best_res, gen.best_res, rtol=1e-2, atol=atol)
    # iterate for iterate: the same points reach f, in the same order
    assert len(gen_in) == gen.k + 1
    if sync_every == 1:
        assert len(fused_in) == len(gen_in)
    else:  # the host learns late that all stopped: extra calls, on the parked batch only
        assert len(gen_in) <= len(fused_in) < len(gen_in) + sync_every
        for extra in fused_in[len(gen_in) :]:
            np.testing.assert_array_equal(extra, fused.best_z)
    for i, (a, b) in enumerate(zip(gen_in, fused_in, strict=False)):
        np.testing.assert_allclose(b, a, rtol=0, atol=atol, err_msg=f"call {i} of f")


def make_problem(dtype, batch=4, d=16, seed=0):
    cell = tanh_cell(d=d, batch=batch, seed=seed)
    z0 = (0.1 * np.random.default_rng(seed + 1).standard_normal(cell.inj.shape)).astype(dtype)
    return cell, z0


def nan_at(cell, row, call, value=np.nan):
    """``cell`` whose output row ``row`` is ``value`` on the ``call``-th call."""
    count = [0]

    def f(z):
        count[0] += 1
        out = cell(z)
        if count[0] == call:
            out = out.copy()
            out[row, 3] = value
        return out

    return f


def bad_cell(cell):
    """Sample 1 gets a NaN on the 3rd call of f (step 2), sample 2 an inf on the 4th."""
    return nan_at(nan_at(cell, 1, 3), 2, 4, np.inf)
