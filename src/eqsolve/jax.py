"""``eqsolve.jax``: differentiable fixed points for JAX (``jit``, ``vmap``, ``grad``).

>>> from eqsolve.jax import fixed_point          # doctest: +SKIP
>>> sol = fixed_point(f, z0, params, x)           # f(z, params, x); sol.value is z*

Reverse-mode gradients come from the implicit function theorem (``jax.custom_vjp``): an
adjoint fixed point ``u = g + J_f(z*)^T u`` solved with "anderson" (default), "neumann",
"broyden" or "gmres" (``eqsolve.Implicit``); the biased ``eqsolve.Phantom`` and
``eqsolve.JFB`` are available for training. See
:func:`eqsolve.adapters.jax.fixed_point`. Importing this module imports JAX.
"""

from __future__ import annotations

from .adapters.backward import BACKWARD_ON_FAILURE, JFB, Implicit, Phantom
from .adapters.jax import BACKWARD_METHODS, fixed_point
from .adapters.jax_dropout import variational_dropout
from .adapters.jax_jacobian import jacobian_reg
from .adapters.jax_spectral import SpectralRadius, spectral_radius
from .adapters.reporting import deprecated_getattr
from .core.adjoint import AdjointInfo
from .core.solution import ConvergenceError, ConvergenceWarning, Solution, Status

__all__ = [
    "BACKWARD_METHODS", "BACKWARD_ON_FAILURE", "JFB", "AdjointInfo", "ConvergenceError",
    "ConvergenceWarning", "Implicit", "Phantom", "Solution", "SpectralRadius", "Status",
    "fixed_point", "jacobian_reg", "spectral_radius", "variational_dropout",
]

#: names of the previous release (the method groups are now the spec's kinds)
__getattr__ = deprecated_getattr(__name__, {
    "IMPLICIT_METHODS": (
        lambda: ("neumann", "anderson", "broyden", "gmres"),
        "eqsolve.adapters.backward.ADJOINT_METHODS (the methods of eqsolve.Implicit)",
    ),
    "INEXACT_METHODS": (lambda: ("phantom", "jfb"), "eqsolve.Phantom and eqsolve.JFB"),
})
