"""The fused CuPy kernels compile: nvcc for several GPU architectures, float and double.

Needs neither CuPy nor a GPU -- only ``nvcc`` on PATH (skipped, saying so, without it).
``eqsolve.backends.cupy.kernels`` (``kernels.cu`` and the generated exports) is imported
without CuPy, as CI does. Warnings are errors. The last test also compiles with NVRTC, the
compiler CuPy uses at run time, with CuPy's own options; it needs CuPy's NVRTC bindings and the
NVRTC library (still no GPU), and skips without them.

nvcc 13 supports sm_75 and newer: sm_75 (Turing) is the oldest target checked, sm_80
(A100) and sm_90 (H100) are the GPUs the benchmarks run on.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from eqsolve.backends.cupy import kernels as K

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc (the CUDA toolkit) is not on PATH: cannot compile the kernels"
)

TARGETS = [("sm_75", "ptx"), ("sm_80", "cubin"), ("sm_90", "cubin")]


@pytest.fixture(scope="module")
def source_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda") / "eqsolve_kernels.cu"
    path.write_text(K.cuda_source())
    return path


def _nvcc(source_file, arch: str, kind: str, *extra: str) -> bytes:
    assert NVCC is not None
    out = source_file.with_name(f"eqsolve_{arch}.{kind}")
    cmd = [NVCC, f"-arch={arch}", f"--{kind}", "-Werror", "all-warnings", *extra]
    cmd += ["-o", str(out), str(source_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert "warning" not in proc.stderr.lower(), proc.stderr
    return out.read_bytes()


@needs_nvcc
@pytest.mark.parametrize("arch,kind", TARGETS, ids=[f"{a}-{k}" for a, k in TARGETS])
def test_nvcc_compiles_every_kernel(source_file, arch, kind):
    binary = _nvcc(source_file, arch, kind)
    for name in K.exported_names():  # float (_f32) and double (_f64) of every kernel
        assert name.encode() in binary, f"{name} missing from the {arch} {kind}"
    if kind == "ptx":
        entries = set(re.findall(rb"\.entry\s+(\w+)", binary))
        assert entries == {n.encode() for n in K.exported_names()}


@needs_nvcc
@pytest.mark.parametrize("ctype", ["float", "double"])
def test_nvcc_compiles_each_dtype_alone(tmp_path, ctype):
    """Each dtype's instantiation compiles by itself (no reliance on the other one)."""
    dtype = next(d for d, (c, _) in K.DTYPES.items() if c == ctype)
    keep = [K.kernel_name(k, dtype) for k in K.KERNELS]
    lines = [
        line
        for line in K.cuda_source().splitlines()
        if not line.startswith('extern "C"') or any(f" {n}(" in line for n in keep)
    ]
    path = tmp_path / f"eqsolve_{ctype}.cu"
    path.write_text("\n".join(lines) + "\n")
    ptx = _nvcc(path, "sm_80", "ptx", "-std=c++14")
    assert set(re.findall(rb"\.entry\s+(\w+)", ptx)) == {n.encode() for n in keep}


@needs_nvcc
def test_compiler_messages_point_at_kernels_cu_lines(tmp_path):
    """``kernels.cu`` is compiled with ``#line`` markers: an error names its own line."""
    cu = K.device_code().splitlines()
    bad = next(i for i, line in enumerate(cu) if "eqs_park(const T* bz" in line) + 2
    assert cu[bad - 1].strip().startswith("for (long long j")  # the body of eqs_park
    source = K.cuda_source().replace(cu[bad - 1], cu[bad - 1] + " not_a_declared_name;", 1)
    path = tmp_path / "broken.cu"
    path.write_text(source)
    cmd = [NVCC or "nvcc", "-arch=sm_80", "--ptx", "-o", str(tmp_path / "b.ptx"), str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"kernels.cu({bad})" in proc.stderr, proc.stderr


def test_nvrtc_compiles_with_cupys_options():
    """NVRTC, as ``cupy.RawModule`` runs it on the GPU machine (no GPU needed to compile)."""
    pytest.importorskip("cupy", reason="cupy is not installed: NVRTC bindings unavailable")
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # the NVRTC shared library is not installed
        pytest.skip(f"NVRTC library not available ({exc}); pip install nvidia-cuda-nvrtc-cu12")
    prog = nvrtc.createProgram(K.cuda_source(), "kernels.cu", [], [])
    try:
        options = ["-arch=compute_80", "-ftz=true", "--device-as-default-execution-space"]
        try:
            nvrtc.compileProgram(prog, options)
        except Exception as exc:
            pytest.fail(f"NVRTC failed: {exc}\n{nvrtc.getProgramLog(prog)}")
        log = nvrtc.getProgramLog(prog).strip()
        assert "warning" not in log.lower(), log
        ptx = nvrtc.getPTX(prog)
        ptx = ptx if isinstance(ptx, bytes) else ptx.encode()
        assert set(re.findall(rb"\.entry\s+(\w+)", ptx)) == {n.encode() for n in K.exported_names()}
    finally:
        nvrtc.destroyProgram(prog)
