"""How CuPy solves run: fused kernels or not, and how often the host synchronises.

The settings are a context variable, so ``eqsolve.cupy.options(...)`` also applies to
``eqsolve.fixed_point`` / ``eqsolve.solve`` on CuPy arrays, and to adjoint solves.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class CupyOptions:
    """How CuPy solves run: ``fused`` (None = auto, True, False) and ``sync_every``."""

    fused: bool | None = None
    sync_every: int = 8

    def __post_init__(self) -> None:
        if self.fused not in (None, True, False):
            raise TypeError(f"fused must be None (auto), True or False, got {self.fused!r}")
        se = self.sync_every
        if isinstance(se, bool) or not isinstance(se, numbers.Integral) or se < 1:
            raise ValueError(f"sync_every must be an integer >= 1, got {se!r}")


_DEFAULT_OPTIONS = CupyOptions()
_OPTIONS: contextvars.ContextVar[CupyOptions | None] = contextvars.ContextVar(
    "eqsolve_cupy_options", default=None
)


def current_options() -> CupyOptions:
    """The settings in force (those of the innermost :func:`options` block)."""
    return _OPTIONS.get() or _DEFAULT_OPTIONS


@contextlib.contextmanager
def options(*, fused: bool | None = None, sync_every: int = 8) -> Iterator[CupyOptions]:
    """Within the block, CuPy solves (also ``eqsolve.fixed_point``) use these settings.

    >>> with eqsolve.cupy.options(fused=False):              # doctest: +SKIP
    ...     sol = eqsolve.fixed_point(f, z0)                  # the generic Array-API path
    """
    opts = CupyOptions(fused, sync_every)
    token = _OPTIONS.set(opts)
    try:
        yield opts
    finally:
        _OPTIONS.reset(token)
