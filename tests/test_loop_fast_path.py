"""The eager driver's quiet steps give the general step's result bit for bit.

``run_python_loop`` takes :func:`loop_step_eager`, whose quiet step skips the per-sample
bookkeeping, both while every sample is active and after some have stopped. Here the same
solve runs once through that driver and once through the general ``loop_step`` only, and
every field of the final state must be identical, including on batches where samples stop at
different steps, where one sample turns NaN, where the residual does not decrease
monotonically (the best-iterate bookkeeping is then exercised), and where ``f`` couples the
samples or changes between calls, so that a stopped sample's rule stops holding at its
parked point, or starts holding at the parked point of a sample stopped by NaN.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import AVAILABLE, from_numpy, to_numpy
from eqsolve.backends import get_backend
from eqsolve.core import loop as core_loop
from eqsolve.core.driver import run_python_loop
from eqsolve.core.solver_base import make_solver
from problems import tanh_cell

EAGER = [b for b in AVAILABLE if b in ("numpy", "torch", "array_api_strict", "cupy")]


def general_only(xp, f, z0, solver, rule):
    state = core_loop.loop_init(xp, f, z0, solver, rule)
    while state.k < rule.max_iter and bool(xp.any(state.active)):
        state = core_loop.loop_step(xp, f, state, solver, rule)
    if bool(xp.any(core_loop.needs_verification(xp, state))):
        state = core_loop.verify(xp, f, state, solver, rule)
    return state


def _fields(state) -> dict[str, np.ndarray]:
    return {
        name: to_numpy(getattr(state, name))
        for name in (
            "z", "g", "best_z", "best_res", "best_ratio", "at_best", "active", "status",
            "iterations", "reopened", "k",
        )
    }


def _changing(xp, z, out, calls, backend):
    """A map that changes between calls (tol 1e-10): from the 3rd call sample 0 maps z to
    z (1 + 5e-11), so it stops CONVERGED at once, and from the 13th to z (1 + 1.2e-10): its
    rule fails by 20% at its parked point. Sample 2 is NaN at the 5th call (stopped
    NONFINITE) and from the 9th maps z to z (1 + 5e-11): its rule holds where it is parked."""
    scale = np.ones((6, 1))
    rows = np.zeros((6, 1))
    if calls >= 2:
        rows[0], scale[0] = 1, 1 + (1.2e-10 if calls >= 12 else 5e-11)
    if calls == 4:
        scale[2] = np.nan
    if calls >= 8:
        rows[2], scale[2] = 1, 1 + 5e-11
    rows, scale = from_numpy(rows, backend), from_numpy(scale, backend)
    return xp.where(rows > 0, z * scale, out * scale)


@pytest.mark.parametrize("case", ["spread", "nan", "nonmonotone", "coupled", "changing"])
@pytest.mark.parametrize("solver_name", ["picard", "anderson", "broyden", "auto"])
@pytest.mark.parametrize(
    "backend",
    EAGER or [pytest.param("none", marks=pytest.mark.skip(reason="no eager backend selected"))],
)
def test_all_active_step_matches_general_step(backend, solver_name, case):
    xp = get_backend(backend).xp
    cell = tanh_cell(d=12, batch=6, seed=3, radius=0.8)
    W_np, inj_np = cell.W, cell.inj
    if case == "nonmonotone":
        # a strongly non-normal J (0.6 I + 1.5 shift): residuals grow for a while before they
        # shrink, so "every residual below its best" fails on many all-active steps
        W_np = 0.6 * np.eye(12) + 1.5 * np.eye(12, k=1)
        inj_np = 0.3 * inj_np
    W, inj = from_numpy(W_np.T.copy(), backend), from_numpy(inj_np, backend)
    nan_row = np.zeros((6, 1))
    nan_row[2] = np.nan

    def f(z):
        out = xp.tanh(z @ W + inj)
        if case == "coupled":  # every sample sees the batch mean: parked samples drift
            out = out + 1e-9 * xp.mean(z, axis=0, keepdims=True)
        if case == "changing":
            out = _changing(xp, z, out, int(k[0]), backend)
        if case == "nan" and int(k[0]) >= 4:  # sample 2 turns NaN at the 5th evaluation
            out = out + from_numpy(nan_row, backend)
        k[0] += 1
        return out

    # samples 0 and 3 start much closer to the fixed point, so they stop earlier
    z0_np = np.random.default_rng(0).standard_normal((6, 12))
    z0_np[[0, 3]] *= 1e-6 if case == "spread" else 1.0
    solver = make_solver(solver_name, {})
    # short budgets end mid-transient, where the best iterate is not the last one
    for max_iter in (3, 6, 10, 80):
        rule = core_loop.StopRule(tol=1e-10, atol=0.0, max_iter=max_iter)
        results = []
        for drive in (run_python_loop, general_only):
            k = [0]
            results.append(_fields(drive(xp, f, from_numpy(z0_np, backend), solver, rule)))
        fast, general = results
        for name in fast:
            np.testing.assert_array_equal(fast[name], general[name], err_msg=f"{name}, {max_iter}")
