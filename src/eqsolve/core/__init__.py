"""Backend-neutral math, written against the Python Array API standard.

Imports only ``array_api_compat`` and ``array_api_extra``; never a framework.
"""

from .anderson import Anderson
from .auto import AutoAnderson
from .broyden import Broyden
from .loop import LoopState, StopRule, loop_init, loop_step
from .picard import Picard
from .solution import ConvergenceError, ConvergenceWarning, CouplingWarning, Solution, Status
from .solver_base import FixedPointSolver, make_solver, solver_names

__all__ = [
    "Anderson",
    "AutoAnderson",
    "Broyden",
    "ConvergenceError",
    "ConvergenceWarning",
    "CouplingWarning",
    "FixedPointSolver",
    "LoopState",
    "Picard",
    "Solution",
    "Status",
    "StopRule",
    "loop_init",
    "loop_step",
    "make_solver",
    "solver_names",
]
