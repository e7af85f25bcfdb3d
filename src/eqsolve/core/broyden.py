"""Limited-memory "good" Broyden method on the residual ``g(z) = f(z) - z``, per sample.

Broyden's method is a quasi-Newton root finder for ``g(z) = 0``. It keeps an estimate
``H_k`` of the inverse Jacobian ``J_g^{-1}`` and steps ``z_{k+1} = z_k - H_k g_k``. With
``s = z_{k+1} - z_k`` and ``y = g_{k+1} - g_k``, the "good" Broyden update (Sherman-Morrison
form of the rank-one secant update of ``J``) is

    H_{k+1} = H_k + (s - H_k y) (s^T H_k) / (s^T H_k y).

``H_0 = -I`` (``J_g = J_f - I ~ -I`` for a contractive ``f``), so the first step is plain
iteration. ``H_k = -I + sum_i u_i v_i^T`` is stored as two ``(B, memory, n)`` buffers: memory is fixed
and does not grow with ``max_iter``. When they are full the method restarts from
``H = -I``. (Overwriting only the oldest term, as some DEQ implementations do, leaves the
later terms -- each computed against the full earlier ``H`` -- inconsistent; on the ``sym``
benchmark problem that diverged for memory 10-40 where restarting converges.)

Safeguards: an update whose denominator ``|s^T H y|`` is not larger than
``eps * ||s|| ||H y||`` (or non-finite) is skipped for that sample; a non-finite step falls
back to the plain step ``z + g``.

References:
    C. G. Broyden, "A class of methods for solving nonlinear simultaneous equations",
    Math. Comp. 19 (1965).
    S. Bai, J. Z. Kolter, V. Koltun, "Deep equilibrium models", NeurIPS 2019.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import array_api_extra as xpx

from ._xp import device_of
from .solver_base import FixedPointSolver, check_positive, register


class BroydenState(NamedTuple):
    U: Any  # (B, memory, n): u_i, zero where unused
    V: Any  # (B, memory, n): v_i, zero where unused


@register
@dataclass(frozen=True)
class Broyden(FixedPointSolver):
    """Limited-memory good Broyden with ``memory`` rank-one terms, restarted when full."""

    memory: int = 30
    name = "broyden"

    def __post_init__(self) -> None:
        check_positive("memory", self.memory, integer=True)

    def init(self, xp: Any, z: Any, g: Any) -> BroydenState:
        B, n = z.shape
        U = xp.zeros((B, self.memory, n), dtype=z.dtype, device=device_of(z))
        return BroydenState(U, xp.zeros_like(U))

    @staticmethod
    def _apply(xp: Any, P: Any, Q: Any, x: Any) -> Any:
        """``-x + sum_i p_i <q_i, x>``: ``H x`` with (P, Q) = (U, V), ``H^T x`` with (V, U)."""
        coeff = xp.matmul(Q, x[:, :, None])  # (B, memory, 1)
        return xp.matmul(xp.matrix_transpose(P), coeff)[:, :, 0] - x

    def propose(self, xp: Any, state: BroydenState, z: Any, g: Any, k: Any) -> Any:
        step = -self._apply(xp, state.U, state.V, g)
        ok = xp.all(xp.isfinite(step), axis=1)
        return xp.where(ok[:, None], z + step, z + g)

    def update(
        self, xp: Any, state: BroydenState, z: Any, g: Any, z_new: Any, g_new: Any, k: Any
    ) -> BroydenState:
        s = z_new - z
        Hy = self._apply(xp, state.U, state.V, g_new - g)
        v = self._apply(xp, state.V, state.U, s)  # H^T s
        denom = xp.vecdot(s, Hy)
        eps = float(xp.finfo(z.dtype).eps)
        scale = xp.linalg.vector_norm(s, axis=1) * xp.linalg.vector_norm(Hy, axis=1)
        ok = xp.isfinite(denom) & (xp.abs(denom) > eps * scale) & xp.isfinite(scale)
        safe = xp.where(ok, denom, xp.ones_like(denom))
        u = xp.where(ok[:, None], (s - Hy) / safe[:, None], xp.zeros_like(s))
        v = xp.where(ok[:, None], v, xp.zeros_like(v))
        slot = k % self.memory
        # restart from H = -I when the buffers are full (slot wraps to 0)
        keep = xp.asarray(slot != 0)
        U = xp.where(keep, state.U, xp.zeros_like(state.U))
        V = xp.where(keep, state.V, xp.zeros_like(state.V))
        U = xpx.at(U)[:, slot, ...].set(u)
        V = xpx.at(V)[:, slot, ...].set(v)
        return BroydenState(U, V)


