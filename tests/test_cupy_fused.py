"""The fused CuPy driver (``eqsolve.backends.cupy.fused``), its options and the CuPy adapter.

Without a GPU (CI, this machine) the fused *driver* -- the host loop that ``eqsolve`` runs on
CuPy arrays -- is run on NumPy with the NumPy reference of each kernel
(``tests/cupy_reference.py``) standing in for the GPU, and compared iterate for iterate with
the generic Array-API loop (``core``): every point handed to ``f``, per-sample status /
iterations / best iterate / residual, and ``nfev`` (``tests/cupy_runs.py``). The CUDA source
itself runs on the CPU in ``test_cupy_emulated.py``. The GPU tests at the end compare the
fused CuPy path with the generic CuPy path (float64 to 1e-12, float32 to 1e-5); they skip,
saying so, where no CUDA GPU is available.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

import eqsolve
from conftest import to_numpy
from cupy_reference import ReferenceExecutor
from cupy_runs import (
    SOLVERS,
    TOL,
    TRAJ_ATOL,
    Recorder,
    assert_same_run,
    bad_cell,
    make_problem,
    run_both,
)
from eqsolve import Anderson, Broyden, Picard, Status
from eqsolve.adapters import cupy as ac
from eqsolve.backends import get_backend
from eqsolve.backends.cupy import fused as drv
from eqsolve.backends.cupy import options as opt
from eqsolve.core.adjoint import adjoint_solve
from eqsolve.core.loop import StopRule

# --------------------------------------------------------------------------------------
# the fused driver on the NumPy reference of each kernel vs the generic loop
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_reference_matches_generic(name, dtype):
    cell, z0 = make_problem(dtype)
    rule = StopRule(TOL[dtype], 0.0, 200)
    gen, gi, fused, fi = run_both(ReferenceExecutor(), cell, z0, SOLVERS[name], rule)
    assert (gen.status == int(Status.CONVERGED)).all()
    assert_same_run(gen, gi, fused, fi, dtype)
    np.testing.assert_array_equal(z0, make_problem(dtype)[1])  # the caller's z0 is untouched
    assert not np.shares_memory(fused.best_z, z0)


@pytest.mark.parametrize("sync_every", [2, 3, 8])
@pytest.mark.parametrize("name", ["picard", "anderson", "broyden"])
def test_sync_every_changes_nothing_but_extra_parked_calls(name, sync_every):
    cell, z0 = make_problem("float64", batch=5)
    rule = StopRule(1e-10, 0.0, 200)
    gen, gi, fused, fi = run_both(
        ReferenceExecutor(), cell, z0, SOLVERS[name], rule, sync_every=sync_every
    )
    assert_same_run(gen, gi, fused, fi, "float64", sync_every=sync_every)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ["picard", "anderson", "broyden", "broyden-restart"])
def test_freezing_nonfinite_and_converged_at_start(name, dtype):
    """Sample 0 starts at its fixed point, sample 1 hits NaN, sample 2 inf, 3 converges."""
    cell, z0 = make_problem(dtype)
    z0[0] = cell.reference_fixed_point()[0].astype(dtype)
    rule = StopRule(TOL[dtype], 0.0, 200)
    gen, gi, fused, fi = run_both(
        ReferenceExecutor(),
        bad_cell(cell),
        z0,
        SOLVERS[name],
        rule,
        f_fused=bad_cell(cell),  # the NaN/inf come on a call count: a fresh copy
    )
    assert list(gen.status) == [0, 2, 2, 0]
    assert list(gen.iterations[:3]) == [0, 2, 3]
    assert_same_run(gen, gi, fused, fi, dtype)
    assert np.isfinite(fused.best_res[1:3]).all()  # the best *finite* iterate is kept


@pytest.mark.parametrize("name", list(SOLVERS))
def test_max_iter_and_atol(name):
    cell, z0 = make_problem("float64")
    for rule in (StopRule(1e-30, 0.0, 7), StopRule(1e-30, 1e-4, 100)):
        gen, gi, fused, fi = run_both(ReferenceExecutor(), cell, z0, SOLVERS[name], rule)
        assert_same_run(gen, gi, fused, fi, "float64")
    assert (fused.status == int(Status.CONVERGED)).all()  # the atol rule stopped it


@pytest.mark.parametrize("name", ["picard", "broyden", "broyden-restart"])
def test_broyden_skips_updates_without_secant_information(name):
    """``f(z) = z + c`` with integer data: ``y = g_new - g = 0`` exactly, so every Broyden
    update is skipped (its terms stay zero) and each step is the plain step."""
    c = np.arange(1.0, 13.0).reshape(3, 4)
    rule = StopRule(1e-3, 0.0, 12)
    gen, gi, fused, fi = run_both(
        ReferenceExecutor(), lambda z: z + c, np.zeros((3, 4)), SOLVERS[name], rule
    )
    assert_same_run(gen, gi, fused, fi, "float64")
    assert (gen.status == int(Status.MAX_ITER)).all()
    if name != "picard":
        assert not np.any(fused.solver.U) and not np.any(fused.solver.V)
        np.testing.assert_array_equal(fused.best_z, 12 * c)


def test_adjoint_solve_on_the_fused_driver():
    """``core.adjoint`` runs its loop on a driver: the fused one gives the same ``u``."""
    cell, _ = make_problem("float64")
    z = cell.reference_fixed_point()
    fz = np.tanh(z @ cell.W.T + cell.inj)
    g = np.random.default_rng(3).standard_normal(z.shape)

    def vjp(v):
        return ((1 - fz**2) * v) @ cell.W

    def driver(f, z0, solver, rule):
        return drv.run_fused(ReferenceExecutor(), f, z0, solver, rule, sync_every=4)

    for method in ("anderson", "neumann", "broyden"):
        u_gen, info_gen = adjoint_solve(np, vjp, g, method=method, tol=1e-12)
        u_fused, info = adjoint_solve(np, vjp, g, method=method, tol=1e-12, driver=driver)
        np.testing.assert_allclose(u_fused, u_gen, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(info.iterations, info_gen.iterations)
        np.testing.assert_allclose(u_fused, cell.reference_adjoint(z, g), rtol=1e-9)


# --------------------------------------------------------------------------------------
# the package's layout: only the backend object needs CuPy and a GPU
# --------------------------------------------------------------------------------------


def test_backend_package_imports_without_cupy():
    """Only ``backends/cupy/backend.py`` needs CuPy; the driver, options and kernels do not."""
    code = textwrap.dedent(
        """
        import sys

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "cupy":
                    raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)

        sys.meta_path.insert(0, Blocker())
        import numpy as np
        import eqsolve, eqsolve.cupy
        from eqsolve.backends.cupy import executor, fused, kernels, options
        kernels.cuda_source()
        with eqsolve.cupy.options(fused=False):
            assert options.current_options().fused is False
        try:
            eqsolve.cupy.solve(np.cos, np.zeros((2, 2)))
        except eqsolve.BackendUnavailableError as exc:
            assert "pip install -c constraints.txt 'eqsolve[cupy]'" in str(exc), exc
        else:
            raise AssertionError("no BackendUnavailableError")
        assert not [m for m in sys.modules if m.split(".")[0] == "cupy"]
        assert "eqsolve.backends.cupy.backend" not in sys.modules
        print("OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_backend_module_needs_a_gpu(monkeypatch):
    """CuPy importable but no GPU: the backend module raises, saying so."""
    if "eqsolve.backends.cupy.backend" in sys.modules:
        pytest.skip("the CuPy backend is already loaded here (a GPU is available)")
    stub = types.ModuleType("cupy")
    stub.cuda = types.SimpleNamespace(is_available=lambda: False)
    monkeypatch.setitem(sys.modules, "cupy", stub)
    with pytest.raises(eqsolve.BackendUnavailableError, match="needs a CUDA GPU"):
        get_backend("cupy")
    assert "eqsolve.backends.cupy.backend" not in sys.modules


# --------------------------------------------------------------------------------------
# selection, options, implicit gradient (CPU parts)
# --------------------------------------------------------------------------------------


def test_selection_rules():
    class MyAnderson(Anderson):
        pass

    assert drv.unsupported_reason(Anderson(m=32), "float32") is None
    assert "m=33" in drv.unsupported_reason(Anderson(m=33), "float64")
    assert "memory=40" in drv.unsupported_reason(Broyden(memory=40), "float64")
    assert "MyAnderson" in drv.unsupported_reason(MyAnderson(), "float64")
    assert "float16" in drv.unsupported_reason(Picard(), "float16")
    a = Anderson()
    assert drv.use_fused(None, a, 64, 256, "float64", sm_count=132)
    assert drv.use_fused(None, a, 4096, 1024, "float32", sm_count=132)
    assert not drv.use_fused(None, a, 8, 10**6, "float64", sm_count=132)  # few long samples
    assert drv.use_fused(None, a, 264, 10**6, "float64", sm_count=132)
    assert drv.use_fused(True, a, 8, 10**6, "float64", sm_count=132)
    assert not drv.use_fused(False, a, 64, 256, "float64", sm_count=132)
    assert not drv.use_fused(True, MyAnderson(), 64, 256, "float64", sm_count=132)


def test_options_context():
    assert opt.current_options() == opt.CupyOptions(None, 8)
    with opt.options(fused=False, sync_every=3) as opts:
        assert opts == opt.CupyOptions(False, 3) == opt.current_options()
        with opt.options(fused=True):
            assert opt.current_options() == opt.CupyOptions(True, 8)
        assert opt.current_options() == opt.CupyOptions(False, 3)
    assert opt.current_options() == opt.CupyOptions(None, 8)
    with pytest.raises(ValueError, match="sync_every"):
        opt.CupyOptions(None, 0)
    with pytest.raises(TypeError, match="fused"):
        opt.CupyOptions("yes", 8)


def _tanh_vjp(cell):
    def vjp(z, v):  # J_f(z)^T v with J = diag(1 - f^2) W
        fz = np.tanh(z @ cell.W.T + cell.inj)
        return ((1 - fz**2) * v) @ cell.W

    return vjp


@pytest.mark.parametrize("backward", ["anderson", "neumann", "broyden", "gmres"])
def test_pullback_matches_dense_adjoint(backward):
    """The implicit-gradient machinery of eqsolve.cupy, run on the NumPy backend."""
    cell, z0 = make_problem("float64")
    sol, pullback = ac._fixed_point_on(
        "numpy", cell, z0, vjp=_tanh_vjp(cell), backward=backward, tol=1e-12
    )
    g = np.random.default_rng(5).standard_normal(z0.shape)
    u = pullback(g)
    np.testing.assert_allclose(u, cell.reference_adjoint(sol.value, g), rtol=1e-8, atol=1e-10)
    assert pullback.info is not None and bool(np.all(pullback.info.converged))


def test_pullback_batch_axis_and_errors():
    cell, z0 = make_problem("float64")
    vjp = _tanh_vjp(cell)

    def vjp_t(z, v):  # the state is (d, batch) here
        return vjp(z.T, v.T).T

    sol, pullback = ac._fixed_point_on(
        "numpy", lambda z: cell(z.T).T, z0.T.copy(), vjp=vjp_t, batch_axis=1, tol=1e-12
    )
    g = np.random.default_rng(6).standard_normal(z0.shape)
    np.testing.assert_allclose(
        pullback(g.T.copy()).T, cell.reference_adjoint(sol.value.T, g), rtol=1e-8
    )
    with pytest.raises(ValueError, match="cotangent 0 has shape"):
        pullback(g)  # (batch, d) instead of (d, batch)
    with pytest.raises(TypeError, match="vjp must be callable"):
        ac._fixed_point_on("numpy", cell, z0, vjp=None)
    with pytest.raises(ValueError, match="supports backward=eqsolve.Implicit, not Phantom"):
        ac._fixed_point_on("numpy", cell, z0, vjp=vjp, backward="phantom")
    with pytest.raises(TypeError, match="Implicit.options .*'mm'"):
        ac._fixed_point_on("numpy", cell, z0, vjp=vjp,
                           backward=eqsolve.Implicit(options={"mm": 3}))


def test_pullback_reports_failure():
    cell, z0 = make_problem("float64")
    sol, pullback = ac._fixed_point_on(
        "numpy",
        cell,
        z0,
        vjp=_tanh_vjp(cell),
        backward=eqsolve.Implicit("neumann", max_iter=2),
        on_failure="raise",
        tol=1e-12,
    )
    with pytest.raises(eqsolve.ConvergenceError, match="within max_iter=2") as err:
        pullback(np.ones_like(z0))
    assert err.value.solution.value.shape == z0.shape


# --------------------------------------------------------------------------------------
# GPU: fused CuPy path vs generic CuPy path (skipped without a CUDA GPU)
# --------------------------------------------------------------------------------------


def _gpu_reason() -> str | None:
    try:
        import cupy
    except ImportError:
        return "no CUDA GPU available: cupy is not installed (pip install -e '.[cupy]')"
    if not cupy.cuda.is_available():
        return "no CUDA GPU available (cupy.cuda.is_available() is False)"
    return None


GPU_REASON = _gpu_reason()
gpu = pytest.mark.skipif(GPU_REASON is not None, reason=GPU_REASON or "")


def test_without_gpu_the_cupy_entry_points_say_so():
    if GPU_REASON is None:
        pytest.skip("a CUDA GPU is available: this checks the message without one")
    import eqsolve.cupy as ec

    with pytest.raises(eqsolve.BackendUnavailableError, match="cupy"):
        ec.solve(np.cos, np.zeros((2, 2)))
    with pytest.raises(eqsolve.BackendUnavailableError, match="cupy"):
        ec.fixed_point_with_pullback(np.cos, np.zeros((2, 2)), vjp=lambda z, v: v)


def _gpu_run(f, z0, solver, tol, fused, sync_every=1):
    import cupy

    rec = Recorder(f)
    with opt.options(fused=fused, sync_every=sync_every):
        sol = eqsolve.solve(rec, cupy.asarray(z0), solver=solver, tol=tol, max_iter=300)
    cupy.cuda.Device().synchronize()
    return sol, rec.inputs


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_gpu_fused_matches_generic(name, dtype, monkeypatch):
    calls = []
    real = drv.run_fused
    monkeypatch.setattr(drv, "run_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    cell, z0 = make_problem(dtype, batch=64, d=256)
    tol = TOL[dtype]
    gen, gi = _gpu_run(cell, z0, SOLVERS[name], tol, fused=False)
    assert not calls
    fused, fi = _gpu_run(cell, z0, SOLVERS[name], tol, fused=None)
    assert calls  # picked automatically
    atol = TRAJ_ATOL[dtype]
    np.testing.assert_array_equal(to_numpy(fused.status), to_numpy(gen.status))
    np.testing.assert_array_equal(to_numpy(fused.iterations), to_numpy(gen.iterations))
    assert fused.nfev == gen.nfev and len(fi) == len(gi)
    np.testing.assert_allclose(to_numpy(fused.value), to_numpy(gen.value), rtol=0, atol=atol)
    for i, (a, b) in enumerate(zip(gi, fi, strict=True)):
        np.testing.assert_allclose(b, a, rtol=0, atol=atol, err_msg=f"call {i} of f")
    assert type(fused.value) is type(gen.value)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("sync_every", [1, 4, 16])
def test_gpu_sync_every_and_freezing(sync_every):
    cell, z0 = make_problem("float64", batch=8, d=64)
    z0[0] = cell.reference_fixed_point()[0]
    gen, gi = _gpu_run(bad_cell(cell), z0, Anderson(), 1e-10, fused=False)
    fused, fi = _gpu_run(bad_cell(cell), z0, Anderson(), 1e-10, True, sync_every)
    for key in ("status", "iterations"):
        np.testing.assert_array_equal(to_numpy(getattr(fused, key)), to_numpy(getattr(gen, key)))
    assert fused.nfev == gen.nfev and len(gi) <= len(fi) < len(gi) + sync_every
    np.testing.assert_allclose(to_numpy(fused.value), to_numpy(gen.value), rtol=0, atol=1e-12)


@gpu
@pytest.mark.gpu
def test_gpu_fixed_point_tuple_state_and_pullback():
    import cupy

    import eqsolve.cupy as ec

    cell, z0 = make_problem("float64", batch=16, d=32)
    Wc, injc = cupy.asarray(cell.W), cupy.asarray(cell.inj)

    def f(zs):  # the state as two halves (a multi-scale tuple)
        z = cupy.concatenate(zs, axis=1)
        out = cupy.tanh(z @ Wc.T + injc)
        return (out[:, :12], out[:, 12:])

    def vjp(zs, vs):
        z, v = cupy.concatenate(zs, axis=1), cupy.concatenate(vs, axis=1)
        fz = cupy.tanh(z @ Wc.T + injc)
        u = ((1 - fz**2) * v) @ Wc
        return (u[:, :12], u[:, 12:])

    zc = cupy.asarray(z0)
    sol, pullback = ec.fixed_point_with_pullback(f, (zc[:, :12], zc[:, 12:]), vjp=vjp, tol=1e-12)
    g = np.random.default_rng(2).standard_normal(z0.shape)
    u = pullback((cupy.asarray(g[:, :12]), cupy.asarray(g[:, 12:])))
    z_star = np.concatenate([to_numpy(a) for a in sol.value], axis=1)
    ref = cell.reference_adjoint(z_star, g)
    np.testing.assert_allclose(np.concatenate([to_numpy(a) for a in u], 1), ref, rtol=1e-8)


@gpu
@pytest.mark.gpu
def test_gpu_dlpack_without_copies():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here: DLPack between torch and CuPy needs it")
    import eqsolve.cupy as ec

    t = torch.randn(8, 16, dtype=torch.float64, device="cuda")
    c = ec.as_cupy(t)
    assert c.data.ptr == t.data_ptr()
    back = ec.to_torch(c)
    assert back.data_ptr() == t.data_ptr()
    seen = []
    sol = ec.solve(lambda z: seen.append(type(z)) or (0.5 * z + 1.0), t, tol=1e-12)
    assert seen[0].__module__.startswith("cupy")
    np.testing.assert_allclose(to_numpy(sol.value), 2.0, atol=1e-10)


# --------------------------------------------------------------------------------------
# certification: the core's stopping rule decides the fused path's statuses
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["picard", "anderson", "broyden"])
def test_certified_fused_results_keep_the_contract(name):
    """The kernels' own bookkeeping knows no determinacy test and picks the best iterate by
    the relative residual; ``certify`` (what ``run_cupy`` does after the fused loop) makes
    the statuses the core's: the run-away map is DIVERGED, a zero fixed point with atol is
    judged at the returned value, and an ordinary solve is unchanged."""
    from contract import DIVERGED, check_contract
    from eqsolve.core.solution import Solution

    def certified(f, z0, rule):
        state = drv.run_fused(ReferenceExecutor(), f, z0, SOLVERS[name], rule)
        out = drv.certify(np, f, state, SOLVERS[name], rule)
        assert not out.reopened.any()  # the kernels' own claims are not "coupling"
        return out, Solution(
            out.best_z, out.status == 0, out.iterations, out.best_res, out.status, out.k + 1
        )

    def runaway(z):
        return z + 1.0 + 0.1 * np.sin(z)

    _, sol = certified(runaway, np.zeros((2, 1)), StopRule(1e-6, 0.0, 2000))
    out = check_contract(sol, runaway, tol=1e-6, atol=0.0, dtype="float64")
    assert (out["status"] != 0).all()
    if name != "picard":
        assert (out["status"] == DIVERGED).all()

    A = 0.6 * np.linalg.qr(np.random.default_rng(0).standard_normal((5, 5)))[0]
    _, sol = certified(lambda z: z @ A.T, np.ones((3, 5)), StopRule(1e-8, 1e-8, 200))
    check_contract(sol, lambda v: v @ A.T, tol=1e-8, atol=1e-8, dtype="float64")

    cell, z0 = make_problem("float64")
    state, sol = certified(cell, z0, StopRule(1e-10, 0.0, 200))
    assert (state.status == 0).all()
    check_contract(sol, cell, tol=1e-10, atol=0.0, dtype="float64")
