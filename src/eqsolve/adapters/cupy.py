"""CuPy adapter: fused GPU solver steps, implicit gradients from a user VJP, DLPack interop.

**Fused path.** On CuPy arrays the generic Array-API step launches dozens of small kernels
per iteration (residual norms, Gram update, small solve, mixing, ring-buffer writes, the
``where`` bookkeeping of ``core/loop.py``) and the Python loop reads ``any(active)`` back
to the host every iteration. :func:`run_fused` replaces all of it with **one kernel launch
per iteration** (``cupy_kernels``: ``picard_step``, ``anderson_step``, ``broyden_step``; one
block per sample) plus the call of ``f``, and reads the number of stopped samples back only
every ``sync_every`` iterations. Per-sample results (best iterate, relative residual,
status, iteration count) and ``nfev`` are those of the generic loop; the algebra is the
same (``core/anderson.py``, ``core/broyden.py``), only the floating-point summation order
differs.

``sync_every > 1``: the host learns that every sample has stopped up to ``sync_every - 1``
iterations late, and ``f`` is then called on the (frozen, parked) batch that many extra
times. Those calls change nothing and are not counted: ``Solution.nfev`` is
``1 + max(iterations)``, as on the generic path. ``sync_every=1`` makes no extra call.

**Selection** (:func:`use_fused`): the CuPy backend's ``run`` takes the fused path for the
built-in solvers (exact types ``Picard``, ``Anderson`` with ``m <= 32``, ``Broyden`` with
``memory <= 32``) in float32/float64. ``fused=None`` (default, "auto") also requires
``n <= AUTO_MAX_N`` per sample or a batch of at least ``2 x`` the GPU's SM count: with one
block per sample, a handful of very long samples would leave most of the GPU idle, and the
generic path (cuBLAS) is then the better bet. This threshold is a design estimate, not yet
measured on a GPU. ``fused=True`` skips the size rule, ``fused=False`` always takes the
generic path. Set them with :func:`options` (a context manager, also honoured by
``eqsolve.fixed_point`` / ``eqsolve.solve``) or as arguments of :func:`solve` /
:func:`fixed_point`.

**Gradients.** CuPy has no autodiff: :func:`fixed_point` takes ``vjp(z, v) = J_f(z)^T v``
and returns the solution with a :class:`Pullback` ``g -> u`` solving the adjoint fixed
point ``u = g + J_f(z*)^T u`` (``core.adjoint``; its loop runs on the same fused driver).
``dL/dtheta = u^T df/dtheta(z*)`` is then one VJP of ``f`` with respect to its parameters.

The executors decouple the host logic from CuPy: :class:`CupyExecutor` launches the CUDA
kernels; :class:`ReferenceExecutor` (NumPy reference of each kernel) and
:class:`EmulatorExecutor` (the CUDA source compiled for the CPU) run the very same driver
without a GPU, which is how the tests check it. This module imports CuPy only when a CuPy
executor is created.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..api import solve as _api_solve
from ..backends import get_backend
from ..core.adjoint import (
    AdjointInfo,
    adjoint_solve,
    check_backward_limits,
    check_backward_options,
    default_adjoint_tol,
)
from ..core.anderson import Anderson, AndersonState
from ..core.broyden import Broyden, BroydenState
from ..core.driver import run_python_loop
from ..core.loop import LoopState, StopRule, verify
from ..core.measure import robust_norm
from ..core.picard import Picard, PicardState
from ..core.solution import ConvergenceError, ConvergenceWarning, Solution, Status
from ..core.solver_base import FixedPointSolver
from ..core.structure import Structure, structure_of
from ..core.validation import ON_FAILURE
from . import cupy_kernels as K

__all__ = [
    "ADJOINT_METHODS",
    "AUTO_MAX_N",
    "CupyExecutor",
    "CupyOptions",
    "EmulatorExecutor",
    "Pullback",
    "ReferenceExecutor",
    "as_cupy",
    "current_options",
    "fixed_point",
    "options",
    "run_cupy",
    "run_fused",
    "solve",
    "to_jax",
    "to_torch",
    "unsupported_reason",
    "use_fused",
]

#: adjoint methods accepted by :func:`fixed_point` (``backward=``), or a solver object
ADJOINT_METHODS: tuple[str, ...] = ("anderson", "neumann", "broyden", "gmres")

#: "auto" selection: per-sample size up to which the fused path is taken at any batch size
AUTO_MAX_N = 32768


# --------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CupyOptions:
    """How CuPy solves run: ``fused`` (None = auto, True, False) and ``sync_every``."""

    fused: bool | None = None
    sync_every: int = 8

    def __post_init__(self) -> None:
        if self.fused not in (None, True, False):
            raise TypeError(f"fused must be None (auto), True or False, got {self.fused!r}")
        se = self.sync_every
        if isinstance(se, bool) or not isinstance(se, numbers.Integral) or se < 1:
            raise ValueError(f"sync_every must be an integer >= 1, got {se!r}")


_DEFAULT_OPTIONS = CupyOptions()
_OPTIONS: contextvars.ContextVar[CupyOptions | None] = contextvars.ContextVar(
    "eqsolve_cupy_options", default=None
)


def current_options() -> CupyOptions:
    """The settings in force (those of the innermost :func:`options` block)."""
    return _OPTIONS.get() or _DEFAULT_OPTIONS


@contextlib.contextmanager
def options(*, fused: bool | None = None, sync_every: int = 8) -> Iterator[CupyOptions]:
    """Within the block, CuPy solves (also ``eqsolve.fixed_point``) use these settings.

    >>> with eqsolve.cupy.options(fused=False):              # doctest: +SKIP
    ...     sol = eqsolve.fixed_point(f, z0)                  # the generic Array-API path
    """
    opts = CupyOptions(fused, sync_every)
    token = _OPTIONS.set(opts)
    try:
        yield opts
    finally:
        _OPTIONS.reset(token)


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
# executors: where the kernels run
# --------------------------------------------------------------------------------------


class Executor(Protocol):
    """Runs kernels of ``cupy_kernels`` (one block per sample) on arrays of ``xp``."""

    xp: Any

    def launch(self, kernel: str, dtype: str, grid: int, args: dict[str, Any]) -> None: ...


class ReferenceExecutor:
    """NumPy arrays; each kernel is its NumPy reference (``cupy_kernels.REFERENCE``)."""

    xp = np

    def launch(self, kernel: str, dtype: str, grid: int, args: dict[str, Any]) -> None:
        with np.errstate(all="ignore"):  # the GPU does not warn on inf/NaN either
            K.REFERENCE[kernel](**args)


class EmulatorExecutor:
    """NumPy arrays; each kernel is the CUDA source compiled for the CPU (``build_emulator``)."""

    xp = np

    def __init__(self, emulator: K.Emulator, block: int = 32):
        self.emulator = emulator
        self.block = block

    def launch(self, kernel: str, dtype: str, grid: int, args: dict[str, Any]) -> None:
        self.emulator.launch(kernel, dtype, grid, self.block, args)


class CupyExecutor:
    """CuPy arrays; the kernels compiled by NVRTC (``cupy.RawModule``) on first use."""

    block = 256

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        self._cupy = cupy
        self._module: Any = None
        self._functions: dict[str, Any] = {}

    def _function(self, name: str) -> Any:
        fn = self._functions.get(name)
        if fn is None:
            if self._module is None:
                self._module = self._cupy.RawModule(code=K.cuda_source())
            fn = self._functions[name] = self._module.get_function(name)
        return fn

    def sm_count(self) -> int:
        return int(self._cupy.cuda.Device().attributes["MultiProcessorCount"])

    def launch(self, kernel: str, dtype: str, grid: int, args: dict[str, Any]) -> None:
        real = np.dtype(dtype).type
        values: list[Any] = []
        for p in K.KERNELS[kernel]:
            v = args[p.name]
            if p.is_pointer:
                values.append(v)
            elif p.ctype == "T":
                values.append(real(v))
            elif p.ctype == "int":
                values.append(np.int32(v))
            else:
                values.append(np.int64(v))
        self._function(K.kernel_name(kernel, dtype))((grid,), (self.block,), tuple(values))


_CUPY_EXECUTOR: CupyExecutor | None = None


def cupy_executor() -> CupyExecutor:
    """The process-wide CuPy executor (its compiled module is reused)."""
    global _CUPY_EXECUTOR
    if _CUPY_EXECUTOR is None:
        _CUPY_EXECUTOR = CupyExecutor()
    return _CUPY_EXECUTOR


# --------------------------------------------------------------------------------------
# the fused driver
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
        # the kernels store G unscaled: inv_scale 1
        return "anderson_step", extra, lambda: AndersonState(X, G, H, xp.ones((B,), dtype=dtype))
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
        g0_norm=robust_norm(xp, g0),
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


# --------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------


def _solve_on(
    backend: str,
    f: Callable[[Any], Any],
    z0: Any,
    fused: bool | None,
    sync_every: int,
    kwargs: dict[str, Any],
) -> Solution:
    with options(fused=fused, sync_every=sync_every):
        return _api_solve(f, z0, backend=backend, **kwargs)


def solve(
    f: Callable[[Any], Any],
    z0: Any,
    *,
    fused: bool | None = None,
    sync_every: int = 8,
    **kwargs: Any,
) -> Solution:
    """Forward solve on CuPy (``eqsolve.solve(..., backend="cupy")`` with these options).

    ``z0`` may be any array with DLPack (a CUDA torch tensor, a GPU JAX array): it is
    imported without a copy, and ``f`` receives and returns CuPy arrays.

    Args:
        fused: ``None`` (auto), ``True`` (fused kernels whenever the solver has them) or
            ``False`` (the generic Array-API path).
        sync_every: host synchronisations (the "has every sample stopped?" read) happen
            every this many iterations.
        **kwargs: every argument of :func:`eqsolve.solve` except ``backend``.
    """
    return _solve_on("cupy", f, z0, fused, sync_every, kwargs)


class Pullback:
    """``g -> u``, the solution of ``u = g + J_f(z*)^T u`` (see :func:`fixed_point`).

    ``u`` has the structure of ``z*``; ``dL/dtheta = u^T df/dtheta(z*)``. After a call,
    ``info`` holds the adjoint solve's per-sample :class:`~eqsolve.core.adjoint.AdjointInfo`.
    """

    def __init__(
        self,
        backend: str,
        vjp: Callable[[Any, Any], Any],
        z_star: Any,
        structure: Structure,
        method: str | FixedPointSolver,
        tol: float | None,
        max_iter: int | None,
        method_options: dict[str, Any],
        forward_tol: float,
        on_failure: str,
        run_options: CupyOptions,
    ):
        self._backend = backend
        self._vjp = vjp
        self.z_star = z_star
        self._structure = structure
        self._method = method
        self._tol = tol
        self._max_iter = max_iter
        self._method_options = method_options
        self._forward_tol = forward_tol
        self._on_failure = on_failure
        self._run_options = run_options
        self.info: AdjointInfo | None = None

    def __call__(self, g: Any) -> Any:
        be = get_backend(self._backend)
        xp = be.xp
        st = self._structure
        leaves = st.leaves(g) if isinstance(g, (tuple, list)) else [g]
        if len(leaves) != len(st.shapes):
            raise ValueError(f"g has {len(leaves)} arrays, the solution {len(st.shapes)}")
        leaves = [be.convert(leaf) for leaf in leaves]
        z_leaves = st.leaves(self.z_star)
        for i, (leaf, zl) in enumerate(zip(leaves, z_leaves, strict=True)):
            if tuple(leaf.shape) != tuple(zl.shape) or leaf.dtype != zl.dtype:
                raise ValueError(
                    f"cotangent {i} has shape {tuple(leaf.shape)} and dtype {leaf.dtype}; "
                    f"the solution has {tuple(zl.shape)} and {zl.dtype}"
                )
        g_tree = leaves[0] if st.container is None else st.container(leaves)
        g_flat = st.flatten(xp, g_tree)
        nvjp = 0

        def vjp_flat(v: Any) -> Any:
            nonlocal nvjp
            nvjp += 1
            return st.flatten(xp, self._vjp(self.z_star, st.unflatten(xp, v)))

        eps = float(np.finfo(str(g_flat.dtype)).eps)
        tol = self._tol if self._tol is not None else default_adjoint_tol(self._forward_tol, eps)
        max_iter = self._max_iter if self._max_iter is not None else 100
        opts = self._run_options
        with options(fused=opts.fused, sync_every=opts.sync_every):
            u, info = adjoint_solve(
                xp,
                vjp_flat,
                g_flat,
                method=self._method,
                tol=tol,
                max_iter=max_iter,
                driver=be.run,
                **self._method_options,
            )
        self.info = info
        if self._on_failure != "ignore":
            _report_adjoint(xp, u, info, self._method, tol, max_iter, nvjp, self._on_failure)
        return st.unflatten(xp, u)


def _report_adjoint(
    xp: Any,
    u: Any,
    info: AdjointInfo,
    method: Any,
    tol: float,
    max_iter: int,
    nvjp: int,
    on_failure: str,
) -> None:
    status = xp.reshape(info.status, (-1,))
    n = int(status.shape[0])
    n_max = int(xp.sum(xp.astype(status == int(Status.MAX_ITER), xp.int32)))
    n_bad = int(xp.sum(xp.astype(status == int(Status.NONFINITE), xp.int32)))
    if n_max == 0 and n_bad == 0:
        return
    name = method if isinstance(method, str) else type(method).__name__
    parts = []
    if n_max:
        worst = float(xp.max(xp.reshape(info.residual, (-1,))[status == int(Status.MAX_ITER)]))
        parts.append(
            f"{n_max} of {n} samples did not reach backward_tol={tol:.3g} within "
            f"backward_max_iter={max_iter} (largest relative residual {worst:.3g})"
        )
    if n_bad:
        parts.append(f"{n_bad} of {n} samples hit NaN/inf")
    message = f"adjoint solve (backward={name!r}): " + "; ".join(parts)
    if on_failure == "raise":
        adjoint = Solution(
            value=u,
            converged=info.converged,
            iterations=info.iterations,
            residual=info.residual,
            status=info.status,
            nfev=nvjp,
        )
        raise ConvergenceError(message, adjoint)
    import warnings

    warnings.warn(message, ConvergenceWarning, stacklevel=3)


def _fixed_point_on(
    backend: str,
    f: Callable[[Any], Any],
    z0: Any,
    *,
    vjp: Callable[[Any, Any], Any],
    backward: str | FixedPointSolver = "anderson",
    backward_tol: float | None = None,
    backward_max_iter: int | None = None,
    backward_options: Mapping[str, Any] | None = None,
    fused: bool | None = None,
    sync_every: int = 8,
    **kwargs: Any,
) -> tuple[Solution, Pullback]:
    if not callable(vjp):
        raise TypeError(f"vjp must be callable as vjp(z, v), got {type(vjp).__name__}")
    if not isinstance(backward, FixedPointSolver):
        if not isinstance(backward, str) or backward not in ADJOINT_METHODS:
            raise ValueError(
                f"backward must be one of {', '.join(map(repr, ADJOINT_METHODS))} or a solver "
                f"object such as eqsolve.Anderson(m=5); got {backward!r}"
            )
    tol, max_iter = check_backward_limits(backward_tol, backward_max_iter)
    method_options = check_backward_options(backward, backward_options)
    on_failure = kwargs.get("on_failure", "warn")
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
    run_options = CupyOptions(fused, sync_every)
    sol = _solve_on(backend, f, z0, fused, sync_every, kwargs)
    structure = structure_of(sol.value, kwargs.get("batch_axis", "auto"))
    pullback = Pullback(
        backend,
        vjp,
        sol.value,
        structure,
        backward,
        tol,
        max_iter,
        method_options,
        float(kwargs.get("tol", 1e-6)),
        on_failure,
        run_options,
    )
    return sol, pullback


def fixed_point(
    f: Callable[[Any], Any],
    z0: Any,
    *,
    vjp: Callable[[Any, Any], Any],
    backward: str | FixedPointSolver = "anderson",
    backward_tol: float | None = None,
    backward_max_iter: int | None = None,
    backward_options: Mapping[str, Any] | None = None,
    fused: bool | None = None,
    sync_every: int = 8,
    **kwargs: Any,
) -> tuple[Solution, Pullback]:
    """Fixed point ``z* = f(z*)`` on CuPy, with its implicit gradient through ``vjp``.

    Args:
        f: the map, on CuPy arrays with the structure of ``z0``.
        z0: initial guess (CuPy array, any DLPack GPU array, or a tuple/list of them).
        vjp: ``vjp(z, v) -> J_f(z)^T v``, the vector-Jacobian product of ``f`` with respect
            to ``z`` (``z`` and ``v`` have the structure of ``z0``).
        backward: adjoint solver: ``"anderson"`` (default), ``"neumann"``, ``"broyden"``,
            ``"gmres"`` or a configured solver object.
        backward_tol: adjoint tolerance; default ``max(tol, 10 eps(dtype))``.
        backward_max_iter: adjoint iterations (GMRES: restart cycles); default 100.
        backward_options: options of the adjoint method, e.g. ``{"m": 5}``.
        fused, sync_every: as in :func:`solve` (they apply to the adjoint solve too).
        **kwargs: the forward solve's arguments (``solver``, ``tol``, ``max_iter``,
            ``batch_axis``, ``on_failure`` -- also used for the adjoint --, solver options).

    Returns:
        ``(solution, pullback)``: ``pullback(g)`` is the ``u`` with ``u = g + J_f(z*)^T u``
        for a cotangent ``g = dL/dz*``, so that ``dL/dtheta = u^T df/dtheta(z*)``.

    Example (needs a CUDA GPU)::

        sol, pullback = eqsolve.cupy.fixed_point(f, z0, vjp=lambda z, v: vjp_of_f(z, v))
        u = pullback(dloss_dz(sol.value))          # then dL/dW = vjp of f w.r.t. W, at u
    """
    return _fixed_point_on(
        "cupy",
        f,
        z0,
        vjp=vjp,
        backward=backward,
        backward_tol=backward_tol,
        backward_max_iter=backward_max_iter,
        backward_options=backward_options,
        fused=fused,
        sync_every=sync_every,
        **kwargs,
    )


# --------------------------------------------------------------------------------------
# DLPack interop (no copies between CUDA arrays of the same device)
# --------------------------------------------------------------------------------------


def _tree(fn: Callable[[Any], Any], tree: Any) -> Any:
    if isinstance(tree, (tuple, list)):
        return type(tree)(fn(x) for x in tree)
    return fn(tree)


def as_cupy(x: Any) -> Any:
    """CuPy view of a DLPack array (a CUDA torch tensor -- detached --, a GPU JAX array).

    No copy for device arrays; host arrays are copied to the current device. Accepts a
    tuple/list of arrays.
    """
    return _tree(get_backend("cupy").convert, x)


def to_torch(x: Any) -> Any:
    """A torch tensor sharing memory with CuPy array ``x`` (or a tuple/list of them)."""
    import torch

    return _tree(torch.from_dlpack, x)


def to_jax(x: Any) -> Any:
    """A JAX array sharing memory with CuPy array ``x`` (needs a CUDA-enabled jaxlib)."""
    import jax.numpy as jnp

    return _tree(jnp.from_dlpack, x)
