"""Anderson acceleration (type II), batched per sample, with a fixed-size ring history.

For the residual ``g(z) = f(z) - z`` and the last ``m_k = min(k+1, m)`` iterates
``z_i`` with residuals ``g_i``, type-II Anderson mixing solves

    min_alpha || sum_i alpha_i g_i ||^2   subject to   sum_i alpha_i = 1

and moves to ``z_{k+1} = sum_i alpha_i (z_i + beta g_i)``. With the Gram matrix
``H_ij = <g_i, g_j>`` the minimiser is ``alpha = H^{-1} 1 / (1^T H^{-1} 1)``.

Regularisation: ``H`` is ill-conditioned once residuals become collinear near convergence, so
it is solved as ``(H + lambda diag(H)) y = 1`` -- a ridge relative to each history entry's own
squared residual norm (computed as a unit-diagonal, Jacobi-scaled system). An absolute ridge,
or one scaled by the mean of ``diag(H)``, swamps the newest (smallest) residuals near
convergence and makes Anderson slower than plain iteration at tight tolerances.

Scale: the residuals are stored divided by a per-sample constant (the norm of the first
residual), so the Gram matrix neither underflows nor overflows for states of 1e-170 or
1e150 (the mixing weights do not depend on the scale; without it, a Gram matrix of zeros
leaves the mixing undetermined).

Safeguard: where the mixing weights are non-finite or ``||alpha||_1 > max_coefficient`` (an
extrapolation that cancels catastrophically), that sample takes the plain damped step
``z + beta g`` instead.

References:
    D. G. Anderson, "Iterative procedures for nonlinear integral equations", J. ACM 12 (1965).
    H. F. Walker and P. Ni, "Anderson acceleration for fixed-point iterations", SIAM J.
    Numer. Anal. 49 (2011).
    S. Bai, J. Z. Kolter, V. Koltun, "Deep equilibrium models", NeurIPS 2019.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import array_api_extra as xpx

from ._xp import batch_zeros, device_of, inverse_norm, set_at
from .solver_base import FixedPointSolver, check_positive, register

#: eagerly built ``reg * I`` matrices, by (m, reg, dtype, device): one array less per step
_RIDGES: dict[tuple[int, float, str, str], Any] = {}


def _ridge(xp: Any, m: int, reg: float, dtype: Any, device: Any, cache: bool) -> Any:
    """``reg * I`` (m x m); cached when eager (under a JAX trace it is a traced constant)."""
    if not cache:
        return reg * xp.eye(m, dtype=dtype, device=device)
    key = (m, reg, f"{type(dtype).__module__}.{dtype}", str(device))
    value = _RIDGES.get(key)
    if value is None:
        value = _RIDGES[key] = reg * xp.eye(m, dtype=dtype, device=device)
    return value


def _combine(xp: Any, w: Any, V: Any, eager: bool) -> Any:
    """``sum_i w_i V_i`` per sample: ``w`` (B, m), ``V`` (B, m, n) -> (B, n).

    A batched matrix-vector product, except eagerly for many short rows, where torch's CPU
    ``bmm`` of (B, 1, m) by (B, m, n) was 3-4x slower than a product and a sum (B = 4096,
    n = 64: 1056 vs 269 us in float32) while ``bmm`` won from n = 128 on.
    """
    B, _, n = V.shape
    if eager and n <= SHORT_ROW and B >= MANY_ROWS:
        return xp.sum(w[:, :, None] * V, axis=1)
    return xp.matmul(w[:, None, :], V)[:, 0, :]


def _gram_row(xp: Any, v: Any, V: Any, eager: bool) -> Any:
    """``<v, V_i>`` per sample: ``v`` (B, n), ``V`` (B, m, n) -> (B, m) (same rule as
    :func:`_combine`; the row-vector ``matmul`` form, as torch's (B, m, n) @ (B, n, 1)
    batched product measured 4x slower on the CPU)."""
    B, _, n = V.shape
    if eager and n <= SHORT_ROW and B >= MANY_ROWS:
        return xp.sum(v[:, None, :] * V, axis=2)
    return xp.matmul(v[:, None, :], xp.matrix_transpose(V))[:, 0, :]


#: the shapes where eager products over the history take the elementwise form
SHORT_ROW, MANY_ROWS = 64, 512


class AndersonState(NamedTuple):
    X: Any  # (B, m, n) past iterates, ring buffer; unused slots are zero
    G: Any  # (B, m, n) their residuals f(z_i) - z_i, times `inv_scale`
    H: Any  # (B, m, m) Gram matrix <g_i, g_j> of the stored G; zero outside the filled block
    inv_scale: Any  # (B,) 1 / ||g_0|| (1 where that is 0 or not finite)


@register
@dataclass(frozen=True)
class Anderson(FixedPointSolver):
    """Type-II Anderson acceleration with history ``m`` and mixing ``beta``.

    Args:
        m: history size (number of past iterates mixed); memory is ``2 m n`` per sample.
        beta: mixing (damping) parameter; ``z_{k+1} = sum_i alpha_i (z_i + beta g_i)``.
        regularization: relative ridge ``lambda``; ``None`` picks ``max(1e-10, 10 eps)`` of
            the state's dtype (1e-10 in float64, ~1.2e-6 in float32).
        max_coefficient: safeguard bound on ``||alpha||_1``; beyond it (or on NaN/inf) the
            sample takes a plain damped step.
    """

    m: int = 5
    beta: float = 1.0
    regularization: float | None = None
    max_coefficient: float = 1e4
    name = "anderson"

    def __post_init__(self) -> None:
        check_positive("m", self.m, integer=True)
        check_positive("beta", self.beta)
        if self.regularization is not None:
            check_positive("regularization", self.regularization)
        check_positive("max_coefficient", self.max_coefficient)

    def init(self, xp: Any, z: Any, g: Any) -> AndersonState:
        B, n = z.shape
        inv_scale = inverse_norm(xp, g)
        g = g * inv_scale[:, None]
        zeros = batch_zeros(xp, z, (self.m, n))
        X = xpx.at(zeros)[:, 0, ...].set(z)
        G = xpx.at(xp.zeros_like(zeros))[:, 0, ...].set(g)
        H = batch_zeros(xp, z, (self.m, self.m))
        H = xpx.at(H)[:, 0, 0].set(xp.vecdot(g, g))
        return AndersonState(X, G, H, inv_scale)

    def mixing_weights(self, xp: Any, H: Any, k: Any) -> Any:
        """Per-sample ``alpha`` (B, m) for Gram ``H`` with ``min(k+1, m)`` filled slots."""
        m = self.m
        dtype = H.dtype
        eager = isinstance(k, int)
        # a full history (eager k is a Python int) needs no mask: every slot is filled
        full = eager and k + 1 >= m
        # a NaN sample must not poison the solve; eagerly one sum tells that none is there (a
        # finite sum means finite entries; an overflowing one only takes the guarded path)
        if not eager or not math.isfinite(float(xp.sum(H))):
            H = xp.where(xp.isfinite(H), H, xp.zeros_like(H))
        d = xp.linalg.diagonal(H)  # (B, m): squared residual norms
        d = xp.where(d > 0, d, xp.ones_like(d))  # empty slot or exactly-zero residual
        dinv = 1.0 / xp.sqrt(d)
        # unit diagonal on the filled block; one factor at a time, since |H_ij| dinv_i <=
        # sqrt(d_j): the product dinv_i dinv_j alone overflows for subnormal residuals
        Hs = (H * dinv[:, :, None]) * dinv[:, None, :]
        reg = self.regularization
        if reg is None:
            reg = max(1e-10, 10.0 * float(xp.finfo(dtype).eps))
        if full:
            A = Hs + _ridge(xp, m, reg, dtype, device_of(H), cache=eager)
            s = dinv
        else:
            eye = xp.eye(m, dtype=dtype, device=device_of(H))
            valid = xp.astype(xp.arange(m, device=device_of(H)) < (k + 1), dtype)  # (m,)
            # filled slots get the relative ridge, empty ones an identity row (so y_i = 0)
            A = Hs + eye * (reg * valid + (1.0 - valid))
            s = dinv * valid
        # y = D^{-1/2} A^{-1} D^{-1/2} 1 up to a per-sample positive factor, which cancels in
        # alpha: scale D^{-1/2} to max 1 so y cannot overflow when residuals are tiny
        s = s / xp.max(s, axis=1, keepdims=True)
        y = xp.linalg.solve(A, s[:, :, None])[:, :, 0] * s
        return y / xp.sum(y, axis=1, keepdims=True)

    def propose(self, xp: Any, state: AndersonState, z: Any, g: Any, k: Any) -> Any:
        alpha = self.mixing_weights(xp, state.H, k)
        eager = isinstance(k, int)
        mixed_g = _combine(xp, alpha, state.G, eager) / state.inv_scale[:, None]
        mixed = _combine(xp, alpha, state.X, eager)
        mixed = mixed + mixed_g if self.beta == 1.0 else mixed + self.beta * mixed_g
        l1 = xp.sum(xp.abs(alpha), axis=1)
        ok = l1 <= self.max_coefficient  # False for NaN and inf too (max_coefficient is finite)
        # eagerly (k a Python int), one host read spares the plain step and the (B, n)
        # selection on the usual step where no sample needs the safeguard
        if isinstance(k, int) and bool(xp.all(ok)):
            return mixed
        plain = z + g if self.beta == 1.0 else z + self.beta * g
        return xp.where(ok[:, None], mixed, plain)

    def update(
        self, xp: Any, state: AndersonState, z: Any, g: Any, z_new: Any, g_new: Any, k: Any
    ) -> AndersonState:
        slot = (k + 1) % self.m
        g_new = g_new * state.inv_scale[:, None]
        X = set_at(state.X, (slice(None), slot, ...), z_new)
        G = set_at(state.G, (slice(None), slot, ...), g_new)
        row = _gram_row(xp, g_new, G, isinstance(k, int))  # (B, m): <g_i, g_new>, unused 0
        H = set_at(state.H, (slice(None), slot, ...), row)
        H = set_at(H, (slice(None), slice(None), slot), row)
        return AndersonState(X, G, H, state.inv_scale)
