"""Shared pieces of the SHINE backward (:class:`eqsolve.SHINE`), framework-free.

SHINE (Ramzi et al., ICLR 2022) replaces the adjoint solve by the forward Broyden solve's
inverse-Jacobian estimate ``H = -I + sum_i u_i v_i^T ~ J_g^{-1}`` (``g(z) = f(z) - z``, see
:mod:`eqsolve.core.broyden`): ``u ~ -H^T g`` in reverse mode, ``dz ~ -H (J_theta dtheta)`` in
forward mode.

To read ``H`` after the solve without changing the public :class:`~eqsolve.Solution`, the
forward solve runs the Broyden solver wrapped in :class:`Tracked`: the same ``propose`` and
``update`` (so the iterates, value, residual and status are those of the plain solve, bit
for bit), plus the mask of the rank-one terms in use after the *last update*. The loop's own
step counter cannot give that mask: the final re-evaluation of the returned points
(:func:`eqsolve.core.loop.verify`) counts a call of ``f`` but makes no update.

Which estimate: the last one. A sample returns its best iterate (``best_z``), which may
differ from the last iterate where ``H`` was built. A sample that stopped before the rest
of the batch is parked: its later updates are skipped (``s = 0``), which writes zero terms,
so its ``H`` stays that of its stop until the batch's memory restarts (then ``H = -I``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..core._xp import device_of
from ..core.broyden import Broyden
from ..core.solution import Solution
from ..core.solver_base import FixedPointSolver, make_solver
from .array import solve, solve_state
from .backward import SHINE

__all__ = [
    "ShineFactors", "Tracked", "apply_H", "apply_HT", "solve_for", "solve_with_factors",
]


class ShineFactors(NamedTuple):
    """``H = -I + sum_i mask_i U[:, i] V[:, i]^T`` per sample, on the ``(B, n)`` view."""

    U: Any  # (B, memory, n)
    V: Any  # (B, memory, n)
    mask: Any  # (memory,): the terms in use after the last update


class TrackedState(NamedTuple):
    inner: Any  # the Broyden state
    mask: Any  # (memory,) mask of the terms in use after the last update


@dataclass(frozen=True)
class Tracked(FixedPointSolver):
    """``solver`` (Broyden) unchanged, also keeping the mask of its terms in use."""

    solver: Broyden
    name = "broyden_tracked"

    def init(self, xp: Any, z: Any, g: Any) -> TrackedState:
        mask = xp.zeros((self.solver.memory,), dtype=z.dtype, device=device_of(z))
        return TrackedState(self.solver.init(xp, z, g), mask)

    def propose(self, xp: Any, state: TrackedState, z: Any, g: Any, k: Any) -> Any:
        return self.solver.propose(xp, state.inner, z, g, k)

    def update(
        self, xp: Any, state: TrackedState, z: Any, g: Any, z_new: Any, g_new: Any, k: Any
    ) -> TrackedState:
        inner = self.solver.update(xp, state.inner, z, g, z_new, g_new, k)
        return TrackedState(inner, self.solver._terms(xp, k + 1, z.dtype, z))


def apply_H(xp: Any, factors: ShineFactors, x: Any) -> Any:
    """``H x`` per sample (``x``: ``(B, n)``)."""
    return Broyden._apply(xp, factors.U, factors.V, x, factors.mask)


def apply_HT(xp: Any, factors: ShineFactors, x: Any) -> Any:
    """``H^T x`` per sample (``x``: ``(B, n)``)."""
    return Broyden._apply(xp, factors.V, factors.U, x, factors.mask)


def solve_with_factors(
    f: Callable[[Any], Any],
    z0: Any,
    *,
    solver: str | FixedPointSolver,
    states: Sequence[int] | None = None,
    **kwargs: Any,
) -> tuple[Solution, ShineFactors]:
    """:func:`eqsolve.solve` with a Broyden solver, plus its final :class:`ShineFactors`.

    ``kwargs``: the other arguments of :func:`eqsolve.solve` and Broyden's options (e.g.
    ``memory=``). The Solution is that of the plain solve. ``states`` is refused (SHINE has
    no estimate at the intermediate states).
    """
    if states:
        raise NotImplementedError(
            "states= (a fixed-point correction) is not supported with backward=eqsolve.SHINE(): "
            "the forward's inverse-Jacobian estimate belongs to the last iterate only; use "
            "eqsolve.Implicit(), eqsolve.Phantom() or eqsolve.JFB() with states="
        )
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in _SOLVE_KEYWORDS}
    inner = make_solver(solver, options)
    if not isinstance(inner, Broyden):  # backward_spec checked it: a safety net
        raise ValueError(f"SHINE needs a Broyden forward solver, got {type(inner).__name__}")
    sol, state = solve_state(f, z0, solver=Tracked(inner), **kwargs)
    tracked = state.solver
    return sol, ShineFactors(tracked.inner.U, tracked.inner.V, tracked.mask)


def solve_for(
    spec: Any, f: Callable[[Any], Any], z0: Any, **kwargs: Any
) -> tuple[Solution, ShineFactors | None]:
    """The adapters' forward solve: :func:`eqsolve.solve`, with the Broyden factors too when
    ``spec`` is :class:`~eqsolve.adapters.backward.SHINE` (``None`` otherwise)."""
    if isinstance(spec, SHINE):
        return solve_with_factors(f, z0, **kwargs)
    return solve(f, z0, **kwargs), None


_SOLVE_KEYWORDS = (
    "tol", "atol", "max_iter", "batch_axis", "backend", "on_failure", "sync_stop",
)
