"""What every fixed-point solver provides, and construction by name with checked options.

A solver is a small frozen dataclass of hyperparameters with three pure functions over a
NamedTuple state of fixed-shape arrays (batch axis first, so each sample owns its history):

* ``init(xp, z, g)``: start from the first evaluated point ``z`` with residual ``g = f(z)-z``;
* ``propose(xp, state, z, g, k)``: the next point to evaluate, from the current point and
  the history (``k`` = number of updates done so far);
* ``update(xp, state, z, g, z_new, g_new, k)``: record the new evaluation.

The solver never calls ``f``: the shared loop (``core.loop``) does, once per iteration, and
owns the stopping rule, the best-iterate bookkeeping and per-sample freezing. This is what
lets the same solver run under a Python loop or ``lax.while_loop``, and be reused on a
linear map (the adjoint solve) or replaced by fused GPU kernels.

Rules for implementations: no Python control flow on array values, ``xp.where`` instead of
branches, ring buffers written at ``k % m`` through ``array_api_extra.at`` (in place on
eager backends: the buffers are private to the state), every array created with the dtype
and device of ``z``.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar


class FixedPointSolver(abc.ABC):
    """Base class of the fixed-point solvers (see the module docstring for the protocol)."""

    #: registry name, e.g. ``"anderson"``
    name: ClassVar[str]

    @abc.abstractmethod
    def init(self, xp: Any, z: Any, g: Any) -> Any:
        """State after the first evaluation ``g = f(z) - z`` (z, g: ``(B, n)``)."""

    @abc.abstractmethod
    def propose(self, xp: Any, state: Any, z: Any, g: Any, k: Any) -> Any:
        """Next point to evaluate, ``(B, n)``."""

    @abc.abstractmethod
    def update(self, xp: Any, state: Any, z: Any, g: Any, z_new: Any, g_new: Any, k: Any) -> Any:
        """State after evaluating ``z_new`` (``k`` = updates done before this one)."""


def damped_step(z: Any, g: Any, beta: float) -> Any:
    """The plain (damped) fixed-point step ``z + beta g`` (no product when ``beta = 1``):
    Picard's step, and the fallback of the mixing solvers."""
    return z + g if beta == 1.0 else z + beta * g


_REGISTRY: dict[str, type[FixedPointSolver]] = {}


def register(cls: type[FixedPointSolver]) -> type[FixedPointSolver]:
    """Class decorator: make a solver constructible by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def solver_names() -> list[str]:
    return sorted(_REGISTRY)


def solver_option_names(name: str) -> list[str]:
    """The hyperparameters of the registered solver ``name`` (empty for an unknown name)."""
    cls = _REGISTRY.get(name.lower())
    return [] if cls is None else [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]


def make_solver(solver: str | FixedPointSolver, options: dict[str, Any]) -> FixedPointSolver:
    """Turn ``solver`` (a name or a configured object) plus keyword options into a solver.

    Raises:
        ValueError: unknown solver name.
        TypeError: unknown option name (misspellings are never ignored), options given
            together with an already configured solver object, or a wrong ``solver`` type.
    """
    if isinstance(solver, FixedPointSolver):
        if options:
            raise TypeError(
                f"solver options {sorted(options)} were given with a configured solver "
                f"object {solver!r}; set them on the object instead"
            )
        return solver
    if not isinstance(solver, str):
        raise TypeError(
            f"solver must be a name ({', '.join(solver_names())}) or a solver object such "
            f"as eqsolve.Anderson(m=5); got {type(solver).__name__}"
        )
    cls = _REGISTRY.get(solver.lower())
    if cls is None:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(solver_names())}")
    valid = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for solver {solver!r}; "
            f"valid options: {', '.join(sorted(valid)) or '(none)'}"
        )
    return cls(**options)


def check_positive(name: str, value: Any, *, integer: bool = False) -> None:
    """Validate a hyperparameter: finite and > 0 (and an int when ``integer``)."""
    if integer:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
