"""Benchmark problems of shared/BENCHMARKS.md, built once in NumPy float64 from a fixed seed
so every backend gets bit-identical inputs.

``f(z) = tanh(z W^T + x U^T + b)``; random draws in the order W (or Q), U, b, x from
``numpy.random.default_rng(seed)``. The ``sym`` problem's input-injection scale (0.1) is
folded into ``U`` and ``b``, so the parameters can be differentiated as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROBLEMS = ("tanh", "tanh-wide", "sym")


@dataclass(frozen=True)
class TanhProblem:
    """The parameters of one DEQ cell and its input batch."""

    name: str
    W: np.ndarray  # (d, d)
    U: np.ndarray  # (d, p)
    b: np.ndarray  # (d,)
    x: np.ndarray  # (B, p)

    @property
    def inj(self) -> np.ndarray:
        """Input injection ``x U^T + b``, ``(B, d)``."""
        return self.x @ self.U.T + self.b

    @property
    def shape(self) -> tuple[int, int]:
        return (self.x.shape[0], self.W.shape[0])


def make_problem(
    name: str, d: int = 256, p: int = 64, batch: int = 64, seed: int = 0
) -> TanhProblem:
    """``tanh`` (P1), ``tanh-wide`` (P2) or ``sym`` (P4) at the given sizes."""
    rng = np.random.default_rng(seed)
    if name in ("tanh", "tanh-wide"):
        W = rng.standard_normal((d, d))
        W *= (0.9 if name == "tanh" else 2.0) / np.linalg.norm(W, 2)
        scale = 1.0
    elif name == "sym":
        Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        W = Q @ np.diag(np.linspace(0.0, 0.99, d)) @ Q.T
        scale = 0.1
    else:
        raise ValueError(f"unknown problem {name!r}; choose one of {', '.join(PROBLEMS)}")
    U = rng.standard_normal((d, p)) / np.sqrt(p)
    b = 0.1 * rng.standard_normal(d)
    x = rng.standard_normal((batch, p))
    return TanhProblem(name, W, scale * U, scale * b, x)
