"""Limited-memory "good" Broyden method on the residual ``g(z) = f(z) - z``, per sample.

Broyden's method is a quasi-Newton root finder for ``g(z) = 0``. It keeps an estimate
``H_k`` of the inverse Jacobian ``J_g^{-1}`` and steps ``z_{k+1} = z_k - H_k g_k``. With
``s = z_{k+1} - z_k`` and ``y = g_{k+1} - g_k``, the "good" Broyden update (Sherman-Morrison
form of the rank-one secant update of ``J``) is

    H_{k+1} = H_k + (s - H_k y) (s^T H_k) / (s^T H_k y).

``H_0 = -I`` (``J_g = J_f - I ~ -I`` for a contractive ``f``), so the first step is plain
iteration. ``H_k = -I + sum_i u_i v_i^T`` is stored as two ``(B, memory, n)`` buffers:
memory is fixed and does not grow with ``max_iter``. When they are full the method restarts from
``H = -I``. (Overwriting only the oldest term, as some DEQ implementations do, leaves the
later terms -- each computed against the full earlier ``H`` -- inconsistent; on the ``sym``
benchmark problem that diverged for memory 10-40 where restarting converges.)

Scale: each rank-one term ``u v^T`` is unchanged when ``s`` and ``y`` are divided by the
same number, so every update divides them by ``||s||`` first: the products stay of order 1
for states of 1e-170 or 1e150 instead of underflowing (and skipping every update) or
overflowing.

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

from ._xp import batch_zeros, device_of, inverse_norm
from .solver_base import FixedPointSolver, check_positive, register


class BroydenState(NamedTuple):
    U: Any  # (B, memory, n): u_i; slots written before the last restart are masked out
    V: Any  # (B, memory, n): v_i
    Hg: Any  # (B, n): H_k g_k for the current point (reused by the next step)


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
        U = batch_zeros(xp, z, (self.memory, n))
        return BroydenState(U, xp.zeros_like(U), -g)

    def _terms(self, xp: Any, k: Any, dtype: Any, like: Any) -> Any:
        """Mask (memory,) of the rank-one terms in use after ``k`` updates.

        Update ``j`` writes slot ``j % memory``; a write to slot 0 is a restart, so after
        ``k`` updates slots ``0 .. (k-1) % memory`` are in use (none for k = 0, where the
        buffers are still zero). Stale slots are masked rather than zeroed: no buffer copy.
        """
        count = (k - 1) % self.memory + 1
        return xp.astype(xp.arange(self.memory, device=device_of(like)) < count, dtype)

    @staticmethod
    def _apply(xp: Any, P: Any, Q: Any, x: Any, mask: Any) -> Any:
        """``-x + sum_i mask_i p_i <q_i, x>``.

        ``H x`` with (P, Q) = (U, V); ``H^T x`` with (P, Q) = (V, U).
        """
        # row-vector products ((B,1,n) @ (B,n,mem), (B,1,mem) @ (B,mem,n)): torch's batched
        # matrix-vector form (B,mem,n) @ (B,n,1) measured 5x slower on the CPU
        coeff = xp.matmul(x[:, None, :], xp.matrix_transpose(Q)) * mask  # (B, 1, memory)
        return xp.matmul(coeff, P)[:, 0, :] - x

    def propose(self, xp: Any, state: BroydenState, z: Any, g: Any, k: Any) -> Any:
        step = -state.Hg
        ok = xp.all(xp.isfinite(step), axis=1)
        return xp.where(ok[:, None], z + step, z + g)

    def update(
        self, xp: Any, state: BroydenState, z: Any, g: Any, z_new: Any, g_new: Any, k: Any
    ) -> BroydenState:
        mask = self._terms(xp, k, z.dtype, z)
        s = z_new - z
        Hg_new = self._apply(xp, state.U, state.V, g_new, mask)
        Hy = Hg_new - state.Hg  # H (g_new - g), by linearity
        # u v^T is invariant under (s, Hy) -> (s, Hy) / c: divide by ||s|| (see the module doc)
        inv = inverse_norm(xp, s)
        s, Hy = s * inv[:, None], Hy * inv[:, None]
        v = self._apply(xp, state.V, state.U, s, mask)  # H^T s
        denom = xp.vecdot(s, Hy)
        eps = float(xp.finfo(z.dtype).eps)
        scale = xp.linalg.vector_norm(s, axis=1) * xp.linalg.vector_norm(Hy, axis=1)
        ok = xp.isfinite(denom) & (xp.abs(denom) > eps * scale) & xp.isfinite(scale)
        safe = xp.where(ok, denom, xp.ones_like(denom))
        u = xp.where(ok[:, None], (s - Hy) / safe[:, None], xp.zeros_like(s))
        v = xp.where(ok[:, None], v, xp.zeros_like(v))
        slot = k % self.memory
        U = xpx.at(state.U)[:, slot, ...].set(u)
        V = xpx.at(state.V)[:, slot, ...].set(v)
        # H_{k+1} g_new: after a restart (slot 0) H = -I + u v^T, else H_k + u v^T
        restart = xp.asarray(slot == 0)
        base = xp.where(restart, -g_new, Hg_new)
        Hg_next = base + u * xp.vecdot(v, g_new)[:, None]
        return BroydenState(U, V, Hg_next)
