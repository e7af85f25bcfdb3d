"""The benchmark problems (bench.problems): identical builds on every backend, the
float64 references, the trained digits cell and the conv cell."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from bench.native import Native
from bench.problems import (
    DEFAULT_PROBLEMS,
    DIGITS_FILE,
    PROBLEMS,
    ConvProblem,
    TanhProblem,
    digits_accuracy,
    load_digits_cell,
    make_problem,
)
from eqsolve.backends import BackendUnavailableError

TANH_FAMILY = ("tanh", "tanh-wide", "sym", "digits")
TOL = {"float64": 1e-12, "float32": 1e-5}


def _build(problem, backend: str, dtype: str):
    """``problem.build`` or skip (with the reason) where that backend is not usable here."""
    try:
        return problem.build(backend, dtype)
    except BackendUnavailableError as err:
        pytest.skip(str(err))


def _native(backend: str, dtype: str, a: np.ndarray):
    return Native(backend, dtype)(a)


# --------------------------------------------------------------------------- the registry


def test_registry_and_errors():
    assert set(DEFAULT_PROBLEMS) <= set(PROBLEMS)
    with pytest.raises(ValueError, match="unknown problem"):
        make_problem("nope")
    with pytest.raises(ValueError, match="unknown size"):
        make_problem("tanh", size="huge")
    p = make_problem("tanh", size="tiny")
    with pytest.raises(ValueError, match="unknown backend"):
        p.build("tensorflow", "float64")
    with pytest.raises(ValueError, match="unknown dtype"):
        p.build("numpy", "float16")
    with pytest.raises(ValueError, match="cannot be built on 'numpy'"):
        make_problem("conv", size="tiny").build("numpy", "float64")


@pytest.mark.parametrize(
    "name, shape",
    [
        ("tanh", (4, 16)),
        ("tanh-wide", (4, 16)),
        ("sym", (4, 16)),
        ("digits", (4, 128)),
        ("conv", (2, 4, 4, 4)),
    ],
)
def test_tiny_sizes(name, shape):
    if name == "conv" and not any(importlib.util.find_spec(m) for m in ("torch", "jax")):
        pytest.skip("the conv problem's references need torch or jax; neither is installed")
    p = make_problem(name, size="tiny")
    assert p.reference_fixed_point().shape == shape
    json.dumps(p.meta)  # the runner writes it to the JSON file


# --------------------------------------------------------------------------- tanh family


@pytest.mark.parametrize("name", ["tanh", "tanh-wide", "sym"])
def test_tanh_family_same_numbers_as_old_builder(name):
    p = make_problem(name)
    assert p.shape == (64, 256) and p.p == 64
    # fingerprints of the draws of the scripts' former builder (its code is gone); W goes
    # through LAPACK (2-norm, QR), so it is compared to 1e-12 rather than bit for bit
    fingerprints = {
        "tanh": (0.0035870228450116766, -0.023700954486997623),
        "tanh-wide": (0.007971161877803725, -0.0526687877488836),
        "sym": (0.5212836693567873, 0.005305106791751013),
    }
    np.testing.assert_allclose([p.W[0, 0], p.W[1, 2]], fingerprints[name], rtol=1e-12)
    assert p.x[0, 0] == 0.9244448003665556  # x is drawn last, after d*d + d*p + d normals


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax", "cupy", "torch-cuda"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", TANH_FAMILY)
def test_tanh_family_builds_identically(name, backend, dtype):
    p = make_problem(name, size="tiny")
    case = _build(p, backend, dtype)
    assert (case.problem, case.backend, case.dtype) == (name, backend, dtype)
    z = np.random.default_rng(1).uniform(-1, 1, p.shape)
    want = p.f64(z)
    zn = _native(backend, dtype, z)
    got = case.to_numpy(case.sync(case.f(zn)))
    assert got.dtype == np.dtype(dtype) and got.shape == p.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL[dtype])
    np.testing.assert_allclose(case.to_numpy(case.f_x(zn, case.x)), want, rtol=0, atol=TOL[dtype])
    # the inputs are the float64 ones cast: bit-identical on every backend
    np.testing.assert_array_equal(case.to_numpy(case.x), p.x.astype(dtype))
    np.testing.assert_array_equal(case.to_numpy(case.z0), np.zeros(p.shape, dtype))
    assert case.meta["d"] == p.d and case.meta["B"] == p.B
    if backend == "jax":
        assert hasattr(case.f, "lower")  # jax.jit-ed


def test_torch_f_x_is_differentiable_in_x():
    torch = pytest.importorskip("torch")
    p = make_problem("tanh", size="tiny")
    case = p.build("torch", "float64")
    x = case.x.clone().requires_grad_(True)
    z = torch.zeros(p.shape, dtype=torch.float64)
    case.f_x(z, x).sum().backward()
    want = (1.0 - p.f64(np.zeros(p.shape)) ** 2) @ p.U  # d sum(tanh(x U^T + b)) / dx
    np.testing.assert_allclose(x.grad.numpy(), want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", TANH_FAMILY)
def test_reference_fixed_point(name):
    p = make_problem(name, size="tiny")
    z = p.reference_fixed_point()
    assert np.max(p.residual(z)) < 1e-12
    np.testing.assert_allclose(z, p.f64(z), rtol=0, atol=1e-13)


def test_reference_gradient_known_answer():
    """W = 0: z* = tanh(x U^T + b) exactly, u = g, dL/dx = (g * (1 - z*^2)) U."""
    rng = np.random.default_rng(3)
    d, p_, B = 6, 4, 3
    U, b, x = rng.standard_normal((d, p_)), rng.standard_normal(d), rng.standard_normal((B, p_))
    prob = TanhProblem("zero", np.zeros((d, d)), U, b, x)
    z = np.tanh(x @ U.T + b)
    g = rng.standard_normal((B, d))
    np.testing.assert_allclose(prob.reference_fixed_point(), z, rtol=0, atol=1e-15)
    np.testing.assert_allclose(prob.reference_adjoint(g), g, rtol=0, atol=1e-15)
    np.testing.assert_allclose(
        prob.reference_input_grad(g), (g * (1 - z**2)) @ U, rtol=1e-14, atol=1e-15
    )


def test_reference_adjoint_solves_the_adjoint_system():
    p = make_problem("sym", size="tiny")
    g = np.random.default_rng(4).standard_normal(p.shape)
    u = p.reference_adjoint(g)
    J = p.jacobian(p.reference_fixed_point())
    np.testing.assert_allclose(u - np.einsum("bij,bi->bj", J, u), g, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["tanh", "tanh-wide"])
def test_reference_gradient_matches_finite_differences(name):
    p = make_problem(name, size="tiny")
    g = np.random.default_rng(5).standard_normal(p.shape)
    grad = p.reference_input_grad(g)
    h = 1e-6
    fd = np.empty_like(p.x)
    for idx in np.ndindex(*p.x.shape):
        loss = []
        for s in (h, -h):
            x = p.x.copy()
            x[idx] += s
            z = TanhProblem("fd", p.W, p.U, p.b, x).reference_fixed_point()
            loss.append(np.sum(z * g))
        fd[idx] = (loss[0] - loss[1]) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-7, atol=1e-8)


# --------------------------------------------------------------------------- digits


def test_digits_file_and_its_accuracy():
    assert DIGITS_FILE.is_file()
    assert DIGITS_FILE.stat().st_size < 300_000
    cell = load_digits_cell()
    assert cell["W"].shape == (128, 128) and cell["U"].shape == (128, 64)
    assert cell["head_W"].shape == (10, 128) and cell["W"].dtype == np.float64
    assert cell["test_x"].min() >= 0.0 and cell["test_x"].max() <= 1.0
    # the stored accuracy is what the stored weights give (float64, recomputed here)
    assert digits_accuracy(cell) == cell["test_accuracy"]
    assert cell["test_accuracy"] > 0.95
    assert np.linalg.norm(cell["W"], 2) <= 0.95 + 1e-6  # the documented contraction
    assert "train_digits_cell.py" in cell["command"]


def test_digits_problem_batches():
    cell = load_digits_cell()
    p = make_problem("digits")
    assert p.shape == (64, 128) and p.meta["test_accuracy"] == cell["test_accuracy"]
    np.testing.assert_array_equal(p.x, cell["test_x"][:64])
    np.testing.assert_array_equal(make_problem("digits", size="tiny").x, cell["test_x"][:4])
    other = make_problem("digits", size="tiny", seed=1)
    assert not np.array_equal(other.x, p.x[:4])
    assert other.x.shape == (4, 64)


# --------------------------------------------------------------------------- conv


@pytest.fixture(scope="module")
def conv_tiny():
    pytest.importorskip("torch", reason="the conv references run on torch (or jax)")
    return make_problem("conv", size="tiny")


@pytest.mark.parametrize("backend", ["torch", "jax", "torch-cuda"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_conv_builds_identically(conv_tiny, backend, dtype):
    p = conv_tiny
    case = _build(p, backend, dtype)
    z = np.random.default_rng(6).standard_normal(p.shape)
    want = p.f64(z)  # torch float64
    zn = _native(backend, dtype, z)
    got = case.to_numpy(case.sync(case.f(zn)))
    assert got.dtype == np.dtype(dtype) and got.shape == p.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL[dtype])
    np.testing.assert_allclose(case.to_numpy(case.f_x(zn, case.x)), want, rtol=0, atol=TOL[dtype])
    np.testing.assert_array_equal(case.to_numpy(case.x), p.x.astype(dtype))


def test_conv_torch_and_jax_agree(conv_tiny):
    pytest.importorskip("jax")
    p = conv_tiny
    z = np.random.default_rng(7).standard_normal(p.shape)
    t, j = p.build("torch", "float64"), p.build("jax", "float64")
    ft = t.to_numpy(t.f(_native("torch", "float64", z)))
    fj = j.to_numpy(j.f(_native("jax", "float64", z)))
    np.testing.assert_allclose(ft, fj, rtol=0, atol=1e-12)


def test_conv_reference(conv_tiny):
    p = conv_tiny
    z = p.reference_fixed_point()
    assert np.max(p.residual(z)) < 1e-12
    g = np.random.default_rng(8).standard_normal(p.shape)
    grad = p.reference_input_grad(g)
    assert grad.shape == p.shape
    # central differences of the reference fixed point in a few entries of x
    h = 1e-6
    for idx in [(0, 1, 2, 3), (1, 3, 3, 1)]:
        loss = []
        for s in (h, -h):
            x = p.x.copy()
            x[idx] += s
            q = ConvProblem(p.params, x, p.groups)
            loss.append(np.sum(q.reference_fixed_point() * g))
        assert abs((loss[0] - loss[1]) / (2 * h) - grad[idx]) < 1e-7 * (1 + abs(grad[idx]))


def test_conv_reference_on_jax_matches_torch(conv_tiny):
    pytest.importorskip("jax")
    p = conv_tiny
    q = ConvProblem(p.params, p.x, p.groups)
    import jax

    nat = Native("jax", "float64")
    q._ref = ("jax", nat, jax.jit(q._jax_cell(nat)))  # the path taken without torch
    g = np.random.default_rng(9).standard_normal(p.shape)
    np.testing.assert_allclose(q.reference_fixed_point(), p.reference_fixed_point(), atol=1e-13)
    np.testing.assert_allclose(
        q.reference_input_grad(g), p.reference_input_grad(g), rtol=1e-10, atol=1e-12
    )
