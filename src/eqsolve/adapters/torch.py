"""PyTorch adapter: a fixed point ``z* = f(z*)`` as a differentiable torch operation.

How the graph is built (the "Distributed use" recipe of the design notes):

1. **Forward solve without a graph.** ``eqsolve.fixed_point`` runs the solver under
   ``torch.no_grad()`` on a detached ``z0``: nothing is saved for backward however many
   iterations it takes.
2. **One differentiable call of f.** When grad mode is on, ``f`` is called once more at the
   solution, on a fresh leaf ``z_leaf = z*.detach().requires_grad_()`` (flattened per
   sample to the solver's ``(B, n)`` view, then restored to the user's structure, so
   multi-scale tuple states work). This ``f(z*)`` carries ``f``'s graph to every tensor
   ``f`` uses (closed-over ``nn.Module`` parameters, inputs ``x``). The returned value is
   ``z* + (f(z*) - f(z*).detach())``: ``z*`` bit for bit -- the point whose residual and
   status the ``Solution`` reports -- with the gradient of ``f(z*)``.
3. **Implicit backward.** ``f(z*)`` passes through :class:`_ImplicitAdjoint`, a custom
   ``torch.autograd.Function`` that is the identity forward and, backward, maps the
   incoming cotangent ``g`` to the solution ``u`` of the adjoint system
   ``u = g + J_f(z*)^T u`` (``eqsolve.core.adjoint.adjoint_solve``; each ``J_f^T v`` is a
   ``torch.autograd.grad`` of the saved ``f(z*)`` with respect to ``z_leaf`` only). Autograd
   then continues through ``f``'s graph with ``u``, giving ``u^T df/dtheta`` for every
   parameter and input: the exact implicit gradient.

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

Mixed precision (``f_dtype`` or an enclosing ``torch.autocast`` region). ``f`` runs under
``torch.autocast`` and its output is cast back to the state's dtype, so the solver's
iterates, residuals and history, the adjoint solve and the gradients stay in float32
(float64); the solver's own arithmetic runs with autocast disabled. A bfloat16/float16
output of ``f`` outside autocast is a ``TypeError`` that names ``f_dtype`` (a silent cast
would hide an ``f`` that accidentally computes in low precision).

Inexact, biased gradients (cheaper; documented as such):

* ``backward="phantom"``: ``k`` damped unrolled steps from the detached ``z*``,
  ``z_{i+1} = (1 - lam) z_i + lam f(z_i)``, differentiated by ordinary backprop
  (Geng et al., "On training implicit models", NeurIPS 2021). The value is ``z*`` (as
  above) carrying the gradient of ``z_k``.
* ``backward="jfb"``: one step, ``f(z*)`` with ``z*`` detached (Jacobian-free
  backpropagation: Fung et al., "JFB: Jacobian-free backpropagation for implicit networks",
  AAAI 2022); equivalent to ``u = g``, i.e. phantom with ``k = 1, lam = 1``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..api import solve as _fixed_point
from ..backends.torch import BACKEND, autocast_dtype, check_sync_stop
from ..core.adjoint import (
    AdjointInfo,
    adjoint_solve,
    check_backward_limits,
    check_backward_options,
    check_phantom,
    default_adjoint_tol,
)
from ..core.solution import ConvergenceError, ConvergenceWarning, Solution, Status
from ..core.solver_base import FixedPointSolver, make_solver
from ..core.structure import BatchAxis, Structure, structure_of
from ..core.validation import ON_FAILURE

__all__ = ["ADJOINT_METHODS", "BACKWARD_METHODS", "DEQ", "fixed_point"]

#: exact implicit gradient, by the adjoint linear solve named
ADJOINT_METHODS: tuple[str, ...] = ("neumann", "anderson", "broyden", "gmres")
#: every accepted ``backward=`` name (``None`` too: no gradient)
BACKWARD_METHODS: tuple[str, ...] = (*ADJOINT_METHODS, "phantom", "jfb")

_PHANTOM_STEPS = 5
_PHANTOM_DAMPING = 0.5


@dataclass(frozen=True)
class _Backward:
    """Validated backward settings (``method`` None: no gradient)."""

    method: str | FixedPointSolver | None
    tol: float | None = None
    max_iter: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    steps: int = 1
    damping: float = 1.0
    on_failure: str = "warn"

    @property
    def inexact(self) -> bool:
        return self.method in ("phantom", "jfb")


def _backward_settings(
    backward: Any,
    backward_tol: Any,
    backward_max_iter: Any,
    backward_options: Any,
    phantom_steps: Any,
    phantom_damping: Any,
    on_failure: Any,
) -> _Backward:
    """Check the backward arguments; errors name the offending argument."""
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
    if backward is not None and not isinstance(backward, (str, FixedPointSolver)):
        raise TypeError(
            f"backward must be one of {', '.join(map(repr, BACKWARD_METHODS))}, None, or a "
            f"solver object such as eqsolve.Anderson(m=5); got {type(backward).__name__}"
        )
    if isinstance(backward, str) and backward not in BACKWARD_METHODS:
        raise ValueError(
            f"unknown backward method {backward!r}; choose one of "
            f"{', '.join(map(repr, BACKWARD_METHODS))} or None (no gradient)"
        )

    is_phantom = backward == "phantom"
    if not is_phantom:
        for name, value in (("phantom_steps", phantom_steps), ("phantom_damping", phantom_damping)):
            if value is not None:
                raise ValueError(
                    f"{name} applies only to backward='phantom', got backward={backward!r}"
                )
    if backward is None or backward in ("phantom", "jfb"):
        for name, value in (
            ("backward_tol", backward_tol),
            ("backward_max_iter", backward_max_iter),
            ("backward_options", backward_options),
        ):
            if value is not None:
                raise ValueError(
                    f"{name} applies only to the implicit (adjoint) backward methods "
                    f"{', '.join(map(repr, ADJOINT_METHODS))}; got backward={backward!r}"
                )

    if backward is None:
        return _Backward(None, on_failure=on_failure)
    if backward == "jfb":
        return _Backward("jfb", on_failure=on_failure)
    if is_phantom:
        steps, damping = check_phantom(
            _PHANTOM_STEPS if phantom_steps is None else phantom_steps,
            _PHANTOM_DAMPING if phantom_damping is None else phantom_damping,
        )
        return _Backward("phantom", steps=steps, damping=damping, on_failure=on_failure)

    # implicit (adjoint) methods; unknown option names fail now rather than in loss.backward()
    tol, max_iter = check_backward_limits(backward_tol, backward_max_iter)
    return _Backward(
        backward,
        tol=tol,
        max_iter=max_iter,
        options=check_backward_options(backward, backward_options),
        on_failure=on_failure,
    )


def _leaves(tree: Any) -> list[Any]:
    return list(tree) if isinstance(tree, (tuple, list)) else [tree]


def _tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    if isinstance(tree, (tuple, list)):
        return type(tree)(fn(*xs) for xs in zip(tree, *rest, strict=True))
    return fn(tree, *rest)


def _method_name(method: Any) -> str:
    return method if isinstance(method, str) else type(method).__name__


class _AdjointLink:
    """What the backward needs: the one differentiable ``f(z*)`` and its input leaf."""

    def __init__(
        self,
        out_flat: torch.Tensor,
        z_leaf: torch.Tensor,
        settings: _Backward,
        forward_tol: float,
        on_backward: Callable[[AdjointInfo], None] | None,
        sync_stop: Any = False,
    ):
        self.out_flat = out_flat
        self.z_leaf = z_leaf
        self.settings = settings
        self.forward_tol = forward_tol
        self.on_backward = on_backward
        self.sync_stop = sync_stop

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        s = self.settings
        if tuple(g.shape) != tuple(self.out_flat.shape):
            raise RuntimeError(
                f"cotangent of shape {tuple(g.shape)} reached the fixed point's backward, "
                f"expected {tuple(self.out_flat.shape)}"
            )
        eps = float(torch.finfo(self.out_flat.dtype).eps)
        tol = s.tol if s.tol is not None else default_adjoint_tol(self.forward_tol, eps)
        max_iter = s.max_iter if s.max_iter is not None else 100
        nvjp = 0
        unused = False

        def vjp(v: torch.Tensor) -> torch.Tensor:
            nonlocal nvjp, unused
            nvjp += 1
            (gz,) = torch.autograd.grad(
                self.out_flat, self.z_leaf, v, retain_graph=True, allow_unused=True
            )
            if gz is None:
                unused = True
                return torch.zeros_like(v)
            return gz

        assert s.method is not None
        # with sync_stop every rank runs the same number of adjoint iterations: the VJP of an
        # f that contains a collective is itself collective
        driver = functools.partial(BACKEND.run, sync_stop=self.sync_stop)
        u, info = adjoint_solve(
            BACKEND.xp, vjp, g.contiguous(), method=s.method, tol=tol, max_iter=max_iter,
            driver=driver, **dict(s.options),
        )
        if unused:
            warnings.warn(
                "f(z*) does not depend on z through autograd (torch.autograd.grad found no "
                "path from z to f(z)), so the backward used J_f = 0. If f detaches z "
                "(.detach(), .data, NumPy), the implicit gradient is wrong.",
                RuntimeWarning,
                stacklevel=2,
            )
        if self.on_backward is not None:
            self.on_backward(info)
        if s.on_failure != "ignore":
            _report_adjoint_failures(u, info, s, tol, max_iter, nvjp)
        return u


def _report_adjoint_failures(
    u: torch.Tensor, info: AdjointInfo, s: _Backward, tol: float, max_iter: int, nvjp: int
) -> None:
    status = info.status.reshape(-1)
    n = int(status.shape[0])
    max_mask = status == int(Status.MAX_ITER)
    n_max = int(max_mask.sum())
    n_bad = int((status == int(Status.NONFINITE)).sum())
    if n_max == 0 and n_bad == 0:
        return
    name = _method_name(s.method)
    parts = []
    if n_max:
        worst = float(info.residual.reshape(-1)[max_mask].max())
        parts.append(
            f"{n_max} of {n} samples did not reach backward_tol={tol:.3g} within "
            f"backward_max_iter={max_iter} (largest relative residual {worst:.3g})"
        )
    if n_bad:
        parts.append(
            f"{n_bad} of {n} samples hit NaN/inf (a non-finite cotangent, or J_f(z*) with "
            "spectral radius >= 1 for a plain 'neumann' iteration)"
        )
    message = (
        f"implicit backward (backward={name!r}): " + "; ".join(parts)
        + ": the gradient of those samples is inexact (see on_failure; try another backward "
        "method or a larger backward_max_iter)"
    )
    if s.on_failure == "raise":
        adjoint = Solution(
            value=u, converged=info.converged, iterations=info.iterations,
            residual=info.residual, status=info.status, nfev=nvjp,
        )
        raise ConvergenceError(message, adjoint)
    warnings.warn(message, ConvergenceWarning, stacklevel=3)


#: dtypes ``f_dtype`` accepts (what ``torch.autocast`` supports as a lower precision)
F_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)


def _check_f_dtype(f_dtype: Any) -> torch.dtype | None:
    """``f_dtype``: ``None`` or one of :data:`F_DTYPES`."""
    if f_dtype is None:
        return None
    if not isinstance(f_dtype, torch.dtype):
        raise TypeError(
            f"f_dtype must be None, torch.bfloat16 or torch.float16, got {type(f_dtype).__name__}"
        )
    if f_dtype not in F_DTYPES:
        raise ValueError(
            f"f_dtype must be None, torch.bfloat16 or torch.float16 (the lower precisions "
            f"torch.autocast runs f in), got {f_dtype}"
        )
    return f_dtype


def _precision_f(
    f: Callable[[Any], Any], state_dtype: torch.dtype, f_dtype: torch.dtype | None,
    device_type: str,
) -> Callable[[Any], Any]:
    """``f`` as the solver calls it: in the precision policy of the call.

    With ``f_dtype`` (or inside an enclosing ``torch.autocast`` region on the state's
    device) ``f`` runs under autocast and every floating tensor it returns is cast back to
    ``state_dtype`` (a differentiable cast: gradients come back in ``state_dtype`` too).
    Otherwise ``f`` is called as it is, and a bfloat16/float16 first output for a state of
    another dtype raises a ``TypeError`` that says how to opt in (other dtype mismatches get
    the generic error of :func:`eqsolve.solve`).
    """
    if f_dtype is not None and state_dtype.is_floating_point:
        if torch.finfo(f_dtype).bits >= torch.finfo(state_dtype).bits:
            raise ValueError(
                f"f_dtype={f_dtype} is not a lower precision than the state's dtype "
                f"{state_dtype}; f_dtype evaluates f in bfloat16/float16 for a float32 or "
                "float64 state"
            )

    def cast(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != state_dtype:
            return t.to(state_dtype)
        return t

    if f_dtype is not None:

        def f_low(z: Any) -> Any:
            with torch.autocast(device_type, dtype=f_dtype):
                out = f(z)
            return _tree_map(cast, out)

        return f_low
    if autocast_dtype(device_type) is not None:  # f runs under the caller's autocast

        def f_autocast(z: Any) -> Any:
            return _tree_map(cast, f(z))

        return f_autocast

    checked = False

    def f_checked(z: Any) -> Any:
        nonlocal checked
        out = f(z)
        if not checked:  # the first call is f(z0)
            checked = True
            leaves = _leaves(out)
            for i, t in enumerate(leaves):
                if isinstance(t, torch.Tensor) and t.dtype in F_DTYPES and t.dtype != state_dtype:
                    where = "f(z0)" if not isinstance(out, (tuple, list)) else f"f(z0)[{i}]"
                    raise TypeError(
                        f"{where} has dtype {t.dtype} but z0 has dtype {state_dtype}. To "
                        f"evaluate f in lower precision pass f_dtype={t.dtype} (f then runs "
                        "under torch.autocast and its output is cast back to the state's "
                        "dtype), call it inside torch.autocast, or cast f's output yourself"
                    )
        return out

    return f_checked


class _ImplicitAdjoint(torch.autograd.Function):
    """Identity on ``f(z*)`` (flattened); backward solves ``u = g + J_f(z*)^T u``."""

    @staticmethod
    def forward(ctx: Any, out_flat: torch.Tensor, link: _AdjointLink) -> torch.Tensor:
        ctx.link = link
        return out_flat.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        if torch.is_grad_enabled():  # create_graph=True: u's dependence on theta is not recorded
            raise RuntimeError(
                "eqsolve.torch.fixed_point does not support higher-order gradients "
                "(backward with create_graph=True through the implicit backward): the "
                "adjoint solve is not differentiable. Use backward='phantom' or an unrolled "
                "loop where second derivatives are needed."
            )
        return ctx.link.solve(g), None


def fixed_point(
    f: Callable[[Any], Any],
    z0: Any,
    *,
    solver: str | FixedPointSolver = "auto",
    tol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int = 100,
    batch_axis: BatchAxis = "auto",
    backward: str | FixedPointSolver | None = "anderson",
    backward_tol: float | None = None,
    backward_max_iter: int | None = None,
    backward_options: Mapping[str, Any] | None = None,
    phantom_steps: int | None = None,
    phantom_damping: float | None = None,
    on_failure: str = "warn",
    on_backward: Callable[[AdjointInfo], None] | None = None,
    sync_stop: Any = False,
    f_dtype: torch.dtype | None = None,
    **solver_options: Any,
) -> Solution:
    """Differentiable fixed point ``z* = f(z*)`` of a PyTorch function.

    The solve runs without a graph; when grad mode is on, one more differentiable call
    ``f(z*)`` attaches the backward, so ``Solution.value`` carries ``grad_fn`` and gradients
    reach every tensor ``f`` uses: the parameters it closes over (an ``nn.Module``'s) and
    its inputs. Memory held for backward is that of one call of ``f`` (``k`` calls for
    ``"phantom"``), independent of the number of solver iterations.

    Args:
        f: maps a state like ``z0`` to one like it, with torch operations (it must be
            differentiable by autograd with respect to ``z`` and whatever it closes over).
        z0: initial guess: a tensor, or a tuple/list of tensors sharing the batch axis
            (multi-scale states). It is detached: ``z*`` does not depend on it, so it
            receives no gradient.
        solver, tol, atol, max_iter, batch_axis, **solver_options: the forward solve, as
            in :func:`eqsolve.fixed_point`.
        backward: how gradients are computed:

            * ``"anderson"`` (default), ``"broyden"``, ``"neumann"`` (plain iteration: the
              truncated Neumann series, needs spectral radius of ``J_f(z*)`` < 1),
              ``"gmres"``, or a configured solver object: the exact implicit gradient
              ``u^T df/dtheta`` with ``u = g + J_f(z*)^T u`` solved to ``backward_tol``;
            * ``"phantom"``: phantom gradient, ``phantom_steps`` damped steps
              ``z_{i+1} = (1 - lam) z_i + lam f(z_i)`` from the detached ``z*`` with
              ``lam = phantom_damping``, backpropagated (biased; Geng et al. 2021);
            * ``"jfb"``: Jacobian-free backpropagation, ``f(z*)`` with ``z*`` detached, i.e.
              ``u = g`` (biased; Fung et al. 2022);
            * ``None``: no gradient (the value is the detached ``z*``).
        backward_tol: relative tolerance of the adjoint solve; default
            ``max(tol, 10 * eps(dtype))``.
        backward_max_iter: maximum adjoint iterations (GMRES: restart cycles); default 100.
        backward_options: hyperparameters of the adjoint method, e.g. ``{"m": 5}`` for
            ``"anderson"`` or ``{"restart": 20}`` for ``"gmres"``.
        phantom_steps: ``k`` for ``"phantom"`` (int >= 1, default 5).
        phantom_damping: ``lam`` for ``"phantom"`` (in (0, 1], default 0.5).
        on_failure: forward *and* adjoint non-convergence / NaN: ``"warn"``
            (:class:`eqsolve.ConvergenceWarning`), ``"raise"``
            (:class:`eqsolve.ConvergenceError`; raised from ``loss.backward()`` for the
            adjoint, holding the adjoint's ``(B, n)`` solution) or ``"ignore"``.
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
            ``DistributedDataParallel`` with collective-free cells (DDP's own all-reduce
            happens after backward). ``True`` without an initialised process group is a
            no-op. Every rank must pass the same ``max_iter``/``backward_max_iter``.
        f_dtype: ``torch.bfloat16`` or ``torch.float16``: evaluate ``f`` under
            ``torch.autocast(device_type, dtype=f_dtype)`` (forward iterations, the
            differentiable call and phantom steps) and cast its output back to ``z0``'s
            dtype, so the solver state, residuals, adjoint and gradients stay float32/64.
            Inside an enclosing ``torch.autocast`` region this happens with its dtype
            without the argument. Choose ``tol`` above the precision of ``f``: a relative
            residual below a few units of roundoff of ``f_dtype`` (bfloat16 ``2**-8``,
            float16 ``2**-11``) is not reachable, e.g. ``tol=1e-2`` for bfloat16.

    Returns:
        A :class:`eqsolve.Solution` whose ``value`` is always the solver's ``z*`` (the
        point ``residual`` and ``status`` describe). With grad mode on and ``backward`` not
        ``None`` it carries ``grad_fn``: the gradient of ``f(z*)`` through the implicit
        backward (implicit methods and ``"jfb"``) or of the phantom iterate ``z_k``;
        ``nfev`` counts these extra calls of ``f``. Otherwise (``torch.no_grad()``,
        inference mode, or ``backward=None``) no extra call is made.

    Raises:
        TypeError / ValueError: invalid arguments (naming the argument).
        RuntimeError: ``f(z*)`` has no autograd graph although its input requires grad
            (``f`` detaches, uses ``.data`` or leaves torch).

    Example:
        >>> import torch, eqsolve.torch as et
        >>> W = torch.nn.Parameter(0.5 * torch.eye(3, dtype=torch.float64))
        >>> x = torch.ones(2, 3, dtype=torch.float64)
        >>> sol = et.fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros(2, 3,
        ...                      dtype=torch.float64), tol=1e-10)
        >>> sol.value.sum().backward(); W.grad.shape
        torch.Size([3, 3])
    """
    settings = _backward_settings(
        backward, backward_tol, backward_max_iter, backward_options, phantom_steps,
        phantom_damping, on_failure,
    )
    check_sync_stop(sync_stop)
    f_dtype = _check_f_dtype(f_dtype)
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    for i, leaf in enumerate(_leaves(z0)):
        if not isinstance(leaf, torch.Tensor):
            where = "z0" if not isinstance(z0, (tuple, list)) else f"z0[{i}]"
            raise TypeError(
                f"{where} must be a torch.Tensor for eqsolve.torch.fixed_point, got "
                f"{type(leaf).__name__} (use eqsolve.fixed_point for other array libraries)"
            )
    z0_detached = _tree_map(lambda t: t.detach(), z0)
    first = _leaves(z0)[0] if _leaves(z0) else None
    if first is not None:
        f = _precision_f(f, first.dtype, f_dtype, first.device.type)
    sol = _fixed_point(
        f, z0_detached, solver=solver, tol=tol, atol=atol, max_iter=max_iter,
        batch_axis=batch_axis, backend="torch", on_failure=on_failure, sync_stop=sync_stop,
        **solver_options,
    )
    if settings.method is None or not torch.is_grad_enabled():
        return sol

    z_star = sol.value
    if settings.inexact:
        z = _tree_map(lambda t: t.detach(), z_star)
        lam = settings.damping
        for _ in range(settings.steps):
            fz = f(z)
            z = fz if lam == 1.0 else _tree_map(lambda a, b: (1.0 - lam) * a + lam * b, z, fz)
        return sol._replace(value=_tree_map(_carry_grad, z_star, z), nfev=sol.nfev + settings.steps)

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
    link = _AdjointLink(out_flat, z_leaf, settings, float(tol), on_backward, sync_stop)
    carrier = structure.unflatten(xp, _ImplicitAdjoint.apply(out_flat, link))
    return sol._replace(value=_tree_map(_carry_grad, z_star, carrier), nfev=sol.nfev + 1)


def _carry_grad(value: torch.Tensor, carrier: torch.Tensor) -> torch.Tensor:
    """``value`` exactly (the solver's ``z*``), with the gradient of ``carrier``.

    ``carrier`` is ``f(z*)`` (or the phantom iterate): the tensor whose graph gives the
    chosen backward. ``carrier - carrier.detach()`` is exactly zero in floating point, so
    the returned tensor is ``z*`` bit for bit -- the point whose residual ``Solution``
    reports -- while its gradient is that of ``carrier``.
    """
    return value + (carrier - carrier.detach())


class DEQ(nn.Module):
    """A deep-equilibrium layer: holds the solver settings, solves ``z = f(z)``.

    Usage inside a model::

        self.deq = eqsolve.torch.DEQ(tol=1e-4, max_iter=30, backward="anderson")
        ...
        z = self.deq(lambda z: self.cell(z, x), z0)

    The layer has no parameters of its own: gradients go to whatever ``f`` closes over.
    Behaviour is the same in ``train()`` and ``eval()`` mode (gradients flow in both; use
    ``torch.no_grad()`` for graph-free inference, which also skips the extra call of ``f``).

    Args: the keyword arguments of :func:`fixed_point` (validated here, at construction).

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
        backward: str | FixedPointSolver | None = "anderson",
        backward_tol: float | None = None,
        backward_max_iter: int | None = None,
        backward_options: Mapping[str, Any] | None = None,
        phantom_steps: int | None = None,
        phantom_damping: float | None = None,
        on_failure: str = "warn",
        sync_stop: Any = False,
        f_dtype: torch.dtype | None = None,
        **solver_options: Any,
    ):
        super().__init__()
        from ..core.validation import check_arguments

        check_arguments(lambda z: z, tol, atol, max_iter, on_failure, batch_axis)  # f comes later
        _backward_settings(
            backward, backward_tol, backward_max_iter, backward_options, phantom_steps,
            phantom_damping, on_failure,
        )
        check_sync_stop(sync_stop)
        _check_f_dtype(f_dtype)
        make_solver(solver, dict(solver_options))
        self.options: dict[str, Any] = dict(
            solver=solver, tol=tol, atol=atol, max_iter=max_iter, batch_axis=batch_axis,
            backward=backward, backward_tol=backward_tol, backward_max_iter=backward_max_iter,
            backward_options=backward_options, phantom_steps=phantom_steps,
            phantom_damping=phantom_damping, on_failure=on_failure, sync_stop=sync_stop,
            f_dtype=f_dtype, **solver_options,
        )
        self.last_solution = None
        self.last_adjoint_info = None

    def _record_adjoint(self, info: AdjointInfo) -> None:
        self.last_adjoint_info = info

    def forward(self, f: Callable[[Any], Any], z0: Any) -> Any:
        """Solve ``z = f(z)`` from ``z0``; the differentiable value (see :func:`fixed_point`)."""
        sol = fixed_point(f, z0, on_backward=self._record_adjoint, **self.options)
        self.last_solution = sol._replace(value=_tree_map(lambda t: t.detach(), sol.value))
        return sol.value

    def extra_repr(self) -> str:
        shown = {
            k: v for k, v in self.options.items()
            if v is not None and not (k == "sync_stop" and v is False)
        }
        return ", ".join(f"{k}={v!r}" for k, v in shown.items())
