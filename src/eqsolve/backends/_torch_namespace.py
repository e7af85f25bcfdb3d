"""array_api_compat's torch namespace with its slowest hot-path wrappers bypassed.

The solvers call ``vecdot`` (row norms, every step), ``matmul`` (Anderson's Gram row and
mixing, Broyden's low-rank products) and ``where`` (the loop's per-sample bookkeeping, about
140 calls per DEQ training step at d=128). array_api_compat wraps them in Python that
handles broadcasting, axis moves and mixed-dtype promotion. eqsolve always calls them with
tensors of one dtype, where ``torch.linalg.vecdot`` / ``torch.matmul`` / ``torch.where``
already are the standard's functions; measured on (4, 16) float64 tensors on one CPU
thread: ``vecdot`` 21 us through the wrapper against 2.8 us direct, ``matmul`` 7.3 us
against 4.4 us; ``where`` on (64,) float32 tensors 4.2 us against 3.5 us. Mixed dtypes
(and Python scalars) go through the wrappers, so the namespace stays standard-conforming.
"""

from __future__ import annotations

import types
from typing import Any

import array_api_compat.torch as compat_torch
import torch

__all__ = ["namespace"]


def _vecdot(x1: Any, x2: Any, /, *, axis: int = -1) -> Any:
    if x1.dtype == x2.dtype and x1.ndim == x2.ndim:
        return torch.linalg.vecdot(x1, x2, dim=axis)
    return compat_torch.vecdot(x1, x2, axis=axis)


def _matmul(x1: Any, x2: Any, /) -> Any:
    if x1.dtype == x2.dtype:
        return torch.matmul(x1, x2)
    return compat_torch.matmul(x1, x2)


def _where(condition: Any, x1: Any, x2: Any, /) -> Any:
    if (
        isinstance(x1, torch.Tensor)
        and isinstance(x2, torch.Tensor)
        and x1.dtype == x2.dtype
    ):
        return torch.where(condition, x1, x2)
    return compat_torch.where(condition, x1, x2)


def _build() -> types.ModuleType:
    ns = types.ModuleType("eqsolve.backends._torch_namespace.namespace", compat_torch.__doc__)
    ns.__dict__.update({k: v for k, v in vars(compat_torch).items() if not k.startswith("__")})
    ns.vecdot = _vecdot  # type: ignore[attr-defined]
    ns.matmul = _matmul  # type: ignore[attr-defined]
    ns.where = _where  # type: ignore[attr-defined]
    linalg = types.ModuleType("linalg")
    linalg.__dict__.update(vars(compat_torch.linalg))  # type: ignore[attr-defined]
    linalg.vecdot = _vecdot  # type: ignore[attr-defined]
    linalg.matmul = _matmul  # type: ignore[attr-defined]
    ns.linalg = linalg  # type: ignore[attr-defined]
    return ns


namespace = _build()
