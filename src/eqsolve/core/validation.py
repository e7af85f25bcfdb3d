"""Checks on user input that give errors naming the offending argument."""

from __future__ import annotations

import math
import numbers
from typing import Any

import array_api_compat as aac

from ._xp import device_of
from .structure import Structure

ON_FAILURE = ("warn", "raise", "ignore")

#: iteration counts are int32 on every backend (JAX's loop counter is one): ``nfev`` =
#: ``max_iter + 2`` (a final verification call included) must fit
MAX_ITER_LIMIT = 2**31 - 3


def check_max_iter(max_iter: Any, name: str = "max_iter") -> int:
    """An int in ``[1, MAX_ITER_LIMIT]``; the error names the argument."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(max_iter).__name__}")
    value = int(max_iter)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if value > MAX_ITER_LIMIT:
        raise ValueError(
            f"{name}={value} is too large: iteration counts are int32, so {name} must be "
            f"<= {MAX_ITER_LIMIT} (2**31 - 3)"
        )
    return value


def check_batch_axis(batch_axis: Any) -> None:
    """``batch_axis``: an int, ``None`` or ``"auto"``."""
    if batch_axis is None or batch_axis == "auto":
        return
    if isinstance(batch_axis, bool) or not isinstance(batch_axis, int):
        raise TypeError(
            f"batch_axis must be an int, None or 'auto', got {type(batch_axis).__name__} "
            f"{batch_axis!r}"
        )


def check_arguments(
    f: Any, tol: Any, atol: Any, max_iter: Any, on_failure: Any, batch_axis: Any
) -> None:
    """Validate the scalar arguments of ``fixed_point``."""
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    for name, value, strict in (("tol", tol, True), ("atol", atol, False)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        value = float(value)
        if math.isnan(value) or math.isinf(value) or value < 0 or (strict and value == 0):
            bound = "> 0" if strict else ">= 0"
            raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    check_max_iter(max_iter)
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
    check_batch_axis(batch_axis)


def check_state_arrays(xp: Any, leaves: list[Any], names: list[str]) -> None:
    """``z0``'s arrays: real floating dtype, one dtype and one device for all of them."""
    first = leaves[0]
    if not xp.isdtype(first.dtype, "real floating"):
        kind = "complex" if xp.isdtype(first.dtype, "complex floating") else "integer or boolean"
        raise TypeError(
            f"{names[0]} has dtype {first.dtype} ({kind}); fixed_point needs a real floating "
            "dtype (float32 or float64): cast it first"
        )
    for leaf, name in zip(leaves[1:], names[1:], strict=True):
        if leaf.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {leaf.dtype} but {names[0]} has {first.dtype}")
        if device_of(leaf) != device_of(first):
            raise ValueError(
                f"{name} is on device {device_of(leaf)} but {names[0]} on {device_of(first)}"
            )
    if str(device_of(first)) == "meta":  # torch: shapes without data
        raise ValueError(
            f"{names[0] if len(names) == 1 else 'z0'} is on the 'meta' device, which holds "
            "shapes but no values; fixed_point needs real data: create z0 on 'cpu' or 'cuda'"
        )


def check_f_output(xp: Any, fz: Any, z: Any, structure: Structure) -> None:
    """``f(z0)`` must have the structure, shapes, dtype, device and array library of ``z0``."""
    if structure.container is not None:
        if not isinstance(fz, (tuple, list)) or len(fz) != len(structure.shapes):
            got = (
                f"{type(fz).__name__} of length {len(fz)}"
                if isinstance(fz, (tuple, list))
                else type(fz).__name__
            )
            raise ValueError(
                f"f(z0) must return a sequence of {len(structure.shapes)} arrays like z0, got {got}"
            )
    out_leaves = structure.leaves(fz)
    in_leaves = structure.leaves(z)
    triples = zip(out_leaves, in_leaves, structure.shapes, strict=True)
    for i, (out, inp, shape) in enumerate(triples):
        where = "f(z0)" if structure.container is None else f"f(z0)[{i}]"
        try:
            out_xp = aac.array_namespace(out)
        except TypeError:
            raise TypeError(
                f"{where} must be an array of the same library as z0 ({xp.__name__}), "
                f"got {type(out).__name__}"
            ) from None
        if out_xp is not xp and aac.array_namespace(inp) is not out_xp:
            raise TypeError(
                f"{where} is a {type(out).__module__}.{type(out).__name__} but z0 is a "
                f"{type(inp).__module__}.{type(inp).__name__}: f must return arrays of the "
                "library it is given"
            )
        if tuple(out.shape) != shape:
            raise ValueError(f"{where} has shape {tuple(out.shape)} but z0 has shape {shape}")
        if out.dtype != inp.dtype:
            raise TypeError(f"{where} has dtype {out.dtype} but z0 has dtype {inp.dtype}")
        d_out, d_in = device_of(out), device_of(inp)
        if d_out is not None and d_in is not None and d_out != d_in:
            raise ValueError(f"{where} is on device {d_out} but z0 is on device {d_in}")


#: ``reduction=`` values of ``jacobian_reg`` (torch and jax)
JACOBIAN_REG_REDUCTIONS: tuple[str, ...] = ("mean", "none")


def _check_int_or_none_batch_axis(batch_axis: Any) -> None:
    """``batch_axis`` of the diagnostics at z* (no ``"auto"``): an int or None."""
    if batch_axis is not None and (isinstance(batch_axis, bool) or not isinstance(batch_axis, int)):
        raise TypeError(f"batch_axis must be an int or None, got {batch_axis!r}")


def check_jacobian_reg_arguments(n_samples: Any, batch_axis: Any, reduction: Any) -> None:
    """The framework-independent arguments of ``jacobian_reg`` (torch and jax).

    Raises:
        ValueError: ``n_samples`` not an int >= 1, or an unknown ``reduction``.
        TypeError: ``batch_axis`` neither an int nor None.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
    _check_int_or_none_batch_axis(batch_axis)
    if reduction not in JACOBIAN_REG_REDUCTIONS:
        raise ValueError(f"reduction must be one of {JACOBIAN_REG_REDUCTIONS}, got {reduction!r}")


def check_spectral_radius_arguments(iters: Any, krylov: Any, rtol: Any, batch_axis: Any) -> None:
    """The framework-independent arguments of ``spectral_radius`` (torch and jax).

    Raises:
        ValueError: ``iters`` not an int >= 0, ``krylov`` not 0 or an int >= 2, or ``rtol``
            not a float in (0, 1).
        TypeError: ``batch_axis`` neither an int nor None.
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if isinstance(krylov, bool) or not isinstance(krylov, int) or krylov < 0 or krylov == 1:
        raise ValueError(f"krylov must be 0 (no Arnoldi stage) or an int >= 2, got {krylov!r}")
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 < rtol < 1:
        raise ValueError(f"rtol must be a float in (0, 1), got {rtol!r}")
    _check_int_or_none_batch_axis(batch_axis)


def check_states(states: Any, max_iter: int) -> tuple[int, ...]:
    """``states=`` of the solves: iterations in ``[0, max_iter]``, as a tuple (``()`` for None).

    Raises:
        TypeError: not a sequence of ints (a bare int is refused: say ``(k,)``).
        ValueError: an iteration outside ``[0, max_iter]``, or a repeated one.
    """
    if states is None:
        return ()
    if isinstance(states, (int, str, bytes)) or not hasattr(states, "__iter__"):
        raise TypeError(
            f"states must be a sequence of iterations (ints), e.g. (5, 10, 15), got {states!r}"
        )
    given = tuple(states)  # once: an iterator would be empty on a second pass
    for k in given:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"states must hold ints, got {k!r} in {given!r}")
    out = tuple(int(k) for k in given)
    for k in out:
        if not 0 <= k <= max_iter:
            raise ValueError(
                f"states entries must lie in [0, max_iter={max_iter}], got {k} in {given!r}"
            )
    if len(set(out)) != len(out):
        raise ValueError(f"states has a repeated iteration: {given!r}")
    return out

