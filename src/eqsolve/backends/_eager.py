"""The Python-loop driver shared by the eager backends (numpy, torch, cupy, array_api_strict)."""

from __future__ import annotations

from typing import Any, Callable

from ..core.loop import LoopState, StopRule, loop_init, loop_step
from ..core.solver_base import FixedPointSolver


def run_python_loop(
    xp: Any, f: Callable[[Any], Any], z0: Any, solver: FixedPointSolver, rule: StopRule
) -> LoopState:
    """Iterate ``loop_step`` while some sample is active and ``k < max_iter``.

    Reading ``any(active)`` is one host sync per iteration, which is free on the CPU.
    """
    state = loop_init(xp, f, z0, solver, rule)
    while state.k < rule.max_iter and bool(xp.any(state.active)):
        state = loop_step(xp, f, state, solver, rule)
    return state
