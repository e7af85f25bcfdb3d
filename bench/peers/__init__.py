"""Peer rows: the fixed-point / root solvers people use today, run on the benchmark's Cases.

``peer_solvers(case, tol=..., max_iter=...)`` lists the installed peers of ``case.framework``
as :class:`PeerSolver` rows; ``missing_peers(framework)`` gives one line per peer that is
not installed (or fails to import). Per framework:

* torch: torchdeq ``anderson``, ``broyden``, ``fixed_point_iter``;
* jax: jaxopt ``FixedPointIteration``, ``AndersonAcceleration``, ``Broyden``; optimistix
  ``FixedPointIteration``, ``Newton``;
* numpy: scipy.optimize ``anderson``, ``broyden1`` (``alpha=1``), ``newton_krylov``;
* cupy: none.

Every peer gets a "defaults" row (the library's own hyperparameters; only the tolerance
and the iteration cap are set, so that it targets the benchmark criterion
``||f(z)_b - z_b|| <= tol ||f(z)_b||`` for every sample ``b``) and, where some setting makes
it faster on the benchmark problems, a "tuned" row (the reasons are in the per-library
modules). Each peer's own stopping rule is translated to that criterion as tightly as it
allows: per-sample relative rules (torchdeq) get ``tol`` as is; absolute, whole-batch or
elementwise rules (jaxopt, optimistix, scipy) get the tightest threshold that implies it,
using ``min_b ||f(z0)_b||`` (one untimed call of the raw ``f``) for ``||f(z*)_b||``.
``PeerSolver.settings`` holds the arguments actually passed and ``PeerSolver.notes`` the rule.
Whether a peer's answer meets the criterion is decided by the runner, not here.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings

from ..case import Case
from ._common import PeerSolver

__all__ = ["PEERS", "PeerSolver", "missing_peers", "peer_solvers"]

#: framework -> the peer libraries benchmarked on it (import names)
PEERS: dict[str, tuple[str, ...]] = {
    "torch": ("torchdeq",),
    "jax": ("jaxopt", "optimistix"),
    "numpy": ("scipy",),
    "cupy": (),
}

_INSTALL = "pip install -c constraints.txt -e '.[bench]'"


def _import_error(library: str) -> str | None:
    """``None`` if ``library`` imports, else one line saying why not."""
    if importlib.util.find_spec(library) is None:
        return f"{library} not installed: {_INSTALL}"
    try:
        with warnings.catch_warnings():  # jaxopt warns that it is no longer maintained
            warnings.simplefilter("ignore", DeprecationWarning)
            importlib.import_module(library)
    except Exception as exc:  # a broken or incompatible install: report, don't crash
        return f"{library} installed but fails to import ({type(exc).__name__}: {exc})"
    return None


def missing_peers(framework: str) -> list[str]:
    """One line per peer library of ``framework`` that cannot be used here, with the fix."""
    if framework not in PEERS:
        raise ValueError(f"unknown framework {framework!r}; expected one of {', '.join(PEERS)}")
    return [msg for lib in PEERS[framework] if (msg := _import_error(lib)) is not None]


def peer_solvers(case: Case, *, tol: float, max_iter: int) -> list[PeerSolver]:
    """The peer rows for ``case`` (installed peers only; see :func:`missing_peers`).

    Building the rows calls the raw ``case.f`` once on ``case.z0`` (untimed) for the peers
    whose stopping rule needs a scale. ``PeerSolver.make`` and the callable it returns may
    raise; record the error in the row.
    """
    if case.framework not in PEERS:
        raise ValueError(f"unknown framework {case.framework!r}")
    rows: list[PeerSolver] = []
    for library in PEERS[case.framework]:
        if _import_error(library) is not None:
            continue
        module = importlib.import_module(f"{__name__}._{library}")
        rows.extend(module.peers(case, tol=float(tol), max_iter=int(max_iter)))
    return rows
