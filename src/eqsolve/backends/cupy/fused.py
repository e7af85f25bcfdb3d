"""The CuPy backend's fused driver: one kernel launch per iteration.

On CuPy arrays the generic Array-API step launches dozens of small kernels per iteration
(residual norms, Gram update, small solve, mixing, ring-buffer writes, the ``where``
bookkeeping of ``core/loop.py``) and the Python loop reads ``any(active)`` back to the host
every iteration. :func:`run_fused` replaces all of it with **one kernel launch per
iteration** (``kernels.cu``: ``picard_step``, ``anderson_step``, ``broyden_step``; one block
per sample) plus the call of ``f``, and reads the number of stopped samples back only every
``sync_every`` iterations. Per-sample results (best iterate, relative residual, status,
iteration count) and ``nfev`` are those of the generic loop; the algebra is the same
(``core/anderson.py``, ``core/broyden.py``), only the floating-point summation order differs.
:func:`certify` then re-derives every status with the core's stopping rule.

``sync_every > 1``: the host learns that every sample has stopped up to ``sync_every - 1``
iterations late, and ``f`` is then called on the (frozen, parked) batch that many extra
times. Those calls change nothing and are not counted: ``Solution.nfev`` is
``1 + max(iterations)``, as on the generic path. ``sync_every=1`` makes no extra call.

**Selection** (:func:`use_fused`): :func:`run_cupy`, the CuPy backend's ``run``, takes the
fused path for the built-in solvers (exact types ``Picard``, ``Anderson`` with ``m <= 32``,
``Broyden`` with ``memory <= 32``) in float32/float64. ``fused=None`` (default, "auto") also
requires ``n <= AUTO_MAX_N`` per sample or a batch of at least ``2 x`` the GPU's SM count:
with one block per sample, a handful of very long samples would leave most of the GPU idle,
and the generic path (cuBLAS) is then the better bet. This threshold is a design estimate,
not yet measured on a GPU. ``fused=True`` skips the size rule, ``fused=False`` always takes
the generic path (:mod:`.options`).

The driver talks to the kernels through an executor (:mod:`.executor`); it imports CuPy
only when :func:`run_cupy` creates the CuPy one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ...core.anderson import Anderson, AndersonState
from ...core.broyden import Broyden, BroydenState
from ...core.driver import run_python_loop
from ...core.loop import LoopState, StopRule, verify
from ...core.measure import growth_limit, robust_norm
from ...core.picard import Picard, PicardState
from ...core.solution import Status
from ...core.solver_base import FixedPointSolver
from . import kernels as K
from .executor import Executor, cupy_executor
from .options import current_options

#: "auto" selection: per-sample size up to which the fused path is taken at any batch size
AUTO_MAX_N = 32768


# --------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------


def unsupported_reason(solver: FixedPointSolver, dtype: str) -> str | None:
    """Why ``solver`` on ``dtype`` has no fused kernel, or None when it has one."""
    if dtype not in K.DTYPES:
        return f"dtype {dtype} (fused kernels exist for float32 and float64)"
    kind = type(solver)
    if kind is Picard:
        return None
    if kind is Anderson:
        assert isinstance(solver, Anderson)
        if solver.m > K.MAX_HISTORY:
            return f"Anderson m={solver.m} > {K.MAX_HISTORY}"
        return None
    if kind is Broyden:
        assert isinstance(solver, Broyden)
        if solver.memory > K.MAX_HISTORY:
            return f"Broyden memory={solver.memory} > {K.MAX_HISTORY}"
        return None
    return f"solver {kind.__name__} (fused kernels exist for Picard, Anderson and Broyden)"


def use_fused(
    fused: bool | None, solver: FixedPointSolver, batch: int, n: int, dtype: str, sm_count: int
) -> bool:
    """Whether a solve of ``batch`` samples of size ``n`` takes the fused path."""
    if fused is False or unsupported_reason(solver, dtype) is not None:
        return False
    if fused is True:
        return True
    return n <= AUTO_MAX_N or batch >= 2 * sm_count


# --------------------------------------------------------------------------------------
# the fused loop
# --------------------------------------------------------------------------------------


def _solver_buffers(
    xp: Any, solver: FixedPointSolver, B: int, n: int, dtype: Any
) -> tuple[str, dict[str, Any], Callable[[], Any]]:
    """Kernel name, its solver-specific arguments, and a function giving the final state."""
    real = np.dtype(dtype).type
    finfo = np.finfo(dtype)
    if isinstance(solver, Anderson):
        X = xp.zeros((B, solver.m, n), dtype=dtype)
        G = xp.zeros_like(X)
        H = xp.zeros((B, solver.m, solver.m), dtype=dtype)
        reg = solver.regularization
        if reg is None:  # as Anderson.mixing_weights
            reg = max(1e-10, 10.0 * float(finfo.eps))
        extra = dict(
            X=X,
            G=G,
            H=H,
            m=solver.m,
            beta=real(solver.beta),
            reg=real(reg),
            max_coeff=real(solver.max_coefficient),
        )
        # the kernels store iterates X and unscaled residuals G: the core keeps the f-values
        # X + G, and G with inv_scale 1
        return "anderson_step", extra, lambda: AndersonState(
            X + G, G, H, xp.ones((B,), dtype=dtype)
        )
    if isinstance(solver, Broyden):
        U = xp.zeros((B, solver.memory, n), dtype=dtype)
        V = xp.zeros_like(U)
        Zc = xp.empty((B, n), dtype=dtype)
        Gc = xp.empty_like(Zc)
        Hg = xp.empty_like(Zc)
        extra = dict(Zc=Zc, Gc=Gc, Hg=Hg, U=U, V=V, mem=solver.memory, eps=real(finfo.eps))
        return "broyden_step", extra, lambda: BroydenState(U, V, Hg)
    if isinstance(solver, Picard):
        return "picard_step", dict(beta=real(solver.beta)), PicardState
    raise TypeError(f"no fused kernel for {type(solver).__name__}")


def run_fused(
    ex: Executor,
    f: Callable[[Any], Any],
    z0: Any,
    solver: FixedPointSolver,
    rule: StopRule,
    *,
    sync_every: int = 8,
) -> LoopState:
    """``core.loop`` semantics with one fused kernel per iteration (``z0``: ``(B, n)``).

    Returns a :class:`~eqsolve.core.loop.LoopState` whose ``k`` is ``max(iterations)``
    (the generic loop's step count), whatever the number of extra calls of ``f`` that
    ``sync_every > 1`` caused; ``z``/``g`` are the last evaluated point and its residual.
    """
    xp = ex.xp
    dtype = str(z0.dtype)
    if dtype not in K.DTYPES:
        raise TypeError(f"fused kernels need float32 or float64, got {dtype}")
    B, n = (int(s) for s in z0.shape)
    real = np.dtype(dtype).type
    z = xp.ascontiguousarray(z0)  # only read: the caller's z0 is never written
    common = dict(
        best_z=xp.empty((B, n), dtype=z.dtype),
        best_res=xp.empty((B,), dtype=z.dtype),
        active=xp.zeros((B,), dtype=np.int32),
        status=xp.zeros((B,), dtype=np.int32),
        iterations=xp.zeros((B,), dtype=np.int32),
        n_stopped=xp.zeros((1,), dtype=np.int32),
        n=n,
        tol=real(rule.tol),
        atol=real(rule.atol),
        tiny=real(np.finfo(dtype).tiny),
    )
    kernel, extra, final_state = _solver_buffers(xp, solver, B, n, z.dtype)

    def evaluate(point: Any) -> Any:
        fz = f(point)
        if tuple(fz.shape) != (B, n) or fz.dtype != z.dtype:
            raise ValueError(
                f"f returned shape {tuple(fz.shape)} and dtype {fz.dtype} on the solver's "
                f"(batch, n) view; expected {(B, n)} and {z.dtype}"
            )
        return xp.ascontiguousarray(fz)

    def step(point: Any, fz: Any, e: int) -> Any:
        z_out = xp.empty_like(point)  # fresh: f may keep the arrays it was given
        args = dict(common, **extra, z=point, fz=fz, z_out=z_out, e=e, first=int(e == 0))
        ex.launch(kernel, dtype, B, args)
        return z_out

    fz = evaluate(z)
    g0 = fz - z
    z_next = step(z, fz, 0)
    k = 0
    n_stopped = common["n_stopped"]
    while k < rule.max_iter:
        if k % sync_every == 0 and int(n_stopped[0]) >= B:  # the loop's only host sync
            break
        z = z_next
        fz = evaluate(z)
        k += 1
        z_next = step(z, fz, k)
    iterations = common["iterations"]
    active = common["active"] != 0
    return LoopState(
        z=z,
        g=fz - z,
        best_z=common["best_z"],
        best_res=common["best_res"],
        best_ratio=common["best_res"] / real(rule.tol),  # replaced by run_cupy's verification
        at_best=xp.zeros_like(active),  # the kernels do not track it: verify every row
        active=active,
        status=common["status"],
        iterations=iterations,
        reopened=xp.zeros_like(active),
        k=int(xp.max(iterations)),
        z0=z0,
        g0=g0,
        g_limit=growth_limit(xp, robust_norm(xp, g0)),
        solver=final_state(),
    )


def run_cupy(
    xp: Any, f: Callable[[Any], Any], z0: Any, solver: FixedPointSolver, rule: StopRule
) -> LoopState:
    """The CuPy backend's driver: fused when :func:`use_fused` says so, else generic."""
    opts = current_options()
    B, n = (int(s) for s in z0.shape)
    dtype = str(z0.dtype)
    if opts.fused is not False and unsupported_reason(solver, dtype) is None:
        ex = cupy_executor()
        with z0.device:
            if use_fused(opts.fused, solver, B, n, dtype, ex.sm_count()):
                state = run_fused(ex, f, z0, solver, rule, sync_every=opts.sync_every)
                return certify(xp, f, state, solver, rule)
    return run_python_loop(xp, f, z0, solver, rule)


def certify(
    xp: Any, f: Callable[[Any], Any], state: LoopState, solver: FixedPointSolver, rule: StopRule
) -> LoopState:
    """The fused result with every status decided by the core's stopping rule.

    The kernels implement the loop's iteration, but their bookkeeping predates the core's
    stopping-rule arithmetic (scaled norms, best iterate by the rule's ratio, the
    determinacy and divergence tests, re-checks of stopped samples). One more evaluation of
    ``f`` on the returned batch (:func:`~eqsolve.core.loop.verify`) re-derives every status
    and residual there with the core's code, so the fused path keeps the contract of
    :class:`~eqsolve.core.solution.Solution`: what it reports CONVERGED meets the rule at
    the returned value. It costs one call of ``f`` per solve, counted in ``nfev``. Every
    sample is judged as if it claimed convergence now (the kernels apply no determinacy
    test), and the kernels' own claims do not count as re-opened samples.
    """
    claimed = state.status == int(Status.CONVERGED)
    unjudged = state._replace(
        status=xp.where(claimed, xp.full_like(state.status, int(Status.MAX_ITER)), state.status)
    )
    out = verify(xp, f, unjudged, solver, rule)
    return out._replace(reopened=xp.zeros_like(out.reopened))
