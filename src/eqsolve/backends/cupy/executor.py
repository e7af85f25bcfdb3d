"""Where the fused kernels run: the executor protocol and the CuPy executor.

The fused driver (:mod:`.fused`) only calls ``executor.launch(kernel, dtype, grid, args)``
on arrays of ``executor.xp``, so the same driver runs on the GPU (:class:`CupyExecutor`) and,
in the tests, on NumPy with a NumPy reference of each kernel or the CUDA source compiled for
the CPU (``tests/cupy_reference.py``, ``tests/cupy_emulator.py``). This module imports CuPy
only when a :class:`CupyExecutor` is created.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from . import kernels as K


class Executor(Protocol):
    """Runs kernels of :data:`.kernels.KERNELS` (one block per sample) on arrays of ``xp``."""

    xp: Any

    def launch(self, kernel: str, dtype: str, grid: int, args: dict[str, Any]) -> None: ...


class CupyExecutor:
    """CuPy arrays; the kernels compiled by NVRTC (``cupy.RawModule``) on first use."""

    block = K.MAX_BLOCK

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        self._cupy = cupy
        self._module: Any = None
        self._functions: dict[str, Any] = {}

    def _function(self, name: str) -> Any:
        fn = self._functions.get(name)
        if fn is None:
            if self._module is None:
                self._module = self._cupy.RawModule(code=K.cuda_source())
            fn = self._functions[name] = self._module.get_function(name)
        return fn

    def sm_count(self) -> int:
        return int(self._cupy.cuda.Device().attributes["MultiProcessorCount"])

    def launch(self, kernel: str, dtype: str, grid: int, args: dict[str, Any]) -> None:
        real = np.dtype(dtype).type
        values: list[Any] = []
        for p in K.KERNELS[kernel]:
            v = args[p.name]
            if p.is_pointer:
                values.append(v)
            elif p.ctype == "T":
                values.append(real(v))
            elif p.ctype == "int":
                values.append(np.int32(v))
            else:
                values.append(np.int64(v))
        self._function(K.kernel_name(kernel, dtype))((grid,), (self.block,), tuple(values))


_CUPY_EXECUTOR: CupyExecutor | None = None


def cupy_executor() -> CupyExecutor:
    """The process-wide CuPy executor (its compiled module is reused)."""
    global _CUPY_EXECUTOR
    if _CUPY_EXECUTOR is None:
        _CUPY_EXECUTOR = CupyExecutor()
    return _CUPY_EXECUTOR
