"""An independent check of the ``Solution`` contract, in float64 NumPy, outside eqsolve.

The contract: for every sample, ``status == CONVERGED`` iff the stopping rule
``||f(z) - z|| <= tol ||f(z)|| + atol`` holds at the returned ``value`` (and DIVERGED is the
only status allowed to meet the residual test without being CONVERGED), and ``residual`` is
the relative residual ``||f(z) - z|| / ||f(z)||`` of ``value``.

:func:`check_contract` re-evaluates the map (a float64 NumPy version of it, written in the
test) at the returned values, on the whole returned batch at once, with 2-norms computed
here by max-scaling (no eqsolve code). Rounding slack: the solver evaluated ``f`` and the
rule in the state's dtype, so the float64 numbers may differ from its own by a few units of
that dtype's roundoff of ``||f(z)|| + ||z||``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from conftest import to_numpy

CONVERGED, MAX_ITER, NONFINITE, DIVERGED = 0, 1, 2, 3


def row_norms(a: np.ndarray) -> np.ndarray:
    """2-norm of each row of ``a`` (B, n) in float64, max-scaled (no under/overflow)."""
    a = np.asarray(a, dtype=np.float64)
    s = np.max(np.abs(a), axis=1)
    ok = np.isfinite(s) & (s > 0)
    safe = np.where(ok, s, 1.0)
    with np.errstate(all="ignore"):
        return np.where(ok, safe * np.sqrt(np.sum((a / safe[:, None]) ** 2, axis=1)), s)


def _rows(x: np.ndarray, one_system: bool) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(1, -1) if one_system else x.reshape(x.shape[0], -1)


def check_contract(
    sol,
    f64: Callable[[np.ndarray], np.ndarray],
    *,
    tol: float,
    atol: float,
    dtype: str,
    one_system: bool = False,
    slack_ulps: float = 64.0,
    eps: float | None = None,
) -> dict[str, np.ndarray]:
    """Assert the contract for ``sol`` (a single-array state); return the float64 figures.

    ``f64`` maps a float64 NumPy array shaped like ``sol.value`` to ``f`` of it.
    ``one_system``: the state is one system (``batch_axis=None`` or a 1-D/0-D state).
    ``eps``: the unit roundoff of the arithmetic ``f`` was evaluated in (default: that of
    ``dtype``); the slack is ``slack_ulps * eps * sqrt(n) * (||f(z)|| + ||z||)``, plus what
    numbers below ``dtype``'s smallest normal lose on any backend (XLA flushes them to 0).
    """
    value = np.asarray(to_numpy(sol.value), dtype=np.float64)
    status = np.atleast_1d(to_numpy(sol.status)).astype(int)
    residual = np.atleast_1d(to_numpy(sol.residual)).astype(np.float64)
    converged = np.atleast_1d(to_numpy(sol.converged)).astype(bool)
    assert set(np.unique(status)) <= {CONVERGED, MAX_ITER, NONFINITE, DIVERGED}, status
    np.testing.assert_array_equal(converged, status == CONVERGED)

    with np.errstate(all="ignore"):
        fv = np.asarray(f64(value.copy()), dtype=np.float64)
    z = _rows(value, one_system)
    fz = _rows(fv, one_system)
    with np.errstate(all="ignore"):
        g = fz - z
    g_n, f_n, z_n = row_norms(g), row_norms(fz), row_norms(z)
    info = np.finfo(dtype)
    eps = float(info.eps) if eps is None else eps
    n = z.shape[1]
    slack = slack_ulps * eps * np.sqrt(n) * (f_n + z_n) + 4 * np.sqrt(n) * float(info.tiny)
    bound = tol * f_n + atol
    finite = np.isfinite(g_n) & np.isfinite(f_n)

    conv = status == CONVERGED
    assert finite[conv].all(), "a CONVERGED value is not finite under f"
    # CONVERGED => the rule holds at the value
    bad = conv & ~(g_n <= bound + slack)
    assert not bad.any(), (
        f"CONVERGED but the rule fails at the value: ||g||={g_n[bad]}, bound={bound[bad]}"
    )
    # MAX_ITER / NONFINITE => the rule does not (clearly) hold at the value
    failed = (status == MAX_ITER) | (status == NONFINITE)
    wrong = failed & finite & (g_n + slack < bound)
    assert not wrong.any(), (
        f"status {status[wrong]} but the rule holds at the value: ||g||={g_n[wrong]}, "
        f"bound={bound[wrong]}"
    )
    # residual is the relative residual of the value (where it is finite and meaningful)
    with np.errstate(all="ignore"):
        rel = np.where(g_n == 0, 0.0, g_n / f_n)
        rel_slack = slack / np.where(f_n > 0, f_n, np.inf)
    show = finite & np.isfinite(rel) & np.isfinite(residual)
    err = np.abs(residual - rel)
    assert (err[show] <= 1e-3 * rel[show] + 2 * rel_slack[show] + 1e-300).all(), (
        f"residual {residual[show]} is not the value's {rel[show]}"
    )
    return {"status": status, "g": g_n, "f": f_n, "bound": bound, "rel": rel}
