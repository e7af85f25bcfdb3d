"""The stopping rule's arithmetic: residual norms, the rule's ratio, and the divergence tests.

Everything that decides whether a sample has converged is computed here, once, and used by
the loop's general step, its eager fast path, the final verification and (through the loop)
every backend and the adjoint solves. Per sample ``b`` of the ``(B, n)`` view, at an
evaluated point ``z`` with ``g = f(z) - z``:

**Residual test**

    ||g|| <= tol * ||f(z)|| + atol                                   (2-norms per sample)

measured by the *rule ratio* ``q = ||g|| / (tol ||f(z)|| + atol)``: the test holds iff
``q <= 1``, and the solver keeps, per sample, the iterate with the lowest ``q`` (with
``atol = 0`` that is the lowest relative residual ``||g|| / ||f(z)||``). Choosing the best
iterate by the rule's own measure is what makes the returned point the one that met it.

**Determinacy test** (divergence). A relative rule can be met by running away: for
``f(z) = z + 1 + 0.1 sin z`` the residual stays ~1 while ``||f(z)||`` grows, and at
``||z|| ~ 1e6`` the residual test holds with ``tol = 1e-6`` although there is no fixed point.
The loop therefore also asks whether the fixed point that the test claims is determined.
With ``z0, g0`` the initial point and residual, the secant ``sigma = ||g - g0|| / ||z - z0||``
estimates how fast the residual changes along the path (for a contraction with constant
``L``, ``sigma >= 1 - L``; for a linear map it is ``||(I - J)(z - z0)|| / ||z - z0||``), so
``||g|| / sigma`` estimates the distance from ``z`` to a fixed point. A point where the
residual test holds is accepted only if that estimate is within the solution's own scale:

    ||g|| * ||z - z0|| <= (||f(z)|| + atol / tol) * ||g - g0||

A map whose residual barely changes while the iterate moves far (``sigma < tol``: no fixed
point, or one not determined to the tolerance) fails it; for any map with ``sigma >= tol``
on the path it always holds. A second divergence test needs no candidate point: the
residual growing by more than :data:`RESIDUAL_GROWTH` over its initial value.

**Norms that neither underflow nor overflow.** The plain norm ``vector_norm(a)`` (one
reduction, ``sqrt(<a, a>)`` in every library) loses every entry below ``sqrt(smallest
normal)`` (1e-154 in float64, 1e-19 in float32; XLA on the CPU even flushes subnormal squares
to zero) and overflows above ``sqrt(max)``. Rows whose norm is within ``[smallest
normal^(1/4), sqrt(max)]`` (a sum of squares within ``[sqrt(smallest normal), max]``) are
accurate as they are (each lost square is below ``smallest normal``, a relative error under
``n sqrt(smallest normal)``); other rows are recomputed max-scaled
(:func:`~eqsolve.core._xp.scaled_norm`), so a state of 1e-170 or 1e200 entries is measured
exactly like one of 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from ._xp import scaled_norm

_T = TypeVar("_T")

#: ``branch(pred, then, otherwise)``: ``then()`` where the 0-d boolean ``pred`` holds, else
#: ``otherwise()`` (both return the same structure). The drivers pass one where arrays allow
#: it -- :func:`host_branch` on eager backends, ``lax.cond`` under JAX -- so work that cannot
#: change the result (a scaled norm where every plain one is accurate; in the loop's record,
#: the determinacy test where no sample newly meets the residual test and the frozen copies
#: where every evaluation is finite) is skipped; without one (``None``) every quantity is
#: computed and selected per sample (the same values, bit for bit).
Branch = Callable[[Any, Callable[[], _T], Callable[[], _T]], _T]


def host_branch(pred: Any, then: Callable[[], _T], otherwise: Callable[[], _T]) -> _T:
    """:data:`Branch` of the eager backends: one host read of ``pred``, one branch run."""
    return then() if bool(pred) else otherwise()


def nested(branch: Branch[Any] | None) -> Branch[Any] | None:
    """The :data:`Branch` for work inside a branch that is rarely taken: eagerly the same
    (a host read is cheap), under a trace none. Each ``lax.cond`` is traced, transformed and
    compiled apart: with the nested ones a jitted jvp + jacrev + Hessian program of the
    tests' tanh cell took 25-45% longer to lower than without any, for work that only the
    rare branch does."""
    return branch if branch is host_branch else None

#: a residual this many times larger than the initial one is reported as DIVERGED
RESIDUAL_GROWTH = 1e10

_LIMITS: dict[tuple[str, str, str], tuple[float, float]] = {}


def limits(xp: Any, dtype: Any) -> tuple[float, float]:
    """``(finfo.smallest_normal ** 0.25, sqrt(finfo.max))`` of ``dtype``, cached (``finfo``
    is slow).

    A plain 2-norm within these bounds (a sum of squares within ``[sqrt(smallest normal),
    max]``) is accurate without rescaling.
    """
    # keyed by strings: dtype objects of different libraries must never be compared
    key = (type(dtype).__module__, type(dtype).__qualname__, str(dtype))
    value = _LIMITS.get(key)
    if value is None:
        info = xp.finfo(dtype)
        value = _LIMITS[key] = (float(info.smallest_normal) ** 0.25, float(info.max) ** 0.5)
    return value


def plain_norm(xp: Any, a: Any) -> Any:
    """``sqrt(<a_b, a_b>)`` per row, in one reduction (accurate within :func:`limits`)."""
    return xp.linalg.vector_norm(a, axis=1)


def robust_norm(xp: Any, a: Any, branch: Branch[Any] | None = None, plain: Any = None) -> Any:
    """Per-row 2-norm of ``a`` ``(B, n)``, exact for any representable entries.

    The plain norm where it is accurate (bit for bit what the eager fast path computes),
    the max-scaled one elsewhere. NaN/inf entries give a non-finite norm. ``branch``
    (:data:`Branch`): the scaled norm is computed only when some row needs it (the usual
    case needs none). ``plain``: ``plain_norm(xp, a)`` where the caller has it.
    """
    lo, hi = limits(xp, a.dtype)
    if plain is None:
        plain = plain_norm(xp, a)
    safe = (plain >= lo) & (plain <= hi)

    def rescaled() -> Any:
        return xp.where(safe, plain, scaled_norm(xp, a))

    return rescaled() if branch is None else branch(xp.all(safe), lambda: plain, rescaled)


def _safe(xp: Any, den: Any) -> tuple[Any, Any]:
    """``(ok, den with 1 where not ok)``: ``ok`` where ``den`` is finite and > 0 (NumPy then
    never warns dividing by it)."""
    ok = (den > 0) & (den < float("inf"))
    return ok, xp.where(ok, den, xp.ones_like(den))


def relative(xp: Any, g_norm: Any, f_norm: Any) -> Any:
    """``||g|| / ||f(z)||``: 0 where ``g = 0``, ``inf`` where only ``f(z)`` is 0 (or inf)."""
    ok, den = _safe(xp, f_norm)
    special = xp.where(g_norm == 0, xp.zeros_like(g_norm), xp.full_like(g_norm, float("inf")))
    return xp.where(ok, g_norm / den, special)


def rule_ratio(
    xp: Any,
    g_norm: Any,
    f_norm: Any,
    rel: Any,
    tol: float,
    atol: float,
    floor: float = 0.0,
    z: Any = None,
) -> Any:
    """``q = ||g|| / (tol ||f(z)|| + atol)``; the residual test holds iff ``q <= 1``.

    With ``atol = 0`` it is ``rel / tol``, which stays exact where ``tol * ||f(z)||`` would
    underflow (a fixed point of 1e-310 in float64).

    ``floor > 0`` (backends that flush subnormal results to zero, see
    :func:`flush_floor`; then ``z`` is needed): ``q = (||g|| + floor) / (tol ||f(z)|| +
    atol)``, so a residual flushed to zero cannot pass for one below the bound; the exact
    zero fixed point (``z = 0`` and ``f(z) = 0``) still has ``q = 0``.
    """
    if atol == 0 and not floor:
        return rel / tol
    ok, den = _safe(xp, tol * f_norm + atol)
    ratio = xp.where(ok, (g_norm + floor) / den, xp.full_like(g_norm, float("inf")))
    if floor:
        zero = (f_norm == 0) & (xp.max(xp.abs(z), axis=1) == 0)
        ratio = xp.where(zero, xp.zeros_like(ratio), ratio)
    return ratio


def flush_floor(xp: Any, dtype: Any, n: int) -> float:
    """How much a flush-to-zero backend can hide of a residual norm: ``sqrt(n)`` times the
    smallest normal number (every entry below it may have been computed as 0).

    XLA flushes subnormal results on the CPU (and fuses ``f(z) - z`` into one expression,
    so even the residual of two normal numbers can be flushed): at ``z = 1e-307`` with
    ``f(z) = 0.9 z`` it computes ``f(z) - z = 0`` and the rule would hold at a point that is
    not a fixed point. The floor makes the residual test certify only what survived.
    """
    floor: float = float(n) ** 0.5 * float(xp.finfo(dtype).smallest_normal)
    return floor


class Measures(NamedTuple):
    """The rule's quantities at one evaluation, per sample (all ``(B,)`` but ``g``)."""

    g: Any  # (B, n) residual f(z) - z
    g_norm: Any
    f_norm: Any
    rel: Any  # relative residual ||g|| / ||f(z)||
    ratio: Any  # rule ratio q (residual test holds iff q <= 1)
    finite: Any  # bool: both norms finite (no NaN/inf in f(z) or g)


def measure(
    xp: Any,
    z: Any,
    fz: Any,
    tol: float,
    atol: float,
    floor: float = 0.0,
    branch: Branch[Any] | None = None,
) -> Measures:
    """Residual and the rule's quantities for the evaluation ``fz = f(z)``.

    ``branch`` (:data:`Branch`): where both plain norms of every row are within
    :func:`limits` (the usual step), they are the robust norms, finite and > 0, and
    ``relative`` is their quotient: one test instead of the scaled norms and the special
    cases' selections (the same values, bit for bit).
    """
    g = fz - z
    lo, hi = limits(xp, z.dtype)
    g_plain, f_plain = plain_norm(xp, g), plain_norm(xp, fz)

    def accurate() -> tuple[Any, Any, Any, Any]:
        rel = g_plain / f_plain
        return g_plain, f_plain, rel, xp.isfinite(rel)  # (all True)

    def general() -> tuple[Any, Any, Any, Any]:
        g_norm = robust_norm(xp, g, nested(branch), g_plain)
        f_norm = robust_norm(xp, fz, nested(branch), f_plain)
        finite = xp.isfinite(g_norm) & xp.isfinite(f_norm)
        return g_norm, f_norm, relative(xp, g_norm, f_norm), finite

    if branch is None:
        g_norm, f_norm, rel, finite = general()
    else:
        within = xp.all((xp.minimum(g_plain, f_plain) >= lo) & (xp.maximum(g_plain, f_plain) <= hi))
        g_norm, f_norm, rel, finite = branch(within, accurate, general)
    ratio = rule_ratio(xp, g_norm, f_norm, rel, tol, atol, floor, z)
    return Measures(g, g_norm, f_norm, rel, ratio, finite)


def runaway(
    xp: Any,
    z: Any,
    m: Measures,
    z0: Any,
    g0: Any,
    tol: float,
    atol: float,
    branch: Branch[Any] | None = None,
    accurate: bool = False,
) -> Any:
    """Where the determinacy test fails (see the module docstring), per sample.

    ``||g|| * ||z - z0|| / (||f(z)|| + atol/tol) > ||g - g0||``. False where ``z = z0`` or
    ``g = 0`` (nothing to estimate / an exact fixed point) and on NaN.

    ``accurate``: the caller needs the test only on rows whose ``z``, ``z0`` and norms are
    finite with ``||f(z)|| > 0`` (the eager usual step): the guards for the other rows are
    skipped, so there the result is unspecified (on the rows that qualify it is the same).
    """
    dz = robust_norm(xp, z - z0, branch)
    dg = robust_norm(xp, m.g - g0, branch)
    if accurate:  # dz / scale is 0 where dz = 0, as the guarded form gives
        scale = m.f_norm + atol / tol if atol else m.f_norm
        return m.g_norm * (dz / scale) > dg
    ok, scale = _safe(xp, m.f_norm + atol / tol if atol else m.f_norm)
    # (where the scale is 0 the residual test failed anyway, unless g = 0: no estimate)
    moved = xp.where(ok & (dz > 0), dz / scale, xp.zeros_like(dz))
    g_norm = xp.where(m.finite, m.g_norm, xp.zeros_like(m.g_norm))  # NaN/inf rows: no test
    return g_norm * moved > dg


def growth_limit(xp: Any, g0_norm: Any) -> Any:
    """The largest residual norm not reported as DIVERGED: :data:`RESIDUAL_GROWTH` times the
    initial one (computed once per solve; the loop keeps it)."""
    return RESIDUAL_GROWTH * g0_norm


def grew(xp: Any, g_norm: Any, g_limit: Any) -> Any:
    """Where the residual has grown beyond its :func:`growth_limit`."""
    return g_norm > g_limit


def within_growth(xp: Any, g_norm: Any, g_limit: Any) -> Any:
    """``~grew`` where ``g_norm`` is not NaN (there both are False): one operation less."""
    return g_norm <= g_limit
