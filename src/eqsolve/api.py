"""``eqsolve.fixed_point`` and ``eqsolve.solve``: the entry points for any array library.

This is the layer above the adapters: :func:`fixed_point` takes the PyTorch route
(:func:`eqsolve.torch.fixed_point`, which attaches gradients) when the solve runs on
PyTorch with grad mode on, and the array adapter (:func:`eqsolve.solve`) otherwise. PyTorch
is imported only when the arrays are PyTorch's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat as aac

from .adapters.array import check_keywords, solve
from .adapters.backward import Backward, backward_spec, pop_legacy
from .backends import get_backend
from .core.solution import Solution
from .core.solver_base import FixedPointSolver
from .core.structure import BatchAxis, leaves_of

__all__ = ["fixed_point", "solve"]

#: keywords that only the PyTorch route understands
_TORCH_ONLY = ("f_dtype", "on_backward")


def fixed_point(
    f: Callable[[Any], Any],
    z0: Any,
    *,
    solver: str | FixedPointSolver = "auto",
    tol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int = 100,
    batch_axis: BatchAxis = "auto",
    backend: str | None = None,
    on_failure: str = "warn",
    sync_stop: Any = None,
    backward: Backward | str | FixedPointSolver | None = "auto",
    states: Sequence[int] | None = None,
    **solver_options: Any,
) -> Solution:
    """Find ``z`` with ``z = f(z)``; differentiable on PyTorch.

    The arguments and the result are those of :func:`eqsolve.solve` (see there for every
    option). The value and ``nfev`` are the same on every backend whenever nothing needs a
    gradient. When the solve runs on PyTorch (``z0`` is a tensor, or ``backend="torch"``),
    grad mode is on and ``f`` uses a tensor that requires grad, this is
    :func:`eqsolve.torch.fixed_point`: ``Solution.value`` (still ``z*`` bit for bit) carries
    the gradient chosen by ``backward`` to everything ``f`` uses, at the cost of one extra
    call of ``f`` (counted in ``nfev``); its extra keywords (``f_dtype``, ``on_backward``)
    are accepted here too. On JAX use :func:`eqsolve.jax.fixed_point` for gradients;
    elsewhere there is no autodiff and ``backward`` is only validated.

    Args:
        backward: ``eqsolve.Implicit(...)`` (default ``"auto"``), ``eqsolve.Phantom(...)``,
            ``eqsolve.JFB()``, a shorthand, or ``None`` (see
            :mod:`eqsolve.adapters.backward`).

    Example:
        >>> import numpy as np, eqsolve
        >>> sol = eqsolve.fixed_point(np.cos, np.zeros((3, 1)), tol=1e-10)
        >>> bool(sol.converged.all()), round(float(sol.value[0, 0]), 6)
        (True, 0.739085)
    """
    if _runs_on_torch(z0, backend):
        from .adapters.torch import fixed_point as torch_fixed_point

        if backend is not None:  # e.g. a NumPy z0 with backend="torch"
            convert = get_backend("torch").convert
            z0 = type(z0)(convert(t) for t in z0) if isinstance(z0, (tuple, list)) else convert(z0)
        return torch_fixed_point(
            f, z0, solver=solver, tol=tol, atol=atol, max_iter=max_iter, batch_axis=batch_axis,
            on_failure=on_failure, backward=backward, states=states,
            sync_stop=False if sync_stop is None else sync_stop, **solver_options,
        )
    backward_spec(backward, pop_legacy(solver_options), solver=solver)  # validated: no autodiff
    torch_only = [k for k in _TORCH_ONLY if k in solver_options]
    if torch_only:
        raise TypeError(
            f"{', '.join(torch_only)} apply only to solves on PyTorch (z0 a torch.Tensor or "
            "backend='torch')"
        )
    check_keywords(solver, solver_options, "fixed_point", ("backward",))
    return solve(
        f, z0, solver=solver, tol=tol, atol=atol, max_iter=max_iter, batch_axis=batch_axis,
        backend=backend, on_failure=on_failure, sync_stop=sync_stop, states=states,
        **solver_options,
    )


def _runs_on_torch(z0: Any, backend: str | None) -> bool:
    """Whether the solve is on PyTorch (only ``backend="torch"`` imports torch here)."""
    leaves = leaves_of(z0)
    if not leaves or not all(aac.is_array_api_obj(t) for t in leaves):
        return False  # solve() gives the error that names the bad argument
    if backend is not None:
        return backend == "torch" and _torch_importable()
    return all(aac.is_torch_array(t) for t in leaves)


def _torch_importable() -> bool:
    try:
        import torch  # noqa: F401  (backend="torch": the solve imports it anyway)
    except ImportError:  # solve() then raises the backend's clear error
        return False
    return True
