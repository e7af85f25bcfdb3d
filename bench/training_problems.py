"""Problems of the training-step workload: a DEQ cell with its parameters as explicit inputs.

A training step differentiates a loss with respect to the cell's *parameters*, so each
problem here holds its parameters ``P`` (a dict of float64 NumPy arrays), the input ``x``
and a framework cell ``cell(z, P, x)``:

``tanh-128``, ``tanh-512``
    ``tanh(z W^T + x U^T + b)``, ``||W||_2 = 0.9`` (P1's draws, :func:`bench.tanh.random_tanh`)
    at (d, B) = (128, 64) and (512, 256), input size p = 64 (issue 12's sizes).
``digits``
    The same cell with the trained digits weights (d = 128, p = 64, B = 64 test images).
``conv``
    The MDEQ-style convolutional cell of :mod:`bench.conv` (B = 16, C = 16, 8x8).

The loss is ``L = sum(c * z*)`` with a fixed Gaussian ``c / B``. Its reference parameter
gradient is computed in float64 outside eqsolve: ``z*`` by Newton's method, the dense
per-sample adjoint ``u = (I - J^T)^{-1} c`` (the problems' ``reference_adjoint``), then
``u^T df/dP`` (closed form for the tanh cell, ``torch.autograd``/``jax.vjp`` in float64 for
the conv cell).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .conv import CONV_SIZES, ConvProblem, jax_conv_cell, torch_conv_cell
from .digits import digits_problem
from .tanh import TanhProblem, random_tanh

#: problem name -> (d, p, B) of the tanh cells; "quick" sizes for smoke runs
TANH_TRAIN_SIZES = {"tanh-128": (128, 64, 64), "tanh-512": (512, 64, 256)}
QUICK_TANH = (16, 8, 4)
TRAINING_PROBLEMS = ("tanh-128", "tanh-512", "digits", "conv")


@dataclass
class TrainingProblem:
    """One cell with explicit parameters; ``base`` gives the float64 references."""

    name: str
    base: TanhProblem | ConvProblem
    params: dict[str, np.ndarray]
    x: np.ndarray
    c: np.ndarray  # the loss weights: L = sum(c * z*)

    def cell(self, framework: str) -> Callable[[Any, dict[str, Any], Any], Any]:
        """``cell(z, P, x)`` in ``framework`` ("torch" or "jax")."""
        if isinstance(self.base, ConvProblem):
            groups = self.base.groups
            return torch_conv_cell(groups) if framework == "torch" else jax_conv_cell(groups)
        if framework == "torch":
            import torch

            def torch_cell(z: Any, P: dict[str, Any], x: Any) -> Any:
                return torch.tanh(torch.addmm(torch.addmm(P["b"], x, P["U"].T), z, P["W"].T))

            return torch_cell
        import jax
        import jax.numpy as jnp

        hi = jax.lax.Precision.HIGHEST

        def jax_cell(z: Any, P: dict[str, Any], x: Any) -> Any:
            pre = jnp.matmul(z, P["W"].T, precision=hi) + jnp.matmul(x, P["U"].T, precision=hi)
            return jnp.tanh(pre + P["b"])

        return jax_cell

    def residual(self, z: np.ndarray) -> np.ndarray:
        """Per-sample relative residual of ``z`` in float64 (independent of eqsolve)."""
        return self.base.residual(np.asarray(z, dtype=np.float64))

    def reference_grads(self) -> dict[str, np.ndarray]:
        """``dL/dP`` in float64 from the dense implicit-function-theorem adjoint."""
        z = self.base.reference_fixed_point()
        u = self.base.reference_adjoint(self.c)
        if isinstance(self.base, TanhProblem):
            s = u.reshape(z.shape) * (1.0 - z * z)  # u^T diag(1 - z*^2)
            return {"W": s.T @ z, "U": s.T @ self.x, "b": s.sum(axis=0)}
        return _conv_param_vjp(self, z, u.reshape(z.shape))


def _conv_param_vjp(pr: TrainingProblem, z: np.ndarray, u: np.ndarray) -> dict[str, np.ndarray]:
    """``u^T df/dP`` of the conv cell at ``z`` in float64 (torch if installed, else jax)."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        P = {k: torch.tensor(v, requires_grad=True) for k, v in pr.params.items()}
        out = pr.cell("torch")(torch.tensor(z), P, torch.tensor(pr.x))
        grads = torch.autograd.grad(out, list(P.values()), torch.tensor(u))
        return {k: g.numpy() for k, g in zip(P, grads, strict=True)}
    import jax

    with jax.enable_x64(True):
        cell = pr.cell("jax")
        Pj = {k: jax.numpy.asarray(v) for k, v in pr.params.items()}
        _, vjp = jax.vjp(lambda P: cell(jax.numpy.asarray(z), P, jax.numpy.asarray(pr.x)), Pj)
        return {k: np.asarray(v) for k, v in vjp(jax.numpy.asarray(u))[0].items()}


def make_training_problem(name: str, *, quick: bool = False, seed: int = 0) -> TrainingProblem:
    """The training problem ``name`` (:data:`TRAINING_PROBLEMS`); ``quick``: tiny sizes."""
    base: TanhProblem | ConvProblem
    if name in TANH_TRAIN_SIZES:
        d, p, B = QUICK_TANH if quick else TANH_TRAIN_SIZES[name]
        base = random_tanh("tanh", d, p, B, seed)
    elif name == "digits":
        base = digits_problem(4 if quick else 64, seed)
    elif name == "conv":
        B, C, H, W, groups = CONV_SIZES["tiny" if quick else "default"]
        base = ConvProblem.random(B, C, H, W, groups, seed=seed)
    else:
        raise ValueError(f"unknown problem {name!r}; choose from {', '.join(TRAINING_PROBLEMS)}")
    if isinstance(base, TanhProblem):
        params = {"W": base.W, "U": base.U, "b": base.b}
    else:
        params = dict(base.params)
    x = np.asarray(base.x, dtype=np.float64)
    shape = (x.shape[0], base.d) if isinstance(base, TanhProblem) else x.shape
    c = np.random.default_rng(seed + 1).standard_normal(shape) / shape[0]
    return TrainingProblem(name, base, params, x, c)
