"""torchdeq 0.1.0 peers (PyTorch): ``anderson``, ``broyden``, ``fixed_point_iter``.

torchdeq's solvers (``torchdeq.solver.get_solver(name)``, the functions its ``DEQ`` modules
call under ``torch.no_grad()``) stop when ``max_b err_b < tol``, with per-sample 2-norms:
``stop_mode="rel"`` gives ``err_b = ||f(z_b) - z_b|| / (||f(z_b)|| + 1e-9)``, which is the
benchmark criterion, so these rows pass ``tol`` unchanged with ``stop_mode="rel"``
(torchdeq's default ``stop_mode="abs"`` would need a scale). The whole batch stops
together: samples that converged early keep being updated (and returned at their lowest
residual). What is returned: ``anderson`` and ``fixed_point_iter`` return ``f(z)`` for the
``z`` whose residual was measured (one extra contraction step for free); ``broyden`` returns
``z`` itself. ``max_iter`` counts f-evaluations for ``anderson`` (two to start, then one per
step) and ``fixed_point_iter``, and steps for ``broyden`` (``max_iter + 1`` evaluations).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..case import Case
from ._common import PeerSolver

#: torchdeq's own defaults (torchdeq/solver/*.py, torchdeq 0.1.0)
DEFAULTS: dict[str, dict[str, Any]] = {
    "anderson": {"m": 6, "lam": 1e-4, "tau": 1.0},
    "broyden": {"LBFGS_thres": None, "ls": False},
    "fixed_point_iter": {"tau": 1.0},
}

#: tuned settings: chosen on P1 (tanh), P2 (tanh-wide) and P4 (sym), float64 and float32
TUNED: dict[str, dict[str, Any]] = {
    # ``lam`` is an absolute ridge added to the per-sample Gram matrix G G^T of the last m
    # residuals. Once ||g||^2 falls below lam (1e-4: residual norms ~1e-2, long before the
    # 1e-8 target) the mixing weights degenerate to a plain average of the last m images,
    # which converges slower than plain iteration (P1: 46 f-evals vs 18; P4: 670 vs 218).
    # lam=1e-20 only guards exact singularity (a sample whose residual is exactly 0); it
    # gives textbook Anderson: P1 18, P4 52 f-evals. m=6 (the default) is as good as 3..10.
    "anderson": {"m": 6, "lam": 1e-20, "tau": 1.0},
    # LBFGS_thres=None keeps max_iter rank-one pairs: two (B, n, max_iter) buffers are
    # allocated and zero-filled on every call (2 x 131 MB on P1 with max_iter=1000), which
    # dominates the solve (P1, one run: 165 ms vs 35 ms). 100 pairs cover the steps P1/P2/P4
    # need (18/48/60); fewer is unsafe: torchdeq overwrites the oldest pair in place of a
    # proper limited-memory update, and P4 diverged (NaN) with 50.
    "broyden": {"LBFGS_thres": 100, "ls": False},
    # fixed_point_iter: its only knob is the damping tau; tau < 1 only slows these
    # problems down, so there is no tuned row.
}

METHOD = {"anderson": "anderson", "broyden": "broyden", "fixed_point_iter": "picard"}


def peers(case: Case, *, tol: float, max_iter: int) -> list[PeerSolver]:
    rows = []
    for name in ("anderson", "broyden", "fixed_point_iter"):
        rows.append(_row(case, name, "defaults", DEFAULTS[name], tol, max_iter))
        if name in TUNED:
            rows.append(_row(case, name, "tuned", TUNED[name], tol, max_iter))
    return rows


def _row(
    case: Case, name: str, variant: str, hyper: dict[str, Any], tol: float, max_iter: int
) -> PeerSolver:
    kwargs: dict[str, Any] = {
        "max_iter": int(max_iter),
        "tol": float(tol),
        "stop_mode": "rel",
        **hyper,
    }
    if isinstance(kwargs.get("LBFGS_thres"), int):  # never more memory than steps
        kwargs["LBFGS_thres"] = min(kwargs["LBFGS_thres"], int(max_iter))

    def make(f: Callable[[Any], Any]) -> Callable[[], Any]:
        import torch
        from torchdeq.solver import get_solver

        solver = get_solver(name)
        z0 = case.z0

        def solve() -> Any:
            with torch.no_grad():
                z, _, _ = solver(f, z0, **kwargs)
            return z

        return solve

    return PeerSolver(
        library="torchdeq",
        method=METHOD[name],
        variant=variant,
        settings=dict(kwargs),
        make=make,
        grad=_make_grad(case, name, kwargs),
        notes=(
            "stops when max over samples of ||f(z)-z||/(||f(z)||+1e-9) < tol "
            "(stop_mode='rel'); whole batch iterates until the last sample converges"
        ),
        call=f"torchdeq.solver.get_solver({name!r})",
    )


def _make_grad(case: Case, name: str, kwargs: dict[str, Any]) -> Callable[[Any], Any]:
    """dL/dx through torchdeq's DEQ module with ``ift=True`` (implicit backward)."""
    hyper = {k: v for k, v in kwargs.items() if k not in ("max_iter", "tol", "stop_mode")}

    def grad(g: Any) -> Any:
        import torch
        from torchdeq import get_deq

        deq = get_deq(
            core="indexing",
            ift=True,
            f_solver=name,
            f_max_iter=kwargs["max_iter"],
            f_tol=kwargs["tol"],
            f_stop_mode="rel",
            b_solver=name,
            b_max_iter=kwargs["max_iter"],
            b_tol=kwargs["tol"],
            b_stop_mode="rel",
        )
        deq.train()
        x = case.x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            z_out, _ = deq(lambda z: case.f_x(z, x), case.z0, solver_kwargs=dict(hyper))
            loss = (z_out[-1] * g).sum()
            (gx,) = torch.autograd.grad(loss, x)
        return gx

    return grad
