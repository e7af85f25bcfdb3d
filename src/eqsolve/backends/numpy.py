"""NumPy backend: Python loop over the core step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat.numpy as compat_numpy
import numpy as np

from . import never_written
from ._eager import EagerBackend

# NumPy >= 2.1 implements the Array API in its main namespace (np.astype arrived in 2.1).
# Using it directly skips array_api_compat's Python wrappers: measured on the tanh benchmark
# problem (float64, tol 1e-8, one thread), 28% less time per Anderson solve, 25% per Broyden
# and 9% per plain iteration. Older NumPy goes through the compat namespace.
xp = np if np.lib.NumpyVersion(np.__version__) >= "2.1.0" else compat_numpy


class NumpyBackend(EagerBackend):
    name = "numpy"
    numpy_arithmetic = True
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

    def guard_inplace(self, leaves: list[Any]) -> tuple[list[Any], Callable[[list[Any]], bool]]:
        """Read-only views: a write into them raises ``ValueError`` ("read-only")."""
        views = []
        for leaf in leaves:
            view = leaf.view()
            view.flags.writeable = False
            views.append(view)
        return views, never_written


BACKEND = NumpyBackend()
