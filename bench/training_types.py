"""The row of the training-step workload (shared by the torch and JAX row builders)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: eqsolve's rows: (forward solver, backward, variant). The defaults (auto forward, auto
#: adjoint); the default forward with the Anderson adjoint (the default before "auto" was);
#: Anderson forward and backward
EQSOLVE_ROWS = (
    ("auto", "auto", "default"),
    ("auto", "anderson", "backward=anderson"),
    ("anderson", "anderson", "backward=anderson"),
)

#: what a row's ``to_numpy`` returns: the returned z*, the parameter gradients, f-evals
StepOutput = tuple[np.ndarray, dict[str, np.ndarray], "int | None"]


@dataclass
class StepRow:
    """One way of running a training step.

    ``step()`` runs forward + backward + parameter gradients and returns native arrays
    (on JAX: not yet synchronised); ``to_numpy`` turns that into :data:`StepOutput`
    (float64 NumPy), which also waits for the device.
    """

    framework: str  # "torch" | "jax"
    library: str  # "eqsolve" | "torchdeq" | "jaxopt" | "optimistix" | "unrolled"
    method: str
    variant: str  # "default" (eqsolve's default solver), "defaults"/"tuned" (peers), "floor"
    step: Callable[[], Any]
    to_numpy: Callable[[Any], StepOutput]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        label = f"{self.library}.{self.method}"
        return f"{label} ({self.variant})" if self.variant else label
