"""Half-precision states (float16, bfloat16): iterate in float32, evaluate on the state's grid.

A solver's own arithmetic cannot run in 16 bits: a Gram matrix or a sum of squares of a few
hundred entries of size 10 overflows float16 (max 65504), and the small linear solve of
Anderson's mixing has no float16 kernel in NumPy, PyTorch or JAX (``lu_cpu not implemented
for 'Half'``). Users who hold their state in half precision still want a solve, so:

* the solver and the loop run in float32 (iterates, histories, residual norms);
* every point handed to ``f`` is first rounded to the state's dtype (:class:`OnGrid` rounds
  the solver's proposals), ``f`` computes in that dtype, and its output is widened back;
* so every point the loop evaluates -- hence the returned value -- is exactly representable
  in the state's dtype, and the value cast back to it is the point the stopping rule was
  checked at. The residual of that point is measured in float32.

Choose ``tol`` above the dtype's resolution (float16: ``2**-11 ~ 4.9e-4``; bfloat16:
``2**-8 ~ 3.9e-3``): a relative residual below a few units of roundoff is not reachable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .solver_base import FixedPointSolver


def working_dtype(xp: Any, dtype: Any) -> Any | None:
    """float32 where ``dtype`` has fewer than 32 bits (float16, bfloat16), else ``None``."""
    if xp.finfo(dtype).bits < 32:
        return xp.float32
    return None


@dataclass(frozen=True)
class OnGrid(FixedPointSolver):
    """``solver`` whose proposals are rounded to ``dtype`` (a state held in ``dtype``).

    Wraps any solver: ``init`` and ``update`` are the inner solver's, ``propose`` rounds the
    inner proposal to ``dtype`` and back, so ``f`` sees -- and the loop records -- points of
    that grid.
    """

    solver: FixedPointSolver
    dtype: Any
    name = "on_grid"

    def init(self, xp: Any, z: Any, g: Any) -> Any:
        return self.solver.init(xp, z, g)

    def propose(self, xp: Any, state: Any, z: Any, g: Any, k: Any) -> Any:
        proposal = self.solver.propose(xp, state, z, g, k)
        return xp.astype(xp.astype(proposal, self.dtype), proposal.dtype)

    def update(self, xp: Any, state: Any, z: Any, g: Any, z_new: Any, g_new: Any, k: Any) -> Any:
        return self.solver.update(xp, state, z, g, z_new, g_new, k)


def widened(
    xp: Any, f: Callable[[Any], Any], low: Any, wide: Any
) -> Callable[[Any], Any]:
    """``f`` on ``(B, n)`` arrays of ``wide``: its input cast to ``low``, its output widened."""

    def f_wide(z: Any) -> Any:
        return xp.astype(f(xp.astype(z, low)), wide)

    return f_wide
