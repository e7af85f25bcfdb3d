"""array-api-strict backend: the reference implementation of the standard.

Running the core here is how portability is proven: it rejects anything outside the
Array API (implicit dtype promotion, flat indexing, non-standard functions).
"""

from __future__ import annotations

from typing import Any

import array_api_compat as aac
import array_api_strict as xp

from ._eager import EagerBackend


class ArrayApiStrictBackend(EagerBackend):
    name = "array_api_strict"
    numpy_arithmetic = True
    xp = xp

    def convert(self, x: Any) -> Any:
        if aac.is_array_api_obj(x) and aac.is_array_api_strict_namespace(aac.array_namespace(x)):
            return x
        if hasattr(x, "detach"):
            x = x.detach()
        import numpy as np

        return xp.asarray(np.asarray(x))


BACKEND = ArrayApiStrictBackend()
