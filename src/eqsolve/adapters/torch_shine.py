"""The SHINE backward of :func:`eqsolve.torch.fixed_point` (closure form).

Like the implicit backward (:mod:`eqsolve.adapters.torch`), one differentiable call
``f(z*)`` on a fresh leaf carries ``f``'s graph, and the returned value is ``z*`` bit for
bit. The node (``torch_implicit.AdjointCarrier``, with :class:`_ShineLink`) is the identity
forward; backward it maps the cotangent ``g`` to ``u = -H^T g`` with the forward Broyden
solve's factors
(:class:`~eqsolve.adapters.shine.ShineFactors`) instead of solving ``u = g + J_f^T u``;
autograd then continues through ``f``'s graph with ``u``: ``u^T df/dtheta``. No VJP in ``z``
is taken (``f(z*)`` is called on a leaf that does not require grad).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..backends.torch import BACKEND
from ..core.structure import BatchAxis, Structure, structure_of, tree_map
from .shine import ShineFactors, apply_HT
from .torch_implicit import AdjointCarrier, carry_grad

__all__ = ["shine_carrier"]


class _ShineLink:
    """SHINE's cotangent map for ``AdjointCarrier``: ``g -> -H^T g``."""

    higher_order_error = (
        "higher-order gradients (create_graph=True) are not supported with "
        "backward=eqsolve.SHINE(): its adjoint -H^T g uses the forward solve's "
        "inverse-Jacobian estimate, which has no derivative. Use "
        "backward=eqsolve.Implicit() with fixed_point(f, z0, *args) for exact "
        "higher derivatives."
    )

    def __init__(self, factors: ShineFactors):
        self.factors = factors

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        factors = self.factors
        if tuple(g.shape) != tuple(factors.U.shape[::2]):
            raise RuntimeError(
                f"cotangent of shape {tuple(g.shape)} reached the fixed point's SHINE "
                f"backward, expected {(factors.U.shape[0], factors.U.shape[2])}"
            )
        gw = g.to(factors.U.dtype)  # float16/bfloat16 states: the factors are float32
        u: torch.Tensor = -apply_HT(BACKEND.xp, factors, gw.contiguous())
        return u.to(g.dtype)


def shine_carrier(
    f: Callable[[Any], Any], z_star: Any, factors: ShineFactors, batch_axis: BatchAxis
) -> Any:
    """``z_star`` exactly, carrying SHINE's gradient ``(-H^T g)^T df/dtheta(z_star)``."""
    xp = BACKEND.xp
    structure: Structure = structure_of(z_star, batch_axis)
    z_flat = structure.flatten(xp, z_star).detach()
    out_flat = structure.flatten(xp, f(structure.unflatten(xp, z_flat)))
    if not out_flat.requires_grad:  # f uses nothing that needs a gradient: z* is constant
        return z_star
    carrier = structure.unflatten(
        xp, AdjointCarrier.apply(out_flat, _ShineLink(factors))  # type: ignore[no-untyped-call]
    )
    return tree_map(carry_grad, z_star, carrier)
