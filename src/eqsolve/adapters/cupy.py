"""CuPy adapter: the user-facing entry points, implicit gradients from a user VJP, DLPack.

:func:`solve` and :func:`fixed_point` solve on CuPy with the run options of
:mod:`eqsolve.backends.cupy.options` (``fused``, ``sync_every``); the CuPy backend
(:mod:`eqsolve.backends.cupy`) runs the fused kernels or the generic Array-API step.

**Gradients.** CuPy has no autodiff: :func:`fixed_point` takes ``vjp(z, v) = J_f(z)^T v``
and returns the solution with a :class:`Pullback` ``g -> u`` solving the adjoint fixed
point ``u = g + J_f(z*)^T u`` (``core.adjoint``; its loop runs on the same fused driver).
``dL/dtheta = u^T df/dtheta(z*)`` is then one VJP of ``f`` with respect to its parameters.

This module imports CuPy only when an array is converted or a solve runs (through
``get_backend("cupy")``), so it imports without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..api import solve as _api_solve
from ..backends import get_backend
from ..backends.cupy.options import CupyOptions, options
from ..core.adjoint import (
    AdjointInfo,
    adjoint_solve,
    check_backward_limits,
    check_backward_options,
    default_adjoint_tol,
)
from ..core.solution import ConvergenceError, ConvergenceWarning, Solution, Status
from ..core.solver_base import FixedPointSolver
from ..core.structure import Structure, structure_of
from ..core.validation import ON_FAILURE

__all__ = [
    "ADJOINT_METHODS",
    "Pullback",
    "as_cupy",
    "fixed_point",
    "solve",
    "to_jax",
    "to_torch",
]

#: adjoint methods accepted by :func:`fixed_point` (``backward=``), or a solver object
ADJOINT_METHODS: tuple[str, ...] = ("anderson", "neumann", "broyden", "gmres")


# --------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------


def _solve_on(
    backend: str,
    f: Callable[[Any], Any],
    z0: Any,
    fused: bool | None,
    sync_every: int,
    kwargs: dict[str, Any],
) -> Solution:
    with options(fused=fused, sync_every=sync_every):
        return _api_solve(f, z0, backend=backend, **kwargs)


def solve(
    f: Callable[[Any], Any],
    z0: Any,
    *,
    fused: bool | None = None,
    sync_every: int = 8,
    **kwargs: Any,
) -> Solution:
    """Forward solve on CuPy (``eqsolve.solve(..., backend="cupy")`` with these options).

    ``z0`` may be any array with DLPack (a CUDA torch tensor, a GPU JAX array): it is
    imported without a copy, and ``f`` receives and returns CuPy arrays.

    Args:
        fused: ``None`` (auto), ``True`` (fused kernels whenever the solver has them) or
            ``False`` (the generic Array-API path).
        sync_every: host synchronisations (the "has every sample stopped?" read) happen
            every this many iterations.
        **kwargs: every argument of :func:`eqsolve.solve` except ``backend``.
    """
    return _solve_on("cupy", f, z0, fused, sync_every, kwargs)


class Pullback:
    """``g -> u``, the solution of ``u = g + J_f(z*)^T u`` (see :func:`fixed_point`).

    ``u`` has the structure of ``z*``; ``dL/dtheta = u^T df/dtheta(z*)``. After a call,
    ``info`` holds the adjoint solve's per-sample :class:`~eqsolve.core.adjoint.AdjointInfo`.
    """

    def __init__(
        self,
        backend: str,
        vjp: Callable[[Any, Any], Any],
        z_star: Any,
        structure: Structure,
        method: str | FixedPointSolver,
        tol: float | None,
        max_iter: int | None,
        method_options: dict[str, Any],
        forward_tol: float,
        on_failure: str,
        run_options: CupyOptions,
    ):
        self._backend = backend
        self._vjp = vjp
        self.z_star = z_star
        self._structure = structure
        self._method = method
        self._tol = tol
        self._max_iter = max_iter
        self._method_options = method_options
        self._forward_tol = forward_tol
        self._on_failure = on_failure
        self._run_options = run_options
        self.info: AdjointInfo | None = None

    def __call__(self, g: Any) -> Any:
        be = get_backend(self._backend)
        xp = be.xp
        st = self._structure
        leaves = st.leaves(g) if isinstance(g, (tuple, list)) else [g]
        if len(leaves) != len(st.shapes):
            raise ValueError(f"g has {len(leaves)} arrays, the solution {len(st.shapes)}")
        leaves = [be.convert(leaf) for leaf in leaves]
        z_leaves = st.leaves(self.z_star)
        for i, (leaf, zl) in enumerate(zip(leaves, z_leaves, strict=True)):
            if tuple(leaf.shape) != tuple(zl.shape) or leaf.dtype != zl.dtype:
                raise ValueError(
                    f"cotangent {i} has shape {tuple(leaf.shape)} and dtype {leaf.dtype}; "
                    f"the solution has {tuple(zl.shape)} and {zl.dtype}"
                )
        g_tree = leaves[0] if st.container is None else st.container(leaves)
        g_flat = st.flatten(xp, g_tree)
        nvjp = 0

        def vjp_flat(v: Any) -> Any:
            nonlocal nvjp
            nvjp += 1
            return st.flatten(xp, self._vjp(self.z_star, st.unflatten(xp, v)))

        eps = float(np.finfo(str(g_flat.dtype)).eps)
        tol = self._tol if self._tol is not None else default_adjoint_tol(self._forward_tol, eps)
        max_iter = self._max_iter if self._max_iter is not None else 100
        opts = self._run_options
        with options(fused=opts.fused, sync_every=opts.sync_every):
            u, info = adjoint_solve(
                xp,
                vjp_flat,
                g_flat,
                method=self._method,
                tol=tol,
                max_iter=max_iter,
                driver=be.run,
                **self._method_options,
            )
        self.info = info
        if self._on_failure != "ignore":
            _report_adjoint(xp, u, info, self._method, tol, max_iter, nvjp, self._on_failure)
        return st.unflatten(xp, u)


def _report_adjoint(
    xp: Any,
    u: Any,
    info: AdjointInfo,
    method: Any,
    tol: float,
    max_iter: int,
    nvjp: int,
    on_failure: str,
) -> None:
    status = xp.reshape(info.status, (-1,))
    n = int(status.shape[0])
    n_max = int(xp.sum(xp.astype(status == int(Status.MAX_ITER), xp.int32)))
    n_bad = int(xp.sum(xp.astype(status == int(Status.NONFINITE), xp.int32)))
    if n_max == 0 and n_bad == 0:
        return
    name = method if isinstance(method, str) else type(method).__name__
    parts = []
    if n_max:
        worst = float(xp.max(xp.reshape(info.residual, (-1,))[status == int(Status.MAX_ITER)]))
        parts.append(
            f"{n_max} of {n} samples did not reach backward_tol={tol:.3g} within "
            f"backward_max_iter={max_iter} (largest relative residual {worst:.3g})"
        )
    if n_bad:
        parts.append(f"{n_bad} of {n} samples hit NaN/inf")
    message = f"adjoint solve (backward={name!r}): " + "; ".join(parts)
    if on_failure == "raise":
        adjoint = Solution(
            value=u,
            converged=info.converged,
            iterations=info.iterations,
            residual=info.residual,
            status=info.status,
            nfev=nvjp,
        )
        raise ConvergenceError(message, adjoint)
    import warnings

    warnings.warn(message, ConvergenceWarning, stacklevel=3)


def _fixed_point_on(
    backend: str,
    f: Callable[[Any], Any],
    z0: Any,
    *,
    vjp: Callable[[Any, Any], Any],
    backward: str | FixedPointSolver = "anderson",
    backward_tol: float | None = None,
    backward_max_iter: int | None = None,
    backward_options: Mapping[str, Any] | None = None,
    fused: bool | None = None,
    sync_every: int = 8,
    **kwargs: Any,
) -> tuple[Solution, Pullback]:
    if not callable(vjp):
        raise TypeError(f"vjp must be callable as vjp(z, v), got {type(vjp).__name__}")
    if not isinstance(backward, FixedPointSolver):
        if not isinstance(backward, str) or backward not in ADJOINT_METHODS:
            raise ValueError(
                f"backward must be one of {', '.join(map(repr, ADJOINT_METHODS))} or a solver "
                f"object such as eqsolve.Anderson(m=5); got {backward!r}"
            )
    tol, max_iter = check_backward_limits(backward_tol, backward_max_iter)
    method_options = check_backward_options(backward, backward_options)
    on_failure = kwargs.get("on_failure", "warn")
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
    run_options = CupyOptions(fused, sync_every)
    sol = _solve_on(backend, f, z0, fused, sync_every, kwargs)
    structure = structure_of(sol.value, kwargs.get("batch_axis", "auto"))
    pullback = Pullback(
        backend,
        vjp,
        sol.value,
        structure,
        backward,
        tol,
        max_iter,
        method_options,
        float(kwargs.get("tol", 1e-6)),
        on_failure,
        run_options,
    )
    return sol, pullback


def fixed_point(
    f: Callable[[Any], Any],
    z0: Any,
    *,
    vjp: Callable[[Any, Any], Any],
    backward: str | FixedPointSolver = "anderson",
    backward_tol: float | None = None,
    backward_max_iter: int | None = None,
    backward_options: Mapping[str, Any] | None = None,
    fused: bool | None = None,
    sync_every: int = 8,
    **kwargs: Any,
) -> tuple[Solution, Pullback]:
    """Fixed point ``z* = f(z*)`` on CuPy, with its implicit gradient through ``vjp``.

    Args:
        f: the map, on CuPy arrays with the structure of ``z0``.
        z0: initial guess (CuPy array, any DLPack GPU array, or a tuple/list of them).
        vjp: ``vjp(z, v) -> J_f(z)^T v``, the vector-Jacobian product of ``f`` with respect
            to ``z`` (``z`` and ``v`` have the structure of ``z0``).
        backward: adjoint solver: ``"anderson"`` (default), ``"neumann"``, ``"broyden"``,
            ``"gmres"`` or a configured solver object.
        backward_tol: adjoint tolerance; default ``max(tol, 10 eps(dtype))``.
        backward_max_iter: adjoint iterations (GMRES: restart cycles); default 100.
        backward_options: options of the adjoint method, e.g. ``{"m": 5}``.
        fused, sync_every: as in :func:`solve` (they apply to the adjoint solve too).
        **kwargs: the forward solve's arguments (``solver``, ``tol``, ``max_iter``,
            ``batch_axis``, ``on_failure`` -- also used for the adjoint --, solver options).

    Returns:
        ``(solution, pullback)``: ``pullback(g)`` is the ``u`` with ``u = g + J_f(z*)^T u``
        for a cotangent ``g = dL/dz*``, so that ``dL/dtheta = u^T df/dtheta(z*)``.

    Example (needs a CUDA GPU)::

        sol, pullback = eqsolve.cupy.fixed_point(f, z0, vjp=lambda z, v: vjp_of_f(z, v))
        u = pullback(dloss_dz(sol.value))          # then dL/dW = vjp of f w.r.t. W, at u
    """
    return _fixed_point_on(
        "cupy",
        f,
        z0,
        vjp=vjp,
        backward=backward,
        backward_tol=backward_tol,
        backward_max_iter=backward_max_iter,
        backward_options=backward_options,
        fused=fused,
        sync_every=sync_every,
        **kwargs,
    )


# --------------------------------------------------------------------------------------
# DLPack interop (no copies between CUDA arrays of the same device)
# --------------------------------------------------------------------------------------


def _tree(fn: Callable[[Any], Any], tree: Any) -> Any:
    if isinstance(tree, (tuple, list)):
        return type(tree)(fn(x) for x in tree)
    return fn(tree)


def as_cupy(x: Any) -> Any:
    """CuPy view of a DLPack array (a CUDA torch tensor -- detached --, a GPU JAX array).

    No copy for device arrays; host arrays are copied to the current device. Accepts a
    tuple/list of arrays.
    """
    return _tree(get_backend("cupy").convert, x)


def to_torch(x: Any) -> Any:
    """A torch tensor sharing memory with CuPy array ``x`` (or a tuple/list of them)."""
    import torch

    return _tree(torch.from_dlpack, x)


def to_jax(x: Any) -> Any:
    """A JAX array sharing memory with CuPy array ``x`` (needs a CUDA-enabled jaxlib)."""
    import jax.numpy as jnp

    return _tree(jnp.from_dlpack, x)
