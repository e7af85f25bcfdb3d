"""JAX backend: the core step under ``jax.lax.while_loop`` (works inside ``jax.jit``).

No host synchronisation happens inside the loop; the continuation test is traced. Reverse
mode through ``lax.while_loop`` is not defined: gradients of a solve come from the implicit
function theorem (a ``custom_vjp`` adapter), never from differentiating the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ..core.loop import LoopState, StopRule, loop_init, loop_step
from ..core.solver_base import FixedPointSolver


class JaxBackend:
    name = "jax"
    xp = jnp

    def convert(self, x: Any) -> Any:
        if isinstance(x, jax.Array):
            return x
        if hasattr(x, "detach"):  # torch tensor: no DLPack export while it requires grad
            x = x.detach()
        try:
            return jnp.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError, AttributeError, ValueError):
            import numpy as np

            return jnp.asarray(np.asarray(x))

    def run(
        self, f: Callable[[Any], Any], z0: Any, solver: FixedPointSolver, rule: StopRule
    ) -> LoopState:
        state = loop_init(jnp, f, z0, solver, rule)
        state = state._replace(k=jnp.asarray(0, dtype=jnp.int32))

        def keep_going(s: LoopState) -> Any:
            return (s.k < rule.max_iter) & jnp.any(s.active)

        def body(s: LoopState) -> LoopState:
            return loop_step(jnp, f, s, solver, rule)

        return jax.lax.while_loop(keep_going, body, state)

    def is_traced(self, x: Any) -> bool:
        return isinstance(x, jax.core.Tracer)


BACKEND = JaxBackend()
