"""The fused CuPy kernels' CUDA source compiled for the CPU, and an executor that runs it.

Test helper, not a test file. :func:`build_emulator` compiles
``eqsolve.backends.cupy.kernels.cuda_source()`` itself with the host C++ compiler: each
block's threads run as cooperative fibers (``ucontext``), ``__syncthreads`` and warp shuffles
are real barriers (a barrier not reached by every thread is reported as an error),
``__shared__`` memory is shared by the block. This executes the kernels' indexing, reductions
and control flow -- not the GPU's memory model or timing. :class:`EmulatorExecutor` runs the
fused driver on it (NumPy arrays).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from eqsolve.backends.cupy import kernels as K
from eqsolve.backends.cupy.kernels import DTYPES, Param, kernel_name

#: C++17 prelude that lets a host compiler build and run the kernel source: one block at a
#: time, its threads as cooperative fibers; barriers and shuffles really synchronise.
EMULATION_PRELUDE = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <ucontext.h>
using std::sqrt;
using std::isfinite;

namespace eqs_emu {
struct dim3_t { unsigned x, y, z; };
struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    unsigned tid = 0;
    int wait = 0;  // 0 runnable, 1 at a block barrier, 2 at a warp barrier
    unsigned long gen = 0;
    bool done = false;
};
struct State {
    std::vector<Fiber> fibers;
    ucontext_t sched;
    int current = 0;
    unsigned nthreads = 0, nblocks = 0, block = 0;
    unsigned long bar_gen = 0;
    unsigned bar_count = 0;
    std::vector<unsigned long> warp_gen;
    std::vector<unsigned> warp_count;
    std::vector<unsigned char> shfl;
    void (*body)(void*) = nullptr;
    void* arg = nullptr;
};
static State S;

inline dim3_t thread_idx() { return dim3_t{S.fibers[S.current].tid, 0u, 0u}; }
inline dim3_t block_idx() { return dim3_t{S.block, 0u, 0u}; }
inline dim3_t block_dim() { return dim3_t{S.nthreads, 1u, 1u}; }
inline dim3_t grid_dim() { return dim3_t{S.nblocks, 1u, 1u}; }

inline void park_fiber(int kind, unsigned long gen) {
    Fiber& f = S.fibers[S.current];
    f.wait = kind;
    f.gen = gen;
    swapcontext(&f.ctx, &S.sched);
}
inline void syncthreads() {
    const unsigned long g = S.bar_gen;
    if (++S.bar_count == S.nthreads) { S.bar_count = 0; ++S.bar_gen; return; }
    park_fiber(1, g);
}
inline void syncwarp() {
    const unsigned w = S.fibers[S.current].tid >> 5;
    const unsigned long g = S.warp_gen[w];
    if (++S.warp_count[w] == 32u) { S.warp_count[w] = 0; ++S.warp_gen[w]; return; }
    park_fiber(2, g);
}
template <class T> T shfl_down(T v, int off) {
    const unsigned tid = S.fibers[S.current].tid;
    std::memcpy(&S.shfl[8 * tid], &v, sizeof(T));
    syncwarp();
    T r = v;
    if ((tid & 31u) + (unsigned)off < 32u) std::memcpy(&r, &S.shfl[8 * (tid + off)], sizeof(T));
    syncwarp();
    return r;
}
static void trampoline() {
    S.body(S.arg);
    S.fibers[S.current].done = true;
}
// 0: ok; 1: deadlock (a barrier that not every thread of the block reaches)
inline int run_block() {
    for (unsigned t = 0; t < S.nthreads; ++t) {
        Fiber& f = S.fibers[t];
        f.tid = t; f.wait = 0; f.gen = 0; f.done = false;
        if (f.stack.empty()) f.stack.resize(1 << 16);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &S.sched;
        makecontext(&f.ctx, trampoline, 0);
    }
    S.bar_count = 0;
    for (auto& c : S.warp_count) c = 0;
    unsigned live = S.nthreads;
    while (live) {
        bool progressed = false;
        for (unsigned t = 0; t < S.nthreads; ++t) {
            Fiber& f = S.fibers[t];
            if (f.done) continue;
            if (f.wait == 1 && f.gen == S.bar_gen) continue;
            if (f.wait == 2 && f.gen == S.warp_gen[t >> 5]) continue;
            f.wait = 0;
            S.current = (int)t;
            swapcontext(&S.sched, &f.ctx);
            progressed = true;
            if (f.done) --live;
        }
        if (!progressed) return 1;
    }
    return 0;
}
template <class F> int launch(unsigned grid, unsigned block, F fn) {
    if (block == 0 || block % 32u != 0 || block > 256u) return 2;
    S.nthreads = block;
    S.nblocks = grid;
    S.fibers.resize(block);
    S.warp_gen.assign(block / 32u, 0ul);
    S.warp_count.assign(block / 32u, 0u);
    S.shfl.assign(8 * block, 0);
    S.body = [](void* a) { (*static_cast<F*>(a))(); };
    S.arg = &fn;
    for (unsigned b = 0; b < grid; ++b) {
        S.block = b;
        const int rc = run_block();
        if (rc) return rc;
    }
    return 0;
}
template <class T> T atomic_add(T* p, T v) { const T old = *p; *p = old + v; return old; }
inline float int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline double longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
}  // namespace eqs_emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define threadIdx (eqs_emu::thread_idx())
#define blockIdx (eqs_emu::block_idx())
#define blockDim (eqs_emu::block_dim())
#define gridDim (eqs_emu::grid_dim())
#define __syncthreads() eqs_emu::syncthreads()
#define __shfl_down_sync(mask, v, off) eqs_emu::shfl_down((v), (off))
#define atomicAdd(p, v) eqs_emu::atomic_add((p), (v))
#define __int_as_float(i) eqs_emu::int_as_float(i)
#define __longlong_as_double(i) eqs_emu::longlong_as_double(i)
"""


def _emulation_wrappers(kernels: dict[str, tuple[Param, ...]]) -> str:
    lines = []
    for dtype, (ctype, _) in DTYPES.items():
        for kernel, params in kernels.items():
            name = kernel_name(kernel, dtype)
            sig = ", ".join(K.c_param(p, ctype) for p in params)
            args = ", ".join(p.name for p in params)
            lines.append(
                f'extern "C" int emu_{name}(unsigned grid, unsigned block, {sig}) {{ '
                f"return eqs_emu::launch(grid, block, [&]() {{ {name}({args}); }}); }}"
            )
    return "\n".join(lines) + "\n"


def emulation_source(extra_device_code: str = "", extra_kernels: Any = None) -> str:
    """C++ source of the CPU emulator: prelude + ``kernels.cuda_source()`` + launch wrappers.

    ``extra_device_code`` / ``extra_kernels`` (a dict like ``kernels.KERNELS`` whose templates
    ``eqs_<name>_impl`` are in ``extra_device_code``) add test kernels.
    """
    extra = extra_kernels or {}
    return (
        EMULATION_PRELUDE
        + K.cuda_source()
        + '#line 1 "emulator-extras.cpp"\n'  # (cuda_source's #line markers name kernels.cu)
        + extra_device_code
        + (K.export_wrappers(extra) if extra else "")
        + _emulation_wrappers({**K.KERNELS, **extra})
    )


def find_cxx() -> str | None:
    """A host C++ compiler for the emulator (``$CXX``, ``g++`` or ``clang++``), or None."""
    for cand in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if cand and shutil.which(cand):
            return cand
    return None


class EmulatorError(RuntimeError):
    """The CPU emulator could not be built, or a kernel deadlocked at a barrier."""


_CTYPES_SCALARS = {"int": ctypes.c_int, "long long": ctypes.c_longlong}


class Emulator:
    """The kernels compiled for the CPU (:func:`build_emulator`); ``launch`` runs one."""

    def __init__(self, path: str, kernels: dict[str, tuple[Param, ...]]):
        self.path = path
        self.kernels = kernels
        self._lib = ctypes.CDLL(path)
        self._fns: dict[str, Any] = {}
        for dtype, (ctype, _) in DTYPES.items():
            real = ctypes.c_float if ctype == "float" else ctypes.c_double
            for kernel, params in kernels.items():
                fn = getattr(self._lib, f"emu_{kernel_name(kernel, dtype)}")
                argtypes: list[Any] = [ctypes.c_uint, ctypes.c_uint]
                for p in params:
                    if p.is_pointer:
                        argtypes.append(ctypes.c_void_p)
                    elif p.ctype == "T":
                        argtypes.append(real)
                    else:
                        argtypes.append(_CTYPES_SCALARS[p.ctype])
                fn.argtypes = argtypes
                fn.restype = ctypes.c_int
                self._fns[kernel_name(kernel, dtype)] = fn

    def launch(self, kernel: str, dtype: str, grid: int, block: int, args: dict[str, Any]) -> None:
        """Run ``kernel`` on NumPy arrays (C-contiguous, of the kernel's dtypes)."""
        params = self.kernels[kernel]
        ctype = DTYPES[dtype][0]
        values: list[Any] = [grid, block]
        for p in params:
            v = args[p.name]
            if p.is_pointer:
                want = np.int32 if p.ctype.startswith(("int", "const int")) else np.dtype(dtype)
                if not isinstance(v, np.ndarray) or v.dtype != want or not v.flags.c_contiguous:
                    raise TypeError(f"{kernel}: argument {p.name} must be a C-contiguous {want}")
                values.append(v.ctypes.data)
            elif p.ctype == "T":
                values.append(float(np.float32(v)) if ctype == "float" else float(v))
            else:
                values.append(int(v))
        rc = self._fns[kernel_name(kernel, dtype)](*values)
        if rc == 1:
            raise EmulatorError(
                f"{kernel_name(kernel, dtype)}: deadlock -- a __syncthreads() or warp shuffle "
                "that not every thread of the block reaches"
            )
        if rc:
            raise EmulatorError(f"{kernel_name(kernel, dtype)}: bad launch configuration")


def build_emulator(
    directory: str | os.PathLike[str] | None = None,
    *,
    extra_device_code: str = "",
    extra_kernels: dict[str, tuple[Param, ...]] | None = None,
) -> Emulator:
    """Compile the kernels for the CPU with the host C++ compiler and load them.

    The shared library is cached by a hash of its source in ``directory`` (default: the
    temporary directory). Raises :class:`EmulatorError` when no compiler is found or the
    build fails (the compiler's output is in the message).
    """
    cxx = find_cxx()
    if cxx is None:
        raise EmulatorError("no host C++ compiler (g++/clang++) on PATH")
    src = emulation_source(extra_device_code, extra_kernels)
    digest = hashlib.sha256((cxx + src).encode()).hexdigest()[:16]
    where = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    where.mkdir(parents=True, exist_ok=True)
    lib = where / f"eqsolve-cuda-emu-{digest}.so"
    if not lib.exists():  # concurrent builders (pytest-xdist) each use their own files
        stem = f"eqsolve-cuda-emu-{digest}-{os.getpid()}"
        cpp, tmp = where / f"{stem}.cpp", where / f"{stem}.so"
        cpp.write_text(src)
        cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-o", str(tmp), str(cpp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        cpp.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise EmulatorError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, lib)
    return Emulator(str(lib), {**K.KERNELS, **(extra_kernels or {})})


def parse_exported(source: str) -> dict[str, str]:
    """``extern "C" __global__`` kernels of a CUDA source: name -> parameter text."""
    pattern = r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)'
    return {m.group(1): " ".join(m.group(2).split()) for m in re.finditer(pattern, source)}


class EmulatorExecutor:
    """NumPy arrays; each kernel is the CUDA source compiled for the CPU (an :class:`Emulator`)."""

    xp = np

    def __init__(self, emulator: Emulator, block: int = 32):
        self.emulator = emulator
        self.block = block

    def launch(self, kernel: str, dtype: str, grid: int, args: dict[str, Any]) -> None:
        self.emulator.launch(kernel, dtype, grid, self.block, args)
