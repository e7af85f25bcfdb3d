"""What every benchmark row is run on: one problem materialised on one backend and dtype.

Problems (:mod:`bench.problems`) build a :class:`Case`; eqsolve rows
(:mod:`bench.runner`) and peer rows (:mod:`bench.peers`) both solve
``case.f`` from ``case.z0``, and the runner checks every answer independently with
:meth:`Problem.residual` in float64 NumPy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class Case:
    """One problem on one backend and dtype.

    ``f`` maps a native ``(B, ...)`` array to one of the same shape (batch axis 0); on JAX it
    is already ``jax.jit``-compiled. ``f_x(z, x)`` is the same cell with the input ``x`` as an
    explicit, differentiable argument (``f(z) == f_x(z, x)``), for the backward figures.
    """

    problem: str
    backend: str  # "numpy" | "torch" | "jax" | "cupy" | "torch-cuda"
    framework: str  # "numpy" | "torch" | "jax" | "cupy"
    dtype: str  # "float32" | "float64"
    f: Callable[[Any], Any]
    z0: Any
    x: Any
    f_x: Callable[[Any, Any], Any]
    sync: Callable[[Any], Any] = field(default=lambda a: a)  # wait for device work
    to_numpy: Callable[[Any], np.ndarray] = field(default=np.asarray)
    meta: dict[str, Any] = field(default_factory=dict)  # sizes etc., written to the JSON


class Problem(Protocol):
    """A benchmark problem: parameters held once in float64 NumPy, built on any framework."""

    name: str
    frameworks: tuple[str, ...]  # frameworks that can build it

    def build(self, backend: str, dtype: str) -> Case: ...

    def residual(self, z: np.ndarray) -> np.ndarray:
        """Per-sample ``||f(z) - z|| / ||f(z)||`` computed in float64 (independent check)."""
        ...

    def reference_input_grad(self, g: np.ndarray) -> np.ndarray:
        """``dL/dx`` for ``L = sum(z* * g)`` from the dense float64 ``(I - J^T)^{-1} g``."""
        ...
