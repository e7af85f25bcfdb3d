"""``eqsolve.torch.fixed_point(f, z0, *args)``: the fixed point as a function of ``args``.

The entry behind :func:`eqsolve.torch.fixed_point` when positional ``args`` are given (see
:mod:`eqsolve.adapters.torch_implicit` for the node and why its derivatives of every order
are exact). ``f(z, *args)`` works on the user's state structure; here it becomes a map of the
solver's ``(B, n)`` view, evaluated in the call's precision policy.

What each backward gives with ``args``:

* ``Implicit``: the node. ``Solution.value`` is the node's output, the solver's ``z*`` bit
  for bit; no extra call of ``f`` is made in the forward pass (``nfev`` is the solve's): ``f``
  is called again in backward, at ``z*``.
* ``Phantom``/``JFB``: ``k`` damped steps of ``f(., *args)`` from the detached ``z*``,
  differentiated by ordinary autograd (their derivatives of every order are those of the
  unrolled map, and closure-captured tensors get that gradient too).
* ``states=``: each state is a node of its own whose forward returns the recorded iterate and
  whose backward is the implicit one at that point (not under ``torch.func.vmap``).

An ``nn.Module`` ``f`` called with ``args`` (``fixed_point(cell, z0, x)``, ``cell(z, x)``)
has its parameters that require grad appended to ``args`` and is evaluated with
``torch.func.functional_call``: they are explicit inputs too, with exact derivatives of every
order. (Under a ``torch.func`` transformation pass the transformed parameters yourself, with
your own ``functional_call``.)

Under a ``torch.func`` transformation an extra call ``f(z0, *detached args)`` (counted in
``nfev``) checks that ``f`` captures no transformed tensor; without one the first call of the
solve does that check for free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from ..backends.torch import BACKEND
from ..core.adjoint import AdjointInfo
from ..core.solution import Solution
from ..core.solver_base import FixedPointSolver
from ..core.structure import BatchAxis, Structure, leaves_of, structure_of, tree_map
from .array import solve
from .backward import JFB, Backward, Implicit, Phantom
from .torch_dropout import dropout_watch, same_scope
from .torch_implicit import (
    CLOSURE_ERROR,
    Problem,
    Settings,
    apply_node,
    carry_grad,
    transforms_active,
)
from .torch_precision import precision_f

__all__ = ["check_args", "fixed_point_args"]


def check_args(args: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    """The positional ``args`` of ``fixed_point(f, z0, *args)``: tensors."""
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise TypeError(
                f"args[{i}] of eqsolve.torch.fixed_point(f, z0, *args) must be a torch.Tensor "
                f"(the differentiable inputs of f), got {type(a).__name__}; pass other values "
                "through a closure or functools.partial"
            )
    return tuple(args)


def _flat_map(
    structure: Structure, f_prec: Callable[[Any], Any]
) -> Callable[..., torch.Tensor]:
    """``f`` on the ``(B, n)`` view: unflatten, ``f(z, *args)`` (precision policy), flatten.

    The first call checks that ``f`` returns a state like ``z0`` (flattening a wrong one
    would fail with an unclear message); later calls, the solver's iterations among them,
    skip the check.
    """
    xp = BACKEND.xp
    checked = [False]

    def base(z: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        out = f_prec((structure.unflatten(xp, z), args))
        if not checked[0]:
            leaves = leaves_of(out)
            if (
                isinstance(out, (tuple, list)) != (structure.container is not None)
                or not all(isinstance(t, torch.Tensor) for t in leaves)
                or tuple(tuple(t.shape) for t in leaves) != structure.shapes
            ):
                got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                       for t in leaves]
                raise ValueError(
                    f"f(z, *args) must return a state like z0 (shapes "
                    f"{list(structure.shapes)}), got "
                    f"{got if isinstance(out, (tuple, list)) else got[0]}"
                )
            checked[0] = True
        flat: torch.Tensor = structure.flatten(xp, out)
        return flat

    return base


def _module_inputs(
    module: nn.Module, args: tuple[torch.Tensor, ...]
) -> tuple[Callable[..., Any], tuple[torch.Tensor, ...]]:
    """An ``nn.Module`` ``f``: its parameters that require grad join ``args`` (explicit
    inputs, through ``torch.func.functional_call``), so they get exact gradients of every
    order too. Buffers and frozen parameters are used as the module holds them."""
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    names = [name for name, _ in named]
    k = len(args)

    def f(z: Any, *inputs: torch.Tensor) -> Any:
        params = dict(zip(names, inputs[k:], strict=True))
        return torch.func.functional_call(module, params, (z, *inputs[:k]))

    return f, (*args, *(p for _, p in named))


def _probe(f_prec: Callable[[Any], Any], z0: Any, args: tuple[torch.Tensor, ...]) -> None:
    """Under a torch.func transformation: raise when ``f`` captures a transformed tensor.

    ``f(z0, *detached args)`` depends on the transformation's inputs only through tensors
    that ``f`` captures: its output then requires grad (grad, vjp, jacrev) or carries a
    forward-mode tangent (jvp, jacfwd) -- which the node would silently drop.
    """
    with torch.enable_grad():
        out = f_prec((z0, tuple(a.detach() for a in args)))
    for t in leaves_of(out):
        if isinstance(t, torch.Tensor) and (
            t.requires_grad or fwAD.unpack_dual(t).tangent is not None  # type: ignore[no-untyped-call]
        ):
            raise RuntimeError(CLOSURE_ERROR)


def fixed_point_args(
    f: Callable[..., Any],
    z0: Any,
    args: tuple[torch.Tensor, ...],
    *,
    spec: Backward | None,
    solver: str | FixedPointSolver,
    tol: float,
    atol: float,
    max_iter: int,
    batch_axis: BatchAxis,
    on_failure: str,
    on_backward: Callable[[AdjointInfo], None] | None,
    sync_stop: Any,
    f_dtype: torch.dtype | None,
    states: Sequence[int] | None,
    solver_options: dict[str, Any],
) -> Solution:
    """:func:`eqsolve.torch.fixed_point` with explicit inputs (arguments checked there)."""
    xp = BACKEND.xp
    if isinstance(f, nn.Module):
        f, args = _module_inputs(f, args)
    z0_d = tree_map(lambda t: t.detach(), z0)
    structure = structure_of(z0_d, batch_axis)
    first = leaves_of(z0_d)[0]
    f_prec = precision_f(
        lambda pair: f(pair[0], *pair[1]), first.dtype, f_dtype, first.device.type
    )
    base = _flat_map(structure, f_prec)

    def run(f_flat: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor) -> Solution:
        return solve(
            dropout_watch(f_flat), start, solver=solver, tol=tol, atol=atol,
            max_iter=max_iter, batch_axis=0, backend="torch", on_failure=on_failure,
            sync_stop=sync_stop, states=states, **solver_options,
        )

    implicit = spec if isinstance(spec, Implicit) else None
    probed = 0
    if implicit is not None and transforms_active():
        # inside the node the solve's own probe cannot see a transformation's tensors
        _probe(f_prec, z0_d, args)
        probed = 1
    settings = Settings(
        spec=implicit, tol=float(tol), max_iter=int(max_iter), on_failure=on_failure,
        sync_stop=sync_stop, on_backward=on_backward, solve=run, scope=same_scope(),
        probe=implicit is not None and (torch.is_grad_enabled() or transforms_active()),
    )
    problem = Problem("primal", base, settings, tuple(False for _ in args))
    z_flat = apply_node(problem, structure.flatten(xp, z0_d), args)
    sol = settings.results.pop()
    settings.results.clear()  # the nodes keep settings: no reference back to the output
    flat_states = sol.states or ()
    if flat_states and int(sol.value.shape[0]) != structure.batch:  # folded by the vmap rule
        raise NotImplementedError(
            "eqsolve.torch.fixed_point: states= is not supported under torch.func.vmap"
        )

    def user(t: torch.Tensor) -> Any:
        return structure.unflatten(xp, t)

    if spec is None or isinstance(spec, Implicit):
        if spec is None:
            z_flat = z_flat.detach()
        points = [
            s if spec is None else apply_node(
                Problem("primal", base, settings, problem.state_like, point=s), s, args
            )
            for s in flat_states
        ]
        return sol._replace(
            value=user(z_flat), nfev=sol.nfev + probed,
            states=None if sol.states is None else tuple(user(p) for p in points),
        )

    assert isinstance(spec, (Phantom, JFB))

    def unrolled(point: torch.Tensor) -> Any:
        z_star = user(point.detach())
        z = z_star
        lam = spec.damping
        for _ in range(spec.steps):
            fz = f_prec((z, args))
            z = fz if lam == 1.0 else tree_map(lambda a, b: (1.0 - lam) * a + lam * b, z, fz)
        return tree_map(carry_grad, z_star, z)

    return sol._replace(
        value=unrolled(z_flat),
        states=None if sol.states is None else tuple(unrolled(s) for s in flat_states),
        nfev=sol.nfev + spec.steps * (1 + len(flat_states)),
    )
