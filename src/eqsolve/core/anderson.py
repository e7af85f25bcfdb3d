"""Anderson acceleration (type II), batched per sample, with a fixed-size ring history.

For the residual ``g(z) = f(z) - z`` and the last ``m_k = min(k+1, m)`` iterates
``z_i`` with residuals ``g_i``, type-II Anderson mixing solves

    min_alpha || sum_i alpha_i g_i ||^2   subject to   sum_i alpha_i = 1

and moves to ``z_{k+1} = sum_i alpha_i (z_i + beta g_i)``; with ``beta = 1`` that is
``sum_i alpha_i f(z_i)``, one product over the stored values of ``f``. With the Gram matrix
``H_ij = <g_i, g_j>`` the minimiser is ``alpha = H^{-1} 1 / (1^T H^{-1} 1)``.

Regularisation: ``H`` is ill-conditioned once residuals become collinear near convergence, so
it is solved as ``(H + lambda diag(H)) y = 1`` -- a ridge relative to each history entry's own
squared residual norm, computed as the unit-diagonal, Jacobi-scaled system
``(D^{-1/2} H D^{-1/2} + lambda I) x = D^{-1/2} 1``, ``y = D^{-1/2} x``. An absolute ridge,
or one scaled by the mean of ``diag(H)``, swamps the newest (smallest) residuals near
convergence and makes Anderson slower than plain iteration at tight tolerances. The scaling
matters as much: the unscaled system, or the bordered (KKT) form ``[[0, 1^T], [1, H]]``
solved by LU, rounds the newest residuals away against the oldest (with ``m = 100`` on a
tanh cell one sample needed 37-100 steps instead of 9).

Scale: the residuals are stored divided by a per-sample constant (the norm of the first
residual), so the Gram matrix neither underflows nor overflows for states of 1e-170 or
1e150 (the mixing weights do not depend on the scale; without it, a Gram matrix of zeros
leaves the mixing undetermined).

Safeguard: where the mixing weights are non-finite (a singular or non-finite system gives
NaN/inf weights for that sample only, see :func:`_solve_per_sample`; so does the zero
residual of an exact fixed point) or
``||alpha||_1 > max_coefficient`` (an extrapolation that cancels catastrophically), that
sample takes the plain damped step ``z + beta g`` instead.

References:
    D. G. Anderson, "Iterative procedures for nonlinear integral equations", J. ACM 12 (1965).
    H. F. Walker and P. Ni, "Anderson acceleration for fixed-point iterations", SIAM J.
    Numer. Anal. 49 (2011).
    S. Bai, J. Z. Kolter, V. Koltun, "Deep equilibrium models", NeurIPS 2019.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from ._xp import batch_zeros, device_of, inverse_norm, set_at
from .solver_base import FixedPointSolver, check_positive, damped_step, register

#: eagerly built ``reg * I`` matrices, by (m, reg, dtype, device): no array built per step
_RIDGES: dict[tuple[int, float, str, str], Any] = {}


def _ridge(xp: Any, m: int, reg: float, like: Any, cache: bool) -> Any:
    """``reg * I`` (m x m), the relative ridge of a unit-diagonal matrix; cached when eager
    (under a JAX trace it is a traced constant)."""
    dtype, device = like.dtype, device_of(like)
    key = (m, reg, f"{type(dtype).__module__}.{dtype}", str(device))
    value = _RIDGES.get(key) if cache else None
    if value is None:
        value = reg * xp.eye(m, dtype=dtype, device=device)
        if cache:
            _RIDGES[key] = value
    return value


def _solve_per_sample(xp: Any, A: Any, b: Any, eager: bool) -> Any:
    """``A^{-1} b`` per sample, where a singular or non-finite system gives NaN/inf for that
    sample only (which the safeguard turns into a plain step) instead of an exception.

    torch's ``linalg.solve_ex`` and JAX's ``solve`` already behave so; NumPy (and CuPy,
    array_api_strict) raise for the whole batch when one matrix is singular or produces NaN
    -- a stopped sample at an exact fixed point has a zero Gram row -- so eagerly such a
    batch is solved again: the non-finite systems replaced by the identity and their results
    set to NaN, and if that still raises, one sample at a time (a rare path).
    """
    solve_ex = getattr(xp.linalg, "solve_ex", None)
    if solve_ex is not None:
        return solve_ex(A, b)[0]
    if not eager:
        return xp.linalg.solve(A, b)
    try:
        return xp.linalg.solve(A, b)
    except Exception:  # numpy.linalg.LinAlgError and the like: each library has its own type
        pass
    bad = ~xp.all(xp.isfinite(A), axis=(1, 2))[:, None, None]
    eye = xp.eye(A.shape[-1], dtype=A.dtype, device=device_of(A))
    nan = xp.full_like(A[:, :, :1], float("nan"))
    try:
        return xp.where(bad, nan, xp.linalg.solve(xp.where(bad, eye, A), b))
    except Exception:
        pass
    rows = []
    for i in range(A.shape[0]):
        try:
            rows.append(xp.linalg.solve(A[i, ...], b))
        except Exception:
            rows.append(nan[i, ...])
    return xp.stack(rows)


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
    F: Any  # (B, m, n) f(z_i) = z_i + g_i of the stored iterates, ring buffer; unused: zero
    G: Any  # (B, m, n) their residuals f(z_i) - z_i, times `inv_scale`
    H: Any  # (B, m, m) Gram matrix <G_i, G_j>; zero outside the filled block
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
        zeros = batch_zeros(xp, z, (self.m, n))
        F = set_at(zeros, (slice(None), 0, ...), z + g)
        g = g * inv_scale[:, None]
        G = set_at(xp.zeros_like(zeros), (slice(None), 0, ...), g)
        H = batch_zeros(xp, z, (self.m, self.m))
        H = set_at(H, (slice(None), 0, 0), xp.vecdot(g, g))
        return AndersonState(F, G, H, inv_scale)

    def filled(self, k: Any) -> int:
        """History slots in use at step ``k``: eagerly ``min(k + 1, m)``, traced ``m``."""
        return min(k + 1, self.m) if isinstance(k, int) else self.m

    def mixing_weights(self, xp: Any, H: Any, k: Any) -> Any:
        """Per-sample ``alpha`` (B, :meth:`filled`) for the Gram matrix ``H``.

        Eagerly only the filled block is solved (a view); under a trace (``k`` an array)
        the empty slots get identity rows and a zero right-hand side: their weights are 0.
        """
        eager = isinstance(k, int)
        size = self.filled(k)
        reg = self.regularization
        if reg is None:
            reg = max(1e-10, 10.0 * float(xp.finfo(H.dtype).eps))
        if eager:
            H = H[:, :size, :size]
        d = xp.linalg.diagonal(H)  # (B, size): squared residual norms
        # an exactly-zero residual (a stopped sample at its fixed point, a zero cotangent)
        # gets d = 1: its row is then ridge only, so the solve stays regular and quiet
        d = xp.where(d > 0, d, xp.ones_like(d))
        p = d**-0.5  # D^{-1/2}
        if not eager:  # slot i is filled iff i <= k
            valid = xp.arange(size, device=device_of(H)) <= k
            p = xp.where(valid, p, xp.zeros_like(p))
        # unit diagonal plus the ridge; one factor at a time, since |H_ij| p_i <= sqrt(d_j):
        # the product p_i p_j alone overflows for subnormal residuals
        M = ((H * p[:, :, None]) * p[:, None, :]) + _ridge(xp, size, reg, H, cache=eager)
        if not eager:
            eye = xp.eye(size, dtype=H.dtype, device=device_of(H))
            M = xp.where(valid[:, None] & valid[None, :], M, eye)
        # y = D^{-1/2} M^{-1} D^{-1/2} 1 ~ 1/d overflows only where d is subnormal (a float32
        # residual ~1e-19 of the first one, from a far starting point): those weights are
        # NaN and the safeguard steps plainly. Not rescaled (two operations per step): from
        # z0 = 1e15 to tol 1e-7 in float32 this took 12-14 steps, rescaled 12-13 (and 12-18
        # with the code before 2026-12-02)
        y = _solve_per_sample(xp, M, p[:, :, None], eager)[:, :, 0] * p
        return y / xp.sum(y, axis=1, keepdims=True)

    def propose(self, xp: Any, state: AndersonState, z: Any, g: Any, k: Any) -> Any:
        alpha = self.mixing_weights(xp, state.H, k)
        eager = isinstance(k, int)
        used = alpha.shape[1]  # the filled slots (all m under a trace)
        mixed = _combine(xp, alpha, state.F[:, :used, :], eager)
        if self.beta != 1.0:  # sum_i alpha_i (f_i - (1 - beta) g_i)
            mixed_g = _combine(xp, alpha, state.G[:, :used, :], eager) / state.inv_scale[:, None]
            mixed = mixed - (1.0 - self.beta) * mixed_g
        l1 = xp.linalg.vector_norm(alpha, axis=1, ord=1)
        # eagerly one host read spares the plain step and the (B, n) selection on the usual
        # step where no sample needs the safeguard (a NaN maximum fails the test)
        if eager and float(xp.max(l1)) <= self.max_coefficient:
            return mixed
        ok = l1 <= self.max_coefficient  # False for NaN and inf too (max_coefficient is finite)
        return xp.where(ok[:, None], mixed, damped_step(z, g, self.beta))

    def update(
        self, xp: Any, state: AndersonState, z: Any, g: Any, z_new: Any, g_new: Any, k: Any
    ) -> AndersonState:
        slot = (k + 1) % self.m
        F = set_at(state.F, (slice(None), slot, ...), z_new + g_new)
        g_new = g_new * state.inv_scale[:, None]
        G = set_at(state.G, (slice(None), slot, ...), g_new)
        row = _gram_row(xp, g_new, G, isinstance(k, int))  # (B, m): <g_i, g_new>, unused 0
        H = set_at(state.H, (slice(None), slot, ...), row)
        H = set_at(H, (slice(None), slice(None), slot), row)
        return AndersonState(F, G, H, state.inv_scale)
