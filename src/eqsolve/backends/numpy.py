"""NumPy backend: Python loop over the core step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat.numpy as xp
import numpy as np

from ..core.driver import run_python_loop
from ..core.loop import LoopState, StopRule
from ..core.solver_base import FixedPointSolver


class NumpyBackend:
    name = "numpy"
    xp = xp

    def convert(self, x: Any) -> Any:
        if hasattr(x, "detach"):  # torch tensor: no export while it requires grad
            x = x.detach()
        if hasattr(x, "__dlpack__"):
            try:
                return np.from_dlpack(x)
            except (BufferError, RuntimeError, TypeError):  # e.g. a GPU array
                pass
        if hasattr(x, "get"):  # CuPy: explicit device -> host copy
            return x.get()
        return np.asarray(x)

    def run(
        self, f: Callable[[Any], Any], z0: Any, solver: FixedPointSolver, rule: StopRule
    ) -> LoopState:
        return run_python_loop(xp, f, z0, solver, rule)

    def is_traced(self, x: Any) -> bool:
        return False


BACKEND = NumpyBackend()
