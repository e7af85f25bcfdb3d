"""The peer-row contract (:class:`PeerSolver`) and the tolerance translation shared by peers."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from ..case import Case

#: largest dense Jacobian (bytes) a peer may materialise before its row is refused in make()
DENSE_JACOBIAN_LIMIT = 256 * 2**20


@dataclass
class PeerSolver:
    """One peer row: a library's solver with fixed settings, ready to run on one Case.

    ``make(f)`` builds the solve for the map ``f`` (the case's raw ``f`` for timing, or an
    instrumented one for counting) and returns a zero-argument callable that solves from
    ``case.z0`` and returns ``z*`` as a native array shaped like ``case.z0`` (not yet
    synchronised: the runner calls ``case.sync``). On JAX the whole solve is ``jax.jit``-ed
    once inside ``make``: the first call of the returned callable compiles, later calls run.
    ``make`` and the callable may raise (a peer that cannot handle the case, a failed solve);
    the runner records the error in the row instead of stopping. A solve that stops at
    ``max_iter`` returns its last (or best) iterate without raising; the runner's float64
    residual check then reports it as not converged.

    ``grad(g)``, where given, returns ``dL/dx`` for ``L = sum(z* * g)`` (``x = case.x``) by the
    peer's own implicit differentiation of ``case.f_x``; it runs the forward solve too (on
    JAX: one jitted forward+backward, compiled on the first call). ``None``: unsupported.
    """

    library: str  # "torchdeq" | "jaxopt" | "optimistix" | "scipy"
    method: str  # "picard" | "anderson" | "broyden" | "newton" | "newton-krylov"
    variant: str  # "defaults" | "tuned"
    settings: dict[str, Any]  # the arguments actually passed (JSON-serialisable)
    make: Callable[[Callable[[Any], Any]], Callable[[], Any]]
    grad: Callable[[Any], Any] | None = None
    notes: str = ""  # stopping rule in the peer's terms, caveats (one or two sentences)
    call: str = field(default="")  # the library call, e.g. "torchdeq.solver.anderson_solver"
    #: a known, measured failure mode of these settings: the table shows it beside the row's
    #: own diagnosis when the row does not converge
    caveat: str = ""

    @property
    def name(self) -> str:
        return f"{self.library}.{self.method} ({self.variant})"


def sample_scales(case: Case) -> np.ndarray:
    """Per-sample ``||f(z0)_b||`` in float64, from one untimed call of the case's raw ``f``.

    Peers whose stopping rule is absolute (jaxopt, optimistix, scipy) need a scale to target
    the benchmark's relative criterion ``||f(z)_b - z_b|| <= tol ||f(z)_b||``; ``f(z0)``
    stands in for ``f(z*)`` (close on the DEQ problems from ``z0 = 0``, and an
    underestimate when ``||z*|| > ||f(z0)||``, which errs on the strict side).
    """
    fz = case.f(case.z0)
    if case.framework == "torch":
        fz = fz.detach()
    return row_norms(case.to_numpy(case.sync(fz)))


def row_norms(a: Any) -> np.ndarray:
    """Per-sample 2-norms of a ``(B, ...)`` array, in float64."""
    a = np.asarray(a, dtype=np.float64)
    a = a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1)
    return np.asarray(np.linalg.norm(a, axis=1))


def scale_floor(case: Case) -> float:
    """``min_b ||f(z0)_b||`` (1.0 if that is 0 or not finite): the scale absolute rules use."""
    return floor_of(sample_scales(case))


def floor_of(scales: np.ndarray) -> float:
    """``min(scales)``, or 1.0 if that is 0 or not finite (or there are none)."""
    m = float(scales.min()) if scales.size else 1.0
    return m if math.isfinite(m) and m > 0 else 1.0


def sample_size(case: Case) -> int:
    """Entries per sample (``prod(z0.shape[1:])``)."""
    shape = tuple(case.z0.shape)
    return int(np.prod(shape[1:])) if len(shape) > 1 else 1


def batch_size(case: Case) -> int:
    shape = tuple(case.z0.shape)
    return int(shape[0]) if shape else 1


def itemsize(case: Case) -> int:
    return int(np.dtype(case.dtype).itemsize)


def round_sig(x: float, digits: int = 6) -> float:
    """``x`` rounded to ``digits`` significant digits (readable settings in the JSON)."""
    if x == 0 or not math.isfinite(x):
        return float(x)
    return float(f"{x:.{digits}g}")


def jax_precision_scope(case: Case) -> contextlib.AbstractContextManager[Any]:
    """A context in which a JAX peer traces and runs ``case``: x64 off for float32 cases.

    The benchmark enables ``jax_enable_x64`` for its float64 rows; jaxopt's
    ``AndersonAcceleration`` and optimistix's ``FixedPointIteration`` then create float64
    state (``jnp.zeros``/``jnp.array(inf)`` at the default dtype) next to float32 iterates and
    fail to trace ("cond branches must have equal output types"). Float32 users run with
    x64 off, so the float32 rows trace and run in that mode. Every call of a jitted solve
    must happen inside the same scope (the x64 flag is part of jit's cache key).
    """
    if case.dtype != "float32":
        return contextlib.nullcontext()
    return x64_off()


def x64_off() -> contextlib.AbstractContextManager[Any]:
    """A context in which JAX traces and runs with ``jax_enable_x64`` off (float32 users'
    mode), whatever an earlier float64 computation in the process switched on."""
    import jax

    try:
        return cast(contextlib.AbstractContextManager[Any], jax.enable_x64(False))
    except (AttributeError, TypeError):  # older JAX: the experimental context manager
        import jax.experimental as jax_experimental

        disable_x64 = getattr(jax_experimental, "disable_x64")  # noqa: B009 - absent in new JAX
        return cast(contextlib.AbstractContextManager[Any], disable_x64())
