"""Array libraries eqsolve can run on, imported lazily.

Each backend module (``numpy``, ``torch``, ``jax``, ``array_api_strict``, and ``cupy.backend``
in the ``cupy`` package) defines a ``BACKEND`` object with:

* ``name``: the backend's name;
* ``xp``: its Array-API namespace (through array_api_compat);
* ``convert(x)``: an array of another library -> this backend's array (DLPack where possible);
* ``run(f, z0, solver, rule, sync_stop=None)``: drive ``core.loop`` to the end and return
  the final ``LoopState`` (a Python loop eagerly, ``lax.while_loop`` under JAX);
  ``sync_stop`` makes several processes/devices stop together (torch: ``True`` or a
  ``torch.distributed`` process group; jax: mapped axis name(s); elsewhere unsupported);
* ``flushes_subnormals``: whether its arithmetic may flush subnormal results to zero (XLA
  does), so the stopping rule must not trust residuals below the smallest normal number;
* ``is_traced(x)``: whether ``x`` is an abstract value under a JAX transformation (no host
  reads, no warnings then);
* ``guard_inplace(leaves)``: the arrays to hand ``f`` instead of ``leaves`` and a test
  ``wrote_into(outputs) -> bool`` telling, after the call, whether ``f`` wrote into them
  (NumPy: read-only views, a write raises; PyTorch: version counters; JAX: immutable;
  CuPy, array-api-strict: ``f`` returning its argument itself).

Importing ``eqsolve`` imports none of the frameworks: a backend module is imported the first
time it is asked for, and a missing package gives an error that says what to install.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import array_api_compat as aac

#: backend name -> (module providing the array library, pip extra that installs it)
_PACKAGES: dict[str, tuple[str, str]] = {
    "numpy": ("numpy", "numpy"),
    "torch": ("torch", "eqsolve[torch]"),
    "jax": ("jax", "eqsolve[jax]"),
    "cupy": ("cupy", "eqsolve[cupy]"),
    "array_api_strict": ("array_api_strict", "array-api-strict"),
}

BACKEND_NAMES: tuple[str, ...] = tuple(_PACKAGES)

#: backend name -> its module under this package, where it is not the name itself
_MODULES: dict[str, str] = {"cupy": "cupy.backend"}


class Backend(Protocol):
    name: str
    xp: Any
    flushes_subnormals: bool

    def convert(self, x: Any) -> Any: ...

    def run(
        self, f: Callable[[Any], Any], z0: Any, solver: Any, rule: Any, sync_stop: Any = None
    ) -> Any: ...

    def is_traced(self, x: Any) -> bool: ...

    def guard_inplace(self, leaves: list[Any]) -> tuple[list[Any], Callable[[list[Any]], bool]]: ...


def never_written(outputs: list[Any]) -> bool:
    """``guard_inplace``'s test where a write cannot happen unnoticed (it raises, or arrays
    are immutable)."""
    return False


class BackendUnavailableError(ModuleNotFoundError):
    """The requested backend's array library is not installed (or has no device)."""


def get_backend(name: str) -> Backend:
    """The backend called ``name``, importing its array library now.

    Raises:
        ValueError: unknown name.
        BackendUnavailableError: the library is not installed, or (CuPy) no GPU is usable.
    """
    if not isinstance(name, str) or name not in _PACKAGES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    package, extra = _PACKAGES[name]
    try:
        importlib.import_module(package)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend {name!r} needs the package {package!r}, which is not installed; "
            f"install it with: pip install -c constraints.txt '{extra}' (from a clone of "
            "eqsolve: constraints.txt pins the CPU build of torch; without it pip may fetch "
            "several GB of CUDA wheels)"
        ) from exc
    module = importlib.import_module(f"{__name__}.{_MODULES.get(name, name)}")
    backend: Backend = module.BACKEND
    return backend


def backend_name_of(xp: Any) -> str:
    """Name of the backend whose namespace is ``xp`` (from ``array_namespace``)."""
    checks: list[tuple[str, Callable[[Any], bool]]] = [
        ("numpy", aac.is_numpy_namespace),
        ("torch", aac.is_torch_namespace),
        ("jax", aac.is_jax_namespace),
        ("cupy", aac.is_cupy_namespace),
        ("array_api_strict", aac.is_array_api_strict_namespace),
    ]
    for name, check in checks:
        if check(xp):
            return name
    raise TypeError(
        f"arrays of namespace {getattr(xp, '__name__', xp)!r} are not supported; "
        f"supported backends: {', '.join(BACKEND_NAMES)}"
    )
