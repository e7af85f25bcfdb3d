"""The ``digits`` problem: the tanh cell trained on scikit-learn's 8x8 digits, its stored
weights and test images (``data/digits_cell.npz``, written by ``bench/train_digits_cell.py``)
and the float64 test accuracy (see :mod:`bench.problems`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .tanh import TanhProblem, tanh_fixed_point

__all__ = ["DIGITS_BATCH", "DIGITS_FILE", "digits_accuracy", "digits_problem", "load_digits_cell"]

#: the trained digits cell (written by ``python -m bench.train_digits_cell``)
DIGITS_FILE = Path(__file__).resolve().parent / "data" / "digits_cell.npz"
DIGITS_BATCH = {"default": 64, "tiny": 4}

_DIGITS_ARRAYS = ("W", "U", "b", "head_W", "head_b")


def load_digits_cell(path: str | Path | None = None) -> dict[str, Any]:
    """The trained digits cell: weights (``W``, ``U``, ``b``, ``head_W``, ``head_b``) as
    float64, ``test_x`` (preprocessed test images, float64), ``test_labels`` (int64), and
    the scalar/str entries (``test_accuracy``, ``preprocessing``, ``command``, ...)."""
    path = DIGITS_FILE if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; regenerate it with python bench/train_digits_cell.py"
        )
    out: dict[str, Any] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            a = data[key]
            if key in _DIGITS_ARRAYS:
                out[key] = a.astype(np.float64)
            elif key == "test_images":
                out["test_x"] = a.astype(np.float64) / float(data["pixel_max"])
            elif key == "test_labels":
                out[key] = a.astype(np.int64)
            elif a.ndim == 0:
                out[key] = a.item()
            else:
                out[key] = a
    return out


def digits_accuracy(cell: dict[str, Any]) -> float:
    """Test accuracy of a :func:`load_digits_cell` dict: float64 Newton fixed point of every
    test image (to 1e-14), linear head, argmax."""
    inj = cell["test_x"] @ cell["U"].T + cell["b"]
    z = tanh_fixed_point(cell["W"], inj)
    pred = np.argmax(z @ cell["head_W"].T + cell["head_b"], axis=1)
    return float(np.mean(pred == cell["test_labels"]))


def digits_problem(batch: int, seed: int) -> TanhProblem:
    cell = load_digits_cell()
    n_test = cell["test_x"].shape[0]
    if seed == 0:
        idx = np.arange(batch)
    else:
        idx = np.sort(np.random.default_rng(seed).choice(n_test, batch, replace=False))
    info = {
        "seed": seed,
        "test_indices": idx.tolist() if batch <= 16 else f"{batch} of {n_test} (seed {seed})",
        "preprocessing": cell["preprocessing"],
        "test_accuracy": cell["test_accuracy"],
        "contraction": cell["contraction"],
        "trained_by": cell["command"],
    }
    return TanhProblem("digits", cell["W"], cell["U"], cell["b"], cell["test_x"][idx], info=info)
