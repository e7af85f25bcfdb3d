"""bench.peers: every installed peer solves a tiny contraction to the tolerance.

Tiny hand-built Cases: ``f(z) = tanh(z W^T + x U^T + b)``, d=8, p=4, B=3, float64 (and one
float32 JAX case), checked against a fixed point computed here in NumPy. Peers that are not
installed are skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from bench.case import Case
from bench.instrument import instrument
from bench.peers import PEERS, PeerSolver, missing_peers, peer_solvers

D, P, B = 8, 4, 3
TOL = 1e-8
MAX_ITER = 200
_rng = np.random.default_rng(0)
W = _rng.standard_normal((D, D))
W *= 0.6 / np.linalg.norm(W, 2)
U = _rng.standard_normal((D, P)) / np.sqrt(P)
BIAS = 0.1 * _rng.standard_normal(D)
X = _rng.standard_normal((B, P))
INJ = X @ U.T + BIAS


def f64(z: np.ndarray) -> np.ndarray:
    return np.tanh(z @ W.T + INJ)


def _fixed_point() -> np.ndarray:
    z = np.zeros((B, D))
    for _ in range(500):
        z = f64(z)
    return z


Z_STAR = _fixed_point()


def rel_residual(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    fz = f64(z)
    return np.linalg.norm(fz - z, axis=1) / np.linalg.norm(fz, axis=1)


def reference_input_grad(g: np.ndarray) -> np.ndarray:
    """dL/dx for L = sum(z* * g): u_b = (I - J_b^T)^{-1} g_b, dL/dx_b = U^T (s_b * u_b)."""
    s = 1.0 - Z_STAR**2  # tanh'
    out = np.empty((B, P))
    for b in range(B):
        J = s[b][:, None] * W
        u = np.linalg.solve(np.eye(D) - J.T, g[b])
        out[b] = U.T @ (s[b] * u)
    return out


def _skip_unless(*modules: str) -> None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} not installed")


def make_case(framework: str, dtype: str = "float64") -> Case:
    if framework == "numpy":
        Wd, Ud, bd, inj, x = (a.astype(dtype) for a in (W, U, BIAS, INJ, X))
        return Case(
            "tiny",
            "numpy",
            "numpy",
            dtype,
            lambda z: np.tanh(z @ Wd.T + inj),
            np.zeros((B, D), dtype),
            x,
            lambda z, xx: np.tanh(z @ Wd.T + xx @ Ud.T + bd),
        )
    if framework == "torch":
        import torch

        t = getattr(torch, dtype)
        Wt, Ut, bt, it, xt = (torch.as_tensor(a, dtype=t) for a in (W, U, BIAS, INJ, X))
        return Case(
            "tiny",
            "torch",
            "torch",
            dtype,
            lambda z: torch.tanh(z @ Wt.T + it),
            torch.zeros(B, D, dtype=t),
            xt,
            lambda z, xx: torch.tanh(z @ Wt.T + xx @ Ut.T + bt),
            to_numpy=lambda a: a.detach().cpu().numpy(),
        )
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        jax.config.update("jax_enable_x64", True)
        Wj, Uj, bj, ij, xj = (jnp.asarray(a, dtype=dtype) for a in (W, U, BIAS, INJ, X))
        return Case(
            "tiny",
            "jax",
            "jax",
            dtype,
            jax.jit(lambda z: jnp.tanh(z @ Wj.T + ij)),
            jnp.zeros((B, D), dtype),
            xj,
            jax.jit(lambda z, xx: jnp.tanh(z @ Wj.T + xx @ Uj.T + bj)),
            sync=jax.block_until_ready,
            to_numpy=np.asarray,
        )
    raise ValueError(framework)


FRAMEWORK_NEEDS = {"numpy": ("scipy",), "torch": ("torch",), "jax": ("jax",)}
EXPECTED_ROWS = {
    "numpy": {
        ("scipy", "anderson"),
        ("scipy", "broyden"),
        ("scipy", "newton-krylov"),
    },
    "torch": {("torchdeq", "anderson"), ("torchdeq", "broyden"), ("torchdeq", "picard")},
    "jax": {
        ("jaxopt", "picard"),
        ("jaxopt", "anderson"),
        ("jaxopt", "broyden"),
        ("optimistix", "picard"),
        ("optimistix", "newton"),
        ("optimistix", "newton-krylov"),
    },
}


def rows_for(framework: str, dtype: str = "float64", **kw) -> tuple[Case, list[PeerSolver]]:
    _skip_unless(*FRAMEWORK_NEEDS[framework])
    if not peer_libraries_installed(framework):
        pytest.skip(f"no peer installed for {framework}: {missing_peers(framework)}")
    case = make_case(framework, dtype)
    return case, peer_solvers(case, tol=kw.get("tol", TOL), max_iter=kw.get("max_iter", MAX_ITER))


def peer_libraries_installed(framework: str) -> bool:
    return any(importlib.util.find_spec(lib) is not None for lib in PEERS[framework])


# ----------------------------------------------------------------------------- listing


def test_missing_peers_names_the_install_command(monkeypatch):
    import bench.peers as peers

    real = importlib.util.find_spec
    monkeypatch.setattr(
        peers.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torchdeq" else real(name, *a),
    )
    lines = missing_peers("torch")
    assert lines == ["torchdeq not installed: pip install -c constraints.txt -e '.[bench]'"]
    assert missing_peers("cupy") == []
    with pytest.raises(ValueError):
        missing_peers("tensorflow")


def test_missing_peers_is_empty_when_installed():
    for framework, libs in PEERS.items():
        if all(importlib.util.find_spec(lib) is not None for lib in libs):
            assert missing_peers(framework) == []


def test_cupy_has_no_peers():
    case = Case("t", "cupy", "cupy", "float64", lambda z: z, np.zeros((1, 1)), None, None)  # type: ignore[arg-type]
    assert peer_solvers(case, tol=TOL, max_iter=10) == []


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_rows_are_described_and_json_serialisable(framework):
    case, rows = rows_for(framework)
    installed = {(lib, m) for lib, m in EXPECTED_ROWS[framework] if importlib.util.find_spec(lib)}
    assert {(r.library, r.method) for r in rows} == installed
    names = [r.name for r in rows]
    assert len(names) == len(set(names))
    for r in rows:
        assert r.variant in ("defaults", "tuned")
        assert r.method in ("picard", "anderson", "broyden", "newton", "newton-krylov")
        json.dumps(r.settings, allow_nan=False)
        assert r.notes and r.call
    # every peer has its defaults row
    for lib, method in installed:
        if (lib, method) != ("optimistix", "newton-krylov"):
            assert any(
                r.library == lib and r.method == method and r.variant == "defaults" for r in rows
            )


# ----------------------------------------------------------------------------- solving


def _solve_checked(case: Case, solve, name: str, tol: float) -> np.ndarray:
    z = case.to_numpy(case.sync(solve()))
    assert z.shape == (B, D), name
    res = rel_residual(z)
    assert np.all(res <= tol * 1.01), (name, res)
    np.testing.assert_allclose(z, Z_STAR, atol=max(1e3 * tol, 1e-7), err_msg=name)
    return z


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_every_peer_solves_to_tolerance_and_is_counted(framework):
    case, rows = rows_for(framework)
    for row in rows:
        f_counted, rec = instrument(case, case.f)
        solve = row.make(f_counted)
        z = _solve_checked(case, solve, row.name, TOL)
        n = rec.nfev
        assert 1 < n <= 50 * MAX_ITER, row.name
        assert len(rec.history) == n and min(rec.history) <= 10 * TOL, row.name
        again = _solve_checked(case, solve, row.name, TOL)  # callable can run again
        np.testing.assert_allclose(again, z, rtol=0, atol=1e-12, err_msg=row.name)
        assert rec.nfev == 2 * n, row.name
        if framework != "jax":  # the raw f (the timed path); on JAX compiling twice is slow
            _solve_checked(case, row.make(case.f), row.name, TOL)


def test_jax_peers_in_float32_with_x64_enabled():
    """The benchmark runs JAX with x64 on; float32 peers must still trace and converge
    (jaxopt Anderson and optimistix fixed-point iteration create default-dtype state;
    lineax GMRES stagnated in float32 with atol=0)."""
    case, rows = rows_for("jax", "float32")
    import jax.numpy as jnp

    picked = [
        r
        for r in rows
        if (r.library, r.method, r.variant)
        in {
            ("jaxopt", "anderson", "tuned"),
            ("optimistix", "picard", "defaults"),
            ("optimistix", "newton-krylov", "tuned"),
        }
    ]
    assert picked
    for row in picked:
        z = row.make(case.f)()
        assert z.dtype == jnp.float32, row.name
        assert np.all(rel_residual(np.asarray(z)) <= 1e-5 * 1.01), row.name


def test_torchdeq_counts_match_its_own_step_count():
    _skip_unless("torch", "torchdeq")
    import torch
    from torchdeq.solver import get_solver

    case = make_case("torch")
    (row,) = [r for r in peer_solvers(case, tol=TOL, max_iter=MAX_ITER) if r.method == "picard"]
    f_counted, rec = instrument(case, case.f)
    row.make(f_counted)()
    with torch.no_grad():
        _, _, info = get_solver("fixed_point_iter")(
            case.f, case.z0, max_iter=MAX_ITER, tol=TOL, stop_mode="rel"
        )
    # fixed_point_iter evaluates f once per step; it stops at the first step below tol
    assert rec.nfev == int(info["nstep"].max())


# ----------------------------------------------------------------------------- failures


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_running_out_of_iterations_returns_an_iterate(framework):
    """max_iter reached: no exception, an unconverged iterate of the right shape."""
    case, rows = rows_for(framework, max_iter=3)
    for row in rows:
        if row.library == "optimistix" and row.method == "newton":
            continue  # converges in 3 Newton steps on this problem
        z = case.to_numpy(case.sync(row.make(case.f)()))
        assert z.shape == (B, D), row.name
        assert np.all(np.isfinite(z)), row.name


def test_dense_newton_refuses_big_batches():
    _skip_unless("jax", "optimistix")
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    Bb, Db = 64, 256  # the P1 sizes: a 16384^2 float64 Jacobian (2 GiB)
    case = Case(
        "big",
        "jax",
        "jax",
        "float64",
        jax.jit(jnp.tanh),
        jnp.full((Bb, Db), 0.5),
        None,
        None,  # type: ignore[arg-type]
    )
    (row,) = [r for r in peer_solvers(case, tol=TOL, max_iter=10) if r.method == "newton"]
    with pytest.raises(MemoryError, match="dense 16384x16384 Jacobian"):
        row.make(case.f)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_peer_gradients_match_the_dense_reference(framework):
    case, rows = rows_for(framework)
    g = np.random.default_rng(1).standard_normal((B, D))
    ref = reference_input_grad(g)
    if framework == "torch":
        import torch

        g_native = torch.as_tensor(g)
    else:
        import jax.numpy as jnp

        g_native = jnp.asarray(g)
    checked = 0
    for row in rows:
        if row.grad is None:
            continue
        if framework == "jax" and row.method not in ("picard", "anderson", "newton-krylov"):
            continue  # compile time: the picard, anderson and newton-krylov rows cover
            # both jaxopt implicit-diff solvers and optimistix's ImplicitAdjoint
        dx = np.asarray(case.to_numpy(row.grad(g_native)), dtype=np.float64)
        err = np.linalg.norm(dx - ref) / np.linalg.norm(ref)
        # jaxopt's default implicit-diff solver is CG on the normal equations at tol 1e-5
        limit = 1e-4 if (row.library == "jaxopt" and row.variant == "defaults") else 1e-6
        assert err < limit, (row.name, err)
        checked += 1
    assert checked > 0


def test_scipy_rows_have_no_gradient():
    case, rows = rows_for("numpy")
    assert all(r.grad is None for r in rows)
