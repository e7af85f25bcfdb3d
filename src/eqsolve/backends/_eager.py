"""What the eager backends (numpy, torch, cupy, array_api_strict) share: the Python loop."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..core.driver import run_python_loop, run_python_loop_synced
from ..core.loop import LoopState, StopRule
from ..core.solver_base import FixedPointSolver


class EagerBackend:
    """Drives ``core.loop`` with a Python loop; subclasses add ``name``, ``xp``, ``convert``."""

    name: str
    xp: Any
    #: the array library computes with NumPy, whose floating-point warnings are meaningless
    #: inside the solver (overflow/underflow/NaN are measured and become statuses)
    numpy_arithmetic: bool = False
    #: NumPy, PyTorch and CuPy keep gradual underflow by default
    flushes_subnormals: bool = False

    def run(
        self,
        f: Callable[[Any], Any],
        z0: Any,
        solver: FixedPointSolver,
        rule: StopRule,
        sync_stop: Any = None,
    ) -> LoopState:
        """Run the loop to the end; ``sync_stop`` (see :meth:`stop_reducer`) shares the stop."""
        any_active = self.stop_reducer(sync_stop)
        with self._quiet_solver(f) as f_user:
            if any_active is None:
                return run_python_loop(self.xp, f_user, z0, solver, rule)
            return run_python_loop_synced(self.xp, f_user, z0, solver, rule, any_active)

    @contextlib.contextmanager
    def _quiet_solver(self, f: Callable[[Any], Any]) -> Iterator[Callable[[Any], Any]]:
        """NumPy warnings off for the solver's own arithmetic, as the caller set them in ``f``."""
        if not self.numpy_arithmetic:
            yield f
            return
        caller = np.geterr()

        def f_user(z: Any) -> Any:
            with np.errstate(**caller):
                return f(z)

        with np.errstate(all="ignore"):
            yield f_user

    def stop_reducer(self, sync_stop: Any) -> Callable[[Any], bool] | None:
        """The cross-process ``any(active)`` for ``sync_stop``, or ``None`` (stop locally).

        Only backends with a notion of process groups support a synchronised stop (torch:
        ``torch.distributed``); elsewhere any value other than ``None``/``False`` raises.
        """
        if sync_stop is None or sync_stop is False:
            return None
        raise ValueError(
            f"sync_stop={sync_stop!r} is not supported on the {self.name!r} backend: a "
            "synchronised stop needs torch.distributed (backend 'torch') or a named JAX axis "
            "(backend 'jax')"
        )

    def is_traced(self, x: Any) -> bool:
        return False  # eager arrays are always concrete

    def guard_inplace(self, leaves: list[Any]) -> tuple[list[Any], Callable[[list[Any]], bool]]:
        """Where writes cannot be seen: ``f`` returning its argument itself counts as one."""

        def wrote_into(outputs: list[Any]) -> bool:
            return any(out is inp for out, inp in zip(outputs, leaves, strict=False))

        return leaves, wrote_into
