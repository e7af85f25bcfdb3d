"""What the eager backends (numpy, torch, cupy, array_api_strict) share: the Python loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.driver import run_python_loop, run_python_loop_synced
from ..core.loop import LoopState, StopRule
from ..core.solver_base import FixedPointSolver


class EagerBackend:
    """Drives ``core.loop`` with a Python loop; subclasses add ``name``, ``xp``, ``convert``."""

    name: str
    xp: Any

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
        if any_active is None:
            return run_python_loop(self.xp, f, z0, solver, rule)
        return run_python_loop_synced(self.xp, f, z0, solver, rule, any_active)

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
