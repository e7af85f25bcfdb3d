"""PyTorch backend: Python loop over the core step, run without building a graph.

The solve itself is never differentiated (a DEQ's gradient comes from the implicit function
theorem, not from backprop through the iterations), so it runs under ``torch.no_grad()``.

Autocast. Inside a ``torch.autocast`` region the solver's own arithmetic (Anderson's Gram
matrix, Broyden's low-rank updates, the residual norms) runs with autocast *disabled*, so it
stays in the state's dtype (float32/float64); only the calls of ``f`` run under the caller's
autocast settings. Without this, autocast would silently run the solver's matmuls in
bfloat16/float16. (``f`` must still return the state's dtype: ``eqsolve.torch.fixed_point``
casts its output back, see its ``f_dtype`` argument.)

Synchronised stop. ``run(..., sync_stop=True | group)`` makes every process of a
``torch.distributed`` group run the same number of iterations (see :meth:`stop_reducer`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.dlpack

from ..core.loop import LoopState, StopRule
from ..core.solver_base import FixedPointSolver
from ._eager import EagerBackend
from ._torch_namespace import namespace as fast_namespace


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the enclosing ``torch.autocast`` region on ``device_type``, or ``None``."""
    try:
        if not torch.amp.is_autocast_available(device_type):
            return None
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (AttributeError, TypeError, RuntimeError):  # torch < 2.4: no per-device queries
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        return None


def check_sync_stop(sync_stop: Any) -> None:
    """``sync_stop`` must be ``None``, a bool or a ``torch.distributed.ProcessGroup``."""
    if sync_stop is None or isinstance(sync_stop, bool):
        return
    if _is_process_group(sync_stop):
        return
    raise TypeError(
        "sync_stop must be False/None (each process stops on its own samples), True (all "
        "processes of the default torch.distributed group stop together) or a "
        f"torch.distributed.ProcessGroup; got {type(sync_stop).__name__}"
    )


def _is_process_group(obj: Any) -> bool:
    import torch.distributed as dist

    return dist.is_available() and isinstance(obj, dist.ProcessGroup)


def stop_group(sync_stop: Any) -> Any:
    """The process group that ``sync_stop`` synchronises, or ``None`` for a local stop.

    ``True`` means the default (WORLD) group when ``torch.distributed`` is initialised, and
    a local stop otherwise (like ``SyncBatchNorm``, a model built with ``sync_stop=True``
    also runs in a single process). A group of one process needs no synchronisation.
    """
    check_sync_stop(sync_stop)
    if sync_stop is None or sync_stop is False:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if sync_stop is True:
            return None
        raise RuntimeError(
            "sync_stop was given a ProcessGroup but torch.distributed is not initialised"
        )
    group = dist.group.WORLD if sync_stop is True else sync_stop
    if dist.get_world_size(group) <= 1:
        return None
    return group


class TorchBackend(EagerBackend):
    name = "torch"
    xp = fast_namespace  # compat's torch namespace, vecdot/matmul unwrapped

    def convert(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x
        try:
            return torch.utils.dlpack.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError, AttributeError):
            import numpy as np

            return torch.asarray(np.asarray(x))

    def guard_inplace(self, leaves: list[Any]) -> tuple[list[Any], Callable[[list[Any]], bool]]:
        """Version counters: every in-place operation on a tensor increments its ``_version``."""
        versions = [leaf._version for leaf in leaves]

        def wrote_into(outputs: list[Any]) -> bool:
            return any(leaf._version != v for leaf, v in zip(leaves, versions, strict=True))

        return leaves, wrote_into

    def stop_reducer(self, sync_stop: Any) -> Callable[[Any], bool] | None:
        """``any(active)`` all-reduced (MAX) over the group of ``sync_stop``.

        One all-reduce of a one-element int32 tensor per iteration, on the device of the
        state (so it also works with NCCL on GPUs); the host reads the result.
        """
        group = stop_group(sync_stop)
        if group is None:
            return None
        import torch.distributed as dist

        def any_active(active: Any) -> bool:
            flag = torch.any(active).to(torch.int32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            return bool(flag.item())

        return any_active

    def run(
        self,
        f: Callable[[Any], Any],
        z0: Any,
        solver: FixedPointSolver,
        rule: StopRule,
        sync_stop: Any = None,
    ) -> LoopState:
        # the loop never builds a graph, and copies of z0 must not inherit requires_grad; a
        # private copy, because a write of f into its argument is only seen after the call
        # (guard_inplace), and the caller's z0 must not have changed by then
        z0 = z0.detach().clone()
        device_type = z0.device.type
        amp_dtype = autocast_dtype(device_type)
        with torch.no_grad():
            if amp_dtype is None:
                return super().run(f, z0, solver, rule, sync_stop)

            def f_autocast(z: Any) -> Any:  # f keeps the caller's autocast settings
                with torch.autocast(device_type, dtype=amp_dtype):
                    return f(z)

            with torch.autocast(device_type, enabled=False):  # the solver's own math does not
                return super().run(f_autocast, z0, solver, rule, sync_stop)


BACKEND = TorchBackend()
