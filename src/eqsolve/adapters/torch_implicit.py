"""Fixed points with explicit inputs: exact derivatives of every order, torch.func, compile.

``eqsolve.torch.fixed_point(f, z0, *args)`` with ``f(z, *args)`` makes ``z* = f(z*, *args)``
one ``torch.autograd.Function`` of ``args`` (:class:`_Node`). Every gradient is defined by
the implicit-function theorem at the node's own output, never by differentiating a solver:

* **Forward.** The node solves without a graph (``eqsolve.solve`` on detached inputs) and
  returns the solver's ``z*`` (the ``(B, n)`` view) unchanged.
* **Backward** (cotangent ``g``). ``u = g + J^T u`` with ``J = d f / d z`` at the saved output
  ``z*``, then ``u^T d f / d args``. With ``create_graph=True`` (or under a torch.func
  transformation) ``u`` is not a number computed on the side: it is the output of the same
  node applied to the adjoint map ``h(u; g, z*, args) = g + J(z*, args)^T u`` (an implicit
  layer in ``u``), and ``u^T df/dargs`` is evaluated at the saved output with the saved
  inputs. Differentiating the backward therefore differentiates through ``z*`` (the node
  again) and through ``u`` (a node whose own backward solves with ``J`` for ``J^T``): second,
  third, ... derivatives are exact at the solver's tolerance and cost one linear solve per
  node, at constant memory -- nothing is unrolled. (Differentiating ``f`` at a detached copy
  of ``z*`` with ``args`` captured by a closure loses the dependence of ``z*`` and of ``J``
  on the parameters: second derivatives 24% off in the prototype.)
* **Forward mode** (``jvp`` staticmethod: ``torch.func.jvp``/``jacfwd``/``hessian``; not
  ``torch.autograd.forward_ad``, whose dual levels cannot nest the ``torch.func.jvp`` the rule
  uses): ``t = J t + (df/dargs) dargs``, the same node applied to the tangent map.
* **torch.func.vmap** (``vmap`` staticmethod): the data-dependent loop never runs under
  ``vmap``. The rule re-applies the node to ``torch.func.vmap(f)`` on the real tensors, the
  mapped dimension folded into the batch: the samples of every vmapped slice are solved
  together, each with its own stopping rule. ``generate_vmap_rule=True`` cannot work here.

A tensor that ``f`` captures by closure is invisible to the node: it would get no gradient
(``torch.func.grad``: silently zero). The first call of ``f`` in the solve (``f(z0)``) runs
with grad mode on and detached ``args``; an output that still requires grad raises. Under a
torch.func transformation one extra call before the node does the same check for the
transformation's tensors (``requires_grad`` or a forward-mode tangent), and a tensor batched
by ``vmap`` but captured by a closure raises too.

Under ``torch.compile`` the whole ``fixed_point`` call is left to eager mode
(:func:`compile_boundary`: one graph break; the solve is a data-dependent Python loop that
dynamo cannot capture, and it would reject a Function with a ``jvp`` staticmethod anyway);
the model around it is compiled. ``fullgraph=True`` is therefore not possible.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar, cast

import torch

from ..backends.torch import BACKEND
from ..core.adjoint import AdjointInfo
from ..core.solution import Solution
from .backward import Implicit, solve_implicit
from .reporting import warn

__all__ = [
    "CLOSURE_ERROR", "AdjointCarrier", "CotangentMap", "Problem", "Settings", "apply_node",
    "carry_grad", "compile_boundary",
    "linear_solve", "transforms_active", "vjp_in_z", "warn_detached",
]

#: the message when tensors that ``f`` captures would get no gradient
CLOSURE_ERROR = (
    "f(z, *args) uses a tensor that requires grad but is not one of the positional args "
    "(captured by a closure, e.g. an nn.Module's parameter): it would receive no gradient "
    "(under torch.func.grad a zero one). Pass every tensor that needs a gradient as a "
    "positional arg, fixed_point(f, z0, *args) with f(z, *args); for an nn.Module cell pass "
    "the module itself as f, fixed_point(cell, z0, x) (its parameters become args), or use "
    "torch.func.functional_call(module, params, (z, x)) with the params passed as args; or "
    "detach the tensor."
)

Fn = Callable[..., torch.Tensor]


def transforms_active() -> bool:
    """Whether a torch.func transformation (grad, vjp, jvp, vmap, ...) is running.

    torch has no public query for this; the private one is what functorch's own
    ``autograd.Function`` dispatch reads (torch 2.x). Should a release drop it, this returns
    False: the closure path then runs as without a transformation (no error raised).
    """
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


@dataclass(frozen=True)
class Settings:
    """What every node of one call shares: the forward solve and the implicit backward."""

    spec: Implicit | None  # None: the node has no gradient (Phantom/JFB carry it outside)
    tol: float
    max_iter: int
    on_failure: str
    sync_stop: Any
    on_backward: Callable[[AdjointInfo], None] | None
    solve: Callable[..., Solution]  # (f_flat, z0_flat) -> Solution, the primal's solve
    scope: Callable[[], Any]  # a context manager: the dropout scope of the call
    probe: bool = True  # f(z0, *detached params) must not require grad (closure tensors)
    results: list[Solution] = field(default_factory=list)  # the primal solves' Solutions


@dataclass(frozen=True)
class Problem:
    """One node: ``z = fn(z, *params)`` on the ``(B, n)`` view.

    ``kind``: ``"primal"`` (the user's map, solved by ``settings.solve`` or, with ``point``,
    taken as given: a correction state), ``"adjoint"`` / ``"tangent"`` (``fn(u, c, z, *p) =
    c + J_base(z, p)^T u`` / ``c + J_base(z, p) u``, linear solves). ``base``: the user's map
    (primal) or the parent node's map. ``state_like``: which params are ``(B, n)`` states.
    """

    kind: str
    base: Fn
    settings: Settings
    state_like: tuple[bool, ...]
    point: torch.Tensor | None = None

    def fn(self, z: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        if self.kind == "primal":
            return self.base(z, *params)
        c, zb, *rest = params
        if self.kind == "adjoint":
            return c + _vjp(self.base, zb, rest, z)
        return c + _jvp(self.base, zb, rest, z)

    def child(self, kind: str) -> Problem:
        """The node of this node's adjoint (``kind="adjoint"``) or tangent map."""
        return Problem(kind, self.fn, self.settings, (True, True, *self.state_like))


def _vjp(fn: Fn, z: torch.Tensor, params: Sequence[torch.Tensor], u: torch.Tensor) -> torch.Tensor:
    """``J_fn(z, params)^T u``, differentiable in ``u``, ``z`` and ``params`` (torch.func)."""
    pullback = torch.func.vjp(lambda zz: fn(zz, *params), z)[1]
    (out,) = pullback(u)
    result: torch.Tensor = out
    return result


def _jvp(fn: Fn, z: torch.Tensor, params: Sequence[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """``J_fn(z, params) t`` (forward mode, torch.func)."""
    out = torch.func.jvp(lambda zz: fn(zz, *params), (z,), (t,))[1]
    result: torch.Tensor = out
    return result


def _differentiable(p: torch.Tensor) -> bool:
    return p.is_floating_point() or p.is_complex()


def linear_solve(
    spec: Implicit,
    op: Callable[[torch.Tensor], torch.Tensor],
    c: torch.Tensor,
    *,
    tol: float,
    max_iter: int,
    on_failure: str,
    sync_stop: Any,
    on_backward: Callable[[AdjointInfo], None] | None,
) -> torch.Tensor:
    """``u = c + op(u)`` per sample with ``spec``, the forward's tol, max_iter and on_failure
    as its defaults; ``on_backward`` gets the solve's :class:`AdjointInfo`.

    With ``sync_stop`` every rank runs the same number of iterations: the VJP of an ``f``
    that contains a collective is itself collective. Every torch implicit backward (closure
    form and explicit ``args``) solves here.
    """
    driver = functools.partial(BACKEND.run, sync_stop=sync_stop)
    u, info, _, _ = solve_implicit(
        BACKEND.xp, spec, op, c.detach().contiguous(), forward_tol=tol,
        forward_max_iter=max_iter, forward_on_failure=on_failure, driver=driver,
    )
    if on_backward is not None:
        on_backward(info)
    out: torch.Tensor = u
    return out


def _linear_solve(
    settings: Settings, op: Callable[[torch.Tensor], torch.Tensor], c: torch.Tensor,
    report: bool,
) -> torch.Tensor:
    """:func:`linear_solve` with the call's settings (``report``: call ``on_backward``)."""
    assert settings.spec is not None
    return linear_solve(
        settings.spec, op, c, tol=settings.tol, max_iter=settings.max_iter,
        on_failure=settings.on_failure, sync_stop=settings.sync_stop,
        on_backward=settings.on_backward if report else None,
    )


def vjp_in_z(
    out: torch.Tensor, z_leaf: torch.Tensor
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[], bool]]:
    """``v -> J^T v`` for ``out = f(z_leaf)`` by ``torch.autograd.grad`` on the retained graph
    (zero where autograd finds no path from ``z_leaf`` to ``out``), and a flag: whether it
    ever found one (:func:`warn_detached` when not)."""
    seen = [False]

    def vjp(v: torch.Tensor) -> torch.Tensor:
        (gz,) = torch.autograd.grad(out, z_leaf, v, retain_graph=True, allow_unused=True)
        if gz is None:
            return torch.zeros_like(v)
        seen[0] = True
        result: torch.Tensor = gz
        return result

    return vjp, lambda: seen[0]


def warn_detached(call: str) -> None:
    """The warning for an ``f`` whose output has no autograd path from ``z``."""
    warn(
        f"{call} does not depend on z through autograd (torch.autograd.grad found no path "
        "from z to f(z)), so the backward used J_f = 0. If f detaches z (.detach(), .data, "
        "NumPy), the implicit gradient is wrong.",
        RuntimeWarning,
    )


def carry_grad(value: torch.Tensor, carrier: torch.Tensor) -> torch.Tensor:
    """``value`` exactly (the solver's ``z*``), with the gradient of ``carrier``.

    ``carrier`` is ``f(z*)`` (or the phantom iterate): the tensor whose graph gives the
    chosen backward. ``carrier - carrier.detach()`` is exactly zero in floating point, so
    the returned tensor is ``z*`` bit for bit -- the point whose residual ``Solution``
    reports -- while its gradient is that of ``carrier``.
    """
    return value + (carrier - carrier.detach())


def _solve(problem: Problem, z0: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The node's forward: its fixed point, computed without a graph."""
    settings = problem.settings
    if problem.point is not None:  # a correction state: the gradient as if it were z*
        return problem.point.detach().clone()
    detached = [p.detach() for p in params]
    if problem.kind == "primal":
        probed: list[bool] = []

        def f_flat(z: torch.Tensor) -> torch.Tensor:
            if probed or not settings.probe:
                return problem.base(z, *detached)
            with torch.enable_grad():  # f(z0): does f use a tensor that requires grad?
                out = problem.base(z, *detached)
            probed.append(True)
            if out.requires_grad:
                raise RuntimeError(CLOSURE_ERROR)
            return out

        sol = settings.solve(f_flat, z0.detach())
        settings.results.append(sol)
        value: torch.Tensor = sol.value
        return value
    c, zb, *rest = detached
    base = problem.base
    if problem.kind == "adjoint":
        with torch.enable_grad():
            z_leaf = zb.requires_grad_(True)  # a detached alias: a leaf of its own
            out = base(z_leaf, *rest)
        if not out.requires_grad:
            return c.clone()  # J = 0
        op, _ = vjp_in_z(out, z_leaf)
        return _linear_solve(settings, op, c, report=True)

    def op_t(v: torch.Tensor) -> torch.Tensor:
        return _jvp(base, zb, rest, v)

    return _linear_solve(settings, op_t, c, report=False)


def _backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
    with ctx.problem.settings.scope():  # the call's dropout masks
        return _backward_in_scope(ctx, g)


def _backward_in_scope(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
    problem: Problem = ctx.problem
    z, *params = ctx.saved_tensors
    needs = ctx.needs_input_grad[2:]
    nothing = (None, None, *(None for _ in params))
    if problem.settings.spec is None or not any(needs):
        return nothing
    if tuple(g.shape) != tuple(z.shape):
        raise RuntimeError(
            f"cotangent of shape {tuple(g.shape)} reached the fixed point's backward, "
            f"expected {tuple(z.shape)}"
        )
    wanted = [i for i, p in enumerate(params) if needs[i] and _differentiable(p)]
    grads: list[Any] = [None] * len(params)
    if torch.is_grad_enabled() or transforms_active():
        # the gradient must itself be differentiable: u is the adjoint node's output and
        # u^T dfn/dparams is taken at the saved output z with the saved params
        u = apply_node(problem.child("adjoint"), g, (g, z, *params))
        with torch.enable_grad():

            def of_params(*wanted_params: torch.Tensor) -> torch.Tensor:
                full = list(params)
                for i, p in zip(wanted, wanted_params, strict=True):
                    full[i] = p
                return problem.fn(z, *full)

            pullback = torch.func.vjp(of_params, *(params[i] for i in wanted))[1]
            for i, gi in zip(wanted, pullback(u), strict=True):
                grads[i] = gi
        return (None, None, *grads)
    with torch.enable_grad():
        z_leaf = z.detach().requires_grad_(True)
        leaves = [
            p.detach().requires_grad_(True) if i in wanted else p.detach()
            for i, p in enumerate(params)
        ]
        out = problem.fn(z_leaf, *leaves)
    if not out.requires_grad:  # f uses neither z nor the params: every gradient is zero
        return nothing
    op, used_z = vjp_in_z(out, z_leaf)
    u = _linear_solve(problem.settings, op, g, report=problem.kind == "primal")
    if problem.kind == "primal" and not used_z():
        warn_detached("f(z*, *args)")
    found = torch.autograd.grad(out, [leaves[i] for i in wanted], u, allow_unused=True)
    for i, gi in zip(wanted, found, strict=True):
        grads[i] = gi
    return (None, None, *grads)


def _jvp_rule(ctx: Any, _problem_t: Any, _z0_t: Any, *tangents: Any) -> torch.Tensor:
    if not transforms_active():  # the rule itself uses torch.func.jvp: no nested dual levels
        raise NotImplementedError(
            "forward-mode AD through eqsolve.torch.fixed_point(f, z0, *args) is supported "
            "with torch.func.jvp / jacfwd / hessian, not with torch.autograd.forward_ad"
        )
    with ctx.problem.settings.scope():
        return _jvp_in_scope(ctx, *tangents)


def _jvp_in_scope(ctx: Any, *tangents: Any) -> torch.Tensor:
    problem: Problem = ctx.problem
    z, *params = ctx.saved_tensors
    if problem.settings.spec is None:
        return torch.zeros_like(z)
    pairs = [
        (i, t) for i, (p, t) in enumerate(zip(params, tangents, strict=True))
        if t is not None and _differentiable(p)
    ]
    if not pairs:
        return torch.zeros_like(z)
    idx = [i for i, _ in pairs]

    def of_params(*moving: torch.Tensor) -> torch.Tensor:
        full = list(params)
        for i, p in zip(idx, moving, strict=True):
            full[i] = p
        return problem.fn(z, *full)

    b = torch.func.jvp(of_params, tuple(params[i] for i in idx), tuple(t for _, t in pairs))[1]
    return apply_node(problem.child("tangent"), b, (b, z, *params))


def _vmap_rule(
    info: Any, in_dims: tuple[Any, ...], problem: Problem, z0: torch.Tensor,
    *params: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    if problem.point is not None:
        raise NotImplementedError(
            "eqsolve.torch.fixed_point: states= is not supported under torch.func.vmap"
        )
    V = int(info.batch_size)
    B, n = int(z0.shape[-2]), int(z0.shape[-1])

    def state(t: torch.Tensor, dim: int | None) -> torch.Tensor:
        t = t.unsqueeze(0).expand(V, B, n) if dim is None else t.movedim(dim, 0)
        return t.reshape(V * B, n)

    z0_v = state(z0, in_dims[1])
    moved: list[torch.Tensor] = []
    dims: list[int | None] = []
    for p, d, is_state in zip(params, in_dims[2:], problem.state_like, strict=True):
        if is_state:
            moved.append(state(p, d))
            dims.append(0)
        else:
            moved.append(p if d is None else p.movedim(d, 0))
            dims.append(None if d is None else 0)
    # base's own params: all of the node's (primal), or those after (c, z) (adjoint/tangent)
    skip = 0 if problem.kind == "primal" else 2
    flags = problem.state_like[skip:]
    mapped = torch.func.vmap(
        problem.base, in_dims=(0, *dims[skip:]), randomness=info.randomness
    )

    def base_v(z: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        ps_v = [p.reshape(V, B, n) if s else p for p, s in zip(ps, flags, strict=True)]
        out: torch.Tensor = mapped(z.reshape(V, B, n), *ps_v)
        return out.reshape(V * B, n)

    out = apply_node(replace(problem, base=base_v), z0_v, tuple(moved))
    return out.reshape(V, B, n), 0


def _forward(problem: Problem, z0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    try:
        return _solve(problem, z0, params)
    except RuntimeError as exc:
        if "escaped from inside a function being vmapped" not in str(exc):
            raise
        raise RuntimeError(
            "under torch.func.vmap, f(z, *args) uses a tensor batched by vmap that is not one "
            "of the positional args (captured by a closure): the solve runs outside vmap. "
            "Pass it as a positional arg of fixed_point(f, z0, *args)."
        ) from exc


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    problem, _z0, *params = inputs
    ctx.problem = problem
    ctx.save_for_backward(output, *params)  # (not a reference cycle through the output)
    ctx.save_for_forward(output, *params)


class CotangentMap(Protocol):
    """What :class:`AdjointCarrier` calls in backward: the closure form's adjoint ``u`` of a
    cotangent ``g`` (the implicit solve, or SHINE's ``-H^T g``), and the error to raise under
    ``create_graph=True`` (the closure form has no second derivative)."""

    higher_order_error: str

    def solve(self, g: torch.Tensor) -> torch.Tensor: ...


F = TypeVar("F", bound=Callable[..., Any])

#: ``fn -> torch.compiler.disable(fn)``, made on first use (importing dynamo costs ~1 s)
_EAGER: dict[Any, Any] = {}


def compile_boundary(fn: F) -> F:
    """``fn`` that ``torch.compile`` does not trace: one graph break at the call, the solve
    (a data-dependent Python loop) runs eagerly, the code around it is compiled. Also for a
    custom Function's backward, which the autograd engine runs inside a compiled step."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" in sys.modules and torch.compiler.is_compiling():
            eager = _EAGER.get(fn)
            if eager is None:
                eager = _EAGER[fn] = torch.compiler.disable(fn, recursive=True)  # type: ignore[no-untyped-call]
            return eager(*args, **kwargs)
        return fn(*args, **kwargs)

    return cast(F, wrapper)


class _Node(torch.autograd.Function):
    """``z* = fixed point of problem.fn(., *params)`` (see the module docstring)."""

    forward = staticmethod(_forward)
    setup_context = staticmethod(_setup_context)
    # run by the autograd engine inside a compiled step: eager, like the forward solve
    backward = staticmethod(compile_boundary(_backward))
    jvp = staticmethod(_jvp_rule)
    vmap = staticmethod(_vmap_rule)


def apply_node(problem: Problem, z0: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``z* = problem.fn(z*, *params)`` as a differentiable torch operation on ``params``."""
    out: torch.Tensor = _Node.apply(problem, z0, *params)  # type: ignore[no-untyped-call]
    return out


class AdjointCarrier(torch.autograd.Function):
    """Identity on the closure form's ``f(z*)`` (flattened); backward maps the cotangent
    ``g`` to ``link.solve(g)`` (a :class:`CotangentMap`), and autograd continues through
    ``f``'s graph with it: ``u^T df/dtheta``."""

    @staticmethod
    def forward(ctx: Any, out_flat: torch.Tensor, link: CotangentMap) -> torch.Tensor:
        ctx.link = link
        return out_flat.clone()

    @staticmethod
    @compile_boundary  # run by the autograd engine inside a compiled step: eagerly
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        if torch.is_grad_enabled():  # create_graph=True: u's dependence on theta is lost
            raise RuntimeError(ctx.link.higher_order_error)
        return ctx.link.solve(g), None

