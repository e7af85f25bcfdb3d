"""PyTorch rows of the training-step workload: one step = forward solve + backward + the
parameter gradients of ``L = sum(c * z*)``, float32, parameters as leaf tensors.

Rows: eqsolve's :data:`~bench.training_types.EQSOLVE_ROWS` (``eqsolve.torch.fixed_point``);
torchdeq's ``get_deq(ift=True)`` with Anderson forward and backward, its defaults and the tuned
``lam`` of :mod:`bench.peers._torchdeq`; and the floor, backprop through ``K`` unrolled
applications of the cell from ``z0 = 0`` (``K`` = eqsolve's forward f-evals).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .peers._torchdeq import DEFAULTS as TORCHDEQ_DEFAULTS
from .peers._torchdeq import TUNED as TORCHDEQ_TUNED
from .training_problems import TrainingProblem
from .training_types import EQSOLVE_ROWS, StepOutput, StepRow


def forward_fevals(pr: TrainingProblem, tol: float, max_iter: int) -> int:
    """f-evaluations of eqsolve's default forward solve (no graph): the floor's ``K``."""
    import torch

    import eqsolve

    cell, P, x, _, z0 = _tensors(pr)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = eqsolve.solve(lambda z: cell(z, P, x), z0, tol=tol, max_iter=max_iter)
    return int(sol.nfev)


def _tensors(pr: TrainingProblem) -> tuple[Any, dict[str, Any], Any, Any, Any]:
    import torch

    P = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in pr.params.items()}
    x = torch.tensor(pr.x, dtype=torch.float32)
    c = torch.tensor(pr.c, dtype=torch.float32)
    return pr.cell("torch"), P, x, c, torch.zeros_like(c)


def rows(pr: TrainingProblem, tol: float, max_iter: int, K: int) -> list[StepRow]:
    """The torch rows of one (problem, tolerance)."""
    import torch

    import eqsolve.torch as et

    cell, P, x, c, z0 = _tensors(pr)
    params = list(P.values())

    def grads_of(z: Any) -> tuple[Any, ...]:
        return tuple(torch.autograd.grad((z * c).sum(), params))

    def to_numpy(out: tuple[Any, tuple[Any, ...], int | None]) -> StepOutput:
        z, grads, nfev = out
        g = {k: t.detach().double().numpy() for k, t in zip(P, grads, strict=True)}
        return z.detach().double().numpy(), g, nfev

    out: list[StepRow] = []
    for method, backward, variant in EQSOLVE_ROWS:

        def eq_step(method: str = method, backward: str = backward) -> Any:
            sol = et.fixed_point(lambda z: cell(z, P, x), z0, solver=method, tol=tol,
                                 max_iter=max_iter, on_failure="ignore", backward=backward)
            return sol.value, grads_of(sol.value), int(sol.nfev)

        out.append(StepRow("torch", "eqsolve", method, variant, eq_step, to_numpy,
                           {"solver": method, "tol": tol, "max_iter": max_iter,
                            "backward": backward}))
    for variant, hyper in (("defaults", TORCHDEQ_DEFAULTS["anderson"]),
                           ("tuned", TORCHDEQ_TUNED["anderson"])):
        out.append(_torchdeq_row(cell, P, x, z0, grads_of, to_numpy, tol, max_iter, variant,
                                 dict(hyper)))

    def unrolled() -> Any:
        z = z0
        for _ in range(K):
            z = cell(z, P, x)
        return z, grads_of(z), K

    out.append(StepRow("torch", "unrolled", f"K={K}", "floor", unrolled, to_numpy, {"K": K}))
    return out


def _torchdeq_row(cell: Any, P: dict[str, Any], x: Any, z0: Any, grads_of: Any, to_numpy: Any,
                  tol: float, max_iter: int, variant: str, hyper: dict[str, Any]) -> StepRow:
    from torchdeq import get_deq

    deq = get_deq(
        core="indexing", ift=True, f_solver="anderson", f_max_iter=max_iter, f_tol=tol,
        f_stop_mode="rel", b_solver="anderson", b_max_iter=max_iter, b_tol=tol,
        b_stop_mode="rel",
    )
    deq.train()

    def step() -> Any:
        z_out, info = deq(lambda z: cell(z, P, x), z0, solver_kwargs=dict(hyper))
        z = z_out[-1]
        nstep = info.get("nstep") if isinstance(info, dict) else None
        nfev = int(np.max(np.asarray(nstep))) if nstep is not None else None
        return z, grads_of(z), nfev

    settings = {"f_solver": "anderson", "b_solver": "anderson", "tol": tol,
                "stop_mode": "rel", "max_iter": max_iter, "ift": True, **hyper}
    return StepRow("torch", "torchdeq", "anderson", variant, step, to_numpy, settings)
