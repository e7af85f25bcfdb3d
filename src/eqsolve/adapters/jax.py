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
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat as aac
import jax
import jax.numpy as jnp

from ..backends.jax import BACKEND, sync_axes
from ..core.adjoint import AdjointInfo
from ..core.solution import Solution, Status
from ..core.solver_base import FixedPointSolver
from ..core.structure import BatchAxis, Structure, structure_of
from ..core.validation import check_arguments, check_state_arrays, check_states
from .array import check_keywords, solve
from .backward import (
    ADJOINT_METHODS,
    JFB,
    Backward,
    Implicit,
    Phantom,
    backward_spec,
    pop_legacy,
    solve_implicit,
)
from .reporting import report_adjoint

#: every accepted ``backward=`` shorthand
BACKWARD_METHODS: tuple[str, ...] = (*ADJOINT_METHODS, "phantom", "jfb")
#: keywords of :func:`fixed_point` beyond those of :func:`eqsolve.solve`
_JAX_KEYWORDS = ("backward", "f_dtype")


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
    backward: Backward | str | FixedPointSolver | None = "anderson",
    sync_stop: str | tuple[str, ...] | None = None,
    f_dtype: Any = None,
    states: Sequence[int] | None = None,
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
        on_failure: forward and (unless ``Implicit(on_failure=...)`` says otherwise) adjoint
            failures: ``"warn"``, ``"raise"`` or ``"ignore"``. The forward's are reported
            only when the call is not under a JAX transformation (read ``Solution.status``
            there); the adjoint's are warned from the running computation through
            ``jax.debug.callback`` (so under ``jit`` too), and ``"raise"`` -- which cannot
            raise inside a transformation -- makes those samples' gradient NaN and warns.
        backward: how the gradient is defined (:mod:`eqsolve.adapters.backward`):
            ``eqsolve.Implicit(method, tol, max_iter, options, on_failure)`` (default
            ``"anderson"``; also ``"neumann"``, ``"broyden"``, ``"gmres"`` or a solver
            object), the biased ``eqsolve.Phantom(steps, damping)`` / ``eqsolve.JFB()``
            (``"phantom"``, ``"jfb"``; see the module docstring), or ``None`` (no
            gradient: the solve's inputs are wrapped in ``lax.stop_gradient``).
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
        states: iterations ``(k_1, ..., k_S)`` for a fixed-point correction loss (Bai,
            Koltun & Kolter, CVPR 2022): ``Solution.states`` holds the solver's own iterate
            at each (a sample that stopped earlier gives its returned value), each
            differentiable with the chosen ``backward`` as if it were the fixed point
            (implicit: its own adjoint solve at that point -- for an unused state a zero
            cotangent, whose adjoint is met at once; phantom/JFB: unrolled steps from it).

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
    spec = backward_spec(backward, pop_legacy(solver_options))
    check_arguments(f, tol, atol, max_iter, on_failure, batch_axis)
    check_keywords(solver, solver_options, "fixed_point", _JAX_KEYWORDS)
    record_at = check_states(states, max_iter)
    sync_axes(sync_stop)  # validates; the reduction is traced inside the loop
    run = functools.partial(BACKEND.run, sync_stop=sync_stop)
    forward_settings = {"tol": float(tol), "max_iter": int(max_iter), "on_failure": on_failure}

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
        sol = solve(
            lambda z: f_params(z, p), z_init, solver=solver, tol=tol, atol=atol,
            max_iter=max_iter, batch_axis=batch_axis, on_failure=on_failure,
            sync_stop=sync_stop, states=record_at, **solver_options,
        )
        return (sol.value, sol.residual, sol.status, sol.iterations, jnp.asarray(sol.nfev),
                sol.states)

    if spec is None:  # no gradient: nothing reaches the loop's inputs
        out = forward(jax.lax.stop_gradient(z0), jax.lax.stop_gradient(params))
        return _solution(out)

    @jax.custom_vjp
    def solve_op(z_init: Any, p: Any) -> tuple[Any, ...]:
        return forward(z_init, p)

    def solve_fwd(z_init: Any, p: Any) -> tuple[tuple[Any, ...], tuple[Any, Any]]:
        out = forward(z_init, p)
        points = (out[0], *(out[5] or ()))  # z* and the correction states
        return out, (tuple(structure.flatten(jnp, z) for z in points), p)

    def solve_bwd(res: tuple[Any, Any], cts: tuple[Any, ...]) -> tuple[Any, Any]:
        points, p = res
        p_ct = None
        for z, ct in zip(points, (cts[0], *(cts[5] or ())), strict=True):
            # each point's gradient as if it were the fixed point (implicit: its own adjoint
            # solve; an unused state's zero cotangent is a zero fixed point, met at once)
            g = structure.flatten(jnp, ct)
            ct_p = _backward(spec, structure, f_params, z, p, g, forward_settings, run)
            p_ct = ct_p if p_ct is None else jax.tree_util.tree_map(_add_cotangents, p_ct, ct_p)
        z0_ct = jax.tree_util.tree_map(jnp.zeros_like, z0)
        return z0_ct, p_ct

    solve_op.defvjp(solve_fwd, solve_bwd)
    return _solution(solve_op(z0, params))


def _add_cotangents(a: Any, b: Any) -> Any:
    """Sum of two cotangents of one input (``float0`` ones, of integer/key inputs, stay)."""
    return a if a.dtype == jax.dtypes.float0 else a + b


def _solution(out: tuple[Any, ...]) -> Solution:
    value, residual, status, iterations, nfev, states = out
    return Solution(
        states=states,
        value=value,
        converged=status == int(Status.CONVERGED),
        iterations=iterations,
        residual=jax.lax.stop_gradient(residual),
        status=status,
        nfev=nfev,
    )


def _backward(
    spec: Backward,
    structure: Structure,
    f_params: Callable[[Any, Any], Any],
    z_star: Any,
    params: Any,
    g: Any,
    forward: dict[str, Any],
    run: Any,
) -> Any:
    """Cotangent of ``params`` for the cotangent ``g`` (``(B, n)``) on ``z*`` (``(B, n)``).

    ``run`` drives the adjoint loop (``BACKEND.run`` with the call's ``sync_stop``);
    ``forward`` holds the forward solve's tol, max_iter and on_failure (the defaults of an
    :class:`Implicit` spec).
    """

    def f_flat(zf: Any, p: Any) -> Any:
        return structure.flatten(jnp, f_params(structure.unflatten(jnp, zf), p))

    if isinstance(spec, (Phantom, JFB)):
        steps, lam = spec.steps, spec.damping

        def unrolled(p: Any) -> Any:
            z = z_star  # held constant: only the k steps are differentiated
            for _ in range(steps):
                z = f_flat(z, p) if lam == 1.0 else (1.0 - lam) * z + lam * f_flat(z, p)
            return z

        _, vjp_p = jax.vjp(unrolled, params)
        return vjp_p(g)[0]

    assert isinstance(spec, Implicit)
    _, vjp_z = jax.vjp(lambda zf: f_flat(zf, params), z_star)
    u, info, tol, max_iter = solve_implicit(
        jnp, spec, lambda v: vjp_z(v)[0], g, forward_tol=forward["tol"],
        forward_max_iter=forward["max_iter"], forward_on_failure=forward["on_failure"],
        driver=run, eager=False,
    )
    if spec.resolved_on_failure(forward["on_failure"]) in ("warn", "raise"):
        jax.debug.callback(
            functools.partial(_warn_backward, method=spec.label, tol=tol, max_iter=max_iter),
            info.status, info.residual, info.iterations,
        )
    _, vjp_p = jax.vjp(lambda p: f_flat(z_star, p), params)
    return vjp_p(u)[0]


def _warn_backward(status: Any, residual: Any, iterations: Any, *, method: str, tol: float,
                   max_iter: int) -> None:
    """Host side of the adjoint's failure report (runs under ``jit`` too): always a warning."""
    import numpy as np

    status = np.asarray(status)
    info = AdjointInfo(
        iterations=np.asarray(iterations), residual=np.asarray(residual),
        converged=status == int(Status.CONVERGED), status=status,
    )
    report_adjoint(np, None, info, method=method, tol=tol, max_iter=max_iter,
                   on_failure="warn")


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
    if jnp.finfo(dt).bits >= jnp.finfo(state_dtype).bits:  # type: ignore[no-untyped-call]
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
