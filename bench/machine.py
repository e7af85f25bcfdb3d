"""The machine a run measures on: thread pinning, usable backends, versions and devices."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_BACKENDS", "GPU_BACKENDS", "THREAD_ENV", "default_backends", "environment"]

#: one intra-op thread for every library (set before NumPy/torch/JAX load)
THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}
DEFAULT_BACKENDS = ("numpy", "torch", "jax")
GPU_BACKENDS = ("torch-cuda", "cupy")


def _gpu_usable(backend: str) -> bool:
    try:
        if backend == "torch-cuda":
            import torch

            return bool(torch.cuda.is_available())
        if backend == "cupy":
            import cupy

            return bool(cupy.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken CUDA install means "no GPU rows"
        return False
    return False


def default_backends() -> list[str]:
    """The installed ones of numpy, torch, jax, plus torch-cuda and cupy when a GPU is usable."""
    out = [b for b in DEFAULT_BACKENDS if importlib.util.find_spec(b) is not None]
    lib = {"torch-cuda": "torch", "cupy": "cupy"}
    out += [b for b in GPU_BACKENDS if importlib.util.find_spec(lib[b]) and _gpu_usable(b)]
    return out


def environment(backends: list[str]) -> dict[str, Any]:
    """Versions, threads, CPU and devices, for the JSON file."""
    from importlib import metadata

    versions = {}
    for dist in (
        "eqsolve",
        "numpy",
        "array-api-compat",
        "torch",
        "jax",
        "jaxlib",
        "cupy-cuda12x",
        "torchdeq",
        "jaxopt",
        "optimistix",
        "equinox",
        "lineax",
        "scipy",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": {k: os.environ.get(k) for k in THREAD_ENV},
        "versions": versions,
        "backends": list(backends),
        "devices": {},
    }
    if "torch" in sys.modules:
        import torch

        env["threads"]["torch.get_num_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["devices"]["torch"] = torch.cuda.get_device_name(0)
    if "jax" in sys.modules:
        import jax

        env["devices"]["jax"] = [str(d) for d in jax.devices()]
    return env
