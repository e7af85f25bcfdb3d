"""CuPy backend: the generic Array-API step under a Python loop on the GPU.

``import cupy`` succeeds on machines without a GPU; device work then raises. This backend
therefore checks ``cupy.cuda.is_available()`` when it is first asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat.cupy as xp
import cupy

from ..core.driver import run_python_loop
from ..core.loop import LoopState, StopRule
from ..core.solver_base import FixedPointSolver
from . import BackendUnavailableError

if not cupy.cuda.is_available():
    raise BackendUnavailableError(
        "backend 'cupy' needs a CUDA GPU, but cupy.cuda.is_available() is False on this machine"
    )


class CupyBackend:
    name = "cupy"
    xp = xp

    def convert(self, x: Any) -> Any:
        if isinstance(x, cupy.ndarray):
            return x
        if hasattr(x, "detach"):
            x = x.detach()
        try:
            return cupy.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError, ValueError):
            import numpy as np

            return cupy.asarray(np.asarray(x))

    def run(
        self, f: Callable[[Any], Any], z0: Any, solver: FixedPointSolver, rule: StopRule
    ) -> LoopState:
        return run_python_loop(xp, f, z0, solver, rule)

    def is_traced(self, x: Any) -> bool:
        return False


BACKEND = CupyBackend()
