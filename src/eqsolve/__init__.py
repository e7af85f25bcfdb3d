"""eqsolve: fixed-point solvers and implicit differentiation for deep equilibrium models.

One core written against the Python Array API standard; NumPy, PyTorch, JAX, CuPy and
array-api-strict arrays all work, and ``backend=`` switches between them.

>>> import eqsolve
>>> sol = eqsolve.fixed_point(f, z0, solver="anderson", tol=1e-6)  # doctest: +SKIP
"""

from . import api
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
    "Picard",
    "Solution",
    "Status",
    "api",
    "fixed_point",
    "solve",
]
