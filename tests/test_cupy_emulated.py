"""The fused CuPy kernels' CUDA source itself, run on the CPU (``tests/cupy_emulator.py``).

``kernels.cu`` and its generated exports are compiled with the host C++ compiler (threads as
fibers, real barriers and warp shuffles) and run under the fused driver against the generic
Array-API loop, and kernel by kernel against the NumPy reference (``tests/cupy_reference.py``).
Skipped, saying so, where no host C++ compiler can build the emulator.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import cupy_emulator as cemu
from cupy_reference import ReferenceExecutor
from cupy_runs import SOLVERS, TOL, assert_same_run, bad_cell, make_problem, run_both
from eqsolve import Status
from eqsolve.backends.cupy import kernels as K
from eqsolve.core.loop import StopRule


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    try:
        return cemu.build_emulator(tmp_path_factory.mktemp("cuda-emu"))
    except cemu.EmulatorError as exc:
        pytest.skip(f"cannot build the CPU emulator of the CUDA kernels: {exc}")


def test_kernel_table_matches_source():
    exported = cemu.parse_exported(K.cuda_source())
    assert sorted(exported) == sorted(K.exported_names())
    for kernel, params in K.KERNELS.items():
        for dtype, (ctype, _) in K.DTYPES.items():
            text = exported[K.kernel_name(kernel, dtype)]
            assert text.count(",") + 1 == len(params)
            assert ("double" in text) == (ctype == "double")
    assert "#include" not in K.cuda_source()  # NVRTC compiles it as it is


def test_source_constants_match_python():
    """``kernels.cu`` (a package resource) agrees with ``kernels.py`` and the core's statuses."""
    code = K.device_code()
    assert code.startswith("// eqsolve") and code in K.cuda_source()
    defines = dict(re.findall(r"^#define (EQS_\w+) (\d+)$", code, flags=re.M))
    assert int(defines["EQS_MAX_HIST"]) == K.MAX_HISTORY
    assert 32 * int(defines["EQS_MAX_WARPS"]) == K.MAX_BLOCK
    for status in (Status.CONVERGED, Status.MAX_ITER, Status.NONFINITE):
        assert int(defines[f"EQS_{status.name}"]) == int(status)


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ["picard", "anderson-m3-beta", "broyden-restart", "broyden"])
def test_emulated_kernels_match_generic(emulator, name, dtype, block):
    """n = 40 > 32 threads (strided loops); block 64: a second warp, partly idle."""
    cell, z0 = make_problem(dtype, batch=3, d=40)
    rule = StopRule(TOL[dtype], 0.0, 100)
    ex = cemu.EmulatorExecutor(emulator, block=block)
    gen, gi, fused, fi = run_both(ex, cell, z0, SOLVERS[name], rule, sync_every=3)
    assert_same_run(gen, gi, fused, fi, dtype, sync_every=3)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ["anderson", "anderson-safeguard", "broyden"])
def test_emulated_kernels_freezing(emulator, name, dtype):
    cell, z0 = make_problem(dtype)
    z0[0] = cell.reference_fixed_point()[0].astype(dtype)
    rule = StopRule(TOL[dtype], 0.0, 200)
    gen, gi, fused, fi = run_both(
        cemu.EmulatorExecutor(emulator),
        bad_cell(cell),
        z0,
        SOLVERS[name],
        rule,
        f_fused=bad_cell(cell),
    )
    assert list(gen.status) == [0, 2, 2, 0]
    assert_same_run(gen, gi, fused, fi, dtype)


def _random_state(kernel, dtype, e, seed=0):
    """Arguments of one kernel call from a random mid-solve state (sample 1 frozen)."""
    rng = np.random.default_rng(seed)
    B, n, hist = 4, 37, 5
    dt = np.dtype(dtype)

    def r(*shape):
        return rng.standard_normal(shape).astype(dt)

    args = dict(
        z=r(B, n),
        fz=r(B, n),
        z_out=np.zeros((B, n), dt),
        best_z=r(B, n),
        best_res=np.abs(r(B)) + dt.type(0.5),
        active=np.array([1, 0, 1, 1], np.int32),
        status=np.ones(B, np.int32),
        iterations=np.full(B, e - 1, np.int32),
        n_stopped=np.ones(1, np.int32),
        n=n,
        e=e,
        tol=dt.type(1e-6),
        atol=dt.type(0),
        tiny=dt.type(np.finfo(dt).tiny),
        beta=dt.type(0.9),
        first=int(e == 0),
    )
    args["fz"][3] = args["z"][3]  # sample 3 converges in this call
    if kernel == "anderson_step":
        G = r(B, hist, n)
        args.update(
            X=r(B, hist, n),
            G=G,
            H=np.einsum("bin,bjn->bij", G, G).astype(dt),
            m=hist,
            reg=dt.type(1e-8),
            max_coeff=dt.type(1e4),
        )
    elif kernel == "broyden_step":
        args.update(
            Zc=r(B, n),
            Gc=r(B, n),
            Hg=r(B, n),
            U=0.1 * r(B, hist, n),
            V=0.1 * r(B, hist, n),
            mem=hist,
            eps=dt.type(np.finfo(dt).eps),
        )
    return args


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "kernel,e",
    [
        ("picard_step", 0),
        ("picard_step", 4),
        ("anderson_step", 0),
        ("anderson_step", 3),
        ("anderson_step", 12),
        ("broyden_step", 0),
        ("broyden_step", 1),
        ("broyden_step", 4),
        ("broyden_step", 6),
        ("broyden_step", 11),
    ],
)
def test_emulated_kernel_equals_reference(emulator, kernel, e, dtype):
    """One call on a random state: every output and buffer, also of frozen samples.

    Broyden: e=1 first update, e=6 slot 0 = restart (all 5 terms in use), e=11 idem.
    """
    ref, emu = _random_state(kernel, dtype, e), _random_state(kernel, dtype, e)
    ReferenceExecutor().launch(kernel, dtype, 4, ref)
    emulator.launch(kernel, dtype, 4, 32, emu)
    atol = 1e-11 if dtype == "float64" else 2e-4
    for key, want in ref.items():
        if isinstance(want, np.ndarray):
            np.testing.assert_allclose(emu[key], want, rtol=1e-5, atol=atol, err_msg=key)
    assert list(ref["status"]) == [1, 1, 1, 0] and int(ref["n_stopped"][0]) == 2


def test_emulator_detects_a_barrier_not_all_threads_reach(tmp_path):
    """The emulator can fail: ``__syncthreads`` under a thread-dependent branch deadlocks."""
    code = r"""
template <typename T> __device__ void eqs_divergent_impl(T* x) {
    if (threadIdx.x < 16) __syncthreads();
    x[threadIdx.x] = 1;
}
"""
    try:
        emu = cemu.build_emulator(
            tmp_path, extra_device_code=code, extra_kernels={"divergent": K.parse_params("T* x")}
        )
    except cemu.EmulatorError as exc:
        pytest.skip(f"cannot build the CPU emulator: {exc}")
    with pytest.raises(cemu.EmulatorError, match="deadlock"):
        emu.launch("divergent", "float64", 1, 32, {"x": np.zeros(32)})
