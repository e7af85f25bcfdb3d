"""CuPy adapter: the user-facing entry points, implicit gradients from a user VJP, DLPack.

:func:`solve` and :func:`fixed_point_with_pullback` solve on CuPy with the run options of
:mod:`eqsolve.backends.cupy.options` (``fused``, ``sync_every``); the CuPy backend
(:mod:`eqsolve.backends.cupy`) runs the fused kernels or the generic Array-API step.

**Gradients.** CuPy has no autodiff: :func:`fixed_point_with_pullback` takes
``vjp(z, v) = J_f(z)^T v`` and returns the solution with a :class:`Pullback` ``g -> u``
solving the adjoint fixed point ``u = g + J_f(z*)^T u`` as the shared backward
specification says (``backward=eqsolve.Implicit(...)``; its loop runs on the same fused
driver).
``dL/dtheta = u^T df/dtheta(z*)`` is then one VJP of ``f`` with respect to its parameters.

This module imports CuPy only when an array is converted or a solve runs (through
``get_backend("cupy")``), so it imports without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..backends import get_backend
from ..backends.cupy.options import CupyOptions, options
from ..core.adjoint import AdjointInfo
from ..core.solution import Solution
from ..core.solver_base import FixedPointSolver
from ..core.structure import Structure, structure_of, tree_map
from ..core.validation import check_arguments
from .array import solve as array_solve
from .backward import ADJOINT_METHODS, Backward, Implicit, backward_spec, pop_legacy, solve_implicit
from .reporting import deprecated_getattr, warn

__all__ = [
    "ADJOINT_METHODS",
    "Pullback",
    "as_cupy",
    "fixed_point_with_pullback",
    "solve",
    "to_jax",
    "to_torch",
]


def _solve_on(
    backend: str,
    f: Callable[[Any], Any],
    z0: Any,
    fused: bool | None,
    sync_every: int,
    kwargs: dict[str, Any],
) -> Solution:
    with options(fused=fused, sync_every=sync_every):
        return array_solve(f, z0, backend=backend, **kwargs)


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
    """``g -> u``, the solution of ``u = g + J_f(z*)^T u`` (see :func:`fixed_point_with_pullback`).

    ``u`` has the structure of ``z*``; ``dL/dtheta = u^T df/dtheta(z*)``. After a call,
    ``info`` holds the adjoint solve's per-sample :class:`~eqsolve.core.adjoint.AdjointInfo`.
    """

    def __init__(
        self,
        backend: str,
        vjp: Callable[[Any, Any], Any],
        z_star: Any,
        structure: Structure,
        spec: Implicit,
        forward: dict[str, Any],
        run_options: CupyOptions,
    ):
        self._backend = backend
        self._vjp = vjp
        self.z_star = z_star
        self._structure = structure
        self._spec = spec
        self._forward = forward  # tol, max_iter and on_failure of the forward solve
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

        def vjp_flat(v: Any) -> Any:
            return st.flatten(xp, self._vjp(self.z_star, st.unflatten(xp, v)))

        opts = self._run_options
        with options(fused=opts.fused, sync_every=opts.sync_every):
            u, info, _, _ = solve_implicit(
                xp, self._spec, vjp_flat, g_flat, forward_tol=self._forward["tol"],
                forward_max_iter=self._forward["max_iter"],
                forward_on_failure=self._forward["on_failure"], driver=be.run,
            )
        self.info = info
        return st.unflatten(xp, u)


def _fixed_point_on(
    backend: str,
    f: Callable[[Any], Any],
    z0: Any,
    *,
    vjp: Callable[[Any, Any], Any],
    backward: Backward | str | FixedPointSolver = "auto",
    fused: bool | None = None,
    sync_every: int = 8,
    **kwargs: Any,
) -> tuple[Solution, Pullback]:
    if not callable(vjp):
        raise TypeError(f"vjp must be callable as vjp(z, v), got {type(vjp).__name__}")
    spec = backward_spec(backward, pop_legacy(kwargs), allow=(Implicit,), where="eqsolve.cupy")
    if spec is None:
        raise ValueError(
            "eqsolve.cupy.fixed_point_with_pullback needs backward=eqsolve.Implicit(...); "
            "for no gradient use eqsolve.cupy.solve"
        )
    assert isinstance(spec, Implicit)
    forward = {
        "tol": float(kwargs.get("tol", 1e-6)),
        "max_iter": int(kwargs.get("max_iter", 100)),
        "on_failure": kwargs.get("on_failure", "warn"),
    }
    check_arguments(f, forward["tol"], kwargs.get("atol", 0.0), kwargs.get("max_iter", 100),
                    forward["on_failure"], kwargs.get("batch_axis", "auto"))
    run_options = CupyOptions(fused, sync_every)
    sol = _solve_on(backend, f, z0, fused, sync_every, kwargs)
    structure = structure_of(sol.value, kwargs.get("batch_axis", "auto"))
    return sol, Pullback(backend, vjp, sol.value, structure, spec, forward, run_options)


def fixed_point_with_pullback(
    f: Callable[[Any], Any],
    z0: Any,
    *,
    vjp: Callable[[Any, Any], Any],
    backward: Backward | str | FixedPointSolver = "auto",
    fused: bool | None = None,
    sync_every: int = 8,
    **kwargs: Any,
) -> tuple[Solution, Pullback]:
    """Fixed point ``z* = f(z*)`` on CuPy, and the pullback of its implicit gradient.

    Args:
        f: the map, on CuPy arrays with the structure of ``z0``.
        z0: initial guess (CuPy array, any DLPack GPU array, or a tuple/list of them).
        vjp: ``vjp(z, v) -> J_f(z)^T v``, the vector-Jacobian product of ``f`` with respect
            to ``z`` (``z`` and ``v`` have the structure of ``z0``).
        backward: the adjoint solve, ``eqsolve.Implicit(method, tol, max_iter, options,
            on_failure)`` or its shorthand (``"auto"``, the default; ``"anderson"``, ``"neumann"``,
            ``"broyden"``, ``"gmres"``, a solver object). ``Phantom``/``JFB`` need autodiff
            of ``f`` with respect to its parameters, which CuPy does not have.
        fused, sync_every: as in :func:`solve` (they apply to the adjoint solve too).
        **kwargs: the forward solve's arguments (``solver``, ``tol``, ``max_iter``,
            ``batch_axis``, ``on_failure`` -- also the adjoint's by default --, solver options).

    Returns:
        ``(solution, pullback)``: ``pullback(g)`` is the ``u`` with ``u = g + J_f(z*)^T u``
        for a cotangent ``g = dL/dz*``, so that ``dL/dtheta = u^T df/dtheta(z*)``.

    Example (needs a CUDA GPU)::

        sol, pullback = eqsolve.cupy.fixed_point_with_pullback(f, z0, vjp=vjp_of_f)
        u = pullback(dloss_dz(sol.value))          # then dL/dW = vjp of f w.r.t. W, at u
    """
    return _fixed_point_on(
        "cupy", f, z0, vjp=vjp, backward=backward, fused=fused, sync_every=sync_every, **kwargs
    )


def fixed_point(*args: Any, **kwargs: Any) -> tuple[Solution, Pullback]:
    """Deprecated name of :func:`fixed_point_with_pullback` (it returns a pair)."""
    warn(
        "eqsolve.cupy.fixed_point is deprecated and will be removed in the next release; use "
        "eqsolve.cupy.fixed_point_with_pullback (it returns (solution, pullback))",
        DeprecationWarning,
    )
    return fixed_point_with_pullback(*args, **kwargs)


# --------------------------------------------------------------------------------------
# DLPack interop (no copies between CUDA arrays of the same device)
# --------------------------------------------------------------------------------------


def as_cupy(x: Any) -> Any:
    """CuPy view of a DLPack array (a CUDA torch tensor -- detached --, a GPU JAX array).

    No copy for device arrays; host arrays are copied to the current device. Accepts a
    tuple/list of arrays.
    """
    return tree_map(get_backend("cupy").convert, x)


def to_torch(x: Any) -> Any:
    """A torch tensor sharing memory with CuPy array ``x`` (or a tuple/list of them)."""
    import torch.utils.dlpack

    return tree_map(torch.utils.dlpack.from_dlpack, x)


def to_jax(x: Any) -> Any:
    """A JAX array sharing memory with CuPy array ``x`` (needs a CUDA-enabled jaxlib)."""
    import jax.numpy as jnp

    return tree_map(jnp.from_dlpack, x)


def _moved(module: str, name: str) -> tuple[Callable[[], Any], str]:
    def value() -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)

    return value, f"{module}.{name}"


#: names that moved to the CuPy backend package in this release
__getattr__ = deprecated_getattr(__name__, {
    **{n: _moved("eqsolve.backends.cupy.options", n)
       for n in ("CupyOptions", "current_options", "options")},
    **{n: _moved("eqsolve.backends.cupy.fused", n)
       for n in ("AUTO_MAX_N", "certify", "run_cupy", "run_fused", "unsupported_reason",
                 "use_fused")},
    **{n: _moved("eqsolve.backends.cupy.executor", n) for n in ("CupyExecutor",)},
})
