"""NumPy reference of each fused CuPy kernel, and an executor that runs the driver on it.

Test helper, not a test file. :data:`REFERENCE` holds, per kernel of
``eqsolve.backends.cupy.kernels.KERNELS``, a NumPy function computing what the kernel computes
(same arguments as keywords, same in-place outputs). :class:`ReferenceExecutor` launches them,
so the fused driver (``eqsolve.backends.cupy.fused.run_fused``) runs on NumPy arrays, iterate
for iterate against the generic solvers, without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

#: the kernels' EQS_CONVERGED, EQS_MAX_ITER, EQS_NONFINITE (``Status`` values)
_CONVERGED, _MAX_ITER, _NONFINITE = 0, 1, 2


def _bookkeep(
    rows: np.ndarray,
    first: int,
    gg: np.ndarray,
    ff: np.ndarray,
    tol: Any,
    atol: Any,
    tiny: Any,
    best_res: np.ndarray,
    active: np.ndarray,
    status: np.ndarray,
    iterations: np.ndarray,
    n_stopped: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``eqs_bookkeep`` for the samples ``rows``: returns (improved, still active, finite)."""
    gn, fn = np.sqrt(gg), np.sqrt(ff)
    finite = np.isfinite(gn) & np.isfinite(fn)
    rel = np.where(finite, gn / np.where(fn > tiny, fn, tiny), np.nan).astype(gg.dtype)
    conv = gn <= tol * fn + atol
    if first:
        improved = np.ones(rows.shape, bool)
        best_res[rows] = rel
        status[rows] = np.where(~finite, _NONFINITE, np.where(conv, _CONVERGED, _MAX_ITER))
        iterations[rows] = 0
    else:
        improved = rel < best_res[rows]
        best_res[rows] = np.where(improved, rel, best_res[rows])
        st = status[rows]
        st = np.where(conv & finite, _CONVERGED, st)
        status[rows] = np.where(~finite, _NONFINITE, st)
        iterations[rows] += 1
    still = finite & ~conv
    active[rows] = still
    n_stopped[0] += int(np.sum(~still))
    return improved, still, finite


def _live(first: int, active: np.ndarray) -> np.ndarray:
    return np.arange(active.shape[0]) if first else np.nonzero(active)[0]


def _park(first: int, active: np.ndarray, best_z: np.ndarray, z_out: np.ndarray) -> None:
    if not first:
        frozen = active == 0
        z_out[frozen] = best_z[frozen]


def _finish(
    rows: np.ndarray,
    improved: np.ndarray,
    still: np.ndarray,
    z: np.ndarray,
    proposal: np.ndarray,
    best_z: np.ndarray,
    z_out: np.ndarray,
) -> None:
    best = np.where(improved[:, None], z, best_z[rows])
    best_z[rows] = best
    z_out[rows] = np.where(still[:, None], proposal, best)


def _ref_picard_step(
    *,
    z,
    fz,
    z_out,
    best_z,
    best_res,
    active,
    status,
    iterations,
    n_stopped,
    n,
    beta,
    tol,
    atol,
    tiny,
    first,
    **_: Any,
) -> None:
    _park(first, active, best_z, z_out)
    rows = _live(first, active)
    if rows.size == 0:
        return
    zz, fb = z[rows], fz[rows]
    g = fb - zz
    improved, still, _finite = _bookkeep(
        rows,
        first,
        np.sum(g * g, axis=1),
        np.sum(fb * fb, axis=1),
        tol,
        atol,
        tiny,
        best_res,
        active,
        status,
        iterations,
        n_stopped,
    )
    _finish(rows, improved, still, zz, zz + beta * g, best_z, z_out)


def lu_solve_partial_pivoting(A: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Batched Gaussian elimination with partial pivoting, as the Anderson kernel does it.

    ``A``: ``(S, m, m)``, ``rhs``: ``(S, m)``. The pivot is the first row of largest
    ``|a|`` (LAPACK's choice); no check for singularity (a zero pivot gives inf/NaN, which
    the ``||alpha||_1`` safeguard turns into a plain step).
    """
    A = np.array(A, copy=True)
    x = np.array(rhs, copy=True)
    S, m, _ = A.shape
    idx = np.arange(S)
    for c in range(m):
        p = c + np.argmax(np.abs(A[:, c:, c]), axis=1)
        Ac, Ap = A[idx, c].copy(), A[idx, p].copy()
        A[idx, c], A[idx, p] = Ap, Ac
        xc, xp_ = x[idx, c].copy(), x[idx, p].copy()
        x[idx, c], x[idx, p] = xp_, xc
        for r in range(c + 1, m):
            fct = A[:, r, c] / A[:, c, c]
            A[:, r, c + 1 :] -= fct[:, None] * A[:, c, c + 1 :]
            x[:, r] -= fct * x[:, c]
            A[:, r, c] = 0
    out = np.zeros_like(x)
    for r in range(m - 1, -1, -1):
        acc = x[:, r].copy()
        for c in range(r + 1, m):
            acc -= A[:, r, c] * out[:, c]
        out[:, r] = acc / A[:, r, r]
    return out


def anderson_weights(H: np.ndarray, count: int, reg: Any, max_coeff: Any) -> tuple[Any, Any]:
    """Mixing weights ``alpha`` (S, m) and the safeguard flag of the Anderson kernel."""
    S, m, _ = H.shape
    dt = H.dtype.type
    valid = np.arange(m) < count
    Hf = np.where(np.isfinite(H), H, dt(0))
    d = np.diagonal(Hf, axis1=1, axis2=2)
    d = np.where(d > 0, d, dt(1))
    dinv = dt(1) / np.sqrt(d)
    A = (Hf * dinv[:, :, None]) * dinv[:, None, :]
    A = A + np.eye(m, dtype=H.dtype) * np.where(valid, reg, dt(1)).astype(H.dtype)
    s = np.where(valid, dinv, dt(0))
    s = s / np.max(s, axis=1, keepdims=True)
    y = lu_solve_partial_pivoting(A, s) * s
    alpha = y / np.sum(y, axis=1, keepdims=True)
    l1 = np.sum(np.abs(alpha), axis=1)
    return alpha, np.isfinite(l1) & (l1 <= max_coeff)


def _ref_anderson_step(
    *,
    z,
    fz,
    z_out,
    X,
    G,
    H,
    best_z,
    best_res,
    active,
    status,
    iterations,
    n_stopped,
    n,
    m,
    e,
    beta,
    reg,
    max_coeff,
    tol,
    atol,
    tiny,
    first,
    **_: Any,
) -> None:
    _park(first, active, best_z, z_out)
    rows = _live(first, active)
    if rows.size == 0:
        return
    slot, count = e % m, min(e + 1, m)
    zz, fb = z[rows], fz[rows]
    g = fb - zz
    X[rows, slot] = zz
    G[rows, slot] = g
    dots = np.zeros((rows.size, m), dtype=z.dtype)
    for r in range(count):
        dots[:, r] = np.sum(g * (g if r == slot else G[rows, r]), axis=1)
    improved, still, finite = _bookkeep(
        rows,
        first,
        dots[:, slot],
        np.sum(fb * fb, axis=1),
        tol,
        atol,
        tiny,
        best_res,
        active,
        status,
        iterations,
        n_stopped,
    )
    rec = rows[finite]
    H[rec, slot, :] = dots[finite]
    H[rec, :, slot] = dots[finite]
    proposal = zz + beta * g
    if np.any(still):
        alpha, ok = anderson_weights(H[rows[still]], count, reg, max_coeff)
        a = alpha[:, :count, None]
        mixed = np.sum(a * X[rows[still], :count], axis=1) + beta * np.sum(
            a * G[rows[still], :count], axis=1
        )
        proposal[still] = np.where(ok[:, None], mixed, proposal[still])
    _finish(rows, improved, still, zz, proposal, best_z, z_out)


def _ref_broyden_step(
    *,
    z,
    fz,
    z_out,
    Zc,
    Gc,
    Hg,
    U,
    V,
    best_z,
    best_res,
    active,
    status,
    iterations,
    n_stopped,
    n,
    mem,
    e,
    eps,
    tol,
    atol,
    tiny,
    first,
    **_: Any,
) -> None:
    _park(first, active, best_z, z_out)
    rows = _live(first, active)
    if rows.size == 0:
        return
    zz, fb = z[rows], fz[rows]
    g = fb - zz
    gg, ff = np.sum(g * g, axis=1), np.sum(fb * fb, axis=1)
    if first:
        Zc[rows], Gc[rows], Hg[rows] = zz, g, -g
        improved, still, _finite = _bookkeep(
            rows,
            first,
            gg,
            ff,
            tol,
            atol,
            tiny,
            best_res,
            active,
            status,
            iterations,
            n_stopped,
        )
        _finish(rows, improved, still, zz, zz + g, best_z, z_out)
        return
    k = e - 1
    slot, cnt, restart = k % mem, (0 if k == 0 else (k - 1) % mem + 1), k % mem == 0
    s = zz - Zc[rows]
    Zc[rows], Gc[rows] = s, g  # as the kernel's pass A (a stopped sample keeps these)
    improved, still, _finite = _bookkeep(
        rows, first, gg, ff, tol, atol, tiny, best_res, active, status, iterations, n_stopped
    )
    proposal = zz.copy()
    go = rows[still]
    if go.size:
        gs, ss_, Ug, Vg = g[still], s[still], U[go], V[go]
        c = np.sum(Vg[:, :cnt] * gs[:, None, :], axis=2)
        d = np.sum(Ug[:, :cnt] * ss_[:, None, :], axis=2)
        hgn = np.sum(c[:, :, None] * Ug[:, :cnt], axis=1) - gs
        hv = np.sum(d[:, :, None] * Vg[:, :cnt], axis=1) - ss_
        hy = hgn - Hg[go]
        denom = np.sum(ss_ * hy, axis=1)
        scale = np.sqrt(np.sum(ss_ * ss_, axis=1)) * np.sqrt(np.sum(hy * hy, axis=1))
        ok = np.isfinite(denom) & (np.abs(denom) > eps * scale) & np.isfinite(scale)
        safe = np.where(ok, denom, 1).astype(z.dtype)
        vg = np.where(ok, np.sum(hv * gs, axis=1), 0).astype(z.dtype)
        u = np.where(ok[:, None], (ss_ - hy) / safe[:, None], 0).astype(z.dtype)
        U[go, slot] = u
        V[go, slot] = np.where(ok[:, None], hv, 0)
        base = -gs if restart else hgn
        hg_next = base + u * vg[:, None]
        Hg[go] = hg_next
        step = -hg_next
        fine = np.all(np.isfinite(step), axis=1)
        proposal[still] = np.where(fine[:, None], zz[still] + step, zz[still] + gs)
        Zc[go] = zz[still]
    _finish(rows, improved, still, zz, proposal, best_z, z_out)


#: kernel -> NumPy function of the kernel's parameters (keywords), mutating its outputs
REFERENCE: dict[str, Callable[..., None]] = {
    "picard_step": _ref_picard_step,
    "anderson_step": _ref_anderson_step,
    "broyden_step": _ref_broyden_step,
}


class ReferenceExecutor:
    """NumPy arrays; each kernel is its NumPy reference (:data:`REFERENCE`)."""

    xp = np

    def launch(self, kernel: str, dtype: str, grid: int, args: dict[str, Any]) -> None:
        with np.errstate(all="ignore"):  # the GPU does not warn on inf/NaN either
            REFERENCE[kernel](**args)
