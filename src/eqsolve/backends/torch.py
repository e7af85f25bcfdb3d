"""PyTorch backend: Python loop over the core step, run without building a graph.

The solve itself is never differentiated (a DEQ's gradient comes from the implicit function
theorem, not from backprop through the iterations), so it runs under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat.torch as xp
import torch

from ..core.loop import LoopState, StopRule
from ..core.solver_base import FixedPointSolver
from ._eager import EagerBackend


class TorchBackend(EagerBackend):
    name = "torch"
    xp = xp

    def convert(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x
        try:
            return torch.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError, AttributeError):
            import numpy as np

            return torch.asarray(np.asarray(x))

    def run(
        self, f: Callable[[Any], Any], z0: Any, solver: FixedPointSolver, rule: StopRule
    ) -> LoopState:
        # the loop never builds a graph, and copies of z0 must not inherit requires_grad
        with torch.no_grad():
            return super().run(f, z0.detach(), solver, rule)


BACKEND = TorchBackend()
