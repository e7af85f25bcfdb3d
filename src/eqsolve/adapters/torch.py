"""PyTorch adapter: a fixed point ``z* = f(z*)`` as a differentiable torch operation.

How the graph is built:

1. **Forward solve without a graph.** ``eqsolve.fixed_point`` runs the solver under
   ``torch.no_grad()`` on a detached ``z0``: nothing is saved for backward however many
   iterations it takes.
2. **One differentiable call of f, only when something needs a gradient.** The first call
   ``f(z0)`` of the solve is made with the caller's grad mode: its output requires grad
   only when ``f`` uses a tensor that does. Then (and only then) ``f`` is called once more
   at the solution, on a fresh leaf ``z_leaf = z*.detach().requires_grad_()`` (flattened per
   sample to the solver's ``(B, n)`` view, then restored to the user's structure, so
   multi-scale tuple states work). This ``f(z*)`` carries ``f``'s graph to every tensor
   ``f`` uses (closed-over ``nn.Module`` parameters, inputs ``x``). The returned value is
   ``z* + (f(z*) - f(z*).detach())``: ``z*`` bit for bit -- the point whose residual and
   status the ``Solution`` reports -- with the gradient of ``f(z*)``.
3. **Implicit backward.** ``f(z*)`` passes through ``torch_implicit.AdjointCarrier``, a custom
   ``torch.autograd.Function`` that is the identity forward and, backward, maps the
   incoming cotangent ``g`` to the solution ``u`` of the adjoint system
   ``u = g + J_f(z*)^T u`` (``eqsolve.core.adjoint.adjoint_solve``; each ``J_f^T v`` is a
   ``torch.autograd.grad`` of the saved ``f(z*)`` with respect to ``z_leaf`` only). Autograd
   then continues through ``f``'s graph with ``u``, giving ``u^T df/dtheta`` for every
   parameter and input: the exact implicit gradient.

With explicit inputs, ``fixed_point(f, z0, *args)`` with ``f(z, *args)``, the fixed point is
instead one ``torch.autograd.Function`` of ``args`` whose backward is taken at its own saved
output (:mod:`eqsolve.adapters.torch_implicit`, entry :mod:`eqsolve.adapters.torch_explicit`):
second and higher derivatives (``create_graph=True``), ``torch.func`` transformations
(``grad``, ``vjp``, ``jvp``, ``jacrev``, ``jacfwd``, ``hessian``, ``vmap``) and
``gradgradcheck`` are exact. The closure form below supports first order only, and raises
(naming the fix) under ``create_graph=True`` or a ``torch.func`` transformation.

Why a custom Function rather than a tensor hook: one node sees the whole flattened state, so
a tuple of feature maps needs no per-leaf bookkeeping; it holds no reference back to its own
output (a hook that closes over the tensor it is registered on makes a reference cycle that
keeps the graph alive until the garbage collector runs); and a backward with
``create_graph=True`` (whose second derivatives would silently miss the dependence of ``u``
on the parameters) is refused with a clear error. The adjoint's VJPs differentiate with respect to
``z_leaf`` only, so they never touch parameter gradient accumulators: the parameters
receive exactly one gradient, in the user's own backward pass, which is what
``DistributedDataParallel``'s all-reduce hooks expect.

Memory held for backward is the graph of one call of ``f`` (phantom: ``k`` calls), whatever
the number of forward iterations.

Distributed training (``DistributedDataParallel``, default settings). Every parameter that
``f`` uses receives exactly one gradient, in the user's backward pass, and the DDP forward
makes no differentiable call of the wrapped module other than the one ``f(z*)``: the graph
DDP's reducer sees is that of a single layer, so ``find_unused_parameters`` is not needed
(tested with 2 gloo processes). When ``f`` itself contains a collective
(``SyncBatchNorm``, an explicit ``all_reduce``), pass ``sync_stop=True`` (or a process
group): every rank then runs the same number of forward iterations *and* of adjoint
iterations (the VJP of a collective is a collective too), deciding each step by an
all-reduce of "some sample of mine is still active". Without it a rank that converges first
leaves the others waiting inside ``f``'s collective.

Mixed precision (``f_dtype`` or an enclosing ``torch.autocast`` region): see
:mod:`eqsolve.adapters.torch_precision`.

Inexact, biased gradients (cheaper; documented as such):

The backward is given by one specification shared with the other adapters
(:mod:`eqsolve.adapters.backward`: ``Implicit``, ``Phantom``, ``JFB``, or a shorthand).

* ``backward=Phantom(k, lam)``: ``k`` damped unrolled steps from the detached ``z*``,
  ``z_{i+1} = (1 - lam) z_i + lam f(z_i)``, differentiated by ordinary backprop
  (Geng et al., "On training implicit models", NeurIPS 2021). The value is ``z*`` (as
  above) carrying the gradient of ``z_k``.
* ``backward=JFB()``: one step, ``f(z*)`` with ``z*`` detached (Jacobian-free
  backpropagation: Fung et al., "JFB: Jacobian-free backpropagation for implicit networks",
  AAAI 2022); equivalent to ``u = g``, i.e. phantom with ``k = 1, lam = 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..backends.torch import BACKEND, check_sync_stop
from ..core.adjoint import AdjointInfo
from ..core.solution import Solution
from ..core.solver_base import FixedPointSolver, make_solver
from ..core.structure import BatchAxis, Structure, leaves_of, structure_of, tree_map
from ..core.validation import check_arguments, check_states
from .array import GRADIENT_KEYWORDS, check_keywords
from .backward import (
    ADJOINT_METHODS,
    JFB,
    SHINE,
    Backward,
    Implicit,
    Phantom,
    backward_spec,
    pop_legacy,
)
from .shine import solve_for
from .torch_dropout import dropout_watch, solve_scope
from .torch_explicit import check_args, fixed_point_args
from .torch_implicit import (
    AdjointCarrier,
    carry_grad,
    compile_boundary,
    linear_solve,
    transforms_active,
    vjp_in_z,
    warn_detached,
)
from .torch_precision import check_f_dtype, precision_f
from .torch_shine import shine_carrier

__all__ = ["ADJOINT_METHODS", "BACKWARD_METHODS", "DEQ", "fixed_point"]

#: every accepted ``backward=`` shorthand (``None`` too: no gradient)
BACKWARD_METHODS: tuple[str, ...] = (*ADJOINT_METHODS, "phantom", "jfb", "shine")


class _AdjointLink:
    """The implicit backward of the closure form (a
    :class:`~eqsolve.adapters.torch_implicit.CotangentMap` for ``AdjointCarrier``): the one
    differentiable ``f(z*)`` and its input leaf, and ``solve(g)``, the adjoint
    ``u = g + J_f(z*)^T u``."""

    higher_order_error = (
        "higher-order gradients (create_graph=True) of eqsolve.torch.fixed_point(f, z0) "
        "with a closure f are not supported: the tensors f captures are invisible to "
        "the fixed point, so the dependence of z* and of the adjoint on them cannot be "
        "differentiated. Pass them as positional args, fixed_point(f, z0, *args) with "
        "f(z, *args) (DEQ: deq(f, z0, *args)): second and higher derivatives are then "
        "exact. backward=eqsolve.Phantom(...) differentiates its own unrolled map and "
        "is biased (its default settings are 20-30% off)."
    )

    def __init__(
        self,
        out_flat: torch.Tensor,
        z_leaf: torch.Tensor,
        spec: Implicit,
        forward: dict[str, Any],
        on_backward: Callable[[AdjointInfo], None] | None,
        sync_stop: Any = False,
    ):
        self.out_flat = out_flat
        self.z_leaf = z_leaf
        self.spec = spec
        self.forward = forward  # tol, max_iter and on_failure of the forward solve
        self.on_backward = on_backward
        self.sync_stop = sync_stop

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        if tuple(g.shape) != tuple(self.out_flat.shape):
            raise RuntimeError(
                f"cotangent of shape {tuple(g.shape)} reached the fixed point's backward, "
                f"expected {tuple(self.out_flat.shape)}"
            )
        vjp, used_z = vjp_in_z(self.out_flat, self.z_leaf)
        u = linear_solve(
            self.spec, vjp, g, tol=self.forward["tol"], max_iter=self.forward["max_iter"],
            on_failure=self.forward["on_failure"], sync_stop=self.sync_stop,
            on_backward=self.on_backward,
        )
        if not used_z():
            warn_detached("f(z*)")
        return u

def _probing(f: Callable[[Any], Any]) -> tuple[Callable[[Any], Any], Callable[[], bool]]:
    """``f`` whose first call (``f(z0)``) runs with grad mode on and records whether its
    output requires grad, i.e. whether ``f`` uses a tensor that needs a gradient.

    That call's graph is dropped at once (its output is detached); the others run as the
    solver runs them, without a graph. No extra call of ``f`` is made to find out.
    """
    seen: list[bool] = []

    def f_probe(z: Any) -> Any:
        if seen:
            return f(z)
        with torch.enable_grad():
            out = f(z)
        seen.append(any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves_of(out)))
        return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)

    return f_probe, lambda: bool(seen and seen[0])


@compile_boundary  # under torch.compile: one graph break, the solve runs eagerly
@solve_scope()  # one solve: eqsolve.torch.VariationalDropout draws one mask in it
def fixed_point(
    f: Callable[..., Any],
    z0: Any,
    *args: torch.Tensor,
    solver: str | FixedPointSolver = "auto",
    tol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int = 100,
    batch_axis: BatchAxis = "auto",
    backward: Backward | str | FixedPointSolver | None = "auto",
    on_failure: str = "warn",
    on_backward: Callable[[AdjointInfo], None] | None = None,
    sync_stop: Any = False,
    f_dtype: torch.dtype | None = None,
    states: Sequence[int] | None = None,
    **solver_options: Any,
) -> Solution:
    """Differentiable fixed point ``z* = f(z*)`` (or ``z* = f(z*, *args)``) of a PyTorch function.

    The solve runs without a graph. When grad mode is on and ``f`` uses a tensor that
    requires grad, one more differentiable call ``f(z*)`` attaches the backward, so
    ``Solution.value`` carries ``grad_fn`` and gradients reach every tensor ``f`` uses: the
    parameters it closes over (an ``nn.Module``'s) and its inputs. Memory held for backward
    is that of one call of ``f`` (``k`` calls for ``Phantom(k)``), independent of the number
    of solver iterations. When nothing needs a gradient the result is exactly that of
    :func:`eqsolve.solve` (same value, same ``nfev``).

    Args:
        f: maps a state like ``z0`` to one like it, with torch operations (it must be
            differentiable by autograd with respect to ``z`` and whatever it closes over).
        z0: initial guess: a tensor, or a tuple/list of tensors sharing the batch axis
            (multi-scale states). It is detached: ``z*`` does not depend on it, so it
            receives no gradient.
        *args: tensors passed to ``f`` as ``f(z, *args)``: the explicit, differentiable
            inputs (weights, the layer's input ``x``; for a module, its parameters through
            ``torch.func.functional_call``). With them ``z*`` is a ``torch.autograd.Function``
            of ``args`` whose every derivative is implicit and exact: second and third
            order (``create_graph=True``, ``gradgradcheck``) and the ``torch.func``
            transformations, ``vmap`` included (one solve for all vmapped samples; the
            ``Solution``'s other fields then describe that whole solve). No extra call of
            ``f`` is made in the forward pass (``f`` is called at ``z*`` in backward).
            ``f`` must not also use a tensor that requires grad through a closure (it
            would get no gradient: ``RuntimeError``). Without ``args`` (a closure ``f``),
            first-order gradients only.
        solver, tol, atol, max_iter, batch_axis, **solver_options: the forward solve, as
            in :func:`eqsolve.solve`.
        backward: how gradients are computed (:mod:`eqsolve.adapters.backward`):
            ``eqsolve.Implicit(method, tol, max_iter, options, on_failure)`` -- the exact
            implicit gradient ``u^T df/dtheta`` with ``u = g + J_f(z*)^T u`` (the default,
            ``"auto"``; also ``"anderson"``, ``"broyden"``, ``"neumann"``, ``"gmres"`` or a solver
            object); ``eqsolve.Phantom(steps, damping)`` (``"phantom"``: biased, Geng et al.
            2021); ``eqsolve.JFB()`` (``"jfb"``: ``u = g``, biased, Fung et al. 2022);
            ``eqsolve.SHINE()`` (``"shine"``: ``u = -H^T g`` from the forward Broyden
            estimate, closure ``f`` and ``solver="broyden"`` only, biased, Ramzi et al.
            2022); ``None``: no gradient.
        on_failure: forward *and* (unless ``Implicit(on_failure=...)`` says otherwise)
            adjoint non-convergence / NaN: ``"warn"`` (:class:`eqsolve.ConvergenceWarning`),
            ``"raise"`` (:class:`eqsolve.ConvergenceError`; raised from ``loss.backward()``
            for the adjoint, holding the adjoint's ``(B, n)`` solution) or ``"ignore"``.
        on_backward: called with the adjoint's :class:`~eqsolve.core.adjoint.AdjointInfo`
            (per-sample iterations, residual, converged, status) after each implicit
            backward, e.g. to log it.
        sync_stop: for an ``f`` containing a collective (``SyncBatchNorm``, an
            ``all_reduce``) under ``torch.distributed``: ``True`` synchronises the stop over
            the default process group, a ``torch.distributed.ProcessGroup`` over that group.
            Every rank then makes the same number of forward iterations (one all-reduce of
            the "some sample still active" flag per iteration; stopped samples stay frozen,
            so each sample's result is unchanged) and of adjoint iterations in backward.
            ``False`` (default): each rank stops on its own samples, which is right for
            ``DistributedDataParallel`` with collective-free cells. ``True`` without an
            initialised process group is a no-op. Every rank must pass the same settings.
        f_dtype: ``torch.bfloat16`` or ``torch.float16``: evaluate ``f`` under
            ``torch.autocast`` and cast its output back to ``z0``'s dtype, so the solver
            state, residuals, adjoint and gradients stay float32/64 (also without the
            argument inside an enclosing autocast region). Choose ``tol`` above the
            precision of ``f``, e.g. ``tol=1e-2`` for bfloat16.
        states: iterations ``(k_1, ..., k_S)`` for a fixed-point correction loss (Bai,
            Koltun & Kolter, "Deep Equilibrium Optical Flow Estimation", CVPR 2022):
            ``Solution.states`` holds the solver's own iterate at each (a sample that
            stopped earlier gives its returned value), each carrying the gradient chosen
            by ``backward`` as if it were the fixed point (implicit: its own adjoint solve
            at that point; phantom/JFB: unrolled steps from it), so a loss
            ``sum_i w_i loss(states[i]) + loss(value)`` supervises the trajectory. Each
            state costs one more call of ``f`` (``Phantom(k)``: ``k``) and, implicitly, one
            more adjoint solve in backward.

    Returns:
        A :class:`eqsolve.Solution` whose ``value`` is always the solver's ``z*`` (the
        point ``residual`` and ``status`` describe). When a gradient is attached it carries
        ``grad_fn`` (the gradient of ``f(z*)`` through the implicit backward, or of the
        unrolled iterate for ``Phantom``/``JFB``) and ``nfev`` counts the extra calls.

    Raises:
        TypeError / ValueError: invalid arguments (naming the argument).
        RuntimeError: ``f(z*)`` has no autograd graph although its input requires grad
            (``f`` detaches, uses ``.data`` or leaves torch); with ``args``, ``f`` uses a
            closure tensor that requires grad; without ``args``, a ``torch.func``
            transformation or ``create_graph=True`` (both say to pass ``args``).

    Example:
        >>> import torch, eqsolve.torch as et
        >>> W = torch.nn.Parameter(0.5 * torch.eye(3, dtype=torch.float64))
        >>> x = torch.ones(2, 3, dtype=torch.float64)
        >>> sol = et.fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros(2, 3,
        ...                      dtype=torch.float64), tol=1e-10)
        >>> sol.value.sum().backward(); W.grad.shape
        torch.Size([3, 3])
    """
    spec = backward_spec(backward, pop_legacy(solver_options), solver=solver)
    check_sync_stop(sync_stop)
    f_dtype = check_f_dtype(f_dtype)
    check_arguments(f, tol, atol, max_iter, on_failure, batch_axis)
    check_keywords(solver, solver_options, "fixed_point", GRADIENT_KEYWORDS)
    for i, leaf in enumerate(leaves_of(z0)):
        if not isinstance(leaf, torch.Tensor):
            where = "z0" if not isinstance(z0, (tuple, list)) else f"z0[{i}]"
            raise TypeError(
                f"{where} must be a torch.Tensor for eqsolve.torch.fixed_point, got "
                f"{type(leaf).__name__} (use eqsolve.fixed_point for other array libraries)"
            )
    if args and isinstance(spec, SHINE):
        raise NotImplementedError(
            "backward=eqsolve.SHINE() is supported with a closure f only: pass "
            "fixed_point(lambda z: f(z, *args), z0, backward=eqsolve.SHINE(), ...)"
        )
    if args:
        return fixed_point_args(
            f, z0, check_args(args), spec=spec, solver=solver, tol=tol, atol=atol,
            max_iter=max_iter, batch_axis=batch_axis, on_failure=on_failure,
            on_backward=on_backward, sync_stop=sync_stop, f_dtype=f_dtype, states=states,
            solver_options=solver_options,
        )
    if transforms_active():
        raise RuntimeError(
            "eqsolve.torch.fixed_point(f, z0) with a closure f cannot run under a torch.func "
            "transformation (grad, vjp, jvp, jacrev, jacfwd, hessian, vmap): the tensors f "
            "captures are invisible to it. Pass them as positional args: "
            "fixed_point(f, z0, *args) with f(z, *args) -- every transformation is then exact."
        )
    z0_detached = tree_map(lambda t: t.detach(), z0)
    first = leaves_of(z0)[0] if leaves_of(z0) else None
    if first is not None:
        f = precision_f(f, first.dtype, f_dtype, first.device.type)
    wants_grad = spec is not None and torch.is_grad_enabled()
    f_solve, needs_grad = _probing(f) if wants_grad else (f, lambda: False)
    f_solve = dropout_watch(f_solve)
    kwargs = dict(
        solver=solver, tol=tol, atol=atol, max_iter=max_iter, batch_axis=batch_axis,
        backend="torch", on_failure=on_failure, sync_stop=sync_stop, states=states,
        **solver_options,
    )
    sol, factors = solve_for(spec if wants_grad else None, f_solve, z0_detached, **kwargs)
    if spec is None or not wants_grad or not needs_grad():
        return sol
    if factors is not None:  # SHINE: -H^T g from the forward's Broyden estimate
        return sol._replace(value=shine_carrier(f, sol.value, factors, batch_axis),
                            nfev=sol.nfev + 1)

    forward = {"tol": float(tol), "max_iter": int(max_iter), "on_failure": on_failure}

    def attach(point: Any) -> Any:
        return _with_gradient(f, point, spec, batch_axis, forward, on_backward, sync_stop)

    assert not isinstance(spec, SHINE)
    extra = 1 if isinstance(spec, Implicit) else spec.steps  # calls of f per point
    value = attach(sol.value)
    if sol.states is None:
        return sol._replace(value=value, nfev=sol.nfev + extra)
    return sol._replace(
        value=value,
        states=tuple(attach(s) for s in sol.states),
        nfev=sol.nfev + extra * (1 + len(sol.states)),
    )


def _with_gradient(
    f: Callable[[Any], Any],
    z_star: Any,
    spec: Backward,
    batch_axis: BatchAxis,
    forward: dict[str, Any],
    on_backward: Callable[[AdjointInfo], None] | None,
    sync_stop: Any,
) -> Any:
    """``z_star`` exactly, carrying the gradient ``spec`` gives it as a fixed point of ``f``.

    Implicit: one differentiable ``f(z_star)`` through ``AdjointCarrier`` (whose
    backward solves ``u = g + J_f(z_star)^T u``); phantom/JFB: ``k`` damped steps from the
    detached ``z_star``. ``forward`` holds the forward solve's tol, max_iter and on_failure.
    """
    if isinstance(spec, (Phantom, JFB)):
        z = tree_map(lambda t: t.detach(), z_star)
        lam = spec.damping
        for _ in range(spec.steps):
            fz = f(z)
            z = fz if lam == 1.0 else tree_map(lambda a, b: (1.0 - lam) * a + lam * b, z, fz)
        return tree_map(carry_grad, z_star, z)

    assert isinstance(spec, Implicit)
    xp = BACKEND.xp
    structure: Structure = structure_of(z_star, batch_axis)
    z_leaf = structure.flatten(xp, z_star).detach().requires_grad_(True)
    out = f(structure.unflatten(xp, z_leaf))
    out_flat = structure.flatten(xp, out)
    if not out_flat.requires_grad:
        raise RuntimeError(
            "f(z*) returned a tensor without an autograd graph although z* requires grad: "
            "f is not differentiable with torch autograd (does it call .detach(), use "
            ".data, go through NumPy, or run under torch.no_grad()?). Pass backward=None "
            "if no gradient is wanted."
        )
    link = _AdjointLink(out_flat, z_leaf, spec, forward, on_backward, sync_stop)
    carrier = structure.unflatten(
        xp, AdjointCarrier.apply(out_flat, link)  # type: ignore[no-untyped-call]
    )
    return tree_map(carry_grad, z_star, carrier)


class DEQ(nn.Module):
    """A deep-equilibrium layer: holds the solver settings, solves ``z = f(z)``.

    Usage inside a model::

        self.deq = eqsolve.torch.DEQ(tol=1e-4, max_iter=30, backward=eqsolve.Implicit())
        ...
        z = self.deq(self.cell, z0, x)              # cell(z, x): exact at every order
        z = self.deq(lambda z: self.cell(z, x), z0)  # closure: first order only

    The layer has no parameters of its own: gradients go to the ``args`` (and, for an
    ``nn.Module`` ``f`` called with ``args``, to its parameters) or to whatever a closure
    ``f`` captures.
    Behaviour is the same in ``train()`` and ``eval()`` mode (gradients flow in both; use
    ``torch.no_grad()`` for graph-free inference, which also skips the extra call of ``f``).

    Args: the keyword arguments of :func:`fixed_point` (validated here, at construction;
    a shorthand ``backward`` is stored as the object it means). With ``states=(k_1, ...)``
    the layer returns ``(value, states)`` (a fixed-point correction, see there).

    Distributed / mixed precision: the layer works inside ``DistributedDataParallel`` with
    default settings; pass ``sync_stop=True`` when the cell contains a collective
    (``SyncBatchNorm``) and ``f_dtype=torch.bfloat16`` (or run the model under
    ``torch.autocast``) to evaluate the cell in low precision with a float32 solver.

    Attributes:
        last_solution: the :class:`eqsolve.Solution` of the latest forward call, with its
            ``value`` detached (so it never keeps a graph alive).
        last_adjoint_info: the :class:`~eqsolve.core.adjoint.AdjointInfo` of the latest
            implicit backward (``None`` before the first one).
    """

    last_solution: Solution | None
    last_adjoint_info: AdjointInfo | None

    def __init__(
        self,
        *,
        solver: str | FixedPointSolver = "auto",
        tol: float = 1e-6,
        atol: float = 0.0,
        max_iter: int = 100,
        batch_axis: BatchAxis = "auto",
        backward: Backward | str | FixedPointSolver | None = "auto",
        on_failure: str = "warn",
        sync_stop: Any = False,
        f_dtype: torch.dtype | None = None,
        states: Sequence[int] | None = None,
        **solver_options: Any,
    ):
        super().__init__()
        spec = backward_spec(backward, pop_legacy(solver_options), solver=solver)
        check_arguments(lambda z: z, tol, atol, max_iter, on_failure, batch_axis)  # f comes later
        check_keywords(solver, solver_options, "DEQ", GRADIENT_KEYWORDS)
        check_sync_stop(sync_stop)
        check_f_dtype(f_dtype)
        make_solver(solver, dict(solver_options))
        record_at = check_states(states, max_iter)
        self.options: dict[str, Any] = dict(
            solver=solver, tol=tol, atol=atol, max_iter=max_iter, batch_axis=batch_axis,
            backward=spec, on_failure=on_failure, sync_stop=sync_stop, f_dtype=f_dtype,
            states=record_at or None, **solver_options,
        )
        self.last_solution = None
        self.last_adjoint_info = None

    def _record_adjoint(self, info: AdjointInfo) -> None:
        self.last_adjoint_info = info

    def forward(self, f: Callable[..., Any], z0: Any, *args: torch.Tensor) -> Any:
        """Solve ``z = f(z, *args)`` from ``z0``; the differentiable value (see
        :func:`fixed_point`: with ``args``, derivatives of every order and torch.func).

        With ``states=`` set: the pair ``(value, states)``, ``states`` the tuple of
        differentiable intermediate iterates of :func:`fixed_point`.
        """
        sol = fixed_point(f, z0, *args, on_backward=self._record_adjoint, **self.options)

        def detached(tree: Any) -> Any:
            return tree_map(lambda t: t.detach(), tree)

        self.last_solution = sol._replace(
            value=detached(sol.value),
            states=None if sol.states is None else tuple(detached(s) for s in sol.states),
        )
        if self.options["states"] is None:
            return sol.value
        return sol.value, sol.states

    def extra_repr(self) -> str:
        shown = {
            k: v for k, v in self.options.items()
            if v is not None and not (k == "sync_stop" and v is False)
        }
        return ", ".join(f"{k}={v!r}" for k, v in shown.items())
