"""Spectral radius of ``J_f(z*)`` per sample for PyTorch, from vector-Jacobian products.

``rho(J_f(z*))`` tells how contractive a DEQ cell is at its equilibrium: plain iteration
converges locally iff ``rho < 1`` and the adjoint solve of the implicit backward has the same
spectrum. DEQ papers log it during training (Bai, Kolter & Koltun, "Deep Equilibrium Models",
NeurIPS 2019; Bai, Koltun & Kolter, ICML 2021). The estimate (power steps, Arnoldi, a
Rayleigh-Ritz step with a residual test: :mod:`eqsolve.core.spectral`) runs on ``J^T`` (same
eigenvalues as ``J``): one call of ``f`` with a graph, then ``iters + krylov + 2`` products
``u -> u^T J`` through that graph (``torch.autograd.grad`` with ``retain_graph``), so any
``f`` autograd can differentiate works and no Jacobian is formed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..backends.torch import BACKEND
from ..core.solution import ConvergenceWarning
from ..core.spectral import SpectralRadius, spectral_radius_from_matvec, unconverged_message
from ..core.structure import structure_of
from ..core.validation import check_spectral_radius_arguments
from .reporting import warn
from .torch_jacobian import cell_and_point, output_leaves

__all__ = ["SpectralRadius", "spectral_radius"]


def spectral_radius(
    f: Callable[[Any], Any],
    z_star: Any,
    *,
    iters: int = 50,
    krylov: int = 30,
    rtol: float = 1e-3,
    generator: torch.Generator | None = None,
    batch_axis: int | None = 0,
) -> SpectralRadius:
    """Estimate ``rho(J_f(z*))``, the spectral radius of the cell's Jacobian, per sample.

    ``iters`` power steps on ``J^T`` from a random start, ``krylov`` Arnoldi steps, then a
    Rayleigh-Ritz step on the plane ``span{v, J^T v}`` with a residual test; see
    :mod:`eqsolve.core.spectral` for the method and its limits. Costs one call of ``f`` and
    ``iters + krylov + 2`` vector-Jacobian products, and ``krylov`` state-sized vectors of
    memory. Nothing is differentiable: this is a diagnostic (``z*`` is detached, the result
    carries no graph).

    What ``converged`` promises: the Ritz residual ``||J^T y - lambda y||`` (unit ``y``) is at
    most ``rtol * radius``. For a normal ``J`` an eigenvalue then lies within ``residual`` of
    ``radius``; it is the dominant one unless another eigenvalue of nearly the same modulus
    has not yet emerged from the start vector (then ``radius`` is an eigenvalue below ``rho``).
    For a strongly non-normal ``J`` a small residual bounds only the backward error.
    Unconverged samples give a ``ConvergenceWarning`` (eagerly, as every eqsolve failure).

    Args:
        f: the cell ``z -> f(z)`` (closing over its parameters and input), as for
            :func:`eqsolve.torch.fixed_point`; differentiable by autograd.
        z_star: the point, usually ``sol.value``: a floating tensor, or a tuple/list of
            tensors sharing ``batch_axis`` (a multiscale state: the Jacobian is then that of
            the whole tuple).
        iters: power steps (``>= 0``) before the Arnoldi stage.
        krylov: Arnoldi steps (``0``: none, power iteration only; else ``>= 2``). On random
            tanh cells of width 64 (float64, checked against dense eigenvalues in the
            tests) the defaults converge every sample; power iteration alone needs several
            hundred steps there.
        rtol: relative tolerance of the residual test, in ``(0, 1)``.
        generator: ``torch.Generator`` for the start vector (on the device of ``z_star``);
            ``None`` uses the global RNG.
        batch_axis: the axis of independent samples (each gets its own radius of its own
            Jacobian block); ``None``: the whole state is one sample.

    Returns:
        :class:`~eqsolve.core.spectral.SpectralRadius` of ``(B,)`` tensors ``radius``,
        ``residual`` and ``converged`` (0-d for ``batch_axis=None``), in ``z_star``'s dtype
        (computed in at least float32), and ``iterations``.

    Raises:
        ValueError / TypeError: bad arguments (named), or ``f`` returns another structure.
        RuntimeError: ``f(z)`` has no autograd graph.

    Example:
        >>> import torch, eqsolve.torch as et
        >>> W = 0.5 * torch.eye(4, dtype=torch.float64)
        >>> r = et.spectral_radius(lambda z: z @ W.T, torch.ones(3, 4, dtype=torch.float64))
        >>> [round(float(x), 4) for x in r.radius]
        [0.5, 0.5, 0.5]
    """
    check_spectral_radius_arguments(iters, krylov, rtol, batch_axis)
    leaves = cell_and_point(f, z_star)
    xp = BACKEND.xp
    structure = structure_of(z_star, batch_axis, name="z_star")  # (B, n) rows per sample
    work = torch.promote_types(leaves[0].dtype, torch.float32)

    with torch.enable_grad():
        z_leaf = structure.flatten(xp, z_star).detach().requires_grad_(True)
        out = f(structure.unflatten(xp, z_leaf))
        output_leaves(out, leaves)
        out_flat = structure.flatten(xp, out)
        if not out_flat.requires_grad:
            raise RuntimeError(
                "f(z) has no autograd graph although z requires grad: f is not "
                "differentiable with torch autograd (.detach(), .data, NumPy, no_grad?)"
            )

        def matvec(v: torch.Tensor) -> torch.Tensor:
            # v^T J for every sample at once: one VJP through the saved graph of f
            (g,) = torch.autograd.grad(out_flat, z_leaf, v.to(out_flat.dtype),
                                       retain_graph=True, allow_unused=True)
            return torch.zeros_like(v) if g is None else g.to(work)

        v0 = torch.randn(structure.batch, structure.n, generator=generator, dtype=work,
                         device=leaves[0].device)
        with torch.no_grad():
            res = spectral_radius_from_matvec(xp, matvec, v0, iters=iters, krylov=krylov,
                                              rtol=rtol)
    dtype = leaves[0].dtype
    radius, residual, converged = (
        (t.to(dtype) if t.is_floating_point() else t) for t in res[:3]
    )
    if batch_axis is None:
        radius, residual, converged = radius[0], residual[0], converged[0]
    bad = int((~converged).sum())
    if bad:
        message = unconverged_message(bad, converged.numel(), iters, krylov, rtol)
        warn(message, ConvergenceWarning)
    return SpectralRadius(radius=radius, residual=residual, converged=converged,
                          iterations=res.iterations)
