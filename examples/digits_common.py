"""Data, settings, initialisation and logging shared by the two frameworks of ``digits_deq.py``.

Both frameworks read the same NumPy data split, the same NumPy initialisation and the same
learning-rate schedule from here, so their rows differ only in the framework.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

N_IN, N_CLASSES = 64, 10


# ------------------------------------------------------------------------ data and settings


@dataclass(frozen=True)
class Config:
    backend: str
    epochs: int
    hidden: int
    batch: int
    lr: float
    seed: int
    jac_reg: float
    unroll_steps: int | None
    tol: float = 1e-4  # forward: relative residual ||f(z) - z|| <= tol ||f(z)||
    max_iter: int = 40
    solver: str = "anderson"
    backward: str = "anderson"
    backward_max_iter: int = 40
    jax_probe_backward: bool = True  # JAX: re-solve the adjoint to count its iterations


@dataclass
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_data(seed: int) -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0) + 1.0  # +1: constant pixels stay 0
    prep = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    return Data(prep(x_tr), y_tr.astype(np.int64), prep(x_te), y_te.astype(np.int64))


def init_params(seed: int, hidden: int) -> dict[str, np.ndarray]:
    """NumPy float32 weights shared by both frameworks (the explicit MLP uses W2, b2)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((hidden, hidden))
    W *= 0.5 / np.linalg.norm(W, 2)  # ||W||_2 = 0.5: the initial cell is a contraction
    params = {
        "U": rng.standard_normal((hidden, N_IN)) / math.sqrt(N_IN),
        "b": np.zeros(hidden),
        "W": W,
        "V": rng.standard_normal((N_CLASSES, hidden)) / math.sqrt(hidden),
        "c": np.zeros(N_CLASSES),
        # explicit MLP only: a second layer with the usual LeCun scale
        "W2": rng.standard_normal((hidden, hidden)) / math.sqrt(hidden),
        "b2": np.zeros(hidden),
    }
    return {k: v.astype(np.float32) for k, v in params.items()}


MODEL_PARAMS = {
    "explicit": ("U", "b", "W2", "b2", "V", "c"),
    "unrolled": ("U", "b", "W", "V", "c"),
    "deq": ("U", "b", "W", "V", "c"),
}


def epoch_batches(cfg: Config, n: int, epoch: int) -> list[np.ndarray]:
    """Shuffled mini-batch indices (the same in both frameworks); the ragged tail is dropped
    (reshuffled every epoch, so every sample is used) to keep one shape for ``jax.jit``."""
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
    return [order[i : i + cfg.batch] for i in range(0, n - cfg.batch + 1, cfg.batch)]


def learning_rate(cfg: Config, step: Any, n_train: int) -> Any:
    """Cosine decay from ``cfg.lr`` to 0 over the run (works on ints and JAX scalars)."""
    total = cfg.epochs * (n_train // cfg.batch)
    cos = math.cos if isinstance(step, int) else _jnp_cos
    return cfg.lr * 0.5 * (1.0 + cos(math.pi * step / total))


def _jnp_cos(x: Any) -> Any:
    import jax.numpy as jnp

    return jnp.cos(x)


@dataclass
class Result:
    name: str
    n_params: int
    acc: float = float("nan")
    epoch_times: list[float] = field(default_factory=list)
    fwd_train: float = float("nan")  # mean forward iterations per sample, all training steps
    fwd_test: float = float("nan")
    bwd: float = float("nan")
    backward_bytes: int = 0
    compile_s: float = 0.0


def log_epoch(
    epoch: int,
    loss: float,
    reg: float | None,
    acc: float,
    fwd: float,
    bwd: float,
    unconverged: int,
    seconds: float,
) -> None:
    parts = [f"  epoch {epoch:3d}", f"loss {loss:.4f}"]
    if reg is not None:
        parts.append(f"jac-reg {reg:.4f}")
    parts.append(f"test acc {100 * acc:5.1f}%")
    if not math.isnan(fwd):
        parts.append(f"fwd it {fwd:5.1f}")
    if not math.isnan(bwd):
        parts.append(f"bwd it {bwd:5.1f}")
    if unconverged:
        parts.append(f"unconverged {unconverged}")
    parts.append(f"{seconds:.2f} s")
    print(" | ".join(parts), flush=True)
