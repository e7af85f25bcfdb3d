"""NumPy backend: Python loop over the core step."""

from __future__ import annotations

from typing import Any

import array_api_compat.numpy as xp
import numpy as np

from ._eager import EagerBackend


class NumpyBackend(EagerBackend):
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


BACKEND = NumpyBackend()
