"""Tiny helpers over array_api_compat used across the core."""

from __future__ import annotations

from typing import Any

import array_api_extra as xpx
from array_api_compat import device, is_writeable_array


def device_of(x: Any) -> Any:
    """Device of ``x`` (``None`` for a JAX tracer under ``jit``)."""
    return device(x)


def scaled_norm(xp: Any, x: Any) -> Any:
    """Per-row 2-norm of ``x`` ``(B, n)`` that neither underflows nor overflows.

    Computed as ``max|x| * ||x / max|x|||``: a float32 row of 1e-30 entries has a plain
    2-norm of 0 (the squares underflow), which would make a tiny cotangent look like zero.
    Rows with a NaN/inf give a non-finite norm; all-zero rows give 0.
    """
    s = xp.max(xp.abs(x), axis=1)
    ok = (s > 0) & xp.isfinite(s)
    s_safe = xp.where(ok, s, xp.ones_like(s))
    scaled = xp.linalg.vector_norm(x / s_safe[:, None], axis=1) * s_safe
    return xp.where(ok, scaled, s)


def inverse_norm(xp: Any, x: Any) -> Any:
    """``1 / ||x_b||`` per row (max-scaled norm), or 1 where that norm is 0 or not finite.

    The per-sample factor that brings a vector to unit size before products that would
    underflow or overflow at its own scale (Anderson's Gram matrix, Broyden's secant pair).
    """
    norm = scaled_norm(xp, x)
    ok = (norm > 0) & (norm < float("inf"))
    ones = xp.ones_like(norm)
    return xp.where(ok, 1.0 / xp.where(ok, norm, ones), ones)


def set_at(x: Any, index: Any, value: Any) -> Any:
    """``x[index] = value``: in place where ``x`` is writeable, else functionally (JAX).

    The solvers' ring buffers are their own (created by ``init``), so writing in place is
    what ``array_api_extra.at(x)[index].set(value)`` does on NumPy/PyTorch/CuPy anyway;
    calling ``__setitem__`` directly skips its dispatch (about 8 us per write on PyTorch,
    four writes per Anderson step).
    """
    if is_writeable_array(x):
        x[index] = value
        return x
    return xpx.at(x)[index].set(value)


def batch_zeros(xp: Any, like: Any, tail: tuple[int, ...]) -> Any:
    """Zeros of shape ``(B, *tail)``, built from ``like`` ``(B, n)``.

    Deriving them from the state (rather than ``xp.zeros``) gives them the state's batch
    layout: under ``jax.jit`` with a batch sharded over an Explicit mesh axis, an unsharded
    ``xp.zeros`` history buffer cannot be combined with the sharded state. Elsewhere it is
    the same array ``xp.zeros`` gives (a fresh, writeable one).
    """
    B = like.shape[0]
    if is_writeable_array(like):  # eager arrays have no batch layout: one operation
        return xp.zeros((B, *tail), dtype=like.dtype, device=device_of(like))
    base = xp.reshape(xp.zeros_like(like[:, :1]), (B,) + (1,) * len(tail))
    return base + xp.zeros(tail, dtype=like.dtype, device=device_of(like))
