"""The array adapter: ``eqsolve.solve`` on any Array API library (no gradients).

This is the framework-neutral forward solve every other entry point builds on: it checks
the arguments, converts ``z0`` to the chosen backend, flattens the state per sample to the
solver's ``(B, n)`` view, widens float16/bfloat16 states, runs the backend's driver of the
core loop, and reports failures (:mod:`eqsolve.adapters.reporting`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat as aac

from ..backends import backend_name_of, get_backend
from ..core.loop import LoopState, StopRule
from ..core.measure import flush_floor
from ..core.precision import OnGrid, widened, working_dtype
from ..core.solution import Solution, Status
from ..core.solver_base import FixedPointSolver, make_solver, solver_option_names
from ..core.structure import BatchAxis, structure_of
from ..core.validation import check_arguments, check_f_output, check_state_arrays, check_states
from .reporting import report_coupling, report_failures

__all__ = ["ENTRY_KEYWORDS", "GRADIENT_KEYWORDS", "check_keywords", "solve", "solve_state"]

#: the keyword arguments every entry point takes, for "did you mean" hints (the
#: differentiable ones add theirs, GRADIENT_KEYWORDS, as ``extra``)
ENTRY_KEYWORDS: tuple[str, ...] = (
    "solver", "tol", "atol", "max_iter", "batch_axis", "backend", "on_failure", "sync_stop",
    "states",
)
#: the keywords of the gradient: ``fixed_point`` and ``DEQ`` take them, ``solve`` does not
GRADIENT_KEYWORDS: tuple[str, ...] = ("backward", "f_dtype", "on_backward")


def check_keywords(
    solver: str | FixedPointSolver, options: dict[str, Any], entry: str,
    extra: tuple[str, ...] = (),
) -> None:
    """A misspelled keyword argument raises a ``TypeError`` that suggests the spelling.

    ``options`` are the keywords that fell through to ``**solver_options``. One that is not
    a hyperparameter of the named solver but looks like an entry point's keyword
    (``tolerance=``, ``max_iters=``) is reported as such ("did you mean 'tol'?"), not as an
    unknown solver option; the others are left to :func:`make_solver`, which names the
    solver's valid options.
    """
    valid = set(solver_option_names(solver)) if isinstance(solver, str) else set()
    keywords = sorted({*ENTRY_KEYWORDS, *extra})
    typos = []
    for name in options:
        if name in valid:
            continue
        if name in GRADIENT_KEYWORDS and name not in keywords:
            raise TypeError(
                f"{entry}() got an unexpected keyword argument {name!r}: it computes no "
                "gradient; fixed_point takes it (eqsolve.fixed_point, eqsolve.torch."
                "fixed_point, eqsolve.jax.fixed_point)"
            )
        alias = _ALIASES.get(name)
        close = difflib.get_close_matches(name, keywords, n=1, cutoff=0.75)
        guess = alias if alias in keywords else (close[0] if close else None)
        if guess is not None:
            typos.append(f"{name!r} (did you mean {guess!r}?)")
    if typos:
        raise TypeError(
            f"{entry}() got an unexpected keyword argument {', '.join(typos)}; its keywords "
            f"are {', '.join(keywords)}, and the options of the chosen solver"
        )


#: common names from other libraries
_ALIASES = {
    "tolerance": "tol", "rtol": "tol", "xtol": "tol", "maxiter": "max_iter",
    "max_iters": "max_iter", "max_steps": "max_iter", "maxfev": "max_iter",
    "method": "solver", "x0": "z0", "init": "z0",
}


def solve(
    f: Callable[[Any], Any],
    z0: Any,
    *,
    solver: str | FixedPointSolver = "auto",
    tol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int = 100,
    batch_axis: BatchAxis = "auto",
    backend: str | None = None,
    on_failure: str = "warn",
    sync_stop: Any = None,
    states: Sequence[int] | None = None,
    **solver_options: Any,
) -> Solution:
    """Find ``z`` with ``z = f(z)``, per sample along ``batch_axis`` (no gradients).

    This is the framework-neutral forward solve; :func:`fixed_point` is the same with
    implicit gradients attached on PyTorch (see there).

    Iterates a quasi-Newton fixed-point solver until, for every sample ``b``, the stopping
    rule ``||f(z_b) - z_b|| <= tol * ||f(z_b)|| + atol`` holds (2-norms over the sample's
    entries, computed without underflow or overflow) at a fixed point that is determined
    (not reached by running away: :attr:`Status.DIVERGED`), or ``max_iter`` updates have
    been applied. Each sample has its own residual, solver history and convergence flag; a
    sample that has stopped is frozen, so solving a batch gives each sample the result it
    gets alone when ``f`` treats samples independently. When it does not, stopped samples
    are re-checked at every evaluation and re-opened (with a :class:`CouplingWarning`).

    The returned :class:`Solution` keeps one contract: a sample's status is CONVERGED if
    and only if the rule holds at the returned value, and ``residual`` is that value's
    relative residual; every other outcome is a status (and eagerly a warning).

    Args:
        f: the map, called with (and returning) arrays like ``z0`` of the solve's backend.
            It is evaluated on the whole batch once per iteration.
        z0: initial guess: an array, or a tuple/list of arrays that share the batch axis
            (the multi-resolution states of a multiscale DEQ). Real floating dtype;
            float16/bfloat16 states are iterated in float32 with ``f`` evaluated on points
            of the state's dtype (see :mod:`eqsolve.core.precision`). ``f`` must return new
            arrays: writing into its argument raises (NumPy, PyTorch).
        solver: ``"auto"`` (default: Anderson mixing that starts per sample once plain
            iteration contracts slower than 0.4 per step, :class:`eqsolve.AutoAnderson`),
            ``"anderson"`` (textbook Anderson from the first step), ``"broyden"``,
            ``"picard"``, or a configured solver object such as ``eqsolve.Anderson(m=5)``.
        tol: relative tolerance (> 0).
        atol: absolute tolerance added to the stopping rule (>= 0); needed when the fixed
            point is ~0, where the relative residual cannot become small. The best iterate
            is chosen by the rule's own ratio ``||g|| / (tol ||f(z)|| + atol)``.
        max_iter: maximum number of solver updates (1 to ``2**31 - 3``); ``f`` is called
            at most ``max_iter + 2`` times (one final call re-evaluates the returned values
            when the last evaluated point of some sample is not the one returned).
        batch_axis: axis of ``z0`` holding independent samples; ``None`` to treat the whole
            state as one system; ``"auto"`` (default): ``0`` when every array of ``z0`` has
            at least 2 dimensions, else ``None`` (a 1-D state is one system, as in scipy).
        backend: ``"numpy"``, ``"torch"``, ``"jax"``, ``"cupy"``, ``"array_api_strict"``, or
            ``None`` to use the library of ``z0``. When given, ``z0`` is converted (DLPack
            where possible) and ``f`` receives that backend's arrays.
        on_failure: when a sample did not converge, diverged or hit NaN/inf: ``"warn"`` (a
            :class:`ConvergenceWarning`), ``"raise"`` (:class:`ConvergenceError`, holding
            the solution) or ``"ignore"``. Under ``jax.jit`` nothing is raised or warned:
            read ``Solution.status``. ``"ignore"`` also silences the
            :class:`CouplingWarning`.
        sync_stop: stop several processes/devices at the same iteration, for an ``f`` that
            contains a collective (each one calls ``f`` ``nfev`` times, the same number
            everywhere; stopped samples stay frozen). ``None`` (default): each stops on its
            own samples. PyTorch: ``True`` (the default ``torch.distributed`` group; no-op
            when it is not initialised) or a ``torch.distributed.ProcessGroup``. JAX: the
            name (or tuple of names) of an enclosing ``shard_map``/``pmap``/``vmap`` axis.
            Other backends: unsupported (``ValueError``).
        states: iterations ``(k_1, ..., k_S)`` in ``[0, max_iter]`` whose iterates to
            return in ``Solution.states`` (iteration 0 is ``z0``; a sample that stopped
            before ``k_i`` gives its returned value): the intermediate states of a
            fixed-point correction loss. ``None`` (default): none kept, no cost.
        **solver_options: hyperparameters of the named solver, e.g. ``m=5`` for Anderson;
            unknown names raise ``TypeError``.

    Returns:
        A :class:`Solution` whose arrays belong to the solve's backend. ``z0`` is never
        modified.

    Example:
        >>> import numpy as np, eqsolve
        >>> sol = eqsolve.solve(np.cos, np.zeros((3, 1)), tol=1e-10)
        >>> bool(sol.converged.all()), round(float(sol.value[0, 0]), 6)
        (True, 0.739085)
    """
    return solve_state(
        f, z0, solver=solver, tol=tol, atol=atol, max_iter=max_iter, batch_axis=batch_axis,
        backend=backend, on_failure=on_failure, sync_stop=sync_stop, states=states,
        **solver_options,
    )[0]


def solve_state(
    f: Callable[[Any], Any],
    z0: Any,
    *,
    solver: str | FixedPointSolver = "auto",
    tol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int = 100,
    batch_axis: BatchAxis = "auto",
    backend: str | None = None,
    on_failure: str = "warn",
    sync_stop: Any = None,
    states: Sequence[int] | None = None,
    **solver_options: Any,
) -> tuple[Solution, LoopState]:
    """:func:`solve`, also returning the driver's final :class:`LoopState` (internal).

    ``LoopState.solver`` is the solver's own state after its last update (e.g. SHINE reads
    the Broyden factors from it: :mod:`eqsolve.adapters.shine`); its arrays are on the
    ``(B, n)`` view, in the working dtype (float32 for a float16/bfloat16 state).
    """
    check_arguments(f, tol, atol, max_iter, on_failure, batch_axis)
    record_at = check_states(states, max_iter)
    check_keywords(solver, solver_options, "solve")
    solver_obj = make_solver(solver, solver_options)

    leaves = list(z0) if isinstance(z0, (tuple, list)) else [z0]
    names = (
        ["z0"] if not isinstance(z0, (tuple, list)) else [f"z0[{i}]" for i in range(len(leaves))]
    )
    if not leaves:
        raise ValueError("z0 is an empty sequence; it needs at least one array")
    for leaf, name in zip(leaves, names, strict=True):
        if not aac.is_array_api_obj(leaf):
            raise TypeError(
                f"{name} must be an array (numpy, torch, jax, cupy or array-api-strict), "
                f"got {type(leaf).__name__}"
            )
    if backend is None:
        try:
            backend_name = backend_name_of(aac.array_namespace(*leaves))
        except TypeError as exc:
            raise TypeError(
                f"the arrays of z0 must all come from one array library: {exc}"
            ) from None
    else:
        backend_name = backend
    be = get_backend(backend_name)
    xp = be.xp
    if backend is not None:
        leaves = [be.convert(leaf) for leaf in leaves]
    check_state_arrays(xp, leaves, names)
    z0_b = leaves[0] if not isinstance(z0, (tuple, list)) else type(z0)(leaves)
    structure = structure_of(z0_b, batch_axis)
    f_flat = _flat_map(f, z0_b, structure, be)

    z_start = structure.flatten(xp, z0_b)
    wide = working_dtype(xp, z_start.dtype)
    if wide is not None:  # float16/bfloat16: iterate in float32 on the state's grid
        low = z_start.dtype
        f_flat = widened(xp, f_flat, low, wide)
        z_start, solver_obj = xp.astype(z_start, wide), OnGrid(solver_obj, low)
    floor = flush_floor(xp, z_start.dtype, structure.n) if be.flushes_subnormals else 0.0
    rule = StopRule(float(tol), float(atol), int(max_iter), floor, record_at)
    state = be.run(f_flat, z_start, solver_obj, rule, sync_stop=sync_stop)
    best = state.best_z if wide is None else xp.astype(state.best_z, low)

    batched = structure.batch_axes[0] is not None

    def per_sample(a: Any) -> Any:  # a one-system solve reports scalars, not (1,) arrays
        return a if batched else a[0]

    status = per_sample(state.status)
    sol = Solution(
        value=structure.unflatten(xp, best),
        converged=status == int(Status.CONVERGED),
        iterations=per_sample(state.iterations),
        residual=per_sample(state.best_res),
        status=status,
        nfev=state.k + 1,
        states=None if state.trace is None else tuple(
            structure.unflatten(xp, state.trace[i, ...] if wide is None
                                else xp.astype(state.trace[i, ...], low))
            for i in range(len(record_at))
        ),
    )
    if on_failure != "ignore" and not be.is_traced(state.status):
        report_coupling(xp, per_sample(state.reopened))
        report_failures(xp, sol, on_failure, float(tol), max_iter)
    return sol, state


def _flat_map(f: Callable[[Any], Any], z0: Any, structure: Any, be: Any) -> Callable[[Any], Any]:
    """``f`` on the ``(B, n)`` view: unflatten, call, check, flatten.

    The first call (``f(z0)``; under JAX at trace time) checks the output's structure,
    shapes, dtype and device. Every call checks that ``f`` did not write into its argument:
    the arrays it receives are the solver's own (its current iterate), so ``z *= 0.5`` in
    ``f`` would silently corrupt the iteration.
    """
    xp = be.xp
    checked = False

    def f_flat(zf: Any) -> Any:
        nonlocal checked
        z = structure.unflatten(xp, zf)
        given, wrote_into = be.guard_inplace(structure.leaves(z))
        try:
            fz = f(given[0] if structure.container is None else structure.container(given))
        except ValueError as exc:
            if "read-only" in str(exc):  # NumPy: f wrote into the read-only view it got
                raise _inplace_error() from exc
            raise
        if not checked:
            check_f_output(xp, fz, z0, structure)
            checked = True
        if wrote_into(structure.leaves(fz)):
            raise _inplace_error()
        return structure.flatten(xp, fz)

    return f_flat


def _inplace_error() -> ValueError:
    return ValueError(
        "f modified its argument in place: eqsolve passes f its current iterate and keeps "
        "using it, so f must return a new array, e.g. `return 0.5 * z + 1` instead of "
        "`z *= 0.5; z += 1; return z` (on backends that cannot see writes, CuPy and "
        "array-api-strict, f returning its argument itself is taken as such a write)"
    )
