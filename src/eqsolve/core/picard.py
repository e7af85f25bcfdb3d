"""Plain and damped fixed-point (Picard / Krasnosel'skii-Mann) iteration.

Update rule, with step ``beta > 0`` (``beta = 1``: plain iteration; ``beta < 1`` damps, ``beta > 1``
over-relaxes):

    z_{k+1} = z_k + beta * (f(z_k) - z_k) = (1 - beta) z_k + beta f(z_k)

Converges linearly at the rate of the spectral radius of ``J_f`` at the fixed point when
``f`` is a contraction (Banach); damping makes the iteration converge for nonexpansive maps
(Krasnosel'skii 1955, Mann 1953).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from .solver_base import FixedPointSolver, check_positive, damped_step, register


class PicardState(NamedTuple):
    """Plain iteration keeps no history."""


@register
@dataclass(frozen=True)
class Picard(FixedPointSolver):
    """Plain/damped iteration ``z <- z + beta (f(z) - z)``."""

    beta: float = 1.0
    name = "picard"

    def __post_init__(self) -> None:
        check_positive("beta", self.beta)

    def init(self, xp: Any, z: Any, g: Any) -> PicardState:
        return PicardState()

    def propose(self, xp: Any, state: PicardState, z: Any, g: Any, k: Any) -> Any:
        return damped_step(z, g, self.beta)

    def update(
        self, xp: Any, state: PicardState, z: Any, g: Any, z_new: Any, g_new: Any, k: Any
    ) -> PicardState:
        return state
