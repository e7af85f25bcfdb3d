"""Wall-clock measurement: medians after warm-up, and the floor ``f-evals x one f call``.

Every time here is ``time.perf_counter`` around a call followed by the case's ``sync``
(``block_until_ready`` on JAX, a device synchronise on CUDA), so asynchronous dispatch is
not mistaken for speed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .case import Case


@dataclass(frozen=True)
class Timing:
    """Median and range of repeated runs, in seconds."""

    median: float
    min: float
    max: float
    reps: int

    def as_ms(self) -> dict[str, float]:
        return {"median_ms": 1e3 * self.median, "min_ms": 1e3 * self.min, "max_ms": 1e3 * self.max}


def time_call(fn: Callable[[], Any], sync: Callable[[Any], Any], reps: int) -> Timing:
    """Median (min-max) of ``reps`` timed calls of ``fn``; the caller has already warmed up."""
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), max(times), len(times))


def first_call(fn: Callable[[], Any], sync: Callable[[Any], Any]) -> tuple[Any, float]:
    """Run ``fn`` once (warm-up; on JAX the compilation) and return its result and time."""
    t0 = time.perf_counter()
    out = sync(fn())
    return out, time.perf_counter() - t0


def f_call_time(case: Case, z: Any, reps: int = 50) -> Timing:
    """Time of one evaluation of ``case.f`` at ``z``.

    Eager backends: the median of single calls. JAX: one call inside compiled code, i.e. a
    jitted ``fori_loop`` of 32 chained evaluations divided by 32, because an eqsolve or peer
    solve calls ``f`` inside one compiled loop, where the per-call dispatch cost of a jitted
    ``f`` called from Python (tens of microseconds) is not paid. Timing single jitted calls
    would overstate the floor.
    """
    if case.framework == "jax":
        import jax

        chain = 32
        f = case.f

        @jax.jit
        def chained(z0: Any) -> Any:
            return jax.lax.fori_loop(0, chain, lambda _, z: f(z), z0)

        case.sync(chained(z))
        t = time_call(lambda: chained(z), case.sync, max(5, reps // 5))
        return Timing(t.median / chain, t.min / chain, t.max / chain, t.reps)
    case.sync(case.f(z))
    return time_call(lambda: case.f(z), case.sync, reps)
