"""Count the evaluations of ``f`` and record the residual at every evaluated point.

``instrument(case, f)`` returns ``(f_wrapped, recorder)``: ``f_wrapped`` computes exactly
what ``f`` computes, and every time it runs, ``recorder`` adds one to :attr:`Recorder.nfev`
and appends the batch-max relative residual at the evaluated point,

    ``max_b ||f(z)_b - z_b|| / ||f(z)_b||``  (2-norms over each sample's entries, float64),

to :attr:`Recorder.history` (``||f(z)_b|| == 0`` gives ``inf``, or ``0`` when ``z_b == 0``
too). The same wrapper serves eqsolve rows and peer rows, so the counts and the
residual-vs-f-evaluation curves are independent of what each solver reports about itself.
It is meant for separate, untimed runs: the host work per call (a float64 residual and,
on JAX, a host callback) costs far more than the solver overhead being measured.

Eager frameworks (NumPy, PyTorch, CuPy): a Python wrapper. On PyTorch the residual is
computed from detached tensors under ``torch.no_grad()``; the tensor ``f`` returned is
handed back untouched, so autograd through ``f_wrapped`` is that of ``f``. Reading the
residual synchronises the device (``.item()``/``float()``).

JAX: the wrapper calls ``jax.debug.callback(..., ordered=True)`` with ``z`` and ``f(z)``, so
it works eagerly and inside ``jax.jit``, ``lax.while_loop``/``fori_loop``/``scan`` and
``lax.cond``, and the callbacks run in program order. How transformed calls count (checked in
``tests/test_bench_instrument.py``):

* ``jit`` / loops: once per executed call of ``f`` (a loop body that calls ``f`` once counts
  once per iteration). A call of ``f`` whose result the program never uses still counts:
  the callback is a side effect and keeps it alive, where XLA would otherwise drop it (e.g.
  jaxopt's ``AndersonAcceleration.init_state`` evaluates ``f(z0)`` only for ``aux``).
* ``jax.jvp``, ``jax.linearize``, ``jax.grad``/``vjp``, ``jax.jacfwd``, ``jax.jacrev``: once
  per primal evaluation. The callback sees primal values only, and under ``jacfwd``
  (``vmap`` over tangents) the primal is not batched, so a whole Jacobian counts one
  evaluation. Products with the linearised ``f`` (the JVPs a Newton-Krylov or GMRES step
  applies after ``jax.linearize``) are not evaluations of ``f`` and are not counted.
* ``jax.vmap`` with a batched ``z``: JAX runs the callback once per mapped element, so a
  vmapped call counts once per element (each element's residual is recorded separately).

Call :meth:`Recorder.reset` between runs. Reading :attr:`Recorder.nfev` or
:attr:`Recorder.history` first waits for pending JAX callbacks (``jax.effects_barrier``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["Recorder", "instrument", "relative_residual"]


def relative_residual(z: Any, fz: Any) -> float:
    """``max_b ||fz_b - z_b|| / ||fz_b||`` in float64 NumPy, for arrays already on the host."""
    z64 = np.asarray(z, dtype=np.float64)
    f64 = np.asarray(fz, dtype=np.float64)
    if z64.ndim == 0:
        z64, f64 = z64.reshape(1, 1), f64.reshape(1, 1)
    z64 = z64.reshape(z64.shape[0], -1)
    f64 = f64.reshape(f64.shape[0], -1)
    num = np.linalg.norm(f64 - z64, axis=1)
    den = np.linalg.norm(f64, axis=1)
    return _batch_max(num, den)


def _batch_max(num: np.ndarray, den: np.ndarray) -> float:
    if num.size == 0:
        return 0.0
    # NaN in z or f(z) (an overflowed iterate: inf - inf); tested first, as the comparisons
    # below are False for NaN and would make it look like an exact fixed point (0)
    if np.isnan(num).any() or np.isnan(den).any():
        return float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))
    if np.isnan(ratio).any():  # inf / inf
        return float("nan")
    return float(ratio.max())


class Recorder:
    """What the instrumented ``f`` saw: number of calls and the residual at each call."""

    def __init__(self, framework: str) -> None:
        self.framework = framework
        self._nfev = 0
        self._history: list[float] = []

    def record(self, residual: float) -> None:
        """Count one evaluation of ``f`` with batch-max relative residual ``residual``."""
        self._nfev += 1
        self._history.append(float(residual))

    def _record_host(self, z: Any, fz: Any) -> None:  # the JAX callback (host arrays)
        self.record(relative_residual(z, fz))

    def _flush(self) -> None:
        if self.framework == "jax" and "jax" in sys.modules:
            import jax

            jax.effects_barrier()

    @property
    def nfev(self) -> int:
        """How many times ``f`` has been evaluated since the last :meth:`reset`."""
        self._flush()
        return self._nfev

    @property
    def history(self) -> list[float]:
        """Batch-max relative residual at each evaluated point, in call order (a copy)."""
        self._flush()
        return list(self._history)

    def reset(self) -> None:
        """Forget all calls (waits for pending JAX callbacks first)."""
        self._flush()
        self._nfev = 0
        self._history = []

    def __repr__(self) -> str:
        last = f", last residual {self._history[-1]:.3g}" if self._history else ""
        return f"Recorder({self.framework}: {self._nfev} evaluations{last})"


def instrument(
    case_or_framework: Any, f: Callable[[Any], Any]
) -> tuple[Callable[[Any], Any], Recorder]:
    """Wrap ``f`` so that its evaluations are counted and their residuals recorded.

    Args:
        case_or_framework: a :class:`~bench.case.Case` (its ``framework`` is used)
            or a framework name: ``"numpy"``, ``"torch"``, ``"jax"`` or ``"cupy"``.
        f: the map ``z -> f(z)`` on that framework's ``(B, ...)`` arrays (batch axis 0).

    Returns:
        ``(f_wrapped, recorder)``; ``f_wrapped(z)`` returns ``f(z)`` unchanged.
    """
    framework = getattr(case_or_framework, "framework", case_or_framework)
    if framework not in ("numpy", "torch", "jax", "cupy"):
        raise ValueError(
            f"unknown framework {framework!r}; expected 'numpy', 'torch', 'jax' or 'cupy'"
        )
    rec = Recorder(framework)
    if framework == "jax":
        return _instrument_jax(f, rec), rec
    if framework == "torch":
        return _instrument_torch(f, rec), rec
    if framework == "cupy":
        return _instrument_cupy(f, rec), rec
    return _instrument_numpy(f, rec), rec


def _instrument_numpy(f: Callable[[Any], Any], rec: Recorder) -> Callable[[Any], Any]:
    def f_numpy(z: Any) -> Any:
        fz = f(z)
        rec.record(relative_residual(z, fz))
        return fz

    return f_numpy


def _instrument_torch(f: Callable[[Any], Any], rec: Recorder) -> Callable[[Any], Any]:
    import torch

    def f_torch(z: Any) -> Any:
        fz = f(z)
        with torch.no_grad():
            zd = z.detach().to(torch.float64)
            fd = fz.detach().to(torch.float64)
            if zd.ndim == 0:
                zd, fd = zd.reshape(1, 1), fd.reshape(1, 1)
            zd, fd = zd.reshape(zd.shape[0], -1), fd.reshape(fd.shape[0], -1)
            num = torch.linalg.vector_norm(fd - zd, dim=1)
            den = torch.linalg.vector_norm(fd, dim=1)
            rec.record(_batch_max(num.cpu().numpy(), den.cpu().numpy()))
        return fz

    return f_torch


def _instrument_cupy(f: Callable[[Any], Any], rec: Recorder) -> Callable[[Any], Any]:
    import cupy

    def f_cupy(z: Any) -> Any:
        fz = f(z)
        zd, fd = z.astype(cupy.float64), fz.astype(cupy.float64)
        if zd.ndim == 0:
            zd, fd = zd.reshape(1, 1), fd.reshape(1, 1)
        zd, fd = zd.reshape(zd.shape[0], -1), fd.reshape(fd.shape[0], -1)
        num = cupy.linalg.norm(fd - zd, axis=1)
        den = cupy.linalg.norm(fd, axis=1)
        rec.record(_batch_max(cupy.asnumpy(num), cupy.asnumpy(den)))
        return fz

    return f_cupy


def _instrument_jax(f: Callable[[Any], Any], rec: Recorder) -> Callable[[Any], Any]:
    import jax

    def f_jax(z: Any) -> Any:
        fz = f(z)
        jax.debug.callback(rec._record_host, z, fz, ordered=True)
        return fz

    return f_jax
