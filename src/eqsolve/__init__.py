"""eqsolve: fixed-point solvers and implicit differentiation for deep equilibrium models.

One core written against the Python Array API standard; NumPy, PyTorch, JAX, CuPy and
array-api-strict arrays all work, and ``backend=`` switches between them.

>>> import eqsolve
>>> sol = eqsolve.fixed_point(f, z0, solver="anderson", tol=1e-6)  # doctest: +SKIP

The framework modules ``eqsolve.torch``, ``eqsolve.jax`` and ``eqsolve.cupy`` are imported on
first use (``import eqsolve`` imports none of the frameworks).
"""

import importlib
from typing import Any

from . import api
from .adapters.backward import JFB, SHINE, Implicit, Phantom
from .api import fixed_point, solve
from .backends import BACKEND_NAMES, BackendUnavailableError
from .core import (
    Anderson,
    AutoAnderson,
    Broyden,
    ConvergenceError,
    ConvergenceWarning,
    CouplingWarning,
    FixedPointSolver,
    Picard,
    Solution,
    Status,
)

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "Anderson",
    "AutoAnderson",
    "BackendUnavailableError",
    "Broyden",
    "ConvergenceError",
    "ConvergenceWarning",
    "CouplingWarning",
    "FixedPointSolver",
    "Implicit",
    "JFB",
    "Phantom",
    "Picard",
    "SHINE",
    "Solution",
    "Status",
    "api",
    "fixed_point",
    "solve",
]

#: framework modules, imported when first accessed as attributes
_LAZY_SUBMODULES = ("torch", "jax", "cupy")


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_SUBMODULES})
