"""Tiny helpers over array_api_compat used across the core."""

from __future__ import annotations

from typing import Any

from array_api_compat import device


def device_of(x: Any) -> Any:
    """Device of ``x`` (``None`` for a JAX tracer under ``jit``)."""
    return device(x)
