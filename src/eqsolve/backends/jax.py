"""JAX backend: the core step under ``jax.lax.while_loop`` (works inside ``jax.jit``).

No host synchronisation happens inside the loop; the continuation test is traced. Reverse
mode through ``lax.while_loop`` is not defined: gradients of a solve come from the implicit
function theorem (``eqsolve.jax.fixed_point``, a ``custom_jvp`` adapter), never from
differentiating the loop. JAX's own error for reverse mode through the loop only surfaces in
the backward pass, away from the call, so the loop's outputs pass through an identity
(:func:`_no_reverse_mode`) whose transpose raises a :class:`ValueError` that points to
``eqsolve.jax.fixed_point`` first; forward mode (``jax.jvp``) still differentiates the
iterations.

Sharding. Under ``jit`` with a sharded batch the loop is one SPMD program: ``any(active)``
over the sharded flags is a global reduction (XLA inserts it), so every device runs the same
number of iterations and stopped samples are frozen. Under ``jax.shard_map`` (or ``pmap``)
each device runs its own loop on its own samples and stops on its own ("per-device
stopping"); ``run(..., sync_stop=axis_name)`` reduces the continuation test over the named
mapped axis (``lax.psum``), so all devices stop together ("global stopping"), which a map
``f`` containing a collective over that axis (``lax.psum``, ``lax.pmean``) requires.

Eager calls. Outside any JAX transformation, ``lax.while_loop`` would trace and compile the
loop anew for every new closure ``f`` (0.7-1.7 s per call on an (8, 16) problem, and the
compiled programs pile up in memory). An eager solve therefore traces ``f`` once to a jaxpr
(``jax.make_jaxpr``; arrays it closes over become inputs) and runs the loop as one jitted
program cached on that jaxpr's text, the solver and the rule: a new closure with the same
computation reuses the compiled loop. The cache is bounded (:data:`EAGER_CACHE_SIZE`).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero, linear_call

from ..core.loop import LoopState, StopRule, loop_init, loop_step, needs_verification, verify
from ..core.solver_base import FixedPointSolver
from . import never_written


def sync_axes(sync_stop: Any) -> tuple[Hashable, ...]:
    """``sync_stop`` as a tuple of axis names (``()``: per-device stopping).

    Accepts ``None``/``False`` (no synchronisation), one axis name (a string, as given to
    ``jax.shard_map``'s mesh, ``pmap(axis_name=)`` or ``vmap(axis_name=)``) or a tuple/list
    of names (e.g. ``("data", "model")``).
    """
    if sync_stop is None or sync_stop is False:
        return ()
    names = tuple(sync_stop) if isinstance(sync_stop, (tuple, list)) else (sync_stop,)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(
                "sync_stop must be None (per-device stopping), an axis name (str) of an "
                "enclosing jax.shard_map / pmap / vmap, or a tuple of such names; got "
                f"{sync_stop!r}"
            )
    if not names:
        raise ValueError("sync_stop=() names no axis; pass None for per-device stopping")
    return names


def _check_bound(names: tuple[Hashable, ...]) -> None:
    """A clear error when an axis of ``sync_stop`` is not bound where the solve runs."""
    for name in names:
        try:
            jax.lax.axis_size(name)
        except NameError:
            raise ValueError(
                f"sync_stop={name!r}: no enclosing mapped axis of that name. Call the solve "
                f"inside jax.shard_map over a mesh with an axis {name!r} (or pmap/vmap with "
                f"axis_name={name!r}); under plain jit with a sharded batch the stop is "
                "already global, so leave sync_stop=None there"
            ) from None


def _varying_axes(x: Any) -> frozenset[Any]:
    """Mesh axes along which ``x`` varies under ``shard_map`` (empty elsewhere)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.9
    if mat is not None:
        return frozenset(getattr(mat, "varying", ()))
    return frozenset(getattr(aval, "vma", ()))  # jax 0.6 - 0.8; older: no such typing


#: compiled eager solves kept (least recently used first out)
EAGER_CACHE_SIZE = 32
_EAGER_CACHE: collections.OrderedDict[Any, Callable[..., LoopState]] = collections.OrderedDict()


def _eager_run(
    f: Callable[[Any], Any], z0: Any, solver: FixedPointSolver, rule: StopRule
) -> LoopState | None:
    """The solve as one cached jitted program (see the module docstring), or None.

    None when ``f`` closes over values of an enclosing transformation (then the caller is
    traced anyway and the loop is staged into it).
    """
    closed = jax.make_jaxpr(f)(z0)
    if any(isinstance(c, jax.core.Tracer) for c in closed.consts):
        return None
    key = (str(closed.jaxpr), solver, rule, jax.typeof(z0))
    run = _EAGER_CACHE.get(key)
    if run is None:
        jaxpr = closed.jaxpr

        def solve_jaxpr(consts: list[Any], z: Any) -> LoopState:
            def f_jaxpr(v: Any) -> Any:
                return jax.core.eval_jaxpr(jaxpr, consts, v)[0]

            return _run_traced(f_jaxpr, z, solver, rule, ())

        run = _EAGER_CACHE[key] = jax.jit(solve_jaxpr)
        while len(_EAGER_CACHE) > EAGER_CACHE_SIZE:
            _EAGER_CACHE.popitem(last=False)
    else:
        _EAGER_CACHE.move_to_end(key)
    return run(closed.consts, z0)


def _branch(pred: Any, then: Callable[[], Any], otherwise: Callable[[], Any]) -> Any:
    """The core's :data:`~eqsolve.core.measure.Branch` under a trace: ``lax.cond``, so a
    step computes the scaled norms, the determinacy test and the frozen copies only when
    some sample needs them (under ``vmap`` of a solve the predicate is batched and JAX
    evaluates both branches, as without it)."""
    return jax.lax.cond(pred, then, otherwise)


def _run_traced(
    f: Callable[[Any], Any],
    z0: Any,
    solver: FixedPointSolver,
    rule: StopRule,
    axes: tuple[Hashable, ...],
) -> LoopState:
    """``loop_init``, ``lax.while_loop`` over ``loop_step``, then ``verify`` under ``lax.cond``."""
    state = loop_init(jnp, f, z0, solver, rule, _branch)
    k = jnp.asarray(0, dtype=jnp.int32)
    # Under shard_map with per-device stopping the trip count differs between devices, so
    # the counter (hence nfev) varies along every axis the flags vary along and that the
    # test does not reduce over. Say so in its type: out_specs=P() for nfev then raises
    # instead of silently returning device 0's count.
    varying = tuple(sorted(_varying_axes(state.active) - set(axes), key=str))
    if varying:
        k = jax.lax.pcast(k, varying, to="varying")
    state = state._replace(k=k)

    def any_over_axes(flags: Any) -> Any:
        some = jnp.any(flags)
        if axes:  # global: some sample on some device along `axes`
            some = jax.lax.psum(some.astype(jnp.int32), axes) > 0  # type: ignore[no-untyped-call]
        return some

    def keep_going(s: LoopState) -> Any:
        return (s.k < rule.max_iter) & any_over_axes(s.active)

    def body(s: LoopState) -> LoopState:
        return loop_step(jnp, f, s, solver, rule, _branch)

    state = _no_reverse_mode(jax.lax.while_loop(keep_going, body, state))
    out: LoopState = jax.lax.cond(
        any_over_axes(needs_verification(jnp, state)),
        lambda s: verify(jnp, f, s, solver, rule, _branch),
        lambda s: s,
        state,
    )
    return out


#: what reverse mode through a plain solve's loop says instead of JAX's while_loop error
REVERSE_MODE_ADVICE = (
    "Reverse-mode differentiation does not work for lax.while_loop, and eqsolve.fixed_point "
    "on JAX arrays runs its solver in a lax.while_loop. For gradients of a fixed point "
    "(jax.grad, jax.vjp, jax.jacrev, jax.hessian, grad of grad) use "
    "eqsolve.jax.fixed_point(f, z0, *args, ...): it differentiates z* = f(z*, *args) "
    "implicitly (custom_jvp + custom_linear_solve), in every mode and order, without "
    "differentiating the loop"
)


def _raise_reverse_mode(_: Any, cotangent: Any) -> Any:
    raise ValueError(REVERSE_MODE_ADVICE)


def _identity(_: Any, tangent: Any) -> Any:
    return tangent


@jax.custom_jvp
def _no_reverse_mode(state: Any) -> Any:
    """Identity on the loop's outputs; transposing its tangent raises the advice above."""
    return state


def _no_reverse_mode_jvp(primals: Any, tangents: Any) -> tuple[Any, Any]:
    (state,), (d_state,) = primals, tangents
    leaves, tree = jax.tree_util.tree_flatten(d_state)
    out = []
    for t in leaves:
        if isinstance(t, SymbolicZero) or t.dtype == jax.dtypes.float0:
            out.append(t)
            continue
        try:  # linear_call: a linear map whose transpose (reverse mode) is ours
            out.append(linear_call(_identity, _raise_reverse_mode, (), t))
        except NotImplementedError:  # no batching rule (jvp under vmap): no guard there
            out.append(t)
    return _no_reverse_mode(state), jax.tree_util.tree_unflatten(tree, out)


_no_reverse_mode.defjvp(_no_reverse_mode_jvp, symbolic_zeros=True)


class JaxBackend:
    name = "jax"
    xp = jnp
    #: XLA flushes subnormal results to zero on the CPU (and fuses f(z) - z): the stopping
    #: rule then adds core.measure.flush_floor to every residual norm
    flushes_subnormals = True

    def convert(self, x: Any) -> Any:
        if isinstance(x, jax.Array):
            return x
        if hasattr(x, "detach"):  # torch tensor: no DLPack export while it requires grad
            x = x.detach()
        try:
            return jnp.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError, AttributeError, ValueError):
            import numpy as np

            return jnp.asarray(np.asarray(x))

    def run(
        self,
        f: Callable[[Any], Any],
        z0: Any,
        solver: FixedPointSolver,
        rule: StopRule,
        sync_stop: Any = None,
    ) -> LoopState:
        """Run the loop under ``lax.while_loop``; ``sync_stop``: axis name(s) to stop over."""
        axes = sync_axes(sync_stop)
        if axes:
            _check_bound(axes)
        elif not self.is_traced(z0):
            state = _eager_run(f, z0, solver, rule)
            if state is not None:
                return state
        return _run_traced(f, z0, solver, rule, axes)

    def is_traced(self, x: Any) -> bool:
        return isinstance(x, jax.core.Tracer)

    def guard_inplace(self, leaves: list[Any]) -> tuple[list[Any], Callable[[list[Any]], bool]]:
        return leaves, never_written  # JAX arrays are immutable


BACKEND = JaxBackend()
