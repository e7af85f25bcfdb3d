"""One entry-point contract: ``eqsolve.fixed_point`` on every backend.

* the same value and ``nfev`` everywhere when nothing needs a gradient (PyTorch with grad
  mode on included: no extra call of ``f``, no graph, ``.numpy()`` works);
* on PyTorch a gradient is attached exactly when ``f`` uses a tensor that requires grad;
* ``import eqsolve`` imports no framework, and ``eqsolve.torch`` / ``eqsolve.jax`` load lazily;
* ``help(eqsolve.fixed_point)`` shows the real keywords; a misspelled keyword says which
  keyword was probably meant;
* warnings point at the caller's line, so Python's default filter shows each call site.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import eqsolve
from conftest import AVAILABLE, from_numpy, to_numpy

TORCH = pytest.mark.skipif(
    "torch" not in AVAILABLE, reason="torch is not installed (or not selected)"
)

A = np.array([[0.5, 0.1, 0.0], [0.0, 0.4, 0.2], [0.1, 0.0, 0.3]])


def linear_map(z):
    """``z A^T + 1`` (exact in every library up to the order of a 3-term sum)."""
    return z @ A.T + 1.0


class Counting:
    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, z):
        self.calls += 1
        return self.f(z)


@pytest.mark.parametrize("solver", ["auto", "anderson", "broyden", "picard"])
def test_same_value_and_nfev_on_every_backend(backend, solver):
    z0 = np.zeros((4, 3))
    ref = eqsolve.fixed_point(linear_map, z0, solver=solver, tol=1e-10)
    At = from_numpy(A, backend)

    f = Counting(lambda z: z @ At.T + 1.0)
    sol = eqsolve.fixed_point(f, from_numpy(z0, backend), solver=solver, tol=1e-10)
    assert int(sol.nfev) == int(ref.nfev)
    if backend != "jax":  # JAX traces f once and runs the compiled loop
        assert f.calls == int(ref.nfev)
    np.testing.assert_allclose(to_numpy(sol.value), ref.value, rtol=1e-13, atol=0)
    np.testing.assert_array_equal(to_numpy(sol.status), ref.status)
    np.testing.assert_array_equal(to_numpy(sol.iterations), ref.iterations)


@TORCH
def test_torch_with_grad_mode_attaches_a_gradient_only_when_one_is_needed():
    import torch

    z0 = torch.zeros(4, 3, dtype=torch.float64)
    At = torch.tensor(A)
    ref = eqsolve.fixed_point(linear_map, np.zeros((4, 3)), tol=1e-10)
    assert torch.is_grad_enabled()

    f = Counting(lambda z: z @ At.T + 1.0)  # closes over no tensor that requires grad
    sol = eqsolve.fixed_point(f, z0, tol=1e-10)
    assert not sol.value.requires_grad and sol.value.grad_fn is None
    assert int(sol.nfev) == int(ref.nfev) == f.calls
    np.testing.assert_allclose(sol.value.numpy(), ref.value, rtol=1e-13, atol=0)

    W = torch.nn.Parameter(At.clone())
    g = Counting(lambda z: z @ W.T + 1.0)
    sol = eqsolve.fixed_point(g, z0, tol=1e-10)
    assert sol.value.requires_grad
    assert int(sol.nfev) == int(ref.nfev) + 1 == g.calls  # the one differentiable call
    np.testing.assert_allclose(sol.value.detach().numpy(), ref.value, rtol=1e-13, atol=0)
    sol.value.sum().backward()
    assert W.grad is not None and bool(torch.isfinite(W.grad).all())

    with torch.no_grad():
        h = Counting(lambda z: z @ W.T + 1.0)
        sol = eqsolve.fixed_point(h, z0, tol=1e-10)
    assert not sol.value.requires_grad and int(sol.nfev) == int(ref.nfev) == h.calls


def test_import_eqsolve_imports_no_framework_and_loads_them_lazily():
    code = textwrap.dedent(
        """
        import importlib.util, sys
        import eqsolve
        assert not {"torch", "jax", "cupy"} & set(sys.modules), sorted(sys.modules)
        if importlib.util.find_spec("torch") is not None:
            assert eqsolve.torch.fixed_point is sys.modules["eqsolve.torch"].fixed_point
        if importlib.util.find_spec("jax") is not None:
            assert callable(eqsolve.jax.fixed_point)
        assert "torch" in dir(eqsolve)
        try:
            eqsolve.nonexistent
        except AttributeError as exc:
            assert "nonexistent" in str(exc)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_signature_shows_the_real_keywords():
    params = inspect.signature(eqsolve.fixed_point).parameters
    for name in ("solver", "tol", "atol", "max_iter", "batch_axis", "backend", "on_failure",
                 "sync_stop", "backward"):
        assert name in params, name
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["tol"].default == 1e-6 and params["max_iter"].default == 100


@pytest.mark.parametrize(
    "wrong, meant",
    [("tolerance", "tol"), ("max_iters", "max_iter"), ("maxiter", "max_iter"), ("atoll", "atol"),
     ("batchaxis", "batch_axis"), ("on_fail", "on_failure"), ("method", "solver")],
)
def test_misspelled_keyword_suggests_the_keyword(backend, wrong, meant):
    f = Counting(lambda z: 0.5 * z)
    for entry in (eqsolve.fixed_point, eqsolve.solve):
        with pytest.raises(TypeError, match=rf"'{wrong}' \(did you mean '{meant}'\?\)"):
            entry(f, from_numpy(np.zeros((2, 3)), backend), **{wrong: 1})
    assert f.calls == 0


def test_unknown_solver_option_still_names_the_solver_options():
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'mm' for solver 'anderson'"):
        eqsolve.fixed_point(np.cos, np.zeros((2, 1)), solver="anderson", mm=3)


# ------------------------------------------- eqsolve.fixed_point routes torch solves to the adapter


@TORCH
def test_top_level_fixed_point_is_differentiable_on_torch():
    import torch

    import eqsolve.torch

    """eqsolve.fixed_point on tensors (grad mode on) gives the same gradient as the adapter."""
    torch.manual_seed(0)
    W = (0.1 * torch.randn(6, 6, dtype=torch.float64)).requires_grad_()
    x = torch.randn(3, 6, dtype=torch.float64)

    def grad_of(fp):
        W.grad = None
        sol = fp(lambda z: torch.tanh(z @ W + x), torch.zeros(3, 6, dtype=torch.float64), tol=1e-12)
        sol.value.pow(2).sum().backward()
        return W.grad.clone()

    g_top = grad_of(eqsolve.fixed_point)
    g_adapter = grad_of(eqsolve.torch.fixed_point)
    torch.testing.assert_close(g_top, g_adapter, rtol=1e-12, atol=1e-14)
    assert float(g_top.abs().max()) > 0.0
    with torch.no_grad():  # no grad mode: the plain solve, no graph
        z0 = torch.zeros(3, 6, dtype=torch.float64)
        sol = eqsolve.fixed_point(lambda z: torch.tanh(z @ W + x), z0)
    assert sol.value.grad_fn is None


@TORCH
def test_top_level_fixed_point_backend_torch_converts_and_differentiates():
    import torch

    W = (0.1 * torch.randn(5, 5, dtype=torch.float64)).requires_grad_()
    sol = eqsolve.fixed_point(lambda z: torch.tanh(z @ W + 1.0), np.zeros((2, 5)), backend="torch")
    assert isinstance(sol.value, torch.Tensor) and sol.value.grad_fn is not None
    sol.value.sum().backward()
    assert W.grad is not None and float(W.grad.abs().max()) > 0.0


# ------------------------------------------------------------------- warnings' location


def test_forward_warning_points_at_the_caller(backend):
    z0 = from_numpy(np.zeros((2, 3)), backend)
    for entry in (eqsolve.fixed_point, eqsolve.solve):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            entry(lambda z: 0.9 * z + 1.0, z0, tol=1e-12, max_iter=2, solver="picard")
        [w] = [w for w in caught if issubclass(w.category, eqsolve.ConvergenceWarning)]
        assert w.filename == __file__, (entry.__name__, w.filename)


@TORCH
def test_torch_backward_warning_points_at_the_backward_call():
    import torch

    import eqsolve.torch as et

    W = torch.nn.Parameter(0.95 * torch.eye(4, dtype=torch.float64))
    sol = et.fixed_point(lambda z: z @ W.T + 1.0, torch.zeros(2, 4, dtype=torch.float64),
                         tol=1e-10, max_iter=1000, backward=eqsolve.Implicit("neumann", max_iter=3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol.value.sum().backward()
    [w] = [w for w in caught if issubclass(w.category, eqsolve.ConvergenceWarning)]
    assert w.filename == __file__, w.filename


def test_default_filter_shows_the_warning_of_each_call_site():
    code = textwrap.dedent(
        """
        import numpy as np, eqsolve
        f = lambda z: 0.9 * z + 1.0
        for _ in range(2):
            eqsolve.fixed_point(f, np.zeros((2, 3)), tol=1e-12, max_iter=2, solver="picard")
        eqsolve.fixed_point(f, np.zeros((2, 3)), tol=1e-12, max_iter=2, solver="picard")
        """
    )
    out = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "ConvergenceWarning" in ln]
    # the loop's line warns once (the default filter), the second call site once more
    assert len(lines) == 2 and lines[0] != lines[1], out.stderr
    assert all(ln.startswith("<string>:") for ln in lines), out.stderr


@pytest.mark.parametrize("name", ["backward", "on_backward", "f_dtype"])
def test_solve_says_gradient_keywords_belong_to_fixed_point(backend, name):
    """``solve`` computes no gradient: a keyword of the gradient is refused by name, and the
    message neither lists it among solve's keywords nor suggests it for itself."""
    f = Counting(lambda z: 0.5 * z)
    with pytest.raises(TypeError, match=rf"solve\(\) got an unexpected keyword argument "
                                        rf"'{name}': it computes no gradient; fixed_point") as e:
        eqsolve.solve(f, from_numpy(np.zeros((2, 3)), backend), **{name: "anderson"})
    assert "did you mean" not in str(e.value)
    assert f.calls == 0
