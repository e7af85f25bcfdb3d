"""What the eager backends (numpy, torch, cupy, array_api_strict) share: the Python loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.driver import run_python_loop
from ..core.loop import LoopState, StopRule
from ..core.solver_base import FixedPointSolver


class EagerBackend:
    """Drives ``core.loop`` with a Python loop; subclasses add ``name``, ``xp``, ``convert``."""

    name: str
    xp: Any

    def run(
        self, f: Callable[[Any], Any], z0: Any, solver: FixedPointSolver, rule: StopRule
    ) -> LoopState:
        return run_python_loop(self.xp, f, z0, solver, rule)

    def is_traced(self, x: Any) -> bool:
        return False  # eager arrays are always concrete
