"""Mixed precision for the PyTorch adapter: ``f`` evaluated under ``torch.autocast``.

With ``f_dtype`` (or inside an enclosing ``torch.autocast`` region) ``f`` runs in bfloat16 /
float16 and its output is cast back to the state's dtype, so the solver's iterates,
residuals, the adjoint solve and the gradients stay in float32 (float64); the solver's own
arithmetic runs with autocast disabled. A bfloat16/float16 output of ``f`` outside autocast
is a ``TypeError`` that names ``f_dtype`` (a silent cast would hide an ``f`` that
accidentally computes in low precision).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..backends.torch import autocast_dtype
from ..core.structure import leaves_of, tree_map

__all__ = ["F_DTYPES", "check_f_dtype", "precision_f"]


#: dtypes ``f_dtype`` accepts (what ``torch.autocast`` supports as a lower precision)
F_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)


def check_f_dtype(f_dtype: Any) -> torch.dtype | None:
    """``f_dtype``: ``None`` or one of :data:`F_DTYPES`."""
    if f_dtype is None:
        return None
    if not isinstance(f_dtype, torch.dtype):
        raise TypeError(
            f"f_dtype must be None, torch.bfloat16 or torch.float16, got {type(f_dtype).__name__}"
        )
    if f_dtype not in F_DTYPES:
        raise ValueError(
            f"f_dtype must be None, torch.bfloat16 or torch.float16 (the lower precisions "
            f"torch.autocast runs f in), got {f_dtype}"
        )
    return f_dtype


def precision_f(
    f: Callable[[Any], Any], state_dtype: torch.dtype, f_dtype: torch.dtype | None,
    device_type: str,
) -> Callable[[Any], Any]:
    """``f`` as the solver calls it: in the precision policy of the call.

    With ``f_dtype`` (or inside an enclosing ``torch.autocast`` region on the state's
    device) ``f`` runs under autocast and every floating tensor it returns is cast back to
    ``state_dtype`` (a differentiable cast: gradients come back in ``state_dtype`` too).
    Otherwise ``f`` is called as it is, and a bfloat16/float16 first output for a state of
    another dtype raises a ``TypeError`` that says how to opt in (other dtype mismatches get
    the generic error of :func:`eqsolve.solve`).
    """
    if f_dtype is not None and state_dtype.is_floating_point:
        if torch.finfo(f_dtype).bits >= torch.finfo(state_dtype).bits:
            raise ValueError(
                f"f_dtype={f_dtype} is not a lower precision than the state's dtype "
                f"{state_dtype}; f_dtype evaluates f in bfloat16/float16 for a float32 or "
                "float64 state"
            )

    def cast(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != state_dtype:
            return t.to(state_dtype)
        return t

    if f_dtype is not None:

        def f_low(z: Any) -> Any:
            with torch.autocast(device_type, dtype=f_dtype):
                out = f(z)
            return tree_map(cast, out)

        return f_low
    if autocast_dtype(device_type) is not None:  # f runs under the caller's autocast

        def f_autocast(z: Any) -> Any:
            return tree_map(cast, f(z))

        return f_autocast

    checked = False

    def f_checked(z: Any) -> Any:
        nonlocal checked
        out = f(z)
        if not checked:  # the first call is f(z0)
            checked = True
            leaves = leaves_of(out)
            for i, t in enumerate(leaves):
                if isinstance(t, torch.Tensor) and t.dtype in F_DTYPES and t.dtype != state_dtype:
                    where = "f(z0)" if not isinstance(out, (tuple, list)) else f"f(z0)[{i}]"
                    raise TypeError(
                        f"{where} has dtype {t.dtype} but z0 has dtype {state_dtype}. To "
                        f"evaluate f in lower precision pass f_dtype={t.dtype} (f then runs "
                        "under torch.autocast and its output is cast back to the state's "
                        "dtype), call it inside torch.autocast, or cast f's output yourself"
                    )
        return out

    return f_checked
