"""Tiny helpers over array_api_compat used across the core."""

from __future__ import annotations

from typing import Any

from array_api_compat import device


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
