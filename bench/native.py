"""Moving a problem's float64 NumPy parameters onto one backend, in one dtype.

:class:`Native` casts every array to the dtype first (so float32 inputs are bit-identical
across backends), then moves it; it also holds the backend's ``sync`` and ``to_numpy`` for
the :class:`~bench.case.Case` it builds. :func:`check_backend` turns unknown names and missing
libraries or devices into errors before anything is built; :func:`rel_residual` is the
float64 per-sample residual every problem checks answers with.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np

from eqsolve.backends import BackendUnavailableError

from .case import Case

__all__ = ["BACKENDS", "DTYPES", "Native", "check_backend", "rel_residual"]

DTYPES = ("float32", "float64")
#: backend name -> the framework whose arrays it uses
BACKENDS = {
    "numpy": "numpy",
    "torch": "torch",
    "torch-cuda": "torch",
    "jax": "jax",
    "cupy": "cupy",
}


def check_backend(backend: str, dtype: str, frameworks: tuple[str, ...], name: str) -> str:
    """The framework of ``backend``; errors for unknown names and missing libraries/devices."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    fw = BACKENDS[backend]
    if fw not in frameworks:
        raise ValueError(
            f"problem {name!r} cannot be built on {backend!r}: it runs on {', '.join(frameworks)}"
        )
    if importlib.util.find_spec(fw) is None:
        raise BackendUnavailableError(f"backend {backend!r} needs {fw}, which is not installed")
    if backend == "torch-cuda":
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailableError("backend 'torch-cuda' needs a CUDA GPU visible to torch")
    if backend == "cupy":
        import cupy

        if not cupy.cuda.is_available():
            raise BackendUnavailableError("backend 'cupy' needs a CUDA GPU visible to cupy")
    if fw == "jax" and dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    return fw


class Native:
    """Moves float64 NumPy arrays onto one backend in one dtype; sync/to_numpy for the Case."""

    def __init__(self, backend: str, dtype: str):
        self.backend, self.dtype = backend, dtype
        self.framework = BACKENDS[backend]
        self.sync: Callable[[Any], Any] = _identity
        self.to_numpy: Callable[[Any], np.ndarray] = np.asarray
        self.device_name = "cpu"
        if self.framework == "torch":
            import torch

            self.device = torch.device("cuda" if backend == "torch-cuda" else "cpu")
            self.device_name = str(self.device)
            self.to_numpy = _torch_to_numpy
            if backend == "torch-cuda":
                self.sync = _torch_cuda_sync
        elif self.framework == "jax":
            import jax

            self.sync = jax.block_until_ready
            self.device_name = str(jax.devices()[0])
        elif self.framework == "cupy":
            import cupy

            self.sync = _cupy_sync
            self.device_name = f"cuda:{cupy.cuda.Device().id}"
            self.to_numpy = cupy.asnumpy

    def case(
        self,
        problem: Any,
        f: Callable[[Any], Any],
        f_x: Callable[[Any, Any], Any],
        z0: Any,
        x: Any,
    ) -> Case:
        """The :class:`Case` of ``problem`` (its ``name`` and ``meta``) on this backend."""
        return Case(
            problem=problem.name,
            backend=self.backend,
            framework=self.framework,
            dtype=self.dtype,
            f=f,
            z0=z0,
            x=x,
            f_x=f_x,
            sync=self.sync,
            to_numpy=self.to_numpy,
            meta={**problem.meta, "device": self.device_name},
        )

    def __call__(self, a: np.ndarray) -> Any:
        """``a`` (float64 NumPy) cast to the dtype first, then moved: identical inputs."""
        a = np.ascontiguousarray(np.asarray(a, dtype=np.float64).astype(self.dtype))
        if self.framework == "torch":
            import torch

            return torch.from_numpy(a.copy()).to(self.device)
        if self.framework == "jax":
            import jax.numpy as jnp

            out = jnp.asarray(a)
            if out.dtype != a.dtype:
                raise RuntimeError(f"jax made {out.dtype} of {a.dtype} (is jax_enable_x64 off?)")
            return out
        if self.framework == "cupy":
            import cupy

            return cupy.asarray(a)
        return a


def _identity(a: Any) -> Any:
    return a


def _torch_to_numpy(a: Any) -> np.ndarray:
    return np.asarray(a.detach().cpu().numpy())


def _torch_cuda_sync(a: Any) -> Any:
    import torch

    torch.cuda.synchronize()
    return a


def _cupy_sync(a: Any) -> Any:
    import cupy

    cupy.cuda.get_current_stream().synchronize()
    return a


def rel_residual(fz: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per-sample ``||f(z) - z|| / ||f(z)||`` (2-norms over all non-batch axes)."""
    B = fz.shape[0]
    num = np.linalg.norm((fz - z).reshape(B, -1), axis=1)
    den = np.linalg.norm(fz.reshape(B, -1), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), num)
