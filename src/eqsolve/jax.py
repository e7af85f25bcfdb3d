"""``eqsolve.jax``: differentiable fixed points for JAX (``jit``, ``vmap``, ``grad``).

>>> from eqsolve.jax import fixed_point          # doctest: +SKIP
>>> sol = fixed_point(f, z0, params, x)           # f(z, params, x); sol.value is z*

Reverse-mode gradients come from the implicit function theorem (``jax.custom_vjp``): an
adjoint fixed point ``u = g + J_f(z*)^T u`` solved with "anderson" (default), "neumann",
"broyden" or "gmres"; the biased "phantom" and "jfb" modes are available for training. See
:func:`eqsolve.adapters.jax.fixed_point`. Importing this module imports JAX.
"""

from __future__ import annotations

from .adapters.jax import (
    BACKWARD_METHODS,
    BACKWARD_ON_FAILURE,
    IMPLICIT_METHODS,
    INEXACT_METHODS,
    fixed_point,
)
from .adapters.jax_jacobian import jacobian_reg
from .core.solution import ConvergenceError, ConvergenceWarning, Solution, Status

__all__ = [
    "BACKWARD_METHODS", "BACKWARD_ON_FAILURE", "IMPLICIT_METHODS", "INEXACT_METHODS",
    "ConvergenceError", "ConvergenceWarning", "Solution", "Status", "fixed_point",
    "jacobian_reg",
]
