"""JAX adapter: a fixed-point solve differentiable in every mode, built on ``jax.custom_jvp``.

Forward: the core solvers run under ``lax.while_loop`` (``eqsolve.backends.jax``), so the
solve works inside ``jax.jit`` and ``jax.vmap``. Derivatives: the implicit function theorem,
never autodiff through the loop (reverse mode through ``lax.while_loop`` is undefined, and
unrolling would cost memory linear in the number of iterations).

Math: implicit differentiation in forward mode. For ``z* = f(z*, theta)`` (``theta`` = every
differentiable input of ``f``: the explicit ``args`` *and* the arrays ``f`` closes over),
differentiating both sides gives the tangent of ``z*`` for a tangent ``dtheta`` -- the
implicit function theorem as a Jacobian-vector product:

    (I - J_f) dz* = J_theta dtheta,       J_f = df/dz (z*, theta),  J_theta = df/dtheta,

a linear system solved matrix-free (products ``J_f v`` by linearizing ``f`` in ``z``) per
sample with the user's adjoint method ("auto", "anderson", "neumann", "broyden", "gmres"), inside
``jax.lax.custom_linear_solve`` (:mod:`eqsolve.adapters.jax_tangent`). That one rule is the
whole derivative; JAX derives the rest:

* Reverse mode (``grad``, ``vjp``, ``jacrev``) is its transpose. For a cotangent
  ``g = dL/dz*`` the transposed linear solve is the adjoint fixed point
  ``u = g + J_f(z*)^T u`` (``transpose_solve``, the same method and tolerance), and the
  transpose of ``J_theta dtheta`` is ``dL/dtheta = u^T df/dtheta`` -- the classical implicit
  backward of deep equilibrium models, with the same cost as a hand-written ``custom_vjp``.
* Higher orders (``hessian``, grad of grad as in force matching, any order) and ``vmap`` of
  any of them: JAX differentiates the rule again; the linear solve differentiates itself by
  solving again, and ``z*`` inside ``J_f`` is differentiated by this same rule, so the loop is
  never differentiated and the user's tolerance sets the error at every order.

``z0`` gets a zero tangent/cotangent (``z*`` does not depend on the initial guess). Each
implicit linear solve (reverse mode: the adjoint solve; forward mode: the tangent solve)
reports through ``jax.debug.callback`` (so under ``jit`` too): failures as ``on_failure``
says, and ``on_backward(AdjointInfo)`` when given.

Inexact ("biased") backward modes, for training where an exact adjoint is not needed:

* ``"phantom"`` -- phantom gradient (Geng et al., 2021, "On training implicit models",
  NeurIPS): from ``z*`` (held constant), unroll ``k`` damped steps
  ``z_{i+1} = (1 - lam) z_i + lam f(z_i, theta)`` and differentiate *that* map with respect to
  ``theta`` by autodiff (the tangent is its ``jax.jvp``, the gradient its transpose, i.e. its
  ``jax.vjp``). The gradient is biased; it approaches the implicit one as ``k`` grows only
  when the damped iteration converges fast.
* ``"jfb"`` -- Jacobian-free backpropagation (Fung et al., 2022, "JFB: Jacobian-free
  backpropagation for implicit networks", AAAI): one undamped step, i.e. ``u = g`` (the
  Neumann series truncated after its first term), ``dL/dtheta = g^T df/dtheta(z*)``.

In every mode the returned value is ``z*`` itself; only the derivative rule differs.

References: Bai, Kolter & Koltun (2019), "Deep equilibrium models" (NeurIPS; the implicit
backward); Blondel, Berthet, Cuturi, Frostig, Hoyer, Llinares-Lopez, Pedregosa & Vert (2022),
"Efficient and modular implicit differentiation" (NeurIPS; implicit differentiation as a
JVP whose transpose is the VJP); optimistix's ``ImplicitAdjoint`` (a recursive ``custom_jvp``
over a linear-solve primitive), whose construction this follows.

Sharding (``sync_stop``). Under ``jit`` with a batch sharded over devices the solve is one
SPMD loop: its continuation test reduces over the whole batch, so all devices stop together
and each sample is frozen when it converges. Under ``jax.shard_map`` (or ``pmap``) every
device runs its own loop on its own block of samples and stops when those have converged
(per-device stopping, the default); ``sync_stop="batch"`` (the mapped axis name) reduces the
"some sample is active" flag over that axis with ``lax.psum`` in the ``while_loop``
condition, forward and in every tangent/adjoint solve, so all devices make the same number of
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
from ..core.structure import BatchAxis, structure_of
from ..core.validation import check_arguments, check_state_arrays, check_states
from .array import GRADIENT_KEYWORDS, check_keywords
from .backward import (
    ADJOINT_METHODS,
    Backward,
    backward_spec,
    pop_legacy,
)
from .jax_tangent import check_on_backward, point_tangent
from .shine import solve_for

#: every accepted ``backward=`` shorthand
BACKWARD_METHODS: tuple[str, ...] = (*ADJOINT_METHODS, "phantom", "jfb", "shine")

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
    backward: Backward | str | FixedPointSolver | None = "auto",
    on_backward: Callable[[AdjointInfo], None] | None = None,
    sync_stop: str | tuple[str, ...] | None = None,
    f_dtype: Any = None,
    states: Sequence[int] | None = None,
    **solver_options: Any,
) -> Solution:
    """Fixed point ``z* = f(z*, *args)`` for JAX, differentiable by every transformation.

    The forward solve is :func:`eqsolve.fixed_point` on JAX arrays (a ``lax.while_loop``).
    Its derivative is defined with ``jax.custom_jvp`` by the implicit function theorem in
    forward mode: for a tangent ``dtheta`` it solves ``(I - J_f) dz* = J_theta dtheta``
    (``J_f = df/dz``) per sample inside ``jax.lax.custom_linear_solve``, with the adjoint
    method and tolerance of ``backward``. ``jax.jvp``, ``jacfwd``, ``jacrev``, ``grad``,
    ``hessian``, grad of grad (force matching), any order, ``vmap`` of any of them, eagerly
    or under ``jit``, follow; reverse mode solves the adjoint fixed point
    ``u = g + J_f(z*)^T u`` and returns ``dL/dtheta = u^T df/dtheta`` (see the module
    docstring). ``theta`` is every differentiable input of ``f``: the pytrees in ``args``
    and, through closure conversion (``jax.closure_convert``), arrays that ``f`` closes over
    (e.g. weights captured by a ``lambda`` built inside the function being differentiated).
    Memory does not grow with the number of solver iterations.

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
            there); those of the implicit linear solves (adjoint in reverse mode, tangent in
            forward mode) are warned from the running computation through
            ``jax.debug.callback`` (so under ``jit`` too), and ``"raise"`` -- which cannot
            raise inside a transformation -- makes those samples' derivative NaN and warns.
        backward: how the gradient is defined (:mod:`eqsolve.adapters.backward`):
            ``eqsolve.Implicit(method, tol, max_iter, options, on_failure)`` (default
            ``"auto"``; also ``"anderson"``, ``"neumann"``, ``"broyden"``, ``"gmres"`` or a solver
            object), the biased ``eqsolve.Phantom(steps, damping)`` / ``eqsolve.JFB()``
            (``"phantom"``, ``"jfb"``; see the module docstring), ``eqsolve.SHINE()``
            (``"shine"``: ``dz* = -H J_theta dtheta`` with the forward Broyden estimate
            ``H``, ``solver="broyden"`` only; biased; first order), or ``None`` (no
            gradient: the solve's inputs are wrapped in ``lax.stop_gradient``).
        on_backward: ``None`` or a callable, called with the
            :class:`~eqsolve.core.adjoint.AdjointInfo` (per-sample ``iterations``,
            ``residual``, ``converged``, ``status``, as NumPy arrays) of each implicit linear
            solve: the adjoint solve of a reverse pass, the tangent solve of a forward one
            (a Hessian runs several). It runs through ``jax.debug.callback``, so under
            ``jit`` too (once per call of the compiled program; under ``vmap``, also once:
            the arrays then hold the samples of every mapped element, mapped axes first,
            flattened into the sample axis), e.g. to log the adjoint's iterations. Not called for
            ``Phantom``/``JFB`` (no linear solve).
        sync_stop: ``None`` (default): under ``jax.shard_map``/``pmap`` each device stops
            when its own samples have converged. An axis name (or tuple of names) of the
            enclosing ``shard_map`` mesh / ``pmap`` / ``vmap``: the ``while_loop`` condition
            is ``lax.psum``-reduced over it, so every device makes the same number of
            forward and adjoint/tangent iterations (needed when ``f`` contains a collective
            over that axis). Under plain ``jit`` with a sharded batch the stop is global already.
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
            (implicit: its own tangent/adjoint linear solve at that point -- for an unused
            state a zero right-hand side, met at once; phantom/JFB: unrolled steps from it).

    Returns:
        A :class:`eqsolve.Solution`. ``value`` (and ``states``) are differentiable in every
        mode. The other fields are diagnostics with no derivative (``residual`` gets a zero
        tangent and is wrapped in ``lax.stop_gradient``; integer/bool fields get ``float0``
        tangents/cotangents).

    Raises:
        TypeError / ValueError: invalid arguments (the message names the argument).

    References:
        Bai, Kolter, Koltun (2019), "Deep equilibrium models" (implicit backward).
        Blondel et al. (2022), "Efficient and modular implicit differentiation" (implicit
        differentiation as a JVP; reverse mode by transposition), as in optimistix's
        ``ImplicitAdjoint``.
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
        >>> h = jax.jit(jax.hessian(loss))(0.5)  # second order: the same rule, again
    """
    spec = backward_spec(backward, pop_legacy(solver_options), solver=solver)
    check_arguments(f, tol, atol, max_iter, on_failure, batch_axis)
    check_keywords(solver, solver_options, "fixed_point", GRADIENT_KEYWORDS)
    record_at = check_states(states, max_iter)
    on_backward = check_on_backward(on_backward)
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
        kwargs = dict(
            solver=solver, tol=tol, atol=atol, max_iter=max_iter, batch_axis=batch_axis,
            on_failure=on_failure, sync_stop=sync_stop, states=record_at, **solver_options,
        )
        # with SHINE the Broyden factors are outputs too: the tangent rule reads them
        sol, factors = solve_for(spec, lambda z: f_params(z, p), z_init, **kwargs)
        return (sol.value, sol.residual, sol.status, sol.iterations, jnp.asarray(sol.nfev),
                sol.states, factors)

    if spec is None:  # no gradient: nothing reaches the loop's inputs
        out = forward(jax.lax.stop_gradient(z0), jax.lax.stop_gradient(params))
        return _solution(out)

    @jax.custom_jvp
    def solve_op(z_init: Any, p: Any) -> tuple[Any, ...]:
        return forward(z_init, p)

    @solve_op.defjvp
    def solve_jvp(primals: tuple[Any, Any], tangents: tuple[Any, Any]) -> tuple[Any, Any]:
        z_init, p = primals
        d_p = tangents[1]  # z0's tangent is dropped: z* does not depend on the start
        # the custom_jvp function itself, not the raw loop: differentiating this rule again
        # (Hessians, grad of grad) differentiates z* by this rule again
        out = solve_op(z_init, p)
        # each point's tangent as if it were the fixed point (implicit: its own linear
        # solve at that point; phantom/JFB: unrolled steps from it)
        d_points = [
            point_tangent(spec, structure, f_params, z, p, d_p, forward_settings, run,
                          on_backward, factors=out[6])
            for z in (out[0], *(out[5] or ()))
        ]
        d_out = (
            d_points[0],
            # the residual is a diagnostic; status, iterations, nfev are integers (float0)
            *(_no_tangent(x) for x in out[1:5]),
            None if out[5] is None else type(out[5])(d_points[1:]),
            None if out[6] is None else type(out[6])(*(_no_tangent(x) for x in out[6])),
        )
        return out, d_out

    return _solution(solve_op(z0, params))


def _no_tangent(x: Any) -> Any:
    """A zero tangent for ``x`` (``float0`` for integers; keeps shard_map's typing)."""
    return jax.custom_derivatives.zero_from_primal(  # type: ignore[no-untyped-call]
        x, symbolic_zeros=False
    )


def _solution(out: tuple[Any, ...]) -> Solution:
    value, residual, status, iterations, nfev, states = out[:6]  # out[6]: SHINE's factors
    return Solution(
        states=states,
        value=value,
        converged=status == int(Status.CONVERGED),
        iterations=iterations,
        residual=jax.lax.stop_gradient(residual),
        status=status,
        nfev=nfev,
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
