"""JAX adapter: a differentiable fixed-point solve built on ``jax.custom_vjp``.

Forward: the core solvers run under ``lax.while_loop`` (``eqsolve.backends.jax``), so the
solve works inside ``jax.jit`` and ``jax.vmap``. Backward: the implicit function theorem,
never backprop through the loop (reverse mode through ``lax.while_loop`` is undefined, and
unrolling would cost memory linear in the number of iterations).

Math. For ``z* = f(z*, theta)`` (``theta`` = every differentiable input of ``f``: the explicit
``args`` *and* the arrays ``f`` closes over) and a cotangent ``g = dL/dz*``,

    dL/dtheta = u^T  df/dtheta (z*, theta),     where   u = g + J_f(z*)^T u,

with ``J_f = df/dz``. The adjoint fixed point ``u`` is solved per sample with
:func:`eqsolve.core.adjoint.adjoint_solve` ("neumann", "anderson", "broyden", "gmres"), using
only vector-Jacobian products ``v -> J_f(z*)^T v`` from ``jax.vjp``; then one more VJP of ``f``
with respect to ``theta`` gives the gradient. ``z0`` gets a zero cotangent (``z*`` does not
depend on the initial guess).

Inexact ("biased") backward modes, for training where an exact adjoint is not needed:

* ``"phantom"`` -- phantom gradient (Geng et al., 2021, "On training implicit models",
  NeurIPS): from ``z*`` (held constant), unroll ``k`` damped steps
  ``z_{i+1} = (1 - lam) z_i + lam f(z_i, theta)`` and differentiate *that* map with respect to
  ``theta`` by autodiff. The gradient is biased; it approaches the implicit one as ``k``
  grows only when the damped iteration converges fast.
* ``"jfb"`` -- Jacobian-free backpropagation (Fung et al., 2022, "JFB: Jacobian-free
  backpropagation for implicit networks", AAAI): one undamped step, i.e. ``u = g`` (the
  Neumann series truncated after its first term), ``dL/dtheta = g^T df/dtheta(z*)``.

In every mode the returned value is ``z*`` itself; only the backward rule differs.

Sharding (``sync_stop``). Under ``jit`` with a batch sharded over devices the solve is one
SPMD loop: its continuation test reduces over the whole batch, so all devices stop together
and each sample is frozen when it converges. Under ``jax.shard_map`` (or ``pmap``) every
device runs its own loop on its own block of samples and stops when those have converged
(per-device stopping, the default); ``sync_stop="batch"`` (the mapped axis name) reduces the
"some sample is active" flag over that axis with ``lax.psum`` in the ``while_loop``
condition, forward and in the adjoint solve, so all devices make the same number of
iterations -- needed when ``f`` itself contains a collective over the axis. Gradients with
respect to replicated parameters are summed over devices by ``shard_map``'s transpose, as for
any other function.

Mixed precision (``f_dtype``). ``f`` is evaluated with ``z`` and the floating leaves of
``args`` cast to ``f_dtype`` (e.g. ``jnp.bfloat16``) and its output cast back to ``z0``'s
dtype: the solver's iterates, residuals and the adjoint stay in float32, and the gradients
of float32 ``args`` come back in float32 (the transpose of a cast is a cast).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat as aac
import jax
import jax.numpy as jnp

from ..api import solve as _array_fixed_point
from ..backends.jax import BACKEND, sync_axes
from ..core.adjoint import (
    FIXED_POINT_METHODS,
    adjoint_solve,
    check_backward_limits,
    check_backward_options,
    check_phantom,
    default_adjoint_tol,
)
from ..core.solution import ConvergenceWarning, Solution, Status
from ..core.solver_base import FixedPointSolver
from ..core.structure import BatchAxis, Structure, structure_of
from ..core.validation import check_arguments, check_state_arrays

#: implicit (adjoint) methods, solved to ``backward_tol``
IMPLICIT_METHODS: tuple[str, ...] = (*FIXED_POINT_METHODS, "gmres")
#: inexact methods, exact only for their own definitions (biased gradients)
INEXACT_METHODS: tuple[str, ...] = ("phantom", "jfb")
BACKWARD_METHODS: tuple[str, ...] = (*IMPLICIT_METHODS, *INEXACT_METHODS)
BACKWARD_ON_FAILURE: tuple[str, ...] = ("warn", "nan", "ignore")


@dataclass(frozen=True, eq=False)
class _Backward:
    """Static configuration of the backward pass."""

    method: str | FixedPointSolver
    tol: float | None  # None: default_adjoint_tol(forward tol, eps of the dtype)
    max_iter: int
    options: dict[str, Any]
    on_failure: str
    phantom_steps: int
    phantom_damping: float


def fixed_point(
    f: Callable[..., Any],
    z0: Any,
    *args: Any,
    solver: str | FixedPointSolver = "auto",
    tol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int = 100,
    batch_axis: BatchAxis = "auto",
    on_failure: str = "warn",
    backward: str | FixedPointSolver = "anderson",
    backward_tol: float | None = None,
    backward_max_iter: int | None = None,
    backward_options: dict[str, Any] | None = None,
    backward_on_failure: str = "warn",
    phantom_steps: int = 5,
    phantom_damping: float = 0.5,
    sync_stop: str | tuple[str, ...] | None = None,
    f_dtype: Any = None,
    **solver_options: Any,
) -> Solution:
    """Differentiable fixed point ``z* = f(z*, *args)`` for JAX (``jit``/``vmap``/``grad``).

    The forward solve is :func:`eqsolve.fixed_point` on JAX arrays (a ``lax.while_loop``);
    the reverse-mode derivative is defined with ``jax.custom_vjp`` by the implicit function
    theorem: for a cotangent ``g`` on ``z*`` it solves the adjoint fixed point
    ``u = g + J_f(z*)^T u`` (``J_f = df/dz``) per sample and returns
    ``dL/dtheta = u^T df/dtheta`` for every differentiable input ``theta`` of ``f``: the
    pytrees in ``args`` and, through closure conversion (``jax.closure_convert``), arrays that
    ``f`` closes over (e.g. weights captured by a ``lambda`` built inside the function being
    differentiated). Memory does not grow with the number of solver iterations.

    Args:
        f: ``f(z, *args) -> z``-like (same structure, shapes and dtype as ``z0``). Must be a
            pure JAX function; samples along ``batch_axis`` should be independent.
        z0: initial guess: a JAX (or NumPy) array, or a tuple/list of arrays sharing the
            batch axis (multiscale states). Real floating dtype. Gets a zero cotangent.
        *args: pytrees of arrays (or numbers) passed to ``f``; differentiable. Values that
            must stay static (Python ints used for shapes, flags) belong in ``f``'s closure.
        solver, tol, atol, max_iter, batch_axis, **solver_options: the forward solve, as in
            :func:`eqsolve.fixed_point`.
        on_failure: forward non-convergence: ``"warn"``, ``"raise"`` or ``"ignore"``. Applied
            only when the call is not under a JAX transformation; under ``jit``/``vmap``/
            ``grad`` nothing is raised: read ``Solution.status``.
        backward: ``"anderson"`` (default), ``"neumann"`` (plain iteration = truncated
            Neumann series ``sum_k (J^T)^k g``), ``"broyden"``, ``"gmres"`` (restarted,
            matrix-free), a configured solver object (e.g. ``eqsolve.Anderson(m=8)``), or
            the biased modes ``"phantom"`` and ``"jfb"`` (see the module docstring).
        backward_tol: relative tolerance of the adjoint solve,
            ``||g + J^T u - u|| <= backward_tol * ||g + J^T u||`` per sample. Default:
            ``max(tol, 10 * eps(dtype))``.
        backward_max_iter: iterations (restart cycles for gmres) of the adjoint solve.
            Default: ``max_iter``.
        backward_options: hyperparameters of the adjoint method (e.g. ``{"m": 5}``).
        backward_on_failure: when a sample's adjoint solve does not converge (or hits
            NaN/inf): ``"warn"`` (default; a :class:`eqsolve.ConvergenceWarning` emitted
            from the running computation through ``jax.debug.callback``, so it also works
            under ``jit``), ``"nan"`` (the gradient of such samples is made NaN, so it
            cannot be used silently) or ``"ignore"`` (best iterate, as is).
        phantom_steps: ``k``, the number of unrolled steps of ``"phantom"`` (>= 1).
        phantom_damping: ``lam`` in ``(0, 1]`` for ``"phantom"``.
        sync_stop: ``None`` (default): under ``jax.shard_map``/``pmap`` each device stops
            when its own samples have converged. An axis name (or tuple of names) of the
            enclosing ``shard_map`` mesh / ``pmap`` / ``vmap``: the ``while_loop`` condition
            is ``lax.psum``-reduced over it, so every device makes the same number of
            forward and adjoint iterations (needed when ``f`` contains a collective over
            that axis). Under plain ``jit`` with a sharded batch the stop is global already.
        f_dtype: a lower-precision floating dtype (e.g. ``jnp.bfloat16``) to evaluate ``f``
            in: ``z`` and the floating leaves of ``args`` are cast to it, the output back to
            ``z0``'s dtype. Arrays that ``f`` closes over are not cast (pass them in
            ``args`` to include them). Choose ``tol`` above the precision of ``f``: a
            relative residual of a few units of roundoff of ``f_dtype`` (bfloat16 ``2**-8``,
            float16 ``2**-11``) is the floor, e.g. ``tol=1e-2`` for bfloat16.

    Returns:
        A :class:`eqsolve.Solution`. ``value`` is differentiable (reverse mode). The other
        fields are diagnostics with no derivative (``residual`` is wrapped in
        ``lax.stop_gradient``; integer/bool fields get ``float0`` cotangents).

    Raises:
        TypeError / ValueError: invalid arguments (the message names the argument).

    Not supported: forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``, ``hessian``)
    of the solve -- ``custom_vjp`` defines reverse mode only.

    References:
        Bai, Kolter, Koltun (2019), "Deep equilibrium models" (implicit backward).
        Geng, Zhang, Bai, Wang, Lin (2021), "On training implicit models" (phantom).
        Fung, Heaton, Li, McKenzie, Osher, Yin (2022), "JFB: Jacobian-free backpropagation
        for implicit networks" (jfb).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from eqsolve.jax import fixed_point
        >>> def loss(w):
        ...     return fixed_point(lambda z, w: jnp.tanh(w * z + 1.0), jnp.zeros((1, 1)), w,
        ...                        tol=1e-10).value.sum()
        >>> g = jax.jit(jax.grad(loss))(0.5)
    """
    check_arguments(f, tol, atol, max_iter, on_failure, batch_axis)
    cfg = _check_backward(
        backward, backward_tol, backward_max_iter, backward_options, backward_on_failure,
        phantom_steps, phantom_damping, max_iter,
    )
    sync_axes(sync_stop)  # validates; the reduction is traced inside the loop
    run = functools.partial(BACKEND.run, sync_stop=sync_stop)

    z0 = _as_jax_state(z0)
    leaves = list(z0) if isinstance(z0, (tuple, list)) else [z0]
    names = ["z0"] if len(leaves) == 1 and not isinstance(z0, (tuple, list)) else [
        f"z0[{i}]" for i in range(len(leaves))
    ]
    check_state_arrays(jnp, leaves, names)
    structure = structure_of(z0, batch_axis)
    if f_dtype is not None:
        f = _precision_policy(f, _check_f_dtype(f_dtype, leaves[0].dtype), leaves[0].dtype)
    try:
        conv_f, consts = jax.closure_convert(f, z0, *args)
    except TypeError as exc:
        raise TypeError(
            f"could not trace f(z0, *args): {exc}. args must be pytrees of arrays or numbers; "
            "keep static values (shapes, flags, callables) in f's closure"
        ) from exc
    params = (tuple(args), tuple(consts))

    def f_params(z: Any, p: Any) -> Any:
        return conv_f(z, *p[0], *p[1])

    def forward(z_init: Any, p: Any) -> tuple[Any, ...]:
        # eagerly the solve itself reports failures (and coupling); under a transformation
        # it cannot, and the statuses are in the Solution
        sol = _array_fixed_point(
            lambda z: f_params(z, p), z_init, solver=solver, tol=tol, atol=atol,
            max_iter=max_iter, batch_axis=batch_axis, on_failure=on_failure,
            sync_stop=sync_stop, **solver_options,
        )
        return sol.value, sol.residual, sol.status, sol.iterations, jnp.asarray(sol.nfev)

    @jax.custom_vjp
    def solve(z_init: Any, p: Any) -> tuple[Any, ...]:
        return forward(z_init, p)

    def solve_fwd(z_init: Any, p: Any) -> tuple[tuple[Any, ...], tuple[Any, Any]]:
        out = forward(z_init, p)
        return out, (structure.flatten(jnp, out[0]), p)

    def solve_bwd(res: tuple[Any, Any], cts: tuple[Any, ...]) -> tuple[Any, Any]:
        z_star, p = res
        g = structure.flatten(jnp, cts[0])
        p_ct = _backward(cfg, structure, f_params, z_star, p, g, tol, run)
        z0_ct = jax.tree_util.tree_map(jnp.zeros_like, z0)
        return z0_ct, p_ct

    solve.defvjp(solve_fwd, solve_bwd)

    value, residual, status, iterations, nfev = solve(z0, params)
    return Solution(
        value=value,
        converged=status == int(Status.CONVERGED),
        iterations=iterations,
        residual=jax.lax.stop_gradient(residual),
        status=status,
        nfev=nfev,
    )


def _backward(
    cfg: _Backward,
    structure: Structure,
    f_params: Callable[[Any, Any], Any],
    z_star: Any,
    params: Any,
    g: Any,
    forward_tol: float,
    run: Any = None,
) -> Any:
    """Cotangent of ``params`` for the cotangent ``g`` (``(B, n)``) on ``z*`` (``(B, n)``).

    ``run`` drives the adjoint loop (``BACKEND.run`` with the call's ``sync_stop``).
    """

    def f_flat(zf: Any, p: Any) -> Any:
        return structure.flatten(jnp, f_params(structure.unflatten(jnp, zf), p))

    method = cfg.method
    if isinstance(method, str) and method in INEXACT_METHODS:
        steps, lam = (1, 1.0) if method == "jfb" else (cfg.phantom_steps, cfg.phantom_damping)

        def unrolled(p: Any) -> Any:
            z = z_star  # held constant: only the k steps are differentiated
            for _ in range(steps):
                z = f_flat(z, p) if lam == 1.0 else (1.0 - lam) * z + lam * f_flat(z, p)
            return z

        _, vjp_p = jax.vjp(unrolled, params)
        return vjp_p(g)[0]

    _, vjp_z = jax.vjp(lambda zf: f_flat(zf, params), z_star)
    eps = float(jnp.finfo(z_star.dtype).eps)
    tol = cfg.tol if cfg.tol is not None else default_adjoint_tol(forward_tol, eps)
    u, info = adjoint_solve(
        jnp, lambda v: vjp_z(v)[0], g, method=method, tol=tol, max_iter=cfg.max_iter,
        driver=BACKEND.run if run is None else run, **cfg.options,
    )
    failed = ~info.converged
    if cfg.on_failure == "nan":
        u = jnp.where(failed[:, None], jnp.asarray(jnp.nan, dtype=u.dtype), u)
    elif cfg.on_failure == "warn":
        label = method if isinstance(method, str) else type(method).__name__
        jax.debug.callback(
            _warn_backward, failed, info.residual, label, tol, cfg.max_iter
        )
    _, vjp_p = jax.vjp(lambda p: f_flat(z_star, p), params)
    return vjp_p(u)[0]


def _warn_backward(failed: Any, residual: Any, method: str, tol: float, max_iter: int) -> None:
    """Host-side report of adjoint samples that did not converge (runs under jit too)."""
    import numpy as np

    failed = np.asarray(failed).reshape(-1)
    n_bad = int(failed.sum())
    if n_bad == 0:
        return
    res = np.asarray(residual).reshape(-1)[failed]
    worst = float(np.max(res)) if np.all(np.isfinite(res)) else float("nan")
    warnings.warn(
        f"backward ({method!r}): the adjoint solve u = g + J^T u did not converge for "
        f"{n_bad} of {failed.size} samples within backward_max_iter={max_iter} to "
        f"backward_tol={tol:.3g} (largest relative residual {worst:.3g}); their gradient "
        "is inaccurate. Try backward='gmres', a larger backward_max_iter, or "
        "backward_on_failure='nan'",
        ConvergenceWarning,
        stacklevel=2,
    )


def _check_backward(
    backward: Any,
    backward_tol: Any,
    backward_max_iter: Any,
    backward_options: Any,
    backward_on_failure: Any,
    phantom_steps: Any,
    phantom_damping: Any,
    max_iter: int,
) -> _Backward:
    """Validate the backward arguments; errors name the offending argument."""
    if isinstance(backward, str):
        if backward not in BACKWARD_METHODS:
            raise ValueError(
                f"backward must be one of {', '.join(map(repr, BACKWARD_METHODS))} or a solver "
                f"object, got {backward!r}"
            )
    elif not isinstance(backward, FixedPointSolver):
        raise TypeError(
            "backward must be a method name or a solver object such as eqsolve.Anderson(m=5), "
            f"got {type(backward).__name__}"
        )
    backward_tol, max_iter_or_none = check_backward_limits(backward_tol, backward_max_iter)
    backward_max_iter = max_iter if max_iter_or_none is None else max_iter_or_none
    # type checked for every method; unknown names of adjoint methods raise now, not in grad
    backward_options = check_backward_options(backward, backward_options)
    if backward_options and isinstance(backward, str) and backward in INEXACT_METHODS:
        raise TypeError(
            f"backward_options {sorted(backward_options)} do not apply to backward={backward!r}; "
            "use phantom_steps / phantom_damping"
        )
    if backward_on_failure not in BACKWARD_ON_FAILURE:
        raise ValueError(
            f"backward_on_failure must be one of {BACKWARD_ON_FAILURE}, got {backward_on_failure!r}"
        )
    phantom_steps, phantom_damping = check_phantom(phantom_steps, phantom_damping)
    return _Backward(
        method=backward, tol=backward_tol, max_iter=backward_max_iter,
        options=backward_options, on_failure=backward_on_failure,
        phantom_steps=phantom_steps, phantom_damping=phantom_damping,
    )


def _check_f_dtype(f_dtype: Any, state_dtype: Any) -> Any:
    """``f_dtype``: a real floating dtype of lower precision than the state's."""
    try:
        dt = jnp.dtype(f_dtype)
    except TypeError:
        raise TypeError(
            f"f_dtype must be None or a floating dtype such as jnp.bfloat16, got {f_dtype!r}"
        ) from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"f_dtype must be a real floating dtype (e.g. jnp.bfloat16), got {dt}")
    if jnp.finfo(dt).bits >= jnp.finfo(state_dtype).bits:
        raise ValueError(
            f"f_dtype={dt} is not a lower precision than the state's dtype {state_dtype}; "
            "f_dtype evaluates f in e.g. bfloat16 for a float32 state"
        )
    return dt


def _precision_policy(f: Callable[..., Any], f_dtype: Any, state_dtype: Any) -> Callable[..., Any]:
    """``f`` computing in ``f_dtype``: cast ``z`` and floating ``args`` down, the output up.

    The casts are ordinary (differentiable) ``astype`` calls: cotangents flow back through
    them in the caller's dtypes.
    """

    def down(x: Any) -> Any:
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(x).astype(f_dtype)
        return x

    def up(x: Any) -> Any:
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(x).astype(state_dtype)
        return x

    def f_low(z: Any, *args: Any) -> Any:
        low_z = jax.tree_util.tree_map(down, z)
        low_args = jax.tree_util.tree_map(down, args)
        return jax.tree_util.tree_map(up, f(low_z, *low_args))

    return f_low


def _as_jax_state(z0: Any) -> Any:
    """``z0`` (array or tuple/list of arrays) as JAX arrays; errors name the bad entry."""
    is_seq = isinstance(z0, (tuple, list))
    leaves = list(z0) if is_seq else [z0]
    if is_seq and not leaves:
        raise ValueError("z0 is an empty sequence; it needs at least one array")
    out = []
    for i, leaf in enumerate(leaves):
        name = f"z0[{i}]" if is_seq else "z0"
        if isinstance(leaf, jax.Array):
            out.append(leaf)
        elif aac.is_array_api_obj(leaf):
            out.append(BACKEND.convert(leaf))
        else:
            raise TypeError(f"{name} must be an array (JAX or NumPy), got {type(leaf).__name__}")
    if not is_seq:
        return out[0]
    return type(z0)(out) if type(z0) in (tuple, list) else tuple(out)
