"""Jacobian regularisation for PyTorch DEQs: a Hutchinson estimate of ``||J_f(z*)||_F^2``.

Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization", ICML 2021
(arXiv:2106.14342). Adding ``gamma * jacobian_reg(f, z*)`` to the training loss keeps the
cell's Jacobian at the equilibrium small, so the fixed point stays well conditioned and the
forward and backward solvers need fewer iterations.

Math. For sample ``b`` with state ``z_b`` of ``d`` elements and per-sample Jacobian
``J_b = d f(z)_b / d z_b`` (``d x d``) at ``z*``, Hutchinson's identity gives

    ||J_b||_F^2 = tr(J_b^T J_b) = E_eps ||eps^T J_b||_2^2,        eps ~ N(0, I_d),

and each ``eps^T J_b`` is one vector-Jacobian product (reverse mode; no Jacobian is formed).
With ``n`` probes ``eps_1 .. eps_n`` the per-sample estimate is

    R_b = (1 / (n d)) sum_k ||eps_k^T J_b||_2^2        (unbiased for ||J_b||_F^2 / d),

the per-element normalisation of the paper (its reference code divides the batch sum of
``||eps^T J||^2`` by ``B * d``, the number of elements of ``z``, i.e. returns the batch mean
of ``R_b``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..core.validation import JACOBIAN_REG_REDUCTIONS, check_jacobian_reg_arguments
from .reporting import warn

__all__ = ["REDUCTIONS", "jacobian_reg"]

#: accepted ``reduction=`` values
REDUCTIONS = JACOBIAN_REG_REDUCTIONS


def _leaves(tree: Any) -> list[Any]:
    return list(tree) if isinstance(tree, (tuple, list)) else [tree]


def cell_and_point(f: Any, z_star: Any) -> list[torch.Tensor]:
    """The leaves of ``z_star`` (a tensor or a tuple/list of them), after checking that ``f``
    is callable and every leaf a floating tensor (the arguments of the diagnostics at z*)."""
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    leaves = _leaves(z_star)
    if not leaves:
        raise ValueError("z_star is an empty sequence")
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            where = f"z_star[{i}]" if isinstance(z_star, (tuple, list)) else "z_star"
            raise TypeError(f"{where} must be a floating-point torch.Tensor, got {leaf!r:.60}")
    return leaves


def output_leaves(out: Any, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """The leaves of ``f(z)``, checked to have the structure and shapes of z*'s ``leaves``."""
    got = _leaves(out)
    if len(got) != len(leaves) or any(
        not isinstance(o, torch.Tensor) or o.shape != t.shape
        for o, t in zip(got, leaves, strict=False)
    ):
        raise ValueError(
            "f(z) must return the structure and shapes of z_star: got "
            f"{[tuple(getattr(o, 'shape', ())) for o in got]} for "
            f"{[tuple(t.shape) for t in leaves]}"
        )
    return got


def _per_sample_sq(v: torch.Tensor, batch_axis: int | None) -> torch.Tensor:
    """Sum of squares over every axis but the batch axis: ``(B,)`` (0-d for None)."""
    if batch_axis is None:
        return v.square().sum()
    return v.movedim(batch_axis, 0).reshape(v.shape[batch_axis], -1).square().sum(dim=1)


def jacobian_reg(
    f: Callable[[Any], Any],
    z_star: Any,
    *,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    batch_axis: int | None = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Hutchinson estimate of ``||J_f(z*)||_F^2 / d`` per sample, as a differentiable loss term.

    One call of ``f`` at ``z*`` and ``n_samples`` vector-Jacobian products
    ``eps^T J_f(z*)`` (``torch.autograd.grad`` with ``create_graph=True``), so the result can
    be backpropagated to the parameters of ``f`` (double backward). See the module docstring
    for the math.

    ``z*`` is **detached** here: the term is evaluated at the given point and differentiated
    with respect to what ``f`` uses (its parameters, the input injection) at fixed ``z*``,
    as in Bai et al.'s reference implementation. The dependence of ``z*`` on the parameters is
    deliberately ignored (following it would need a second-order implicit derivative, which
    ``eqsolve.torch.fixed_point`` does not provide). So pass ``sol.value`` of
    :func:`eqsolve.torch.fixed_point` (or the output of :class:`eqsolve.torch.DEQ`) as it
    is: its implicit-gradient graph is not touched, and gradients of ``loss + gamma * reg``
    are the implicit gradient of ``loss`` plus the partial derivative of ``reg``.

    Args:
        f: the cell, ``z -> f(z)`` (same structure and shapes as ``z_star``), differentiable
            by autograd; it closes over its parameters and inputs, as for
            :func:`eqsolve.torch.fixed_point`. Samples along ``batch_axis`` should be
            independent (then the batch Jacobian is block diagonal and ``R_b`` estimates the
            norm of sample ``b``'s block; otherwise the sum of ``R_b * d`` still estimates the
            squared Frobenius norm of the whole Jacobian).
        z_star: the point (usually the fixed point): a tensor, or a tuple/list of tensors
            sharing the batch axis (multi-scale states; ``d`` is then their total number of
            elements per sample).
        n_samples: probes ``eps`` averaged per sample (the paper uses 1).
        generator: ``torch.Generator`` for the probes (on the device of ``z_star``); ``None``
            uses the global RNG. Probe ``k`` of each output leaf is
            ``torch.randn(leaf.shape, generator=generator, dtype=leaf.dtype,
            device=leaf.device)``, drawn in probe order then leaf order.
        batch_axis: the axis of independent samples; ``None``: the whole state is one sample.
        reduction: ``"mean"`` (default): the scalar ``(1/B) sum_b R_b`` (the paper's
            normalisation); ``"none"``: the per-sample estimates ``R_b``, shape ``(B,)``
            (0-d when ``batch_axis`` is None).

    Returns:
        ``R`` as above: an estimate of ``||J_b||_F^2 / d`` (squared Frobenius norm divided by
        the per-sample dimension ``d``), averaged over the batch for ``"mean"``. It carries a
        graph when grad mode is on; under ``torch.no_grad()`` it is a plain value.

    Raises:
        ValueError / TypeError: bad arguments, or ``f`` returns a different structure.
        RuntimeError: ``f(z)`` has no autograd graph at all (``f`` detaches its input and
            uses no parameter). An ``f`` whose graph does not reach ``z`` gives 0 with a
            ``RuntimeWarning``.

    Reference:
        Bai, Koltun, Kolter (2021), "Stabilizing Equilibrium Models by Jacobian
        Regularization", ICML. Hutchinson (1989), "A stochastic estimator of the trace of the
        influence matrix for Laplacian smoothing splines".

    Example:
        >>> import torch, eqsolve.torch as et
        >>> W = torch.nn.Parameter(0.3 * torch.randn(8, 8, dtype=torch.float64))
        >>> x = torch.randn(4, 8, dtype=torch.float64)
        >>> f = lambda z: torch.tanh(z @ W.T + x)
        >>> z = et.fixed_point(f, torch.zeros(4, 8, dtype=torch.float64)).value
        >>> loss = z.square().mean() + 0.5 * et.jacobian_reg(f, z)
        >>> loss.backward(); W.grad.shape
        torch.Size([8, 8])
    """
    check_jacobian_reg_arguments(n_samples, batch_axis, reduction)
    leaves = cell_and_point(f, z_star)

    want_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        z = [t.detach().requires_grad_(True) for t in leaves]
        z_in = type(z_star)(z) if isinstance(z_star, (tuple, list)) else z[0]
        out = output_leaves(f(z_in), z)
        if not any(o.requires_grad for o in out):
            raise RuntimeError(
                "f(z) has no autograd graph although z requires grad: f is not "
                "differentiable with torch autograd (.detach(), .data, NumPy, no_grad?)"
            )
        if batch_axis is None:
            d = sum(t.numel() for t in z)
        else:
            d = sum(t.numel() // max(t.shape[batch_axis], 1) for t in z)
        live = [i for i, o in enumerate(out) if o.requires_grad]
        total: torch.Tensor | None = None
        for _ in range(n_samples):
            eps = [
                torch.randn(o.shape, generator=generator, dtype=o.dtype, device=o.device)
                for o in out
            ]
            vjps = torch.autograd.grad(
                [out[i] for i in live],
                z,
                [eps[i] for i in live],
                create_graph=want_graph,
                retain_graph=True,
                allow_unused=True,
            )
            for v in vjps:
                if v is None:  # f does not depend on this leaf of z: J block is zero
                    continue
                sq = _per_sample_sq(v, batch_axis)
                total = sq if total is None else total + sq
        if total is None:  # no output depends on z at all: J = 0
            warn(
                "f(z) does not depend on z through autograd, so jacobian_reg is 0. If f "
                "detaches z (.detach(), .data, NumPy), this is wrong.",
                RuntimeWarning,
            )
            b = 1 if batch_axis is None else z[0].shape[batch_axis]
            total = out[live[0]].new_zeros(() if batch_axis is None else (b,))
        est = total / (n_samples * d)
        result = est.mean() if reduction == "mean" else est
    reg: torch.Tensor = result if want_graph else result.detach()
    return reg
