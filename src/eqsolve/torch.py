"""PyTorch entry points: a differentiable fixed point and a DEQ layer.

>>> import eqsolve.torch as et                                         # doctest: +SKIP
>>> sol = et.fixed_point(lambda z: cell(z, x), z0, backward=eqsolve.Implicit())  # doctest: +SKIP
>>> sol.value.sum().backward()                                         # doctest: +SKIP

See :mod:`eqsolve.adapters.torch` for how the backward is built (a graph-free solve, one
differentiable call of ``f`` at ``z*``, and the implicit adjoint solve in backward).

With the differentiable inputs passed explicitly, ``et.fixed_point(f, z0, *args)`` with
``f(z, *args)`` (or ``et.DEQ(...)(cell, z0, x)`` for an ``nn.Module`` cell), every derivative
is exact: ``create_graph=True`` (second, third order), ``gradgradcheck`` and the
``torch.func`` transformations (``grad``, ``vjp``, ``jvp``, ``jacrev``, ``jacfwd``,
``hessian``, ``vmap``); see :mod:`eqsolve.adapters.torch_implicit`.

>>> z = et.fixed_point(lambda z, W, x: torch.tanh(z @ W.T + x), z0, W, x).value  # doctest: +SKIP
"""

from __future__ import annotations

from .adapters.backward import JFB, SHINE, Implicit, Phantom
from .adapters.torch import ADJOINT_METHODS, BACKWARD_METHODS, DEQ, fixed_point
from .adapters.torch_dropout import VariationalDropout
from .adapters.torch_jacobian import jacobian_reg
from .adapters.torch_spectral import SpectralRadius, spectral_radius
from .core.adjoint import AdjointInfo
from .core.solution import ConvergenceError, ConvergenceWarning, Solution

__all__ = [
    "ADJOINT_METHODS", "BACKWARD_METHODS", "DEQ", "JFB", "AdjointInfo", "ConvergenceError",
    "ConvergenceWarning", "Implicit", "Phantom", "SHINE", "Solution", "SpectralRadius",
    "VariationalDropout", "fixed_point", "jacobian_reg", "spectral_radius",
]
