"""Spectral radius of the Jacobian at a fixed point, per sample, from matrix-vector products.

DEQ papers watch ``rho(J_f(z*))`` during training: it says how contractive the layer is at its
equilibrium (plain iteration converges locally iff ``rho < 1``, at the rate ``rho``; the
adjoint system ``u = g + J^T u`` has the same spectrum). Forming ``J`` costs ``n`` products;
this estimates ``rho`` with about ``iters + 2`` products ``v -> J v`` and no dense matrix.

Method (power iteration with a two-dimensional Rayleigh-Ritz step; Saad, "Numerical Methods
for Large Eigenvalue Problems", 2nd ed., SIAM 2011, sections 4.1 and 4.3):

1. ``v_{k+1} = J v_k / ||J v_k||`` for ``iters`` steps, from a random start. The iterates
   approach the invariant subspace of the dominant eigenvalue(s): a line for a real
   dominant eigenvalue, a plane for a complex-conjugate pair ``rho e^{+-i theta}`` -- where
   plain power iteration never settles and ``||J v||`` oscillates around ``rho``.
2. Project ``J`` onto ``span{v, J v}``: with ``q1 = v``, ``J q1 = alpha q1 + beta q2``
   (Gram-Schmidt), ``H = [[alpha, q1.Jq2], [beta, q2.Jq2]]`` (one more product, ``J q2``).
   The eigenvalues of ``H`` (closed form for 2x2) are the Ritz values. When they are a
   complex pair, the plane is the dominant invariant subspace and ``rho = sqrt(det H)``
   exactly; when real, the larger modulus of the Ritz values whose residual passes the test
   below (two real eigenvectors of nearly equal modulus, e.g. ``-rho`` and ``0.95 rho``);
   with none passing, the Ritz value nearer ``alpha`` (the Rayleigh quotient of ``v``): the
   other belongs to a direction that is not converged, and for a non-normal ``J`` it can
   exceed ``rho``.
3. Trust: a sample is ``converged`` when the Ritz residual (``||J y - lambda y||``, or how
   far the plane is from invariant) is at most ``rtol * radius`` -- ARPACK's test.

The error decays like ``(|lambda_3| / rho)^iters`` (``lambda_3`` the largest eigenvalue
outside the dominant line/plane); no method based on products alone is exact for every
matrix: eigenvalues of equal modulus and different argument (``+-rho``, or three on one circle)
make the estimate a lower bound. Every sample is its own problem (the batch is block
diagonal); a zero Jacobian gives 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = [
    "SpectralRadius", "power_step", "ritz_radius", "spectral_radius_from_matvec",
    "unconverged_message",
]


def _normalised(xp: Any, v: Any) -> Any:
    """``v / ||v||`` per row; a zero row stays zero (a zero Jacobian has radius 0)."""
    norm = xp.linalg.vector_norm(v, axis=-1, keepdims=True)
    return v / xp.where(norm > 0, norm, xp.ones_like(norm))


def power_step(xp: Any, matvec: Callable[[Any], Any], v: Any) -> Any:
    """One step of power iteration on ``(B, n)`` rows: ``J v / ||J v||`` per sample."""
    return _normalised(xp, matvec(v))


def ritz_radius(
    xp: Any, matvec: Callable[[Any], Any], v: Any, rtol: float
) -> tuple[Any, Any]:
    """``(B,)`` modulus of the dominant Ritz value of ``J`` on ``span{v, J v}``, and its
    residual (module doc).

    The residual is ``||J y - lambda y||`` for the unit Ritz vector ``y`` of the chosen real
    Ritz value, or ``||(I - Q Q^T) J Q||`` (how far the plane is from invariant) for a complex
    pair: small means the Ritz value is (nearly) an eigenvalue of ``J``, as in ARPACK's
    stopping test. Two products of ``J``.
    """
    q1 = _normalised(xp, v)
    jq1 = matvec(q1)
    alpha = xp.sum(q1 * jq1, axis=-1)
    r = jq1 - alpha[:, None] * q1
    beta = xp.linalg.vector_norm(r, axis=-1)
    # r is roundoff when q1 is an eigenvector: then the plane is meaningless and alpha is the
    # answer (the zero q2 below makes H = [[alpha, 0], [0, 0]] and the residual beta)
    scale = xp.linalg.vector_norm(jq1, axis=-1)
    eps = xp.finfo(v.dtype).eps
    degenerate = beta <= 64 * eps * scale
    safe_beta = xp.where(degenerate, xp.ones_like(beta), beta)
    q2 = xp.where(degenerate[:, None], xp.zeros_like(r), r / safe_beta[:, None])
    jq2 = matvec(q2)
    h11, h21 = alpha, xp.where(degenerate, xp.zeros_like(beta), beta)
    h12 = xp.sum(q1 * jq2, axis=-1)
    h22 = xp.sum(q2 * jq2, axis=-1)
    # J q1 lies in the plane by construction; what of J q2 leaves it measures invariance
    outside = xp.linalg.vector_norm(jq2 - h12[:, None] * q1 - h22[:, None] * q2, axis=-1)
    half_tr = (h11 + h22) / 2
    det = h11 * h22 - h12 * h21
    disc = half_tr * half_tr - det
    complex_pair = disc < 0
    root = xp.sqrt(xp.where(complex_pair, xp.zeros_like(disc), disc))
    lam_plus, lam_minus = half_tr + root, half_tr - root
    nearer_plus = xp.abs(lam_plus - alpha) <= xp.abs(lam_minus - alpha)

    def residual_of(lam: Any) -> Any:
        # unit eigenvector s of H for lam: (h12, lam - h11) or (lam - h22, h21), the longer;
        # J Q s - lam Q s = s2 * (the part of J q2 outside the plane)
        a1, a2 = h12, lam - h11
        b1, b2 = lam - h22, h21
        na, nb = xp.sqrt(a1 * a1 + a2 * a2), xp.sqrt(b1 * b1 + b2 * b2)
        use_a = na >= nb
        top = xp.where(use_a, na, nb)
        s2 = xp.where(use_a, a2, b2) / xp.where(top > 0, top, xp.ones_like(top))
        s2 = xp.where(top > 0, s2, xp.zeros_like(s2))
        return xp.where(degenerate, beta, xp.abs(s2) * outside)

    res_plus, res_minus = residual_of(lam_plus), residual_of(lam_minus)
    ok_plus = res_plus <= rtol * xp.abs(lam_plus)
    ok_minus = res_minus <= rtol * xp.abs(lam_minus)
    # of the accurate Ritz values (each within its residual of an eigenvalue of J), the
    # larger; v mixing two real eigenvectors of nearly equal modulus (-rho and 0.95 rho)
    # makes both accurate, and alpha may be nearer the smaller. With none accurate, the one
    # nearer alpha (the other belongs to an unconverged direction and, for a non-normal J,
    # can exceed rho), reported unconverged by its residual.
    plus_first = xp.abs(lam_plus) >= xp.abs(lam_minus)
    pick_plus = xp.where(
        ok_plus & ok_minus, plus_first,
        xp.where(ok_plus | ok_minus, ok_plus, nearer_plus),
    )
    real_radius = xp.abs(xp.where(pick_plus, lam_plus, lam_minus))
    real_residual = xp.where(pick_plus, res_plus, res_minus)
    modulus_pair = xp.sqrt(xp.where(complex_pair, det, xp.zeros_like(det)))
    radius = xp.where(complex_pair, modulus_pair, real_radius)
    residual = xp.where(complex_pair, outside, real_residual)
    return radius, residual


class SpectralRadius(NamedTuple):
    """Per-sample estimate of ``rho(J_f(z*))`` (``(B,)`` arrays, or 0-d for one sample).

    Attributes:
        radius: the estimate (module doc).
        residual: the Ritz residual (:func:`ritz_radius`), ``||J y - lambda y||`` with
            ``||y|| = 1``: for a normal ``J`` the Ritz value is within it of an eigenvalue.
        converged: ``residual <= rtol * radius``. ``False`` marks an estimate not to be
            trusted: more ``iters`` are needed, or the dominant eigenvalues are too close
            in modulus for power iteration to separate them.
        iterations: power steps made (the products of the Jacobian are ``iters + 2``).
    """

    radius: Any
    residual: Any
    converged: Any
    iterations: int


def spectral_radius_from_matvec(
    xp: Any,
    matvec: Callable[[Any], Any],
    v0: Any,
    *,
    iters: int,
    rtol: float,
    loop: Callable[[int, Callable[[Any], Any], Any], Any] | None = None,
) -> SpectralRadius:
    """Estimate ``rho(J_b)`` per sample from products ``v -> J v`` on ``(B, n)`` rows.

    ``v0``: the ``(B, n)`` start (random, so that it has a component along the dominant
    eigenvectors). ``loop(n, body, v)``: how to run ``n`` power steps (a Python loop by
    default; JAX passes ``lax.fori_loop`` so the steps are not unrolled under ``jit``).
    A sample is converged when its Ritz residual is at most ``rtol * radius``.
    Cost: ``iters + 2`` calls of ``matvec``.
    """
    def body(v: Any) -> Any:
        return power_step(xp, matvec, v)

    v = _normalised(xp, v0)
    if loop is None:
        for _ in range(iters):
            v = body(v)
    else:
        v = loop(iters, body, v)
    radius, residual = ritz_radius(xp, matvec, v, rtol)
    converged = residual <= rtol * radius
    return SpectralRadius(radius=radius, residual=residual, converged=converged,
                          iterations=iters)


def unconverged_message(unconverged: int, total: int, iters: int, rtol: float) -> str:
    """The eager warning of the adapters' ``spectral_radius`` when samples did not converge."""
    return (
        f"spectral_radius: {unconverged} of {total} samples did not converge in {iters} power "
        f"steps (Ritz residual > rtol * radius, rtol={rtol:g}); their radius is a rough "
        "estimate. Raise iters, or see SpectralRadius.converged."
    )
