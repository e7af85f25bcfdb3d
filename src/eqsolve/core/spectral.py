"""Spectral radius of the Jacobian at a fixed point, per sample, from matrix-vector products.

DEQ papers watch ``rho(J_f(z*))`` during training: it says how contractive the layer is at its
equilibrium (plain iteration converges locally iff ``rho < 1``, at the rate ``rho``; the
adjoint system ``u = g + J^T u`` has the same spectrum). Forming ``J`` costs ``n`` products;
this estimates ``rho`` with ``iters + krylov + 2`` products ``v -> J v`` and no dense matrix.

Method (Saad, "Numerical Methods for Large Eigenvalue Problems", 2nd ed., SIAM 2011,
sections 4.1, 4.3 and 6.2):

1. Power iteration ``v_{k+1} = J v_k / ||J v_k||``, ``iters`` steps from a random start:
   cheap, memory-free damping of the start's components along small eigenvalues.
2. Arnoldi, ``krylov`` steps from ``v`` (:func:`arnoldi_start`): the Ritz values of the
   Krylov space separate eigenvalues of nearly equal modulus far faster than power
   iteration does (the circular spectra of random DEQ cells need hundreds of power steps).
   The dominant Ritz vector (found without an eigenvalue routine, which the Array API
   lacks) becomes the new ``v``.
3. Rayleigh-Ritz on the plane ``span{v, J v}`` (:func:`ritz_radius`): with ``q1 = v``,
   ``J q1 = alpha q1 + beta q2`` (Gram-Schmidt), ``H = [[alpha, q1.Jq2], [beta, q2.Jq2]]``.
   When its eigenvalues (closed form for 2x2) are a complex pair, the plane is the dominant
   invariant subspace of a pair ``rho e^{+-i theta}`` -- where plain power iteration never
   settles -- and ``rho = sqrt(det H)``; when real, the larger modulus of the Ritz values
   whose residual passes the test below, or with none passing, the one nearer ``alpha``.
4. Trust: a sample is ``converged`` when the Ritz residual (``||J y - lambda y||``, or how
   far the plane is from invariant) is at most ``rtol * radius`` -- ARPACK's test. For a
   normal ``J`` an eigenvalue then lies within the residual of the estimate.

No method based on products alone is exact for every matrix: an eigenvalue of the largest
modulus whose direction the Krylov space has not yet found leaves the estimate below
``rho`` (a lower bound, often with a small residual: a converged sample is an accurate
eigenvalue, not a proof that no larger one exists), and for a strongly non-normal ``J`` a
small residual bounds only the backward error. Every sample is its own problem (the batch
is block diagonal); a zero Jacobian gives 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = [
    "SpectralRadius", "arnoldi_start", "power_step", "ritz_radius",
    "spectral_radius_from_matvec", "unconverged_message",
]

#: ``loop(n, body, carry)`` runs ``carry = body(i, carry)`` for ``i < n`` (``lax.fori_loop``)
Loop = Callable[[int, Callable[[Any, Any], Any], Any], Any]


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
        iterations: power and Arnoldi steps made (the products of the Jacobian are two
            more).
    """

    radius: Any
    residual: Any
    converged: Any
    iterations: int


def _python_loop(n: int, body: Callable[[int, Any], Any], carry: Any) -> Any:
    for i in range(n):
        carry = body(i, carry)
    return carry


def arnoldi_start(
    xp: Any, matvec: Callable[[Any], Any], v: Any, m: int, loop: Loop = _python_loop
) -> Any:
    """A start vector for the Ritz step: the dominant Ritz vector of an ``m``-step Arnoldi.

    Arnoldi (Saad 2011, section 6.2) builds an orthonormal basis ``Q`` of the Krylov space
    ``span{v, Jv, ..., J^{m-1} v}`` and ``H = Q^T J Q`` (upper Hessenberg). Its Ritz values
    approximate the outermost eigenvalues of ``J`` far faster than power iteration
    separates them (for eigenvalues of nearly equal modulus, as in the circular spectra of
    random DEQ cells). The Array API has no eigenvalue routine, so the dominant invariant
    subspace of the small ``H`` is found by Gelfand's formula instead: repeated normalised
    squaring ``P <- (P / max|P|)^2`` (40 times: ``H^(2^40)``) leaves only the directions of
    the eigenvalue(s) of largest modulus, and the longest column of ``P``, mapped back by
    ``Q``, is the Ritz vector the caller's :func:`ritz_radius` then tests with a residual.

    Fixed shapes throughout (the basis is an ``(m, B, n)`` buffer, columns of ``H`` are
    added with one-hot masks, Gram-Schmidt runs twice against every slot, unfilled ones
    being zero), so ``loop`` may be ``lax.fori_loop``. Cost: ``m`` products and
    ``m (B, n)`` vectors of memory. A basis vector whose new direction is roundoff (an
    invariant subspace reached early) is left zero.
    """
    b, n = v.shape
    eps = xp.finfo(v.dtype).eps
    slots = xp.arange(m)
    q0 = _normalised(xp, v)
    basis = xp.where((slots == 0)[:, None, None], q0[None, ...], xp.zeros((m, b, n),
                                                                            dtype=v.dtype))
    hess = xp.zeros((b, m, m), dtype=v.dtype)

    def step(j: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
        basis, hess = carry
        here = slots == j
        q = xp.sum(xp.where(here[:, None, None], basis, xp.zeros_like(basis)), axis=0)
        w = matvec(q)
        scale = xp.linalg.vector_norm(w, axis=-1)
        column = xp.zeros((m, b), dtype=v.dtype)
        for _ in range(2):  # classical Gram-Schmidt, repeated ("twice is enough")
            c = xp.sum(basis * w[None, ...], axis=-1)  # (m, B); 0 on unfilled slots
            w = w - xp.sum(c[:, :, None] * basis, axis=0)
            column = column + c
        beta = xp.linalg.vector_norm(w, axis=-1)
        fresh = beta > 64 * eps * scale
        nxt = xp.where(fresh[:, None], w / xp.where(fresh, beta, xp.ones_like(beta))[:, None],
                       xp.zeros_like(w))
        below = slots == j + 1
        column = xp.where(below[:, None], xp.where(fresh, beta, xp.zeros_like(beta))[None, :],
                          column)
        basis = xp.where(below[:, None, None], nxt[None, ...], basis)
        hess = hess + xp.where(here[None, None, :], xp.permute_dims(column, (1, 0))[:, :, None],
                               xp.zeros_like(hess))
        return basis, hess

    basis, hess = loop(m, step, (basis, hess))
    p = hess
    for _ in range(40):
        top = xp.max(xp.abs(p), axis=(1, 2), keepdims=True)
        p = p / xp.where(top > 0, top, xp.ones_like(top))
        p = xp.matmul(p, p)
    lengths = xp.linalg.vector_norm(p, axis=1)  # (B, m): norm of each column
    pick = xp.argmax(lengths, axis=-1)
    onehot = slots[None, :] == pick[:, None]
    y = xp.sum(xp.where(onehot[:, None, :], p, xp.zeros_like(p)), axis=-1)  # (B, m)
    start = xp.sum(xp.permute_dims(y, (1, 0))[:, :, None] * basis, axis=0)
    # nothing found (H = 0: J v = 0): keep v, whose Ritz step then reports radius 0
    found = xp.linalg.vector_norm(start, axis=-1) > 0
    return xp.where(found[:, None], start, q0)


def spectral_radius_from_matvec(
    xp: Any,
    matvec: Callable[[Any], Any],
    v0: Any,
    *,
    iters: int,
    krylov: int,
    rtol: float,
    loop: Loop = _python_loop,
) -> SpectralRadius:
    """Estimate ``rho(J_b)`` per sample from products ``v -> J v`` on ``(B, n)`` rows.

    ``iters`` power steps from ``v0`` (random, so that it has a component along the
    dominant eigenvectors), then, when ``krylov >= 2``, :func:`arnoldi_start` with that many
    Arnoldi steps, then the Rayleigh-Ritz step and residual test of :func:`ritz_radius`.
    ``loop(n, body, carry)``: how to run ``n`` steps of ``body(i, carry)`` (a Python loop by
    default; JAX passes ``lax.fori_loop`` so nothing is unrolled under ``jit``).
    A sample is converged when its Ritz residual is at most ``rtol * radius``.
    Cost: ``iters + krylov + 2`` calls of ``matvec``.
    """
    def power(_: Any, v: Any) -> Any:
        return power_step(xp, matvec, v)

    v = loop(iters, power, _normalised(xp, v0))
    if krylov >= 2:
        v = arnoldi_start(xp, matvec, v, krylov, loop)
    radius, residual = ritz_radius(xp, matvec, v, rtol)
    converged = residual <= rtol * radius
    return SpectralRadius(radius=radius, residual=residual, converged=converged,
                          iterations=iters + krylov)


def unconverged_message(
    unconverged: int, total: int, iters: int, krylov: int, rtol: float
) -> str:
    """The eager warning of the adapters' ``spectral_radius`` when samples did not converge."""
    return (
        f"spectral_radius: {unconverged} of {total} samples did not converge with iters={iters}"
        f" power steps and krylov={krylov} Arnoldi steps (Ritz residual > rtol * radius, "
        f"rtol={rtol:g}); their radius is a rough estimate. Raise iters or krylov, or see "
        "SpectralRadius.converged."
    )
