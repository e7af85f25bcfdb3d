"""Spectral radius of ``J_f(z*)`` per sample for JAX, from vector-Jacobian products.

The JAX twin of :mod:`eqsolve.adapters.torch_spectral`: ``rho(J_f(z*))`` by power iteration
on ``J^T``, Arnoldi and a Rayleigh-Ritz step with a residual test
(:mod:`eqsolve.core.spectral`), from one ``jax.vjp`` of ``f`` at ``z*`` and
``iters + krylov + 2`` products through it. The power and Arnoldi steps run in
``lax.fori_loop``, so the function is ``jit``-able without unrolling and ``vmap``-able.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ..core.solution import ConvergenceWarning
from ..core.spectral import SpectralRadius, spectral_radius_from_matvec, unconverged_message
from ..core.structure import structure_of
from ..core.validation import check_spectral_radius_arguments
from .jax_jacobian import cell_and_point, output_leaves
from .reporting import warn

__all__ = ["SpectralRadius", "spectral_radius"]


def spectral_radius(
    f: Callable[..., Any],
    z_star: Any,
    *args: Any,
    key: Any = None,
    iters: int = 50,
    krylov: int = 30,
    rtol: float = 1e-3,
    batch_axis: int | None = 0,
) -> SpectralRadius:
    """Estimate ``rho(J_f(z*))``, the spectral radius of the cell's Jacobian, per sample.

    Same method, promise and limits as :func:`eqsolve.torch.spectral_radius` (see there and
    :mod:`eqsolve.core.spectral`): ``converged`` means the Ritz residual is at most
    ``rtol * radius``. Costs one ``jax.vjp`` of ``f`` and ``iters + krylov + 2`` VJPs; works
    under ``jit`` (``iters`` and ``krylov`` static) and ``vmap``. Not differentiable (``z*``
    and ``args`` are wrapped in ``lax.stop_gradient``). Eagerly, unconverged samples give a
    ``ConvergenceWarning``; under ``jit`` read ``converged``.

    Args:
        f: the cell, ``f(z, *args)``, as for :func:`eqsolve.jax.fixed_point`.
        z_star: the point, usually ``sol.value``: an array or a pytree of arrays sharing
            ``batch_axis``.
        *args: passed to ``f``.
        key: a ``jax.random`` key for the start vector; ``None``: ``jax.random.key(0)``.
        iters: power steps (``>= 0``, a Python int) before the Arnoldi stage.
        krylov: Arnoldi steps (``0``: none; else ``>= 2``), as in the torch version.
        rtol: relative tolerance of the residual test, in ``(0, 1)``.
        batch_axis: the axis of independent samples; ``None``: the whole state is one sample.

    Returns:
        :class:`~eqsolve.core.spectral.SpectralRadius` of ``(B,)`` arrays (0-d for
        ``batch_axis=None``) in ``z_star``'s dtype (computed in at least float32).

    Example:
        >>> import jax.numpy as jnp
        >>> from eqsolve.jax import spectral_radius
        >>> r = spectral_radius(lambda z, a: a * z, jnp.ones((3, 4)), 0.5)
        >>> [round(float(x), 4) for x in r.radius]
        [0.5, 0.5, 0.5]
    """
    check_spectral_radius_arguments(iters, krylov, rtol, batch_axis)
    z, leaves, tree = cell_and_point(f, z_star)
    args = jax.tree_util.tree_map(jax.lax.stop_gradient, args)
    structure = structure_of(z, batch_axis, name="z_star")  # (B, n) rows per sample

    def f_flat(v: Any) -> Any:
        out = f(structure.unflatten(jnp, v), *args)
        output_leaves(out, leaves, tree)
        return structure.flatten(jnp, out)

    z_flat = structure.flatten(jnp, z)
    _, vjp = jax.vjp(f_flat, z_flat)
    work = jnp.promote_types(z_flat.dtype, jnp.float32)

    def matvec(v: Any) -> Any:  # v^T J for every sample at once: one VJP
        return vjp(v.astype(z_flat.dtype))[0].astype(work)

    k = jax.random.key(0) if key is None else key
    v0 = jax.random.normal(k, (structure.batch, structure.n), work)

    def loop(n: int, body: Callable[[Any, Any], Any], carry: Any) -> Any:
        return jax.lax.fori_loop(0, n, body, carry)

    res = spectral_radius_from_matvec(jnp, matvec, v0, iters=iters, krylov=krylov,
                                      rtol=rtol, loop=loop)
    dtype = leaves[0].dtype
    radius, residual, converged = res.radius.astype(dtype), res.residual.astype(dtype), \
        res.converged
    if batch_axis is None:
        radius, residual, converged = radius[0], residual[0], converged[0]
    if not isinstance(converged, jax.core.Tracer):
        bad = int(jnp.sum(~converged))
        if bad:
            message = unconverged_message(bad, int(converged.size), iters, krylov, rtol)
            warn(message, ConvergenceWarning)
    return SpectralRadius(radius=radius, residual=residual, converged=converged,
                          iterations=res.iterations)
