"""Argument validation of ``eqsolve.fixed_point``: every bad input raises an error of the
documented type whose message names the offending argument, before ``f`` runs where the
argument alone is wrong."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest

import eqsolve
import eqsolve.backends as backends_mod
from conftest import AVAILABLE, from_numpy, to_numpy
from eqsolve.backends import BackendUnavailableError, get_backend

B, D = 3, 4
#: backends whose solves need no compilation (positive controls that only check that a valid
#: call is accepted run on these; the JAX path is exercised with solver="picard" elsewhere)
EAGER = [b for b in AVAILABLE if b != "jax"]


def _z0(backend: str, shape=(B, D), dtype="float64"):
    return from_numpy(np.zeros(shape, dtype=dtype), backend)


class CountingMap:
    """``f(z) = 0.5 z + 1`` counting its calls (for "rejected before f runs" checks)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, z):
        self.calls += 1
        if isinstance(z, (tuple, list)):
            return type(z)(0.5 * leaf + 1.0 for leaf in z)
        return 0.5 * z + 1.0


def _other_library_array(backend: str, shape, dtype="float64"):
    """An array of the same shape/dtype but from a different array library."""
    a = np.zeros(shape, dtype=dtype)
    if backend == "numpy":
        import array_api_strict

        return array_api_strict.asarray(a)
    return a  # a plain numpy array for torch, jax, cupy, array_api_strict


# --------------------------------------------------------------------------- positive control


def test_valid_call_works(backend):
    """The checks below must not reject a well-formed call (guards against a check that
    always raises)."""
    f = CountingMap()
    sol = eqsolve.fixed_point(f, _z0(backend), solver="picard", tol=1e-10, max_iter=100)
    assert bool(np.all(to_numpy(sol.converged)))
    np.testing.assert_allclose(to_numpy(sol.value), 2.0, rtol=1e-8)
    # an eager JAX solve traces f once and runs the compiled loop; elsewhere f runs per step
    assert f.calls >= (1 if backend == "jax" else 2)


# --------------------------------------------------------------------------- f


@pytest.mark.parametrize("f", [3, None, "cos", np.zeros(3)])
def test_f_not_callable(backend, f):
    with pytest.raises(TypeError, match=r"\bf must be callable"):
        eqsolve.fixed_point(f, _z0(backend))


def test_f_wrong_shape(backend):
    with pytest.raises(ValueError, match=r"f\(z0\) has shape \(1, 4\) but z0 has shape \(3, 4\)"):
        eqsolve.fixed_point(lambda z: z[:1, :], _z0(backend))


def test_f_wrong_shape_transposed(backend):
    xp = get_backend(backend).xp
    with pytest.raises(ValueError, match=r"f\(z0\) has shape"):
        eqsolve.fixed_point(lambda z: xp.reshape(z, (D, B)), _z0(backend))


def test_f_wrong_dtype(backend):
    xp = get_backend(backend).xp
    with pytest.raises(
        TypeError, match=r"f\(z0\) has dtype .*float32.* but z0 has dtype .*float64"
    ):
        eqsolve.fixed_point(lambda z: xp.astype(z, xp.float32), _z0(backend))


def test_f_wrong_dtype_upcast(backend):
    xp = get_backend(backend).xp
    with pytest.raises(TypeError, match=r"f\(z0\) has dtype"):
        eqsolve.fixed_point(lambda z: xp.astype(z, xp.float64), _z0(backend, dtype="float32"))


def test_f_returns_other_library(backend):
    other = _other_library_array(backend, (B, D))
    with pytest.raises(TypeError, match=r"f\(z0\) .*library"):
        eqsolve.fixed_point(lambda z: other, _z0(backend))


def test_f_returns_numpy_for_torch():
    pytest.importorskip("torch", reason="torch not installed")
    import torch

    z0 = torch.zeros(B, D, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"f\(z0\) is a numpy\.ndarray but z0 is a torch\.Tensor"):
        eqsolve.fixed_point(lambda z: z.numpy() * 0.5, z0)


@pytest.mark.parametrize("out", [1.0, [0.0] * D, None])
def test_f_returns_non_array(backend, out):
    with pytest.raises(TypeError, match=r"f\(z0\) must be an array"):
        eqsolve.fixed_point(lambda z: out, _z0(backend))


def test_f_device_mismatch_torch_meta():
    """Device mismatch, emulated on a CPU-only machine with a torch "meta" tensor.

    (JAX and CuPy device mismatches need a second device and cannot be exercised here;
    the same check -- ``check_f_output`` comparing ``array_api_compat.device`` -- covers them.)
    """
    pytest.importorskip("torch", reason="torch not installed")
    import torch

    z0 = torch.zeros(B, D, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"f\(z0\) is on device meta but z0 is on device cpu"):
        eqsolve.fixed_point(lambda z: torch.zeros(B, D, dtype=torch.float64, device="meta"), z0)


def test_z0_device_mismatch_in_tuple_torch_meta():
    pytest.importorskip("torch", reason="torch not installed")
    import torch

    z0 = (
        torch.zeros(B, D, dtype=torch.float64),
        torch.zeros(B, 2, dtype=torch.float64, device="meta"),
    )
    f = CountingMap()
    with pytest.raises(ValueError, match=r"z0\[1\] is on device meta"):
        eqsolve.fixed_point(f, z0)
    assert f.calls == 0


def test_tuple_z0_f_returns_single_array(backend):
    z0 = (_z0(backend), _z0(backend, (B, 2)))
    with pytest.raises(ValueError, match=r"f\(z0\) must return a sequence of 2 arrays.*got"):
        eqsolve.fixed_point(lambda z: z[0], z0)


@pytest.mark.parametrize("n_out", [1, 3])
def test_tuple_z0_f_returns_wrong_length(backend, n_out):
    z0 = (_z0(backend), _z0(backend, (B, 2)))
    with pytest.raises(
        ValueError, match=rf"f\(z0\) must return a sequence of 2 arrays.*length {n_out}"
    ):
        eqsolve.fixed_point(lambda z: tuple(z[0] for _ in range(n_out)), z0)


def test_tuple_z0_f_leaf_wrong_shape(backend):
    z0 = (_z0(backend), _z0(backend, (B, 2)))
    with pytest.raises(
        ValueError, match=r"f\(z0\)\[1\] has shape \(3, 4\) but z0 has shape \(3, 2\)"
    ):
        eqsolve.fixed_point(lambda z: (z[0], z[0]), z0)


def test_tuple_z0_f_leaf_wrong_dtype(backend):
    xp = get_backend(backend).xp
    z0 = (_z0(backend), _z0(backend, (B, 2)))
    with pytest.raises(TypeError, match=r"f\(z0\)\[0\] has dtype"):
        eqsolve.fixed_point(lambda z: (xp.astype(z[0], xp.float32), z[1]), z0)


# --------------------------------------------------------------------------- z0


@pytest.mark.parametrize(
    "dtype, kind",
    [("int64", "integer"), ("int32", "integer"), ("bool", "boolean"), ("complex128", "complex")],
)
def test_z0_bad_dtype(backend, dtype, kind):
    z0 = from_numpy(np.zeros((B, D), dtype=dtype), backend)
    f = CountingMap()
    with pytest.raises(TypeError, match=rf"z0 has dtype .*{kind}.*real floating"):
        eqsolve.fixed_point(f, z0)
    assert f.calls == 0


def test_z0_bad_dtype_in_tuple(backend):
    z0 = (_z0(backend), from_numpy(np.zeros((B, 2), dtype="int64"), backend))
    with pytest.raises(TypeError, match=r"z0\[1\] has dtype"):
        eqsolve.fixed_point(CountingMap(), z0)


def test_z0_mixed_float_dtypes_in_tuple(backend):
    z0 = (_z0(backend), _z0(backend, (B, 2), dtype="float32"))
    with pytest.raises(TypeError, match=r"z0\[1\] has dtype .*float32.* but z0\[0\] has .*float64"):
        eqsolve.fixed_point(CountingMap(), z0)


@pytest.mark.parametrize("z0", [[1.0, 2.0], 1.0, 3, "abc", None, [[0.0, 1.0]]])
def test_z0_not_an_array(z0):
    f = CountingMap()
    with pytest.raises(TypeError, match=r"z0(\[0\])? must be an array"):
        eqsolve.fixed_point(f, z0)
    assert f.calls == 0


def test_z0_list_of_floats_with_backend(backend):
    with pytest.raises(TypeError, match=r"z0\[0\] must be an array"):
        eqsolve.fixed_point(CountingMap(), [1.0, 2.0], backend=backend)


def test_z0_mixed_libraries_in_tuple():
    import array_api_strict

    others = [array_api_strict.asarray(np.zeros((B, 2)))]
    if "torch" in AVAILABLE:
        import torch

        others.append(torch.zeros(B, 2, dtype=torch.float64))
    if "jax" in AVAILABLE:
        import jax.numpy as jnp

        others.append(jnp.zeros((B, 2), dtype=jnp.float64))
    for other in others:
        f = CountingMap()
        with pytest.raises(TypeError, match=r"arrays of z0 must all come from one array library"):
            eqsolve.fixed_point(f, (np.zeros((B, D)), other))
        assert f.calls == 0


@pytest.mark.parametrize("z0", [(), []])
def test_z0_empty_sequence(z0):
    with pytest.raises(ValueError, match=r"z0 is an empty sequence"):
        eqsolve.fixed_point(CountingMap(), z0)


def test_z0_no_entries(backend):
    with pytest.raises(ValueError, match=r"z0 has no entries"):
        eqsolve.fixed_point(CountingMap(), _z0(backend, (0, D)))


def test_z0_mismatched_batch_sizes(backend):
    z0 = (_z0(backend, (B, D)), _z0(backend, (B + 1, D)))
    f = CountingMap()
    with pytest.raises(
        ValueError, match=r"same batch size along batch_axis=0: z0\[0\] has 3, z0\[1\] has 4"
    ):
        eqsolve.fixed_point(f, z0)
    assert f.calls == 0


@pytest.mark.parametrize("axis", [2, -3, 10])
def test_batch_axis_out_of_range(backend, axis):
    with pytest.raises(
        ValueError, match=rf"batch_axis={axis} is out of range for z0 of shape \(3, 4\)"
    ):
        eqsolve.fixed_point(CountingMap(), _z0(backend), batch_axis=axis)


@pytest.mark.parametrize("axis", [1.0, True, "0", "Auto"])
def test_batch_axis_wrong_type(axis):
    with pytest.raises(TypeError, match=r"batch_axis must be an int, None or 'auto'"):
        eqsolve.fixed_point(CountingMap(), np.zeros((B, D)), batch_axis=axis)


def test_zero_dim_z0_with_batch_axis_0_is_an_error(backend):
    xp = get_backend(backend).xp
    z0 = xp.zeros((), dtype=xp.float64)  # (np.ascontiguousarray would make it 1-d)
    with pytest.raises(ValueError, match=r"z0 is 0-d but batch_axis=0"):
        eqsolve.fixed_point(CountingMap(), z0, batch_axis=0)
    if backend != "jax":  # (positive control; a 0-d JAX solve costs a ~3 s compile)
        # the default batch_axis="auto" solves a 0-d state as one system, like None
        for axis in (None, "auto"):
            sol = eqsolve.fixed_point(
                CountingMap(), z0, batch_axis=axis, tol=1e-10, solver="picard"
            )
            assert bool(to_numpy(sol.converged)) and sol.status.shape == ()


# --------------------------------------------------------------------------- scalar arguments


@pytest.mark.parametrize("tol", [0, 0.0, -1, -1e-6, math.nan, math.inf, -math.inf])
def test_tol_bad_value(backend, tol):
    f = CountingMap()
    with pytest.raises(ValueError, match=r"tol must be finite and > 0"):
        eqsolve.fixed_point(f, _z0(backend), tol=tol)
    assert f.calls == 0


@pytest.mark.parametrize("tol", ["1e-6", None, True, [1e-6]])
def test_tol_bad_type(tol):
    with pytest.raises(TypeError, match=r"tol must be a real number"):
        eqsolve.fixed_point(CountingMap(), np.zeros((B, D)), tol=tol)


def test_numpy_scalars_accepted_for_tol_and_max_iter():
    # numbers.Real / numbers.Integral: values read from configs or arrays are fine
    sol = eqsolve.fixed_point(
        lambda z: 0.5 * z + 1.0, np.zeros((B, D)), tol=np.float32(1e-6), max_iter=np.int64(60)
    )
    assert bool(np.all(sol.converged))
    np.testing.assert_allclose(sol.value, 2.0, rtol=1e-5)


@pytest.mark.parametrize("atol", [-1.0, -1e-300, math.nan, math.inf])
def test_atol_bad_value(backend, atol):
    with pytest.raises(ValueError, match=r"atol must be finite and >= 0"):
        eqsolve.fixed_point(CountingMap(), _z0(backend), atol=atol)


def test_atol_zero_is_allowed(backend):
    sol = eqsolve.fixed_point(CountingMap(), _z0(backend), atol=0.0, tol=1e-8, solver="picard")
    assert bool(np.all(to_numpy(sol.converged)))


@pytest.mark.parametrize("atol", ["0", None])
def test_atol_bad_type(atol):
    with pytest.raises(TypeError, match=r"atol must be"):
        eqsolve.fixed_point(CountingMap(), np.zeros((B, D)), atol=atol)


@pytest.mark.parametrize("max_iter", [0, -1])
def test_max_iter_too_small(backend, max_iter):
    f = CountingMap()
    with pytest.raises(ValueError, match=r"max_iter must be >= 1"):
        eqsolve.fixed_point(f, _z0(backend), max_iter=max_iter)
    assert f.calls == 0


@pytest.mark.parametrize("max_iter", [1.5, 10.0, True, False, "10", None])
def test_max_iter_bad_type(max_iter):
    with pytest.raises(TypeError, match=r"max_iter must be an int"):
        eqsolve.fixed_point(CountingMap(), np.zeros((B, D)), max_iter=max_iter)


def test_max_iter_one_is_allowed(backend):
    sol = eqsolve.solve(
        CountingMap(), _z0(backend), max_iter=1, on_failure="ignore", solver="picard"
    )
    assert int(sol.nfev) == 2
    assert to_numpy(sol.iterations).tolist() == [1] * B
    assert to_numpy(sol.status).tolist() == [int(eqsolve.Status.MAX_ITER)] * B


@pytest.mark.parametrize("mode", ["loud", "WARN", "", None, "error"])
def test_on_failure_unknown(backend, mode):
    with pytest.raises(ValueError, match=r"on_failure must be one of"):
        eqsolve.fixed_point(CountingMap(), _z0(backend), on_failure=mode)


# --------------------------------------------------------------------------- solver and options


@pytest.mark.parametrize("name", ["andersen", "newton", "ANDERSEN", ""])
def test_unknown_solver_name(backend, name):
    f = CountingMap()
    with pytest.raises(
        ValueError, match=rf"unknown solver '{name}'; choose one of anderson, auto, broyden, picard"
    ):
        eqsolve.fixed_point(f, _z0(backend), solver=name)
    assert f.calls == 0


@pytest.mark.parametrize("solver", [3, None, eqsolve.Anderson, object()])
def test_solver_wrong_type(solver):
    with pytest.raises(TypeError, match=r"solver must be a name"):
        eqsolve.fixed_point(CountingMap(), np.zeros((B, D)), solver=solver)


@pytest.mark.parametrize(
    "solver, options, bad",
    [
        ("anderson", {"mm": 3}, "mm"),
        ("anderson", {"m": 3, "betta": 0.5}, "betta"),
        ("anderson", {"memory": 3}, "memory"),  # a Broyden option
        ("broyden", {"m": 5}, "m"),  # an Anderson option
        ("broyden", {"memroy": 5}, "memroy"),
        ("picard", {"m": 5}, "m"),
        ("picard", {"damping": 0.5}, "damping"),
        ("anderson", {"name": "broyden"}, "name"),  # class attribute, not a field
    ],
)
def test_unknown_solver_option(backend, solver, options, bad):
    f = CountingMap()
    with pytest.raises(TypeError, match=rf"unknown option\(s\) .*'{bad}'.* for solver '{solver}'"):
        eqsolve.fixed_point(f, _z0(backend), solver=solver, **options)
    assert f.calls == 0


@pytest.mark.parametrize(
    "solver, options",
    [("anderson", {"m": 3, "beta": 0.5}), ("broyden", {"memory": 4}), ("picard", {"beta": 0.5})],
)
@pytest.mark.parametrize(
    "backend", EAGER
)  # jax: each eager solve compiles (~2 s); see test_failures
def test_valid_solver_options_accepted(backend, solver, options):
    sol = eqsolve.fixed_point(
        CountingMap(), _z0(backend), solver=solver, tol=1e-8, max_iter=200, **options
    )
    assert bool(np.all(to_numpy(sol.converged)))


@pytest.mark.parametrize("obj", [eqsolve.Anderson(m=3), eqsolve.Broyden(), eqsolve.Picard()])
def test_options_with_solver_object(obj):
    with pytest.raises(
        TypeError, match=r"solver options \['m'\] were given with a configured solver object"
    ):
        eqsolve.fixed_point(CountingMap(), np.zeros((B, D)), solver=obj, m=4)


@pytest.mark.parametrize(
    "make, exc, name",
    [
        (lambda: eqsolve.Anderson(m=0), ValueError, "m"),
        (lambda: eqsolve.Anderson(m=-2), ValueError, "m"),
        (lambda: eqsolve.Anderson(m=2.5), ValueError, "m"),
        (lambda: eqsolve.Anderson(m=True), ValueError, "m"),
        (lambda: eqsolve.Anderson(beta=float("nan")), ValueError, "beta"),
        (lambda: eqsolve.Anderson(beta=0.0), ValueError, "beta"),
        (lambda: eqsolve.Anderson(beta=-1.0), ValueError, "beta"),
        (lambda: eqsolve.Anderson(beta="1"), TypeError, "beta"),
        (lambda: eqsolve.Anderson(regularization=-1e-8), ValueError, "regularization"),
        (lambda: eqsolve.Anderson(regularization=float("inf")), ValueError, "regularization"),
        (lambda: eqsolve.Anderson(max_coefficient=0.0), ValueError, "max_coefficient"),
        (lambda: eqsolve.Broyden(memory=-1), ValueError, "memory"),
        (lambda: eqsolve.Broyden(memory=0), ValueError, "memory"),
        (lambda: eqsolve.Broyden(memory=3.0), ValueError, "memory"),
        (lambda: eqsolve.Picard(beta=0), ValueError, "beta"),
        (lambda: eqsolve.Picard(beta=float("inf")), ValueError, "beta"),
        (lambda: eqsolve.Picard(beta=None), TypeError, "beta"),
    ],
)
def test_bad_hyperparameters(make, exc, name):
    with pytest.raises(exc, match=rf"^{name} must be"):
        make()


@pytest.mark.parametrize(
    "solver, options, name",
    [
        ("anderson", {"m": 0}, "m"),
        ("broyden", {"memory": -1}, "memory"),
        ("picard", {"beta": 0.0}, "beta"),
    ],
)
def test_bad_hyperparameters_by_name(backend, solver, options, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        eqsolve.fixed_point(CountingMap(), _z0(backend), solver=solver, **options)


# --------------------------------------------------------------------------- backend


@pytest.mark.parametrize("name", ["tensorflow", "Torch", "NumPy", "", 3])
def test_unknown_backend(name):
    f = CountingMap()
    with pytest.raises(
        ValueError,
        match=r"unknown backend .*; choose one of numpy, torch, jax, cupy, array_api_strict",
    ):
        eqsolve.fixed_point(f, np.zeros((B, D)), backend=name)
    assert f.calls == 0


@pytest.mark.parametrize("name", ["torch", "jax", "cupy", "array_api_strict"])
def test_backend_not_installed_message(monkeypatch, name):
    """Simulate a missing package by pointing the backend at a module that does not exist."""
    _, extra = backends_mod._PACKAGES[name]
    monkeypatch.setitem(backends_mod._PACKAGES, name, ("eqsolve_no_such_package_xyz", extra))
    f = CountingMap()
    with pytest.raises(
        BackendUnavailableError, match=rf"backend '{name}' needs the package"
    ) as info:
        eqsolve.fixed_point(f, np.zeros((B, D)), backend=name)
    assert "pip install" in str(info.value)
    assert extra in str(info.value)
    assert isinstance(info.value, ImportError)  # catchable as the usual missing-module error
    assert f.calls == 0


@pytest.mark.parametrize("name, extra", [("torch", "eqsolve[torch]"), ("jax", "eqsolve[jax]")])
def test_backend_import_blocked(monkeypatch, name, extra):
    """``sys.modules[name] = None`` makes ``import name`` fail like a missing package."""
    monkeypatch.setitem(sys.modules, name, None)
    hint = rf"pip install -c constraints.txt '{re_escape(extra)}'"
    with pytest.raises(BackendUnavailableError, match=hint):
        eqsolve.fixed_point(CountingMap(), np.zeros((B, D)), backend=name)
    with pytest.raises(BackendUnavailableError, match=rf"'{name}'"):
        get_backend(name)


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


def test_cupy_unavailable_message():
    """Without cupy: the install hint. With cupy but no GPU: a message about the GPU."""
    if importlib.util.find_spec("cupy") is None:
        hint = r"pip install -c constraints.txt 'eqsolve\[cupy\]'"
        with pytest.raises(BackendUnavailableError, match=hint):
            eqsolve.fixed_point(CountingMap(), np.zeros((B, D)), backend="cupy")
        return
    import cupy

    if cupy.cuda.is_available():
        pytest.skip("cupy has a usable GPU here: the no-GPU message cannot be triggered")
    with pytest.raises(BackendUnavailableError, match=r"GPU"):
        eqsolve.fixed_point(CountingMap(), np.zeros((B, D)), backend="cupy")


def test_explicit_backend_converts_and_validates(backend):
    """With ``backend=``, the (converted) z0's dtype is validated too."""
    with pytest.raises(TypeError, match=r"z0 has dtype"):
        eqsolve.fixed_point(CountingMap(), np.zeros((B, D), dtype=np.int64), backend=backend)
    sol = eqsolve.fixed_point(
        CountingMap(), np.zeros((B, D)), backend=backend, tol=1e-10, solver="picard"
    )
    np.testing.assert_allclose(to_numpy(sol.value), 2.0, rtol=1e-8)
