"""What one solver step costs, counted rather than timed, and the eager shortcuts' results.

Operation counts are load-independent: the number of non-view ATen operations that one
eager PyTorch step dispatches beyond those of ``f`` itself, counted with a
``TorchDispatchMode``. The bounds are today's counts, so a change that adds work to every
step fails here; issue 12 aims lower (12 per Picard step, 25 per Anderson step).
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

import eqsolve
from conftest import AVAILABLE, from_numpy, to_numpy
from eqsolve.core import auto

TORCH = pytest.mark.skipif(
    "torch" not in AVAILABLE, reason="torch is not installed (or not selected)"
)

#: upper bounds on non-view ATen operations per step, beyond f's own (on this problem some
#: samples of "auto" mix and some do not: it costs Anderson's step plus the plain one and the
#: selection between them; "auto (plain phase)": with a start_ratio that keeps it plain)
BOUNDS = {"picard": 16, "anderson": 37, "auto": 45, "auto (plain phase)": 23}
#: the counts on the same problem before issue 12's first changes (main of 2026-12-01; the
#: plain phase: main of 2026-12-02, which wrote the Anderson ring at every plain step)
BEFORE = {"picard": 28, "anderson": 72, "auto": 79, "auto (plain phase)": 29}

_VIEWS = {
    "view", "_unsafe_view", "t", "transpose", "select", "slice", "unsqueeze", "squeeze",
    "expand", "as_strided", "detach", "alias", "reshape", "permute", "_reshape_alias",
    "unbind", "split", "narrow", "diagonal", "lift_fresh",
}


def _counter():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket.__name__)
            if name not in _VIEWS:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    return Count()


def _tanh_cell():
    """``(W^T, x)`` of the float64 cell ``tanh(z W^T + x)``, ``||W|| = 0.9``, B = 8, n = 32."""
    import torch

    rng = np.random.default_rng(0)
    W = rng.standard_normal((32, 32))
    W *= 0.9 / np.linalg.norm(W, 2)
    return torch.tensor(W.T.copy()), torch.tensor(rng.standard_normal((8, 32)))


@TORCH
@pytest.mark.parametrize("solver", sorted(BOUNDS))
def test_operations_per_step(solver):
    import torch

    Wt, x = _tanh_cell()

    def f(z):
        return torch.tanh(z @ Wt + x)

    z0 = torch.zeros(8, 32, dtype=torch.float64)
    if solver == "auto (plain phase)":  # a start_ratio no step exceeds: it never mixes
        solver = eqsolve.AutoAnderson(start_ratio=1e9)
    with torch.no_grad():
        # warm-up: constants the solvers cache on first use are not a per-step cost
        eqsolve.solve(f, z0, solver=solver, tol=1e-30, max_iter=20, on_failure="ignore")
        one = _counter()
        with one:
            f(z0)
        per_f = sum(one.ops.values())
        totals = {}
        for steps in (10, 20):  # tol=1e-30: every sample stays active, no host-read exits
            c = _counter()
            with c:
                eqsolve.solve(f, z0, solver=solver, tol=1e-30, max_iter=steps, on_failure="ignore")
            totals[steps] = sum(c.ops.values())
    per_step = (totals[20] - totals[10]) / 10 - per_f
    name = solver if isinstance(solver, str) else "auto (plain phase)"
    assert per_step <= BOUNDS[name], (name, per_step)
    assert per_step < BEFORE[name]


#: bounds on the mean operations per step beyond f's own while samples stop at different
#: steps (the end of every DEQ solve), and the counts before the eager step covered it
#: (main of 2026-12-02: each such step went through record())
STOPPING_BOUNDS = {"picard": 35, "anderson": 58, "auto": 54}
STOPPING_BEFORE = {"picard": 52, "anderson": 73, "auto": 74}


@TORCH
@pytest.mark.parametrize("solver", sorted(STOPPING_BOUNDS))
def test_operations_per_step_while_samples_stop(solver):
    import torch

    Wt, x = _tanh_cell()
    # per-sample contraction 0.2 ... 0.9: the samples stop over the second half of the solve
    s = torch.linspace(0.2, 0.9, 8, dtype=torch.float64)[:, None]

    def f(z):
        return torch.tanh(s * (z @ Wt) + x)

    z0 = torch.zeros(8, 32, dtype=torch.float64)
    with torch.no_grad():
        eqsolve.solve(f, z0, solver=solver, tol=1e-10, max_iter=200)  # warm-up
        one = _counter()
        with one:
            f(z0)
        c = _counter()
        with c:
            sol = eqsolve.solve(f, z0, solver=solver, tol=1e-10, max_iter=200)
    iterations = to_numpy(sol.iterations)
    assert bool(to_numpy(sol.converged).all()) and len(set(iterations.tolist())) >= 5
    nfev = int(sol.nfev)
    per_step = (sum(c.ops.values()) - nfev * sum(one.ops.values())) / nfev
    assert per_step <= STOPPING_BOUNDS[solver], (solver, per_step)
    assert per_step < STOPPING_BEFORE[solver]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_auto_mixing_on_the_started_samples_only_gives_the_same_result(backend, dtype,
                                                                       monkeypatch):
    """A batch large enough that the eager step mixes only its started samples: every sample
    gets what the whole-batch mixing gives it (same iterations, values to rounding)."""
    if backend == "jax":
        pytest.skip("JAX runs the loop compiled (k is traced): the eager shortcut never applies")
    rng = np.random.default_rng(1)
    B, n = 600, 16
    W = rng.standard_normal((n, n))
    W *= 0.95 / np.linalg.norm(W, 2)
    # contraction rates spread over the batch: some samples start mixing early, others never
    scale = np.linspace(0.1, 1.0, B)[:, None]
    x = rng.standard_normal((B, n))
    Wt, xs, sc = (from_numpy(a.astype(dtype), backend) for a in (W.T.copy(), x, scale))
    xp = eqsolve.backends.get_backend(backend).xp

    def f(z):
        return xp.tanh(sc * (z @ Wt) + xs)

    z0 = from_numpy(np.zeros((B, n), dtype), backend)
    tol = 1e-5 if dtype == "float32" else 1e-10
    subset = eqsolve.solve(f, z0, tol=tol, max_iter=200)
    monkeypatch.setattr(auto, "SUBSET_MIN_BATCH", 10**9)
    whole = eqsolve.solve(f, z0, tol=tol, max_iter=200)
    assert bool(to_numpy(whole.converged).all()) and bool(to_numpy(subset.converged).all())
    np.testing.assert_array_equal(to_numpy(subset.iterations), to_numpy(whole.iterations))
    atol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(to_numpy(subset.value), to_numpy(whole.value), rtol=0, atol=atol)


@pytest.mark.parametrize("solver", ["anderson", "auto"])
def test_elementwise_history_products_give_the_matmul_result(backend, solver, monkeypatch):
    """Eagerly, many short rows take Anderson's products over the history elementwise: the
    same iterations and values (to rounding) as the batched matrix products."""
    from eqsolve.core import anderson

    if backend == "jax":
        pytest.skip("JAX runs the loop compiled (k is traced): the eager shortcut never applies")
    rng = np.random.default_rng(2)
    B, n = 600, 16
    W = rng.standard_normal((n, n))
    W *= 0.95 / np.linalg.norm(W, 2)
    Wt, xs = (from_numpy(a, backend) for a in (W.T.copy(), rng.standard_normal((B, n))))
    xp = eqsolve.backends.get_backend(backend).xp

    def f(z):
        return xp.tanh(z @ Wt + xs)

    z0 = from_numpy(np.zeros((B, n)), backend)
    assert n <= anderson.SHORT_ROW and B >= anderson.MANY_ROWS  # the premise
    short = eqsolve.solve(f, z0, solver=solver, tol=1e-10, max_iter=200)
    monkeypatch.setattr(anderson, "MANY_ROWS", 10**9)
    full = eqsolve.solve(f, z0, solver=solver, tol=1e-10, max_iter=200)
    assert bool(to_numpy(short.converged).all())
    np.testing.assert_array_equal(to_numpy(short.iterations), to_numpy(full.iterations))
    np.testing.assert_allclose(to_numpy(short.value), to_numpy(full.value), rtol=0, atol=1e-12)
