"""The backward specification: how a fixed point is differentiated, for every adapter.

One object says how gradients of ``z* = f(z*, theta)`` are computed, validated once here
and read by the PyTorch, JAX and CuPy adapters alike (in the spirit of optimistix's
``adjoint=`` argument):

* :class:`Implicit` -- the exact implicit gradient. For a cotangent ``g = dL/dz*`` the
  adjoint fixed point ``u = g + J_f(z*)^T u`` is solved per sample (matrix-free, VJPs
  only) with ``method``, then ``dL/dtheta = u^T df/dtheta(z*)`` (Bai, Kolter, Koltun,
  "Deep equilibrium models", NeurIPS 2019).
* :class:`Phantom` -- ``steps`` damped unrolled steps ``z_{i+1} = (1 - lam) z_i + lam f(z_i)``
  from ``z*`` held constant, differentiated by the framework (biased; Geng et al., "On
  training implicit models", NeurIPS 2021).
* :class:`JFB` -- Jacobian-free backpropagation: ``u = g``, i.e. one undamped step (biased;
  Fung et al., "JFB: Jacobian-free backpropagation for implicit networks", AAAI 2022).
* :class:`SHINE` -- ``u = -H^T g`` with the forward Broyden solve's own inverse-Jacobian
  estimate ``H`` (no adjoint solve; biased; Ramzi et al., ICLR 2022). Broyden forward only.
* ``None`` -- no gradient.

The string shorthands are still accepted: ``"auto"``, ``"anderson"``, ``"broyden"``, ``"neumann"``,
``"gmres"`` (or a configured solver object such as ``eqsolve.Anderson(m=8)``) mean
``Implicit(method=...)``; ``"phantom"`` means ``Phantom()``; ``"jfb"`` means ``JFB()``;
``"shine"`` means ``SHINE()``.

Defaults, the same on every framework: the adjoint tolerance is ``max(tol, 10 eps(dtype))``
(tied to the forward's), its iteration budget is the forward's ``max_iter``, and a failure
of the adjoint solve is handled like a forward failure (the call's ``on_failure``).

The keyword arguments of earlier releases (``backward_tol``, ``backward_max_iter``,
``backward_options``, ``backward_on_failure``, ``phantom_steps``, ``phantom_damping``) still
work for one release, with a :class:`DeprecationWarning`: :func:`backward_spec` turns them
into the object they mean.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.adjoint import FIXED_POINT_METHODS, AdjointInfo, adjoint_solve, default_adjoint_tol
from ..core.broyden import Broyden
from ..core.driver import Driver
from ..core.gmres import gmres_solve
from ..core.solver_base import FixedPointSolver, make_solver
from ..core.validation import check_max_iter
from .reporting import report_adjoint, warn

__all__ = [
    "ADJOINT_METHODS",
    "BACKWARD_ON_FAILURE",
    "JFB",
    "LEGACY_KEYWORDS",
    "SHINE",
    "Backward",
    "Implicit",
    "Phantom",
    "backward_spec",
    "pop_legacy",
    "solve_implicit",
]

#: adjoint methods of :class:`Implicit` (or a configured solver object)
ADJOINT_METHODS: tuple[str, ...] = (*FIXED_POINT_METHODS, "gmres")
#: what a failed adjoint solve does: a warning, :class:`eqsolve.ConvergenceError`, the
#: failed samples' gradient made NaN (so it cannot be used silently), or nothing
BACKWARD_ON_FAILURE: tuple[str, ...] = ("warn", "raise", "nan", "ignore")


def _real(name: str, value: Any, *, lower: float, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v <= lower or (upper is not None and v > upper):
        bound = f"> {lower:g}" if upper is None else f"in ({lower:g}, {upper:g}]"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return v


def _checked_options(method: str | FixedPointSolver, options: Any) -> dict[str, Any]:
    """The adjoint method's options, checked now rather than inside ``loss.backward()``."""
    if options is None:
        checked: dict[str, Any] = {}
    elif isinstance(options, Mapping):
        checked = dict(options)
    else:
        raise TypeError(f"Implicit.options must be a dict, got {type(options).__name__}")
    if isinstance(method, FixedPointSolver):
        make_solver(method, checked)  # options with a configured object raise
    elif method in FIXED_POINT_METHODS:
        try:
            make_solver(FIXED_POINT_METHODS[method], checked)
        except TypeError as exc:
            raise TypeError(f"Implicit.options for method={method!r}: {exc}") from None
    else:  # gmres: its keyword-only parameters other than the ones Implicit sets itself
        params = inspect.signature(gmres_solve).parameters
        valid = {
            name for name, p in params.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
            and name not in ("tol", "max_iter", "driver")
        }
        unknown = sorted(set(checked) - valid)
        if unknown:
            raise TypeError(
                f"Implicit.options for method='gmres': unknown option(s) "
                f"{', '.join(map(repr, unknown))}; valid options: {', '.join(sorted(valid))}"
            )
    return checked


@dataclass(frozen=True)
class Implicit:
    """Exact implicit gradient: solve ``u = g + J_f(z*)^T u``, then ``u^T df/dtheta``.

    Args:
        method: ``"auto"`` (default: plain iteration per sample until it contracts slower
            than ``start_ratio`` per step, then Anderson, the forward default's rule: where
            plain iteration is fast it takes the same steps without Anderson's per-step
            cost), ``"anderson"``, ``"broyden"``, ``"neumann"`` (plain
            iteration, i.e. the truncated Neumann series ``sum_k (J^T)^k g``; needs spectral
            radius of ``J_f(z*)`` below 1), ``"gmres"`` (restarted, matrix-free), or a
            configured fixed-point solver object such as ``eqsolve.Anderson(m=8)``.
        tol: relative tolerance ``||g + J^T u - u|| <= tol ||g + J^T u||`` per sample;
            ``None`` (default): ``max(forward tol, 10 eps(dtype))``.
        max_iter: adjoint iterations (GMRES: restart cycles); ``None`` (default): the
            forward solve's ``max_iter``.
        options: hyperparameters of ``method``, e.g. ``{"m": 5}`` or ``{"restart": 20}``.
        on_failure: when a sample's adjoint solve does not converge or hits NaN/inf:
            ``"warn"``, ``"raise"`` (:class:`eqsolve.ConvergenceError` from the backward
            pass, holding the adjoint's solution), ``"nan"`` (that sample's gradient becomes
            NaN) or ``"ignore"``; ``None`` (default): the call's ``on_failure``. Under a JAX
            transformation Python cannot raise: ``"raise"`` then makes the gradient NaN and
            warns.
    """

    method: str | FixedPointSolver = "auto"
    tol: float | None = None
    max_iter: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    on_failure: str | None = None

    def __post_init__(self) -> None:
        method = self.method
        if isinstance(method, str):
            if method not in ADJOINT_METHODS:
                raise ValueError(
                    f"Implicit.method must be one of {', '.join(map(repr, ADJOINT_METHODS))} "
                    f"or a solver object such as eqsolve.Anderson(m=5), got {method!r}"
                )
        elif not isinstance(method, FixedPointSolver):
            raise TypeError(
                "Implicit.method must be a method name or a solver object such as "
                f"eqsolve.Anderson(m=5), got {type(method).__name__}"
            )
        if self.tol is not None:
            object.__setattr__(self, "tol", _real("Implicit.tol", self.tol, lower=0.0))
        if self.max_iter is not None:
            object.__setattr__(self, "max_iter", check_max_iter(self.max_iter, "Implicit.max_iter"))
        object.__setattr__(self, "options", _checked_options(method, self.options))
        if self.on_failure is not None and self.on_failure not in BACKWARD_ON_FAILURE:
            raise ValueError(
                f"Implicit.on_failure must be one of {BACKWARD_ON_FAILURE} or None (the "
                f"call's on_failure), got {self.on_failure!r}"
            )

    @property
    def label(self) -> str:
        """The method's name, for messages."""
        return self.method if isinstance(self.method, str) else type(self.method).__name__

    def resolved_tol(self, forward_tol: float, dtype_eps: float) -> float:
        """The adjoint tolerance: ``tol``, else the forward's, never below ``10 eps``."""
        return self.tol if self.tol is not None else default_adjoint_tol(forward_tol, dtype_eps)

    def resolved_max_iter(self, forward_max_iter: int) -> int:
        return self.max_iter if self.max_iter is not None else int(forward_max_iter)

    def resolved_on_failure(self, forward_on_failure: str) -> str:
        return self.on_failure if self.on_failure is not None else forward_on_failure


@dataclass(frozen=True)
class Phantom:
    """Phantom gradient: ``steps`` damped steps from ``z*`` held constant, backpropagated.

    ``z_0 = z*``, ``z_{i+1} = (1 - damping) z_i + damping f(z_i)``; the value stays ``z*``
    and carries the gradient of ``z_steps``. Biased: it approaches the implicit gradient as
    ``steps`` grows only where the damped iteration contracts fast (Geng et al. 2021).

    Args:
        steps: number of unrolled steps ``k`` (int >= 1, default 5).
        damping: ``lam`` in ``(0, 1]`` (default 0.5).
    """

    steps: int = 5
    damping: float = 0.5

    def __post_init__(self) -> None:
        steps = self.steps
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
            raise TypeError(f"Phantom.steps must be an int, got {type(steps).__name__}")
        if steps < 1:
            raise ValueError(f"Phantom.steps must be >= 1, got {steps}")
        object.__setattr__(self, "steps", int(steps))
        object.__setattr__(
            self, "damping", _real("Phantom.damping", self.damping, lower=0.0, upper=1.0)
        )


@dataclass(frozen=True)
class JFB:
    """Jacobian-free backpropagation: ``u = g``, the gradient of one step ``f(z*)``.

    Equal to ``Phantom(steps=1, damping=1.0)``; biased (Fung et al. 2022).
    """

    @property
    def steps(self) -> int:
        return 1

    @property
    def damping(self) -> float:
        return 1.0


@dataclass(frozen=True)
class SHINE:
    """SHINE: the adjoint from the forward Broyden solve's inverse-Jacobian estimate.

    The exact adjoint of a cotangent ``g = dL/dz*`` is ``u = (I - J_f^T)^{-1} g =
    -(J_g^T)^{-1} g`` with ``g(z) = f(z) - z``. Broyden's method (:class:`eqsolve.Broyden`)
    builds ``H = -I + sum_i u_i v_i^T ~ J_g^{-1}`` during the forward solve; SHINE reuses it
    instead of solving the adjoint system:

        u ~ -H^T g,      dL/dtheta = u^T df/dtheta(z*)

    (forward mode: ``dz* ~ -H (J_theta dtheta)``). It costs one call of ``f`` at ``z*`` (as
    :class:`Implicit`) and ``O(memory n)`` per sample, with no adjoint iterations. The
    gradient is **biased**: ``H`` is a low-rank secant approximation, accurate only along the
    directions the forward iterates explored, so the error does not vanish as ``tol -> 0``
    (Ramzi, Mannel, Bhatt, Peyre, Ciuciu, Starck, "SHINE: SHaring the INverse Estimate from
    the forward pass for bi-level optimization and implicit models", ICLR 2022). Without any
    update (``H = -I``) it reduces to :class:`JFB` (``u = g``).

    Which estimate: the one of the solver's *last* update. Each sample returns its best
    iterate, which may differ from the last one where ``H`` was built (a non-monotone
    residual); a sample that stopped before the rest of the batch keeps its terms until the
    batch's Broyden memory restarts, after which its ``H`` is ``-I`` (``u = g``). Choose
    ``memory`` at least the number of iterations to keep every term.

    Requires the forward solver to be Broyden (``solver="broyden"`` or an
    ``eqsolve.Broyden(...)`` object). Not supported: CuPy, second-order derivatives, the
    explicit-``args`` form of ``eqsolve.torch.fixed_point`` (use a closure ``f``), and
    ``states=``.
    """


#: a validated backward specification (``None``: no gradient)
Backward = Implicit | Phantom | JFB | SHINE

#: keyword arguments of earlier releases that :func:`backward_spec` still understands
LEGACY_KEYWORDS: tuple[str, ...] = (
    "backward_tol",
    "backward_max_iter",
    "backward_options",
    "backward_on_failure",
    "phantom_steps",
    "phantom_damping",
)

_SHORTHANDS = (*ADJOINT_METHODS, "phantom", "jfb", "shine")


def pop_legacy(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove the :data:`LEGACY_KEYWORDS` from ``kwargs`` and return them."""
    return {k: kwargs.pop(k) for k in LEGACY_KEYWORDS if k in kwargs}


def backward_spec(
    backward: Any,
    legacy: Mapping[str, Any] | None = None,
    *,
    allow: tuple[type, ...] = (Implicit, Phantom, JFB, SHINE),
    where: str = "",
    solver: Any = None,
) -> Backward | None:
    """The validated backward specification of a call.

    Args:
        backward: ``Implicit(...)``, ``Phantom(...)``, ``JFB()``, ``None``, a shorthand
            (``"auto"``, ``"anderson"``, ``"broyden"``, ``"neumann"``, ``"gmres"``, ``"phantom"``,
            ``"jfb"``) or a configured solver object (``Implicit(method=obj)``).
        legacy: the deprecated keywords given (:data:`LEGACY_KEYWORDS`); each is folded into
            the object it configures, with a :class:`DeprecationWarning`.
        allow: the kinds the calling adapter supports (CuPy: ``Implicit`` only, since it
            has no autodiff of ``f`` with respect to its parameters).
        where: the adapter's name, for error messages (e.g. ``"eqsolve.cupy"``).
        solver: the call's forward solver (name or object), where the adapter knows it:
            :class:`SHINE` needs it to be Broyden.

    Raises:
        TypeError / ValueError: naming the argument.
    """
    legacy = dict(legacy or {})
    if isinstance(backward, (Implicit, Phantom, JFB, SHINE)) or backward is None:
        spec = backward
    elif isinstance(backward, FixedPointSolver):
        spec = Implicit(method=backward)
    elif isinstance(backward, str):
        if backward in ADJOINT_METHODS:
            spec = Implicit(method=backward)
        elif backward == "phantom":
            spec = Phantom()
        elif backward == "jfb":
            spec = JFB()
        elif backward == "shine":
            spec = SHINE()
        else:
            raise ValueError(
                f"backward must be one of {', '.join(map(repr, _SHORTHANDS))}, None, or "
                f"eqsolve.Implicit(...), eqsolve.Phantom(...), eqsolve.JFB(), eqsolve.SHINE(); "
                f"got {backward!r}"
            )
    else:
        raise TypeError(
            "backward must be eqsolve.Implicit(...), eqsolve.Phantom(...), eqsolve.JFB(), "
            "eqsolve.SHINE(), None, a method name or a solver object such as "
            f"eqsolve.Anderson(m=5); got {type(backward).__name__}"
        )
    if legacy:
        spec = _fold_legacy(spec, backward, legacy)
    if spec is not None and not isinstance(spec, allow):
        kinds = ", ".join(f"eqsolve.{k.__name__}" for k in allow)
        raise ValueError(
            f"{where or 'this adapter'} supports backward={kinds}, not {type(spec).__name__}"
            + (
                " (it has no autodiff of f with respect to its parameters: only the adjoint "
                "solve is done here)" if where == "eqsolve.cupy" else ""
            )
        )
    if solver is not None:
        _check_shine_solver(spec, solver)
    return spec


def _check_shine_solver(spec: Backward | None, solver: Any) -> None:
    """:class:`SHINE` needs the forward solver to be Broyden (``ValueError`` otherwise)."""
    if isinstance(spec, SHINE) and not (
        isinstance(solver, Broyden) or (isinstance(solver, str) and solver.lower() == "broyden")
    ):
        shown = solver if isinstance(solver, str) else type(solver).__name__
        raise ValueError(
            f"backward=eqsolve.SHINE() reuses the forward Broyden solve's inverse-Jacobian "
            f"estimate, so it needs solver='broyden' (or an eqsolve.Broyden(...) object); got "
            f"solver={shown!r}"
        )


def _fold_legacy(
    spec: Backward | None, backward: Any, legacy: dict[str, Any]
) -> Backward | None:
    """The object that the deprecated keywords configure (they are not mixed with one)."""
    given = ", ".join(sorted(legacy))
    if isinstance(backward, (Implicit, Phantom, JFB, SHINE)):
        raise ValueError(
            f"{given} cannot be combined with backward={backward!r}: set them on the object"
        )
    phantom = {k: v for k, v in legacy.items() if k.startswith("phantom_")}
    implicit = {k: v for k, v in legacy.items() if not k.startswith("phantom_")}
    if phantom and not isinstance(spec, Phantom):
        raise ValueError(
            f"{', '.join(sorted(phantom))} applies only to backward='phantom', got "
            f"backward={backward!r}"
        )
    if implicit and not isinstance(spec, Implicit):
        raise ValueError(
            f"{', '.join(sorted(implicit))} applies only to the implicit (adjoint) backward "
            f"methods {', '.join(map(repr, ADJOINT_METHODS))}; got backward={backward!r}"
        )
    new: Backward
    if isinstance(spec, Phantom):
        new = Phantom(
            steps=phantom.get("phantom_steps", spec.steps),
            damping=phantom.get("phantom_damping", spec.damping),
        )
        hint = f"backward=eqsolve.Phantom(steps={new.steps}, damping={new.damping})"
    else:
        assert isinstance(spec, Implicit)
        on_failure = implicit.get("backward_on_failure")
        if on_failure is not None and on_failure not in BACKWARD_ON_FAILURE:
            raise ValueError(
                f"backward_on_failure must be one of {BACKWARD_ON_FAILURE}, got {on_failure!r}"
            )
        try:
            new = Implicit(
                method=spec.method,
                tol=implicit.get("backward_tol"),
                max_iter=implicit.get("backward_max_iter"),
                options=implicit.get("backward_options") or {},
                on_failure=on_failure,
            )
        except (TypeError, ValueError) as exc:  # name the keyword the user wrote
            msg = str(exc)
            for old, attr in (
                ("backward_tol", "Implicit.tol"), ("backward_max_iter", "Implicit.max_iter"),
                ("backward_options", "Implicit.options"),
            ):
                msg = msg.replace(attr, old)
            raise type(exc)(msg) from None
        hint = "backward=eqsolve.Implicit(method=..., tol=..., max_iter=..., options=...)"
    warn(
        f"{given} {'is' if len(legacy) == 1 else 'are'} deprecated and will be removed in "
        f"the next release; pass {hint}",
        DeprecationWarning,
    )
    return new


def solve_implicit(
    xp: Any,
    spec: Implicit,
    vjp: Callable[[Any], Any],
    g: Any,
    *,
    forward_tol: float,
    forward_max_iter: int,
    forward_on_failure: str,
    driver: Driver | None = None,
    eager: bool = True,
) -> tuple[Any, AdjointInfo, float, int]:
    """Solve ``u = g + vjp(u)`` per sample as ``spec`` says, and apply its failure policy.

    Every adapter's implicit backward goes through here (``g``: ``(B, n)``). Returns
    ``(u, info, tol, max_iter)`` with the resolved tolerance and budget. ``eager``: values
    can be read on the host, so failures are reported here (warned or raised); under a JAX
    transformation the caller reports them from a host callback with :func:`report_adjoint`
    (``"raise"`` cannot raise there: the failed samples' ``u`` is made NaN, as for ``"nan"``).
    """
    tol = spec.resolved_tol(forward_tol, float(xp.finfo(g.dtype).eps))
    max_iter = spec.resolved_max_iter(forward_max_iter)
    policy = spec.resolved_on_failure(forward_on_failure)
    u, info = adjoint_solve(
        xp, vjp, g, method=spec.method, tol=tol, max_iter=max_iter, driver=driver,
        **dict(spec.options),
    )
    if policy == "nan" or (policy == "raise" and not eager):
        nan = xp.asarray(float("nan"), dtype=u.dtype)
        u = xp.where(xp.reshape(~info.converged, (-1, 1)), nan, u)
    if eager and policy in ("warn", "raise"):
        report_adjoint(xp, u, info, method=spec.label, tol=tol, max_iter=max_iter,
                       on_failure=policy)
    return u, info, tol, max_iter
