"""``eqsolve.jax``: differentiable fixed points for JAX (``jit``, ``vmap``, any derivative).

>>> from eqsolve.jax import fixed_point          # doctest: +SKIP
>>> sol = fixed_point(f, z0, params, x)  # f(z, params, x); sol.value is z*  # doctest: +SKIP

Derivatives come from the implicit function theorem in forward mode (``jax.custom_jvp``):
the tangent system ``(I - J_f) dz* = J_theta dtheta`` is solved inside
``jax.lax.custom_linear_solve`` with "auto" (default), "anderson", "neumann", "broyden" or "gmres"
(``eqsolve.Implicit``), and every transformation follows -- ``jvp``, ``jacfwd``, ``grad``
(its transpose: the adjoint fixed point ``u = g + J_f(z*)^T u``), ``jacrev``, ``hessian``,
grad of grad, ``vmap`` of them, under ``jit`` or eagerly. ``on_backward`` receives each
linear solve's :class:`AdjointInfo`. The biased ``eqsolve.Phantom``, ``eqsolve.JFB`` and
``eqsolve.SHINE`` (Broyden forward) are available for training. See
:func:`eqsolve.adapters.jax.fixed_point`. Importing this module imports JAX.
"""

from __future__ import annotations

from .adapters.backward import BACKWARD_ON_FAILURE, JFB, SHINE, Implicit, Phantom
from .adapters.jax import BACKWARD_METHODS, fixed_point
from .adapters.jax_dropout import variational_dropout
from .adapters.jax_jacobian import jacobian_reg
from .adapters.jax_spectral import SpectralRadius, spectral_radius
from .adapters.reporting import deprecated_getattr
from .core.adjoint import AdjointInfo
from .core.solution import ConvergenceError, ConvergenceWarning, Solution, Status

__all__ = [
    "BACKWARD_METHODS", "BACKWARD_ON_FAILURE", "JFB", "AdjointInfo", "ConvergenceError",
    "ConvergenceWarning", "Implicit", "Phantom", "SHINE", "Solution", "SpectralRadius",
    "Status", "fixed_point", "jacobian_reg", "spectral_radius", "variational_dropout",
]

#: names of the previous release (the method groups are now the spec's kinds)
__getattr__ = deprecated_getattr(__name__, {
    "IMPLICIT_METHODS": (
        lambda: ("neumann", "anderson", "broyden", "gmres"),
        "eqsolve.adapters.backward.ADJOINT_METHODS (the methods of eqsolve.Implicit)",
    ),
    "INEXACT_METHODS": (lambda: ("phantom", "jfb"), "eqsolve.Phantom and eqsolve.JFB"),
})
