"""Tangent rules of the JAX fixed point: implicit differentiation in forward mode.

:func:`eqsolve.adapters.jax.fixed_point` defines the derivative of its solve with
``jax.custom_jvp``; this module computes the tangent ``dz`` of one point ``z`` (the fixed point
``z*``, or a correction state treated as if it were one) for a tangent ``dtheta`` of the
parameters. Everything else -- reverse mode, Hessians, any order, ``vmap`` of them -- is JAX
differentiating and transposing this rule.

Implicit (``eqsolve.Implicit``). Differentiating ``z* = f(z*, theta)`` gives the tangent
system (the implicit function theorem as a Jacobian-vector product)

    (I - J_f) dz = J_theta dtheta,     J_f = df/dz (z*, theta),  J_theta = df/dtheta (z*, theta),

matrix-free: ``J_f v`` is a linearization of ``f`` in ``z`` at ``z*`` (``jax.linearize``),
``J_theta dtheta`` one ``jax.jvp`` in ``theta``. It is solved with
``jax.lax.custom_linear_solve(matvec, rhs, solve, transpose_solve)``: ``solve`` finds
``x = b + J_f x`` and ``transpose_solve`` finds ``x = b + J_f^T x``, both per sample with the
user's adjoint method and tolerance (:func:`eqsolve.adapters.backward.solve_implicit`, the
same machinery as every adapter's adjoint). ``custom_linear_solve`` is what makes every
transformation work without ever differentiating the solver's ``while_loop``:

* reverse mode transposes the rule: the linear solve's transpose is the adjoint solve
  ``u = g + J_f^T u`` (``transpose_solve``), and the transpose of ``J_theta dtheta`` is the
  vector-Jacobian product ``u^T df/dtheta`` -- the classical implicit backward of deep
  equilibrium models (Bai, Kolter & Koltun 2019);
* higher orders differentiate the linear solve itself, which JAX does by calling it again
  (``dx = (I - J)^{-1} (db - dJ x)``), while the derivative of ``z*`` inside ``J_f`` comes
  from the fixed point's own ``custom_jvp`` rule (the rule reads ``z`` from the ``custom_jvp``
  function, never from the raw loop, and does not stop its gradient).

This is the construction of Blondel et al. (2022), "Efficient and modular implicit
differentiation" (NeurIPS), and of optimistix's ``ImplicitAdjoint`` (a recursive
``custom_jvp`` over a linear-solve primitive). Rules that matter (a wrong one gives silently
wrong higher derivatives): the operator reaches the solves only through ``matvec`` (inside
``solve`` ``J v = v - matvec(v)``, inside ``transpose_solve`` ``J^T v = v - vecmat(v)``), never
``symmetric=True``, the tolerance is computed inside each solve from its own ``b``, and a
multi-array state is one ``(B, n)`` array here.

Phantom / JFB. The tangent of the unrolled map ``z_{i+1} = (1 - lam) z_i + lam f(z_i, theta)``
from ``z`` held constant, by ``jax.jvp`` in ``theta``; its transpose is the vector-Jacobian
product that these biased modes have always used.

SHINE (``eqsolve.SHINE``). No linear solve: ``dz = -H (J_theta dtheta)`` with the forward
Broyden solve's inverse-Jacobian estimate ``H ~ (J_f - I)^{-1}`` (its factors are outputs of
the primal solve, under ``stop_gradient``); the transpose, ``u = -H^T g``, is JAX's.

Each implicit linear solve (the tangent solve in forward mode, the adjoint solve in reverse
mode) reports from the running computation through ``jax.debug.callback`` (so under ``jit``
too): a failure warning as the ``on_failure`` policy says, and ``on_backward(AdjointInfo)``.
Under ``vmap`` (``jacrev`` maps the adjoint solve over every output) it reports once, with
every mapped element's samples (:func:`_report_once`).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..core.adjoint import AdjointInfo
from ..core.solution import Status
from ..core.structure import Structure
from .backward import JFB, SHINE, Backward, Implicit, Phantom, solve_implicit
from .reporting import report_adjoint
from .shine import ShineFactors, apply_H

__all__ = ["check_on_backward", "point_tangent"]

#: ``on_backward``: a callable taking an :class:`AdjointInfo`, or ``None``
OnBackward = Callable[[AdjointInfo], None] | None


def check_on_backward(on_backward: Any) -> OnBackward:
    """``on_backward`` must be ``None`` or callable (checked at the call, not in a trace)."""
    if on_backward is not None and not callable(on_backward):
        raise TypeError(
            "on_backward must be None or a callable taking an eqsolve.AdjointInfo, got "
            f"{type(on_backward).__name__}"
        )
    checked: OnBackward = on_backward
    return checked


def point_tangent(
    spec: Backward,
    structure: Structure,
    f_params: Callable[[Any, Any], Any],
    point: Any,
    params: Any,
    d_params: Any,
    forward: dict[str, Any],
    run: Any,
    on_backward: OnBackward,
    factors: ShineFactors | None = None,
) -> Any:
    """Tangent of ``point`` (user structure) for the tangent ``d_params`` of ``params``.

    ``point`` must come from the ``custom_jvp`` function itself (so that higher-order
    derivatives see its dependence on ``params``). ``forward`` holds the forward solve's tol,
    max_iter and on_failure (the defaults of an :class:`Implicit` spec); ``run`` drives the
    linear solves' loops (``BACKEND.run`` with the call's ``sync_stop``). ``factors``: the
    forward Broyden factors (:class:`SHINE` only).
    """

    def f_flat(zf: Any, p: Any) -> Any:
        return structure.flatten(jnp, f_params(structure.unflatten(jnp, zf), p))

    zf = structure.flatten(jnp, point)
    if isinstance(spec, (Phantom, JFB)):
        steps, lam = spec.steps, spec.damping

        def unrolled(p: Any) -> Any:
            z = zf  # the start is held constant: only the k steps are differentiated
            for _ in range(steps):
                z = f_flat(z, p) if lam == 1.0 else (1.0 - lam) * z + lam * f_flat(z, p)
            return z

        dz = jax.jvp(unrolled, (params,), (d_params,))[1]
    elif isinstance(spec, SHINE):
        assert factors is not None
        rhs = jax.jvp(lambda p: f_flat(zf, p), (params,), (d_params,))[1]
        fixed = ShineFactors(*(jax.lax.stop_gradient(a) for a in factors))
        dz = -apply_H(jnp, fixed, rhs.astype(fixed.U.dtype)).astype(rhs.dtype)
    else:
        assert isinstance(spec, Implicit)
        dz = _implicit_tangent(spec, f_flat, zf, params, d_params, forward, run, on_backward)
    flat = structure.unflatten(jnp, dz)
    leaves = structure.leaves(flat)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(point), leaves)


def _implicit_tangent(
    spec: Implicit,
    f_flat: Callable[[Any, Any], Any],
    zf: Any,
    params: Any,
    d_params: Any,
    forward: dict[str, Any],
    run: Any,
    on_backward: OnBackward,
) -> Any:
    """Solve ``(I - J_f) dz = J_theta dtheta`` on the ``(B, n)`` view (module docstring)."""
    rhs = jax.jvp(lambda p: f_flat(zf, p), (params,), (d_params,))[1]
    _, f_lin = jax.linearize(lambda y: f_flat(y, params), zf)

    def matvec(v: Any) -> Any:  # (I - J_f) v
        return v - f_lin(v)

    def implicit_solve(op: Any, b: Any) -> Any:  # x = b + (v - op(v)) applied to x
        closed = jax.make_jaxpr(op)(b)
        if any(isinstance(c, jax.core.Tracer) for c in closed.consts):  # staged anyway
            return _solve(closed.jaxpr, closed.consts, b, spec, forward, run, on_backward)
        return _eager_solver(closed.jaxpr, b, spec, forward, run, on_backward)(closed.consts, b)

    return jax.lax.custom_linear_solve(
        matvec, rhs, solve=implicit_solve, transpose_solve=implicit_solve
    )


def _solve(jaxpr: Any, consts: Any, b: Any, spec: Implicit, forward: dict[str, Any], run: Any,
           on_backward: OnBackward) -> Any:
    """Solve ``x = b + (x - op(x))`` (``op``: the jaxpr of ``matvec`` or ``vecmat``)."""

    def op(v: Any) -> Any:
        return jax.core.eval_jaxpr(jaxpr, consts, v)[0]

    u, info, tol, max_iter = solve_implicit(
        jnp, spec, lambda v: v - op(v), b, forward_tol=forward["tol"],
        forward_max_iter=forward["max_iter"], forward_on_failure=forward["on_failure"],
        driver=run, eager=False,
    )
    warn = spec.resolved_on_failure(forward["on_failure"]) in ("warn", "raise")
    if warn or on_backward is not None:
        report = functools.partial(
            _report, method=spec.label, tol=tol, max_iter=max_iter, warn=warn,
            on_backward=on_backward,
        )
        _report_once(report)(info.status, jax.lax.stop_gradient(info.residual),
                             info.iterations)
    return u


def _report_once(report: Callable[..., None]) -> Callable[..., Any]:
    """``jax.debug.callback(report, *arrays)`` that ``vmap`` calls once, with every mapped
    element's samples flattened into the sample axis (mapped axes first).

    ``debug.callback``'s own batching rule unrolls the callback over the mapped axis: a
    ``jax.jacrev`` of a (8, 32) solve put 512 callbacks into its program, and XLA compiled it
    in 14 s instead of ~1 s (and the host was called 256 times per run).
    """

    @jax.custom_batching.custom_vmap
    def emit(*arrays: Any) -> Any:
        jax.debug.callback(report, *arrays)
        return jnp.zeros((), jnp.int32)  # custom_vmap needs an output; nothing reads it

    @emit.def_vmap
    def emit_batched(axis_size: int, in_batched: list[bool], *arrays: Any) -> Any:
        # the rule receives mapped arrays with the mapped axis first
        flat = [
            jnp.reshape(a if mapped else jnp.broadcast_to(a, (axis_size, *a.shape)),
                        (-1, *a.shape[2 if mapped else 1:]))
            for a, mapped in zip(arrays, in_batched, strict=True)
        ]
        return emit(*flat), False

    return emit


#: jitted linear solves of eager calls, keyed on the operator's jaxpr text (least recently
#: used first out). Outside ``jit``, ``custom_linear_solve`` evaluates its solve op by op, and
#: the solver's ``while_loop`` would be compiled anew on every call (about 0.5 s each)
EAGER_CACHE_SIZE = 32
_EAGER_SOLVES: collections.OrderedDict[Any, tuple[Callable[..., Any], Any]] = (
    collections.OrderedDict()
)


def _eager_solver(jaxpr: Any, b: Any, spec: Implicit, forward: dict[str, Any], run: Any,
                  on_backward: OnBackward) -> Callable[..., Any]:
    """The linear solve of an eager call as a cached jitted function of ``(consts, b)``."""
    key = (
        str(jaxpr), jax.typeof(b), spec.method, spec.tol, spec.max_iter,
        repr(sorted(spec.options.items())), spec.on_failure, tuple(sorted(forward.items())),
        repr(run), id(on_backward),  # the entry keeps on_backward alive: its id stays unique
    )
    entry = _EAGER_SOLVES.get(key)
    if entry is None:
        fn = jax.jit(functools.partial(_solve, jaxpr, spec=spec, forward=forward, run=run,
                                       on_backward=on_backward))
        entry = _EAGER_SOLVES[key] = (fn, on_backward)
        while len(_EAGER_SOLVES) > EAGER_CACHE_SIZE:
            _EAGER_SOLVES.popitem(last=False)
    else:
        _EAGER_SOLVES.move_to_end(key)
    return entry[0]


def _report(status: Any, residual: Any, iterations: Any, *, method: str, tol: float,
            max_iter: int, warn: bool, on_backward: OnBackward) -> None:
    """Host side of one implicit linear solve (runs under ``jit`` too)."""
    status = np.asarray(status)
    info = AdjointInfo(
        iterations=np.asarray(iterations), residual=np.asarray(residual),
        converged=status == int(Status.CONVERGED), status=status,
    )
    if warn:
        report_adjoint(np, None, info, method=method, tol=tol, max_iter=max_iter,
                       on_failure="warn")
    if on_backward is not None:
        on_backward(info)
