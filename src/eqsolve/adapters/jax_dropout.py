"""Dropout that keeps a fixed point, for JAX: the mask is a function of a key passed to ``f``.

Why: dropout with a fresh mask at every call of ``f`` leaves ``f`` without a fixed point
(:mod:`eqsolve.adapters.torch_dropout`). In JAX randomness is explicit, so the variational
kind needs no bookkeeping: draw the mask from a key that reaches ``f`` through
:func:`eqsolve.jax.fixed_point`'s ``*args``. The solver passes the same ``args`` at every
iteration (and the implicit backward differentiates the same ``f``), so every call in one
solve sees the same mask; a new key per training step gives a new mask per solve.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["variational_dropout"]


def variational_dropout(
    key: Any, x: Any, p: float, *, shared_axes: Sequence[int] = (), deterministic: bool = False
) -> Any:
    """``x * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` drawn from ``key`` (one mask per key).

    Call it inside ``f`` with a key that is one of ``f``'s arguments (not split per call):
    then the mask is the same at every solver iteration, ``f`` is one map with a fixed point,
    and the gradient (also through ``jit``/``vmap``/``grad``) is that of this map.

    Args:
        key: a ``jax.random`` key; the same key gives the same mask.
        x: the activations.
        p: drop probability in ``[0, 1)`` (a Python float).
        shared_axes: axes of ``x`` along which one mask entry is shared (e.g. the spatial
            axes of an ``(N, H, W, C)`` map for channel dropout).
        deterministic: ``True`` returns ``x`` unchanged (evaluation).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from eqsolve.jax import fixed_point, variational_dropout
        >>> def f(z, x, key):
        ...     return jnp.tanh(variational_dropout(key, 0.5 * z, 0.3) + x)
        >>> sol = fixed_point(f, jnp.zeros((2, 4)), jnp.ones((2, 4)), jax.random.key(0))
        >>> bool(sol.converged.all())
        True
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"p must be a float in [0, 1), got {p!r}")
    if deterministic or p == 0:
        return x
    x = jnp.asarray(x)
    shape = list(x.shape)
    for a in shared_axes:
        if isinstance(a, bool) or not isinstance(a, int) or not -x.ndim <= a < x.ndim:
            raise ValueError(
                f"shared_axes entry {a!r} is not an axis of an input of shape {x.shape}"
            )
        shape[a] = 1
    keep = jax.random.bernoulli(key, 1.0 - p, tuple(shape))
    return jnp.where(keep, x / (1.0 - p), jnp.zeros((), x.dtype))
