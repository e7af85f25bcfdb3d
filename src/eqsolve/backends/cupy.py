"""CuPy backend: the generic Array-API step under a Python loop on the GPU.

``import cupy`` succeeds on machines without a GPU; device work then raises. This backend
therefore checks ``cupy.cuda.is_available()`` when it is first asked for.
"""

from __future__ import annotations

from typing import Any

import array_api_compat.cupy as xp
import cupy

from . import BackendUnavailableError

if not cupy.cuda.is_available():
    raise BackendUnavailableError(
        "backend 'cupy' needs a CUDA GPU, but cupy.cuda.is_available() is False on this machine"
    )


from ._eager import EagerBackend


class CupyBackend(EagerBackend):
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


BACKEND = CupyBackend()
