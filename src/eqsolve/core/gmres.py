"""Restarted GMRES for the adjoint system ``(I - J^T) u = g``: matrix-free, batched per sample.

GMRES (Saad & Schultz 1986) solves ``A u = b`` by minimising the residual over a Krylov
space. From the current point ``u_0`` with residual ``r_0 = b - A u_0``, ``beta = ||r_0||``,
``m`` steps of the Arnoldi process build an orthonormal basis ``V_{m+1} = [v_0 .. v_m]``
(``v_0 = r_0 / beta``) and an upper-Hessenberg ``H_m`` ((m+1) x m) with
``A V_m = V_{m+1} H_m``. The iterate

    u_m = u_0 + V_m y,    y = argmin_y || beta e_1 - H_m y ||

minimises ``||b - A u||`` over ``u_0 + K_m(A, r_0)``. Here ``A = I - J^T`` is applied
through ``vjp`` (``A v = v - vjp(v)``), on the ``(B, n)`` per-sample view.

Implementation choices:

* **Batched per sample.** Each sample owns its basis (``m + 1`` vectors: ``(B, m+1, n)``),
  its Hessenberg matrix (``(B, m+1, m)``, kept rotated to triangular form) and its Givens
  rotations; samples never mix, and each has its own breakdown and convergence.
* **Static shapes.** ``m = min(restart, n)`` Arnoldi steps per cycle, always (a Python
  loop over a static count: the same code is traced once by ``jax.jit``). No Python
  control flow on array values, ``xp.where`` masks instead. The basis and Hessenberg are
  held as Python lists of ``(B, n)`` / ``(B,)`` arrays, so every operation has one shape
  whatever the step (JAX compiles each primitive once when run eagerly; no scatters).
* **Orthogonalisation**: modified Gram-Schmidt followed by one full re-orthogonalisation
  pass ("twice is enough"), so ``V`` stays orthonormal to working precision.
* **Least squares** by Givens rotations applied column by column (the numerically standard
  choice, as in Saad & Schultz); ``|gamma_{j+1}|`` is the residual of step ``j``, ``y`` comes
  from a masked back-substitution.
* **Breakdown.** When the orthogonalised vector ``w`` is at rounding level (``||w|| <= eps
  ||A v_j||``; exactly zero at a "happy" breakdown, or when ``r_0 = 0``), the Krylov space is
  invariant: the next basis vector is set to zero, later columns are masked out (their
  ``y`` entries are exactly 0) and nothing is divided by a zero norm.
* **Restarts are the outer loop, driven by the shared fixed-point loop** (``core.loop``
  through a ``driver``). One restart cycle is written as a fixed-point *solver* for the
  linear map ``h(u) = b + J^T u``: given the current point ``u`` and its residual
  ``h(u) - u = b - A u`` (which the loop evaluates anyway), ``propose`` runs one Arnoldi
  cycle and returns ``u + V y``. The loop then evaluates ``h`` at the proposal, so every
  reported residual is the *true* one (never the recurrence), the stopping rule, best
  iterate, per-sample freezing and NaN handling are the same code as for the other
  methods, and one cycle costs ``m + 1`` VJPs, like textbook GMRES(m).

  **JAX.** With ``driver=get_backend("jax").run`` (what the JAX adapter passes) the
  cycles run under ``lax.while_loop``: ``gmres_solve`` works inside ``jax.jit`` with a
  data-dependent number of cycles and the Arnoldi cycle traced once. The default driver is
  the Python loop, which reads ``any(active)`` on the host and so cannot be traced.

The right-hand side is normalised per sample (``g / ||g||``, with the norm computed after
scaling by ``max |g|``, so tiny float32 cotangents such as ``1e-30`` neither underflow the
norm nor give NaN); the solution is scaled back. A zero cotangent gives ``u = 0`` exactly.

Reference:
    Y. Saad and M. H. Schultz, "GMRES: A generalized minimal residual algorithm for solving
    nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 7(3), 856-869 (1986).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from .driver import python_driver
from .loop import StopRule
from .solution import Status
from .solver_base import FixedPointSolver, check_positive

if TYPE_CHECKING:
    from .adjoint import AdjointInfo
    from .driver import Driver


class GmresState(NamedTuple):
    """A restart cycle keeps nothing between cycles (restarted GMRES)."""


def _safe_norm(xp: Any, x: Any) -> Any:
    """Per-row 2-norm of ``x`` ``(B, n)`` without underflow/overflow (scaled by max |x|)."""
    s = xp.max(xp.abs(x), axis=1)
    ok = (s > 0) & xp.isfinite(s)
    s_safe = xp.where(ok, s, xp.ones_like(s))
    scaled = xp.linalg.vector_norm(x / s_safe[:, None], axis=1) * s_safe
    # s == 0: the norm is 0; s inf/nan: propagate a non-finite norm
    return xp.where(ok, scaled, s)


def _hypot(xp: Any, a: Any, b: Any) -> Any:
    """``sqrt(a^2 + b^2)`` elementwise, scaled (no overflow/underflow)."""
    s = xp.maximum(xp.abs(a), xp.abs(b))
    s_safe = xp.where(s > 0, s, xp.ones_like(s))
    return s * xp.sqrt((a / s_safe) ** 2 + (b / s_safe) ** 2)


def _safe_div(xp: Any, num: Any, den: Any, ok: Any) -> Any:
    """``num / den`` where ``ok``, else 0 (never divides by 0; ``num``/``den`` broadcast)."""
    q = num / xp.where(ok, den, xp.ones_like(den))
    return xp.where(ok, q, xp.zeros_like(q))


def gmres_cycle(xp: Any, vjp: Callable[[Any], Any], r: Any, m: int) -> Any:
    """One GMRES(m) cycle: the correction ``V_m y`` for the residual ``r = b - A u`` ``(B, n)``.

    ``A v = v - vjp(v)``. Returns ``(B, n)``; rows with ``r = 0`` (or non-finite ``r``)
    get an exactly zero correction. Pure function of its inputs, static shapes.

    The basis is held as ``m + 1`` arrays ``(B, n)`` and the rotated Hessenberg as ``(B,)``
    entries (the ``(B, m+1, n)`` / ``(B, m+1, m)`` data, one per sample) so every operation
    in the unrolled loop has the same shape whatever ``j`` is: JAX compiles each primitive
    once when run eagerly, and nothing is scattered into a buffer.
    """
    dtype = r.dtype
    eps = float(xp.finfo(dtype).eps)
    zero = xp.zeros_like(r[:, 0])  # (B,)

    beta = _safe_norm(xp, r)
    alive = (beta > 0) & xp.isfinite(beta)  # v_j is a (nonzero) basis vector
    V: list[Any] = [_safe_div(xp, r, beta[:, None], alive[:, None])]
    R: list[list[Any]] = []  # R[j] = column j of the rotated Hessenberg, rows 0..j
    cs: list[Any] = []
    sn: list[Any] = []
    gamma: list[Any] = [xp.where(alive, beta, zero)]  # rotated beta e_1

    for j in range(m):
        w = V[j] - vjp(V[j])  # A v_j
        w = xp.where(alive[:, None], w, xp.zeros_like(w))
        w_norm0 = xp.linalg.vector_norm(w, axis=1)
        # modified Gram-Schmidt, then one re-orthogonalisation sweep ("twice is enough")
        h = [zero] * (j + 1)
        for _ in range(2):
            for i in range(j + 1):
                hij = xp.vecdot(V[i], w)
                w = w - hij[:, None] * V[i]
                h[i] = h[i] + hij

        h_next = xp.linalg.vector_norm(w, axis=1)
        nxt = alive & (h_next > eps * w_norm0)  # else (happy) breakdown: invariant subspace
        V.append(_safe_div(xp, w, h_next[:, None], nxt[:, None]))
        h_next = xp.where(nxt, h_next, zero)

        # apply the previous rotations to the new column, then make the new rotation
        col = [*h, h_next]
        for i in range(j):
            a, b = col[i], col[i + 1]
            col[i] = cs[i] * a + sn[i] * b
            col[i + 1] = cs[i] * b - sn[i] * a
        a, b = col[j], col[j + 1]
        rho = _hypot(xp, a, b)
        ok = rho > 0
        c_j = xp.where(ok, _safe_div(xp, a, rho, ok), xp.ones_like(a))
        s_j = _safe_div(xp, b, rho, ok)
        cs.append(c_j)
        sn.append(s_j)
        col[j] = rho  # = c_j a + s_j b (0 when the column is 0)
        gamma.append(-s_j * gamma[j])
        gamma[j] = c_j * gamma[j]
        R.append(col[: j + 1])
        alive = nxt

    # back-substitution R y = gamma[:m]; a zero diagonal (a column after a breakdown) gives
    # y_i = 0 -- its gamma_i and the rest of its row are 0 as well
    y: list[Any] = [zero] * m
    for i in range(m - 1, -1, -1):
        num = gamma[i]
        for k in range(i + 1, m):
            num = num - R[k][i] * y[k]
        d = R[i][i]
        y[i] = _safe_div(xp, num, d, d != 0)
    return xp.matmul(xp.stack(y, axis=1)[:, None, :], xp.stack(V[:m], axis=1))[:, 0, :]


@dataclass(frozen=True, eq=False)
class GmresCycle(FixedPointSolver):
    """One GMRES(m) restart cycle per loop step, as a solver for ``u = b + vjp(u)``.

    Not in the solver registry: it needs the linear part ``vjp`` of the map (the loop's
    residual ``h(u) - u = b - (I - J^T) u`` supplies ``b - A u``). Built by
    :func:`gmres_solve`.
    """

    vjp: Callable[[Any], Any]
    m: int
    name = "gmres"

    def __post_init__(self) -> None:
        check_positive("restart", self.m, integer=True)

    def init(self, xp: Any, z: Any, g: Any) -> GmresState:
        return GmresState()

    def propose(self, xp: Any, state: GmresState, z: Any, g: Any, k: Any) -> Any:
        return z + gmres_cycle(xp, self.vjp, g, self.m)

    def update(
        self, xp: Any, state: GmresState, z: Any, g: Any, z_new: Any, g_new: Any, k: Any
    ) -> GmresState:
        return state


def gmres_solve(
    xp: Any,
    vjp: Callable[[Any], Any],
    g: Any,
    *,
    tol: float,
    max_iter: int,
    restart: int = 20,
    driver: Driver | None = None,
) -> tuple[Any, AdjointInfo]:
    """Solve ``(I - J^T) u = g`` per sample by restarted GMRES (``vjp(v) = J^T v``).

    Args:
        xp: Array-API namespace of ``g``.
        vjp: ``v -> J^T v`` on ``(B, n)`` arrays, per sample (linear in ``v``).
        g: right-hand side (the cotangent), ``(B, n)``.
        tol: relative tolerance, the same rule as the other adjoint methods:
            ``||g + J^T u - u|| <= tol ||g + J^T u||`` (true residual, tested after each
            restart cycle).
        max_iter: maximum number of restart cycles.
        restart: Krylov dimension per cycle (capped at ``n``).
        driver: loop driver (``Backend.run``); the Python loop by default. Pass the JAX
            backend's ``run`` to use ``gmres_solve`` inside ``jax.jit``.

    Returns:
        ``(u, info)``: ``u`` like ``g``; ``info.iterations`` = Arnoldi steps (VJPs inside
        the cycles) applied to each sample, ``restart`` per cycle; ``info.residual`` = the
        true relative residual of ``u``; ``info.converged``; ``info.status``
        (:class:`~eqsolve.core.solution.Status`).
    """
    from .adjoint import AdjointInfo  # adjoint imports this module lazily: no cycle

    check_positive("restart", restart, integer=True)
    check_positive("max_iter", max_iter, integer=True)
    if g.ndim != 2:
        raise ValueError(f"gmres_solve expects a (B, n) right-hand side, got shape {g.shape}")
    m = min(int(restart), int(g.shape[1]))
    run = driver if driver is not None else python_driver(xp)

    # normalise per sample (robust norm: no underflow of tiny float32 cotangents)
    norm = _safe_norm(xp, g)
    scale = xp.where(norm > 0, norm, xp.ones_like(norm))
    g_unit = g / scale[:, None]

    def h(u: Any) -> Any:
        return g_unit + vjp(u)

    state = run(h, g_unit, GmresCycle(vjp, m), StopRule(float(tol), 0.0, int(max_iter)))
    u = state.best_z * scale[:, None]
    info = AdjointInfo(
        iterations=state.iterations * m,
        residual=state.best_res,
        converged=state.status == int(Status.CONVERGED),
        status=state.status,
    )
    return u, info
