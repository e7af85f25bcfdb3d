"""bench.instrument: f-evaluation counts and residual histories on every framework."""

from __future__ import annotations

import numpy as np
import pytest

from bench.case import Case
from bench.instrument import Recorder, instrument, relative_residual

D, B = 6, 3
_rng = np.random.default_rng(0)
W = _rng.standard_normal((D, D))
W *= 0.5 / np.linalg.norm(W, 2)
INJ = _rng.standard_normal((B, D))


def f_np(z: np.ndarray) -> np.ndarray:
    return np.tanh(z @ W.T + INJ)


def picard_residuals(n: int) -> list[float]:
    """Residuals at z_0 = 0, z_1 = f(z_0), ... (the points a Picard loop evaluates)."""
    z, out = np.zeros((B, D)), []
    for _ in range(n):
        fz = f_np(z)
        num = np.linalg.norm(fz - z, axis=1)
        out.append(float(np.max(num / np.linalg.norm(fz, axis=1))))
        z = fz
    return out


def test_relative_residual_is_the_batch_max_of_per_sample_ratios():
    z = np.array([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    fz = np.array([[1.0, 1.0], [0.0, 0.0], [3.0, 4.0]])
    assert relative_residual(z, fz) == pytest.approx(1 / np.sqrt(2))
    assert relative_residual(np.zeros((2, 2)), np.zeros((2, 2))) == 0.0  # 0/0 -> 0
    assert relative_residual(np.ones((1, 2)), np.zeros((1, 2))) == float("inf")
    # an overflowed iterate is NaN, never an exact fixed point (NaN compares False to 0)
    nan = np.full((1, 2), np.nan)
    assert np.isnan(relative_residual(nan, nan))
    assert np.isnan(relative_residual(np.zeros((1, 2)), np.full((1, 2), np.inf)))


def test_unknown_framework_raises():
    with pytest.raises(ValueError, match="unknown framework"):
        instrument("tensorflow", f_np)


def test_numpy_counts_every_call_and_records_residuals():
    fi, rec = instrument("numpy", f_np)
    assert isinstance(rec, Recorder) and rec.nfev == 0 and rec.history == []
    z = np.zeros((B, D))
    for _ in range(7):
        out = fi(z)
        np.testing.assert_array_equal(out, f_np(z))
        z = out
    assert rec.nfev == 7
    np.testing.assert_allclose(rec.history, picard_residuals(7), rtol=1e-12)
    rec.reset()
    assert rec.nfev == 0 and rec.history == []
    fi(z)
    assert rec.nfev == 1


def test_framework_is_taken_from_a_case():
    case = Case("t", "numpy", "numpy", "float64", f_np, np.zeros((B, D)), None, lambda z, x: z)
    fi, rec = instrument(case, case.f)
    fi(case.z0)
    assert rec.framework == "numpy" and rec.nfev == 1


def test_torch_counts_and_keeps_autograd():
    torch = pytest.importorskip("torch")
    Wt, it = torch.from_numpy(W), torch.from_numpy(INJ)

    def f(z):
        return torch.tanh(z @ Wt.T + it)

    fi, rec = instrument("torch", f)
    z = torch.zeros(B, D, dtype=torch.float64)
    for _ in range(5):
        z = fi(z)
    assert rec.nfev == 5
    np.testing.assert_allclose(rec.history, picard_residuals(5), rtol=1e-12)

    # the wrapped value is f's own tensor: gradients flow exactly as through f
    y = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    (g_wrapped,) = torch.autograd.grad(fi(y).sum(), y)
    (g_plain,) = torch.autograd.grad(f(y).sum(), y)
    torch.testing.assert_close(g_wrapped, g_plain)
    assert rec.nfev == 6

    # float32 tensors: residual computed in float64 from the float32 values
    W32, i32 = Wt.float(), it.float()
    fi32, rec = instrument("torch", lambda z: torch.tanh(z @ W32.T + i32))
    z32 = torch.zeros(B, D, dtype=torch.float32)
    out = fi32(z32)
    assert out.dtype == torch.float32
    expected = relative_residual(z32.numpy(), out.numpy())
    assert rec.history == [pytest.approx(expected, rel=1e-12)]


@pytest.fixture
def jax_f():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    Wj, ij = jnp.asarray(W), jnp.asarray(INJ)
    return jax.jit(lambda z: jnp.tanh(z @ Wj.T + ij))


def test_jax_eager_and_jit(jax_f):
    import jax
    import jax.numpy as jnp

    fi, rec = instrument("jax", jax_f)
    z = jnp.zeros((B, D))
    for _ in range(3):
        z = fi(z)
    assert rec.nfev == 3
    g = jax.jit(fi)
    g(z)
    g(z)  # second call: compiled, callback still runs
    assert rec.nfev == 5


def test_jax_counts_inside_fori_and_while_loops(jax_f):
    import jax
    import jax.numpy as jnp

    fi, rec = instrument("jax", jax_f)
    z0 = jnp.zeros((B, D))
    fori = jax.jit(lambda z: jax.lax.fori_loop(0, 9, lambda i, z: fi(z), z))
    jax.block_until_ready(fori(z0))
    assert rec.nfev == 9
    np.testing.assert_allclose(rec.history, picard_residuals(9), rtol=1e-10)

    rec.reset()

    def body(carry):
        z, k = carry
        return fi(z), k + 1

    wl = jax.jit(lambda z: jax.lax.while_loop(lambda c: c[1] < 11, body, (z, 0))[0])
    jax.block_until_ready(wl(z0))
    assert rec.nfev == 11
    np.testing.assert_allclose(rec.history, picard_residuals(11), rtol=1e-10)


def test_jax_transformations_count_primal_evaluations(jax_f):
    """jvp / linearize / grad / jacfwd / jacrev: one evaluation each; vmap: one per element."""
    import jax
    import jax.numpy as jnp

    fi, rec = instrument("jax", jax_f)
    z = jnp.full((B, D), 0.1)
    cases = {
        "jvp": lambda: jax.jvp(fi, (z,), (jnp.ones_like(z),)),
        "linearize": lambda: jax.linearize(fi, z)[1](jnp.ones_like(z)),
        "grad": lambda: jax.grad(lambda z: fi(z).sum())(z),
        "jacfwd": lambda: jax.jit(jax.jacfwd(fi))(z),
        "jacrev": lambda: jax.jacrev(fi)(z),
    }
    for name, fn in cases.items():
        rec.reset()
        jax.block_until_ready(fn())
        assert rec.nfev == 1, name
    rec.reset()
    jax.block_until_ready(jax.vmap(fi)(jnp.stack([z, 2 * z, 3 * z, 4 * z])))
    assert rec.nfev == 4


def test_jax_history_of_a_vmapped_call_is_per_element(jax_f):
    import jax
    import jax.numpy as jnp

    fi, rec = instrument("jax", jax_f)
    zs = jnp.stack([jnp.zeros((B, D)), jnp.asarray(f_np(np.zeros((B, D))))])
    jax.block_until_ready(jax.vmap(fi)(zs))
    np.testing.assert_allclose(sorted(rec.history), sorted(picard_residuals(2)), rtol=1e-10)


def test_cupy_path_with_a_numpy_stand_in(monkeypatch):
    """The CuPy wrapper's logic, run on a stand-in module (no GPU needed)."""
    import sys
    import types

    fake = types.SimpleNamespace(float64=np.float64, linalg=np.linalg, asnumpy=np.asarray)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    fi, rec = instrument("cupy", f_np)
    z = np.zeros((B, D))
    for _ in range(4):
        z = fi(z)
    assert rec.nfev == 4
    np.testing.assert_allclose(rec.history, picard_residuals(4), rtol=1e-12)


@pytest.mark.gpu
def test_cupy_on_a_gpu():
    cupy = pytest.importorskip("cupy")
    if not cupy.cuda.is_available():
        pytest.skip("no CUDA GPU")
    Wc, ic = cupy.asarray(W), cupy.asarray(INJ)
    fi, rec = instrument("cupy", lambda z: cupy.tanh(z @ Wc.T + ic))
    z = cupy.zeros((B, D))
    for _ in range(3):
        z = fi(z)
    assert rec.nfev == 3
    np.testing.assert_allclose(rec.history, picard_residuals(3), rtol=1e-10)
