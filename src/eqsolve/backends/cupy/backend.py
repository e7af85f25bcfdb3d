"""The CuPy backend object: fused GPU kernels for the built-in solvers, the generic step otherwise.

``run`` is :func:`eqsolve.backends.cupy.fused.run_cupy`: Picard, Anderson and Broyden run one
fused kernel per iteration with a host synchronisation every few iterations; other solvers
(and ``eqsolve.cupy.options(fused=False)``) run the generic Array-API step under the Python
loop.

``import cupy`` succeeds on machines without a GPU; device work then raises. This module
therefore checks ``cupy.cuda.is_available()`` when it is imported (``get_backend("cupy")``)
and raises :class:`~eqsolve.backends.BackendUnavailableError` without one. It is the only
module of the package that needs CuPy to import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cupy

from .. import BackendUnavailableError

if not cupy.cuda.is_available():
    raise BackendUnavailableError(
        "backend 'cupy' needs a CUDA GPU, but cupy.cuda.is_available() is False on this machine"
    )


import array_api_compat.cupy as xp

from ...core.loop import LoopState, StopRule
from ...core.solver_base import FixedPointSolver
from .._eager import EagerBackend
from .fused import run_cupy


class CupyBackend(EagerBackend):
    name = "cupy"
    xp = xp

    def run(
        self,
        f: Callable[[Any], Any],
        z0: Any,
        solver: FixedPointSolver,
        rule: StopRule,
        sync_stop: Any = None,
    ) -> LoopState:
        # the fused kernels keep no trace of iterates: states= runs the generic loop
        if self.stop_reducer(sync_stop) is not None or rule.record_at:
            return super().run(f, z0, solver, rule, sync_stop)
        return run_cupy(self.xp, f, z0, solver, rule)

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


BACKEND = CupyBackend()
