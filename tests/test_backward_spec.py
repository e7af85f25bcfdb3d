"""One backward specification (eqsolve.Implicit / Phantom / JFB) for every adapter.

The object is validated once; each adapter (PyTorch, JAX, CuPy's pullback) accepts the same
objects and shorthands, rejects the same bad input with the same message, resolves the same
defaults (adjoint tol ``max(tol, 10 eps)``, budget = the forward's ``max_iter``, failures
handled by the call's ``on_failure``), and the keywords of the previous release still work
with a DeprecationWarning.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import eqsolve
from conftest import AVAILABLE
from eqsolve.adapters.backward import backward_spec

TORCH = pytest.mark.skipif(
    "torch" not in AVAILABLE, reason="torch is not installed (or not selected)"
)
JAX = pytest.mark.skipif("jax" not in AVAILABLE, reason="jax is not installed (or not selected)")

BAD_SPECS = [
    (lambda: eqsolve.Implicit("newton"), ValueError, "Implicit.method must be one of"),
    (lambda: eqsolve.Implicit(3), TypeError, "Implicit.method must be a method name"),
    (lambda: eqsolve.Implicit(tol=-1.0), ValueError, "Implicit.tol must be finite and > 0"),
    (lambda: eqsolve.Implicit(tol="1e-6"), TypeError, "Implicit.tol must be a real number"),
    (lambda: eqsolve.Implicit(max_iter=0), ValueError, "Implicit.max_iter must be >= 1"),
    (lambda: eqsolve.Implicit(max_iter=2.5), TypeError, "Implicit.max_iter must be an int"),
    (lambda: eqsolve.Implicit(options=[1]), TypeError, "Implicit.options must be a dict"),
    (lambda: eqsolve.Implicit(options={"mm": 3}), TypeError, "Implicit.options .*'mm'"),
    (lambda: eqsolve.Implicit("anderson", options={"m": 0}), ValueError, "m must be"),
    (lambda: eqsolve.Implicit("gmres", options={"m": 3}), TypeError, "method='gmres'.*'m'"),
    (lambda: eqsolve.Implicit(eqsolve.Anderson(), options={"m": 3}), TypeError, "configured"),
    (lambda: eqsolve.Implicit(on_failure="loud"), ValueError, "Implicit.on_failure"),
    (lambda: eqsolve.Phantom(steps=0), ValueError, "Phantom.steps must be >= 1"),
    (lambda: eqsolve.Phantom(steps=1.5), TypeError, "Phantom.steps must be an int"),
    (lambda: eqsolve.Phantom(damping=0.0), ValueError, r"Phantom.damping must be .*\(0, 1\]"),
    (lambda: eqsolve.Phantom(damping=1.5), ValueError, "Phantom.damping"),
    (lambda: backward_spec("newton"), ValueError, "backward must be one of"),
    (lambda: backward_spec(3), TypeError, "backward must be"),
]


@pytest.mark.parametrize("make, exc, match", BAD_SPECS)
def test_bad_specifications_name_the_field(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_shorthands_mean_the_objects():
    assert backward_spec("auto") == eqsolve.Implicit()  # the default method
    assert backward_spec("anderson") == eqsolve.Implicit("anderson")
    assert backward_spec("gmres") == eqsolve.Implicit("gmres")
    assert backward_spec("phantom") == eqsolve.Phantom(5, 0.5)
    assert backward_spec("jfb") == eqsolve.JFB()
    assert backward_spec(None) is None
    obj = eqsolve.Anderson(m=3)
    assert backward_spec(obj) == eqsolve.Implicit(method=obj)
    assert (eqsolve.JFB().steps, eqsolve.JFB().damping) == (1, 1.0)


def test_defaults_resolve_from_the_forward_solve():
    spec = eqsolve.Implicit()
    assert spec.resolved_tol(1e-4, 2.2e-16) == 1e-4
    assert spec.resolved_tol(1e-20, 2.2e-16) == pytest.approx(2.2e-15)  # never below 10 eps
    assert spec.resolved_max_iter(37) == 37
    assert spec.resolved_on_failure("raise") == "raise"
    own = eqsolve.Implicit(tol=1e-3, max_iter=4, on_failure="nan")
    assert (own.resolved_tol(1e-8, 1e-16), own.resolved_max_iter(50)) == (1e-3, 4)
    assert own.resolved_on_failure("warn") == "nan"


LEGACY = [
    ({"backward_tol": 1e-9}, "anderson", eqsolve.Implicit("anderson", tol=1e-9)),
    ({"backward_max_iter": 7, "backward_options": {"m": 3}}, "anderson",
     eqsolve.Implicit("anderson", max_iter=7, options={"m": 3})),
    ({"backward_on_failure": "nan"}, "gmres", eqsolve.Implicit("gmres", on_failure="nan")),
    ({"phantom_steps": 3, "phantom_damping": 0.7}, "phantom", eqsolve.Phantom(3, 0.7)),
]


@pytest.mark.parametrize("legacy, backward, want", LEGACY)
def test_legacy_keywords_map_to_the_object_with_a_deprecation_warning(legacy, backward, want):
    with pytest.warns(DeprecationWarning, match="deprecated.*pass backward=eqsolve"):
        assert backward_spec(backward, legacy) == want


@pytest.mark.parametrize(
    "backward, legacy, match",
    [
        ("anderson", {"phantom_steps": 3}, "phantom_steps applies only to backward='phantom'"),
        ("jfb", {"backward_tol": 1e-6}, "backward_tol applies only to the implicit"),
        (None, {"backward_max_iter": 3}, "backward_max_iter applies only to the implicit"),
        (eqsolve.Implicit(), {"backward_tol": 1e-6}, "cannot be combined with backward="),
        ("anderson", {"backward_tol": -1.0}, "backward_tol must be finite and > 0"),
        ("anderson", {"backward_max_iter": 0}, "backward_max_iter must be >= 1"),
        ("anderson", {"backward_options": {"mm": 1}}, "backward_options .*'mm'"),
        ("anderson", {"backward_on_failure": "loud"}, "backward_on_failure must be one of"),
    ],
)
def test_legacy_keyword_errors_name_the_keyword(backward, legacy, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises((TypeError, ValueError), match=match):
            backward_spec(backward, legacy)


def test_generic_entry_validates_backward_on_every_backend():
    with pytest.raises(ValueError, match="backward must be one of"):
        eqsolve.fixed_point(np.cos, np.zeros((2, 1)), backward="newton")
    with pytest.raises(TypeError, match="f_dtype apply only to solves on PyTorch"):
        eqsolve.fixed_point(np.cos, np.zeros((2, 1)), f_dtype="bfloat16")


# ------------------------------------------------------------ the adapters read one spec


def _adapters():
    """(name, call(backward=..., **kw) on a small contraction) for each installed adapter."""
    out = []
    W = 0.5 * np.eye(3) + 0.05
    if "torch" in AVAILABLE:
        import torch

        import eqsolve.torch as et

        Wt = torch.nn.Parameter(torch.tensor(W))

        def torch_call(**kw):
            z0 = torch.zeros(2, 3, dtype=torch.float64)
            return et.fixed_point(lambda z: torch.tanh(z @ Wt.T + 1.0), z0, tol=1e-10, **kw)

        out.append(pytest.param("torch", torch_call, id="torch"))
    if "jax" in AVAILABLE:
        import jax.numpy as jnp

        import eqsolve.jax as ej

        def jax_call(**kw):
            z0 = jnp.zeros((2, 3))
            return ej.fixed_point(lambda z, w: jnp.tanh(z @ w.T + 1.0), z0, jnp.asarray(W),
                                  tol=1e-10, **kw)

        out.append(pytest.param("jax", jax_call, id="jax"))

    from eqsolve.adapters import cupy as ac  # the CuPy pullback, run on NumPy arrays

    def cupy_call(**kw):
        def vjp(z, v):
            return ((1.0 - np.tanh(z @ W.T + 1.0) ** 2) * v) @ W

        return ac._fixed_point_on("numpy", lambda z: np.tanh(z @ W.T + 1.0), np.zeros((2, 3)),
                                  vjp=vjp, tol=1e-10, **kw)

    out.append(pytest.param("cupy", cupy_call, id="cupy-pullback-on-numpy"))
    return out


@pytest.mark.parametrize("name, call", _adapters())
@pytest.mark.parametrize(
    "backward, exc, match",
    [
        ("newton", ValueError, "backward must be one of"),
        (3, TypeError, "backward must be"),
    ],
)
def test_every_adapter_rejects_the_same_input_alike(name, call, backward, exc, match):
    with pytest.raises(exc, match=match):
        call(backward=backward)


@pytest.mark.parametrize("name, call", _adapters())
def test_every_adapter_accepts_the_objects_and_legacy_keywords(name, call):
    call(backward=eqsolve.Implicit("gmres", tol=1e-9, options={"restart": 3}))
    call(backward="broyden")
    with pytest.warns(DeprecationWarning, match="backward_tol is deprecated"):
        call(backward="anderson", backward_tol=1e-9)
    if name == "cupy":  # no autodiff of f's parameters there: said, not ignored
        with pytest.raises(ValueError, match="eqsolve.cupy supports backward=eqsolve.Implicit"):
            call(backward=eqsolve.Phantom())
        with pytest.raises(ValueError, match="for no gradient use eqsolve.cupy.solve"):
            call(backward=None)
    else:
        call(backward=eqsolve.Phantom(2, 0.5))
        call(backward=eqsolve.JFB())
        assert bool(call(backward=None).converged.all())


@JAX
def test_jax_backward_none_gives_zero_gradient_not_an_error():
    import jax
    import jax.numpy as jnp

    import eqsolve.jax as ej

    def loss(w):
        sol = ej.fixed_point(lambda z, w: jnp.tanh(w * z + 1.0), jnp.zeros((2, 3)), w,
                             tol=1e-10, backward=None)
        return sol.value.sum()

    assert float(jax.grad(loss)(0.5)) == 0.0
    assert float(jax.jit(jax.grad(loss))(0.5)) == 0.0


def _slow_neumann_torch(on_failure, spec):
    import torch

    import eqsolve.torch as et

    W = torch.nn.Parameter(0.95 * torch.eye(4, dtype=torch.float64))
    sol = et.fixed_point(lambda z: 0.95 * z @ W.T + 1.0, torch.zeros(2, 4, dtype=torch.float64),
                         tol=1e-10, max_iter=1000, backward=spec, on_failure=on_failure)
    return sol, W


@TORCH
def test_torch_adjoint_budget_and_failure_policy_default_to_the_forward():
    """Neumann on a map with spectral radius 0.9 needs ~200 adjoint steps: with the forward's
    max_iter=1000 it converges, with Implicit(max_iter=5) it fails and says so."""
    sol, W = _slow_neumann_torch("warn", eqsolve.Implicit("neumann"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol.value.sum().backward()
    sol, W = _slow_neumann_torch("warn", eqsolve.Implicit("neumann", max_iter=5))
    with pytest.warns(eqsolve.ConvergenceWarning, match="within max_iter=5"):
        sol.value.sum().backward()
    sol, W = _slow_neumann_torch("raise", eqsolve.Implicit("neumann", max_iter=5))
    with pytest.raises(eqsolve.ConvergenceError, match="method='neumann'"):
        sol.value.sum().backward()
    sol, W = _slow_neumann_torch("raise", eqsolve.Implicit("neumann", max_iter=5, on_failure="nan"))
    sol.value.sum().backward()
    assert bool(W.grad.isnan().all())  # both samples failed: their contributions are NaN
