"""CUDA C sources of the fused CuPy solver steps, their NumPy reference, and a CPU emulator.

Importable without CuPy (and without a GPU): CI compiles :func:`cuda_source` with ``nvcc``
(``tests/test_cupy_kernels_compile.py``), and the tests run the same kernels on the CPU.

One kernel per solver runs one whole iteration of ``core/loop.py`` after ``f`` was evaluated:
it records the evaluated point, applies the stopping rule and the per-sample bookkeeping
(best iterate, status, iteration count, freezing) and writes the next point to evaluate. The
grid has one block per sample (``blockIdx.x`` = sample ``b``), so every per-sample reduction
(``||f(z) - z||^2``, ``||f(z)||^2``, Gram rows, Broyden inner products) is a block reduction
and needs no second launch; a frozen sample's block only parks its point at the best iterate.

* ``picard_step``: ``z + beta g``.
* ``anderson_step``: ring-buffer write of ``(z, g)``, the new Gram row/column against the
  ring, the Jacobi-scaled ridge system ``(Hs + lambda I) x = s`` solved in shared memory by
  Gaussian elimination with partial pivoting, the ``||alpha||_1`` safeguard and the mixing
  ``sum_i alpha_i X_i + beta sum_i alpha_i G_i`` -- exactly ``core/anderson.py``.
* ``broyden_step``: the limited-memory good-Broyden update of ``core/broyden.py`` (restart
  when the memory is full, masked stale terms, skipped updates) and the step ``-H g``.

Kernels are written once as templates and exported per dtype as ``extern "C"`` functions
``eqs_<kernel>_f32`` / ``eqs_<kernel>_f64`` (wrappers generated from :data:`KERNELS`). The
source has no ``#include``: NVRTC (what CuPy uses at run time), ``nvcc`` and, with the
:data:`EMULATION_PRELUDE`, a host C++ compiler all accept it.

Testing without a GPU:

* :data:`REFERENCE` holds, per kernel, a NumPy function computing what the kernel computes
  (same arguments, same in-place outputs). The fused driver in :mod:`eqsolve.adapters.cupy`
  runs on it iterate for iterate against the generic solvers.
* :func:`build_emulator` compiles the CUDA source itself for the CPU: each block's threads
  run as cooperative fibers (``ucontext``), ``__syncthreads`` and warp shuffles are real
  barriers (a barrier not reached by every thread is reported as an error), ``__shared__``
  memory is shared by the block. This executes the kernels' indexing, reductions and
  control flow -- not the GPU's memory model or timing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: largest Anderson ``m`` / Broyden ``memory`` the kernels support (shared-memory sizes)
MAX_HISTORY = 32
#: threads per block must be a multiple of 32 and at most this
MAX_BLOCK = 256

#: numpy dtype name -> (C type, kernel-name suffix)
DTYPES: dict[str, tuple[str, str]] = {"float32": ("float", "f32"), "float64": ("double", "f64")}


@dataclass(frozen=True)
class Param:
    """One kernel parameter; ``ctype`` uses ``T`` for the floating type."""

    ctype: str
    name: str

    @property
    def is_pointer(self) -> bool:
        return self.ctype.endswith("*")


def _params(spec: str) -> tuple[Param, ...]:
    out = []
    for item in spec.split(","):
        item = item.strip()
        ctype, name = item.rsplit(" ", 1)
        if name.startswith("*"):
            ctype, name = ctype + "*", name[1:]
        out.append(Param(ctype.strip(), name))
    return tuple(out)


_BOOKKEEPING = "T* best_z, T* best_res, int* active, int* status, int* iterations, int* n_stopped"

#: kernel -> its parameters, in order (the wrappers, CuPy launches, the emulator's ctypes
#: signatures and the NumPy references all follow this table)
KERNELS: dict[str, tuple[Param, ...]] = {
    "picard_step": _params(
        f"const T* z, const T* fz, T* z_out, {_BOOKKEEPING}, long long n, T beta, T tol, "
        "T atol, T tiny, int first"
    ),
    "anderson_step": _params(
        f"const T* z, const T* fz, T* z_out, T* X, T* G, T* H, {_BOOKKEEPING}, long long n, "
        "int m, int e, T beta, T reg, T max_coeff, T tol, T atol, T tiny, int first"
    ),
    "broyden_step": _params(
        f"const T* z, const T* fz, T* z_out, T* Zc, T* Gc, T* Hg, T* U, T* V, {_BOOKKEEPING}, "
        "long long n, int mem, int e, T eps, T tol, T atol, T tiny, int first"
    ),
}


def kernel_name(kernel: str, dtype: str) -> str:
    """Exported symbol of ``kernel`` for numpy dtype name ``dtype`` (``eqs_<kernel>_f64``)."""
    return f"eqs_{kernel}_{DTYPES[dtype][1]}"


# --------------------------------------------------------------------------------------
# CUDA C source
# --------------------------------------------------------------------------------------

_DEVICE_CODE = r"""
// eqsolve: fused fixed-point solver steps. One block per sample (blockIdx.x = sample b),
// blockDim.x a multiple of 32 and at most 256. No includes: NVRTC, nvcc and the CPU emulator
// compile this text as it is.

#define EQS_MAX_WARPS 8
#define EQS_MAX_HIST 32
#define EQS_CONVERGED 0
#define EQS_MAX_ITER 1
#define EQS_NONFINITE 2

template <typename T> struct EqsNan;
template <> struct EqsNan<float> {
    __device__ static float get() { return __int_as_float(0x7fc00000); }
};
template <> struct EqsNan<double> {
    __device__ static double get() { return __longlong_as_double(0x7ff8000000000000LL); }
};

template <typename T> __device__ __forceinline__ T eqs_warp_sum(T v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    return v;
}

// Called by every thread of the block with its partial sum of row `row`: lane 0 of each
// warp stores the warp's sum in red[row][warp].
template <typename T> __device__ __forceinline__ void eqs_row(T* red, int row, T v) {
    v = eqs_warp_sum(v);
    if ((threadIdx.x & 31) == 0) red[row * EQS_MAX_WARPS + (threadIdx.x >> 5)] = v;
}

// tot[r] = sum over warps of red[r] for r < rows, in a fixed order (deterministic results).
// Begins and ends with a barrier: every thread may read tot[] afterwards.
template <typename T> __device__ void eqs_rows_total(const T* red, T* tot, int rows) {
    __syncthreads();
    const int nw = (int)(blockDim.x >> 5);
    for (int r = (int)threadIdx.x; r < rows; r += (int)blockDim.x) {
        T s = red[r * EQS_MAX_WARPS];
        for (int w = 1; w < nw; ++w) s += red[r * EQS_MAX_WARPS + w];
        tot[r] = s;
    }
    __syncthreads();
}

// Thread 0 only: the stopping rule ||f(z) - z|| <= tol ||f(z)|| + atol and the per-sample
// bookkeeping of core/loop.py (loop_init when `first`, else loop_step) for sample b, from
// gg = ||f(z) - z||^2 and ff = ||f(z)||^2 of the evaluated point z.
// dec[0] = improved (z becomes the best iterate), dec[1] = the sample is still active.
template <typename T>
__device__ bool eqs_bookkeep(long long b, int first, T gg, T ff, T tol, T atol, T tiny,
                             T* best_res, int* active, int* status, int* iterations,
                             int* n_stopped, int* dec) {
    const T gn = sqrt(gg);
    const T fn = sqrt(ff);
    const bool finite = isfinite(gn) && isfinite(fn);
    const T rel = finite ? gn / (fn > tiny ? fn : tiny) : EqsNan<T>::get();
    const bool conv = gn <= tol * fn + atol;
    int improved;
    if (first) {
        improved = 1;
        best_res[b] = rel;
        status[b] = !finite ? EQS_NONFINITE : (conv ? EQS_CONVERGED : EQS_MAX_ITER);
        iterations[b] = 0;
    } else {
        improved = rel < best_res[b];
        if (improved) best_res[b] = rel;
        if (conv && finite) status[b] = EQS_CONVERGED;
        if (!finite) status[b] = EQS_NONFINITE;
        iterations[b] += 1;
    }
    const int still = finite && !conv;
    active[b] = still;
    if (!still) atomicAdd(n_stopped, 1);
    dec[0] = improved;
    dec[1] = still;
    return finite;
}

// A stopped sample: f still sees a point for it, its best iterate (core/loop.py parks it).
template <typename T>
__device__ __forceinline__ void eqs_park(const T* bz, T* zo, long long n) {
    for (long long j = threadIdx.x; j < n; j += blockDim.x) zo[j] = bz[j];
}

// ---------------------------------------------------------------------------- Picard
template <typename T>
__device__ void eqs_picard_step_impl(const T* z, const T* fz, T* z_out, T* best_z,
                                     T* best_res, int* active, int* status, int* iterations,
                                     int* n_stopped, long long n, T beta, T tol, T atol,
                                     T tiny, int first) {
    __shared__ T red[2 * EQS_MAX_WARPS];
    __shared__ T tot[2];
    __shared__ int dec[2];
    const long long b = blockIdx.x;
    const T* zb = z + b * n;
    const T* fb = fz + b * n;
    T* zo = z_out + b * n;
    T* bz = best_z + b * n;
    if (!first && !active[b]) {
        eqs_park(bz, zo, n);
        return;
    }
    T gg = 0, ff = 0;
    for (long long j = threadIdx.x; j < n; j += blockDim.x) {
        const T fj = fb[j];
        const T g = fj - zb[j];
        gg += g * g;
        ff += fj * fj;
    }
    eqs_row(red, 0, gg);
    eqs_row(red, 1, ff);
    eqs_rows_total(red, tot, 2);
    if (threadIdx.x == 0)
        eqs_bookkeep(b, first, tot[0], tot[1], tol, atol, tiny, best_res, active, status,
                     iterations, n_stopped, dec);
    __syncthreads();
    const int improved = dec[0], go = dec[1];
    for (long long j = threadIdx.x; j < n; j += blockDim.x) {
        const T zj = zb[j];
        if (improved) bz[j] = zj;
        zo[j] = go ? zj + beta * (fb[j] - zj) : (improved ? zj : bz[j]);
    }
}

// -------------------------------------------------------------------------- Anderson
// X, G: (B, m, n) ring buffers of iterates and residuals, H: (B, m, m) Gram matrix
// <g_i, g_j> (zero outside the filled block). e = index of the evaluated point (0 for
// z0); it goes to slot e % m, and min(e + 1, m) slots are filled afterwards.
template <typename T>
__device__ void eqs_anderson_step_impl(const T* z, const T* fz, T* z_out, T* X, T* G, T* H,
                                       T* best_z, T* best_res, int* active, int* status,
                                       int* iterations, int* n_stopped, long long n, int m,
                                       int e, T beta, T reg, T max_coeff, T tol, T atol,
                                       T tiny, int first) {
    __shared__ T red[(EQS_MAX_HIST + 1) * EQS_MAX_WARPS];
    __shared__ T tot[EQS_MAX_HIST + 1];
    __shared__ T A[EQS_MAX_HIST][EQS_MAX_HIST + 1];  // augmented system [A | s]
    __shared__ T dinv[EQS_MAX_HIST];
    __shared__ T sv[EQS_MAX_HIST];
    __shared__ T alpha[EQS_MAX_HIST];
    __shared__ int dec[3];
    const long long b = blockIdx.x;
    const T* zb = z + b * n;
    const T* fb = fz + b * n;
    T* zo = z_out + b * n;
    T* bz = best_z + b * n;
    T* Xb = X + b * (long long)m * n;
    T* Gb = G + b * (long long)m * n;
    T* Hb = H + b * (long long)m * m;
    if (!first && !active[b]) {
        eqs_park(bz, zo, n);
        return;
    }
    const int slot = e % m;
    const int count = e + 1 < m ? e + 1 : m;
    T* Xs = Xb + slot * n;
    T* Gs = Gb + slot * n;

    // pass 1: g = f(z) - z, ring-buffer write, ||g||^2 and ||f(z)||^2
    T gg = 0, ff = 0;
    for (long long j = threadIdx.x; j < n; j += blockDim.x) {
        const T zj = zb[j];
        const T fj = fb[j];
        const T g = fj - zj;
        Xs[j] = zj;
        Gs[j] = g;
        gg += g * g;
        ff += fj * fj;
    }
    // Gram row <g, g_r> for the filled slots (each thread re-reads only its own Gs[j])
    for (int r = 0; r < m; ++r) {
        T acc = 0;
        if (r == slot) {
            acc = gg;
        } else if (r < count) {
            const T* Gr = Gb + r * n;
            for (long long j = threadIdx.x; j < n; j += blockDim.x) acc += Gs[j] * Gr[j];
        }
        eqs_row(red, r, acc);
    }
    eqs_row(red, m, ff);
    eqs_rows_total(red, tot, m + 1);
    if (threadIdx.x == 0) {
        const bool finite = eqs_bookkeep(b, first, tot[slot], tot[m], tol, atol, tiny,
                                         best_res, active, status, iterations, n_stopped, dec);
        if (finite) {  // the solver only records finite data (as core/loop.py)
            for (int r = 0; r < m; ++r) {
                Hb[slot * m + r] = tot[r];
                Hb[r * m + slot] = tot[r];
            }
        }
    }
    __syncthreads();
    const int improved = dec[0], go = dec[1];

    if (go) {
        // mixing weights (core/anderson.py, mixing_weights with k = e): Jacobi-scaled ridge
        // system, y = solve(Hs + diag(reg valid + (1 - valid)), s) * s, alpha = y / sum(y)
        for (int r = (int)threadIdx.x; r < m; r += (int)blockDim.x) {
            T d = Hb[r * m + r];
            d = isfinite(d) ? d : (T)0;
            d = d > 0 ? d : (T)1;
            dinv[r] = (T)1 / sqrt(d);
        }
        __syncthreads();
        for (int r = (int)threadIdx.x; r < m; r += (int)blockDim.x) {
            for (int c = 0; c < m; ++c) {
                T h = Hb[r * m + c];
                h = isfinite(h) ? h : (T)0;
                A[r][c] = (h * dinv[r]) * dinv[c];
            }
            A[r][r] += r < count ? reg : (T)1;
            sv[r] = r < count ? dinv[r] : (T)0;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            T smax = sv[0];
            for (int r = 1; r < m; ++r) smax = sv[r] > smax ? sv[r] : smax;
            for (int r = 0; r < m; ++r) {
                sv[r] = sv[r] / smax;
                A[r][m] = sv[r];
            }
        }
        __syncthreads();
        // Gaussian elimination with partial pivoting (first largest |pivot|, as LAPACK)
        for (int c = 0; c < m; ++c) {
            if (threadIdx.x == 0) {
                int p = c;
                T best = A[c][c] < 0 ? -A[c][c] : A[c][c];
                for (int r = c + 1; r < m; ++r) {
                    const T a = A[r][c] < 0 ? -A[r][c] : A[r][c];
                    if (a > best) {
                        best = a;
                        p = r;
                    }
                }
                if (p != c) {
                    for (int q = 0; q <= m; ++q) {
                        const T t = A[c][q];
                        A[c][q] = A[p][q];
                        A[p][q] = t;
                    }
                }
            }
            __syncthreads();
            for (int r = c + 1 + (int)threadIdx.x; r < m; r += (int)blockDim.x) {
                const T fct = A[r][c] / A[c][c];
                for (int q = c + 1; q <= m; ++q) A[r][q] -= fct * A[c][q];
                A[r][c] = 0;
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            for (int r = m - 1; r >= 0; --r) {
                T acc = A[r][m];
                for (int c = r + 1; c < m; ++c) acc -= A[r][c] * alpha[c];
                alpha[r] = acc / A[r][r];
            }
            T ysum = 0;
            for (int r = 0; r < m; ++r) {
                alpha[r] = alpha[r] * sv[r];
                ysum += alpha[r];
            }
            T l1 = 0;
            for (int r = 0; r < m; ++r) {
                alpha[r] = alpha[r] / ysum;
                l1 += alpha[r] < 0 ? -alpha[r] : alpha[r];
            }
            dec[2] = isfinite(l1) && l1 <= max_coeff;  // else: the plain damped step
        }
        __syncthreads();
    }
    const int ok = go ? dec[2] : 0;
    // last pass: best iterate, and the next point (mixed, plain step, or parked)
    for (long long j = threadIdx.x; j < n; j += blockDim.x) {
        const T zj = zb[j];
        if (improved) bz[j] = zj;
        T out;
        if (go && ok) {
            T mx = 0, mg = 0;
            for (int r = 0; r < count; ++r) {
                mx += alpha[r] * Xb[r * n + j];
                mg += alpha[r] * Gb[r * n + j];
            }
            out = mx + beta * mg;
        } else if (go) {
            out = zj + beta * Gs[j];
        } else {
            out = improved ? zj : bz[j];
        }
        zo[j] = out;
    }
}

// --------------------------------------------------------------------------- Broyden
// Zc, Gc: (B, n) last recorded point and residual; Hg: (B, n) H g of it; U, V:
// (B, mem, n) rank-one terms u_i v_i^T of H = -I + sum_i u_i v_i^T. e = index of the
// evaluated point; the update is core/broyden.py's update with k = e - 1.
template <typename T>
__device__ void eqs_broyden_step_impl(const T* z, const T* fz, T* z_out, T* Zc, T* Gc, T* Hg,
                                      T* U, T* V, T* best_z, T* best_res, int* active,
                                      int* status, int* iterations, int* n_stopped,
                                      long long n, int mem, int e, T eps, T tol, T atol,
                                      T tiny, int first) {
    __shared__ T red[(2 * EQS_MAX_HIST + 2) * EQS_MAX_WARPS];
    __shared__ T tot[2 * EQS_MAX_HIST + 2];
    __shared__ T cd[2 * EQS_MAX_HIST];  // c_i = <v_i, g_new>, d_i = <u_i, s>
    __shared__ T upd[2];                // denominator (1 when skipped), <v, g_new>
    __shared__ int dec[4];              // improved, active, update ok, step finite
    const long long b = blockIdx.x;
    const T* zb = z + b * n;
    const T* fb = fz + b * n;
    T* zo = z_out + b * n;
    T* bz = best_z + b * n;
    T* zc = Zc + b * n;
    T* gc = Gc + b * n;
    T* hg = Hg + b * n;
    T* Ub = U + b * (long long)mem * n;
    T* Vb = V + b * (long long)mem * n;
    if (!first && !active[b]) {
        eqs_park(bz, zo, n);
        return;
    }
    if (first) {  // init: H = -I, so H g = -g and the first step is z + g
        T gg = 0, ff = 0;
        for (long long j = threadIdx.x; j < n; j += blockDim.x) {
            const T zj = zb[j];
            const T fj = fb[j];
            const T g = fj - zj;
            zc[j] = zj;
            gc[j] = g;
            hg[j] = -g;
            gg += g * g;
            ff += fj * fj;
        }
        eqs_row(red, 0, gg);
        eqs_row(red, 1, ff);
        eqs_rows_total(red, tot, 2);
        if (threadIdx.x == 0)
            eqs_bookkeep(b, first, tot[0], tot[1], tol, atol, tiny, best_res, active, status,
                         iterations, n_stopped, dec);
        __syncthreads();
        const int improved = dec[0], go = dec[1];
        for (long long j = threadIdx.x; j < n; j += blockDim.x) {
            const T zj = zb[j];
            if (improved) bz[j] = zj;
            zo[j] = go ? zj + -hg[j] : (improved ? zj : bz[j]);
        }
        return;
    }
    const int k = e - 1;  // updates done before this one
    const int slot = k % mem;
    const int cnt = k == 0 ? 0 : (k - 1) % mem + 1;  // terms in use (stale ones masked)
    const bool restart = slot == 0;

    // pass A: g_new, s = z_new - z (kept in Zc), norms, c_i = <v_i, g_new>, d_i = <u_i, s>
    T gg = 0, ff = 0;
    for (long long j = threadIdx.x; j < n; j += blockDim.x) {
        const T zj = zb[j];
        const T fj = fb[j];
        const T g = fj - zj;
        const T s = zj - zc[j];
        zc[j] = s;
        gc[j] = g;
        gg += g * g;
        ff += fj * fj;
    }
    eqs_row(red, 0, gg);
    eqs_row(red, 1, ff);
    for (int i = 0; i < cnt; ++i) {
        const T* Vi = Vb + i * n;
        const T* Ui = Ub + i * n;
        T c = 0, d = 0;
        for (long long j = threadIdx.x; j < n; j += blockDim.x) {
            c += Vi[j] * gc[j];
            d += Ui[j] * zc[j];
        }
        eqs_row(red, 2 + i, c);
        eqs_row(red, 2 + cnt + i, d);
    }
    eqs_rows_total(red, tot, 2 + 2 * cnt);
    if (threadIdx.x == 0)
        eqs_bookkeep(b, first, tot[0], tot[1], tol, atol, tiny, best_res, active, status,
                     iterations, n_stopped, dec);
    for (int i = (int)threadIdx.x; i < 2 * cnt; i += (int)blockDim.x) cd[i] = tot[2 + i];
    __syncthreads();
    const int improved = dec[0], go = dec[1];
    if (!go) {
        for (long long j = threadIdx.x; j < n; j += blockDim.x) {
            const T zj = zb[j];
            if (improved) bz[j] = zj;
            zo[j] = improved ? zj : bz[j];
        }
        return;
    }
    T* Us = Ub + slot * n;
    T* Vs = Vb + slot * n;
    // pass B: H g_new, H^T s, Hy = H g_new - H g; <s, Hy>, ||s||^2, ||Hy||^2, <H^T s, g_new>.
    // Slot `slot` is in use only at a restart, and then each element is read before written.
    T sy = 0, ss = 0, yy = 0, vg = 0;
    for (long long j = threadIdx.x; j < n; j += blockDim.x) {
        const T g = gc[j];
        const T s = zc[j];
        T au = 0, av = 0;
        for (int i = 0; i < cnt; ++i) {
            au += cd[i] * Ub[i * n + j];
            av += cd[cnt + i] * Vb[i * n + j];
        }
        const T hgn = au - g;
        const T hv = av - s;
        const T hy = hgn - hg[j];
        sy += s * hy;
        ss += s * s;
        yy += hy * hy;
        vg += hv * g;
        hg[j] = hgn;
        Us[j] = hy;  // scratch until pass C
        Vs[j] = hv;
    }
    eqs_row(red, 0, sy);
    eqs_row(red, 1, ss);
    eqs_row(red, 2, yy);
    eqs_row(red, 3, vg);
    eqs_rows_total(red, tot, 4);
    if (threadIdx.x == 0) {
        const T denom = tot[0];
        const T scale = sqrt(tot[1]) * sqrt(tot[2]);
        const T ad = denom < 0 ? -denom : denom;
        const int ok = isfinite(denom) && ad > eps * scale && isfinite(scale);
        dec[2] = ok;
        upd[0] = ok ? denom : (T)1;
        upd[1] = ok ? tot[3] : (T)0;  // <v, g_new> with v zeroed for a skipped update
    }
    __syncthreads();
    const int ok = dec[2];
    const T safe = upd[0], vgc = upd[1];
    // pass C: u, v into slot `slot`, H_{k+1} g_new, the step -H g_new and its finiteness
    T bad = 0;
    for (long long j = threadIdx.x; j < n; j += blockDim.x) {
        const T s = zc[j];
        const T hy = Us[j];
        const T u = ok ? (s - hy) / safe : (T)0;
        Us[j] = u;
        if (!ok) Vs[j] = 0;
        const T base = restart ? -gc[j] : hg[j];
        const T hgnext = base + u * vgc;
        hg[j] = hgnext;
        const T zj = zb[j];
        zc[j] = zj;
        const T step = -hgnext;
        bad += isfinite(step) ? (T)0 : (T)1;
        zo[j] = zj + step;
        if (improved) bz[j] = zj;
    }
    eqs_row(red, 0, bad);
    eqs_rows_total(red, tot, 1);
    if (tot[0] != 0) {  // a non-finite step: the plain step z + g instead
        for (long long j = threadIdx.x; j < n; j += blockDim.x) zo[j] = zb[j] + gc[j];
    }
}
"""


def _c_param(p: Param, ctype: str) -> str:
    return f"{p.ctype.replace('T', ctype)} {p.name}"


def _wrappers(kernels: dict[str, tuple[Param, ...]]) -> str:
    lines = []
    for dtype, (ctype, _) in DTYPES.items():
        for kernel, params in kernels.items():
            sig = ", ".join(_c_param(p, ctype) for p in params)
            args = ", ".join(p.name for p in params)
            lines.append(
                f'extern "C" __global__ void {kernel_name(kernel, dtype)}({sig}) '
                f"{{ eqs_{kernel}_impl<{ctype}>({args}); }}"
            )
    return "\n".join(lines) + "\n"


def cuda_source() -> str:
    """The whole CUDA C++ module: every kernel, exported for float32 and float64."""
    return _DEVICE_CODE + "\n" + _wrappers(KERNELS)


def exported_names() -> list[str]:
    """Every ``extern "C"`` kernel symbol of :func:`cuda_source`."""
    return [kernel_name(k, d) for d in DTYPES for k in KERNELS]


# --------------------------------------------------------------------------------------
# NumPy reference: what each kernel computes (same arguments, same in-place outputs)
# --------------------------------------------------------------------------------------

_CONVERGED, _MAX_ITER, _NONFINITE = 0, 1, 2


def _bookkeep(
    rows: np.ndarray,
    first: int,
    gg: np.ndarray,
    ff: np.ndarray,
    tol: Any,
    atol: Any,
    tiny: Any,
    best_res: np.ndarray,
    active: np.ndarray,
    status: np.ndarray,
    iterations: np.ndarray,
    n_stopped: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``eqs_bookkeep`` for the samples ``rows``: returns (improved, still active, finite)."""
    gn, fn = np.sqrt(gg), np.sqrt(ff)
    finite = np.isfinite(gn) & np.isfinite(fn)
    rel = np.where(finite, gn / np.where(fn > tiny, fn, tiny), np.nan).astype(gg.dtype)
    conv = gn <= tol * fn + atol
    if first:
        improved = np.ones(rows.shape, bool)
        best_res[rows] = rel
        status[rows] = np.where(~finite, _NONFINITE, np.where(conv, _CONVERGED, _MAX_ITER))
        iterations[rows] = 0
    else:
        improved = rel < best_res[rows]
        best_res[rows] = np.where(improved, rel, best_res[rows])
        st = status[rows]
        st = np.where(conv & finite, _CONVERGED, st)
        status[rows] = np.where(~finite, _NONFINITE, st)
        iterations[rows] += 1
    still = finite & ~conv
    active[rows] = still
    n_stopped[0] += int(np.sum(~still))
    return improved, still, finite


def _live(first: int, active: np.ndarray) -> np.ndarray:
    return np.arange(active.shape[0]) if first else np.nonzero(active)[0]


def _park(first: int, active: np.ndarray, best_z: np.ndarray, z_out: np.ndarray) -> None:
    if not first:
        frozen = active == 0
        z_out[frozen] = best_z[frozen]


def _finish(
    rows: np.ndarray,
    improved: np.ndarray,
    still: np.ndarray,
    z: np.ndarray,
    proposal: np.ndarray,
    best_z: np.ndarray,
    z_out: np.ndarray,
) -> None:
    best = np.where(improved[:, None], z, best_z[rows])
    best_z[rows] = best
    z_out[rows] = np.where(still[:, None], proposal, best)


def _ref_picard_step(
    *,
    z,
    fz,
    z_out,
    best_z,
    best_res,
    active,
    status,
    iterations,
    n_stopped,
    n,
    beta,
    tol,
    atol,
    tiny,
    first,
    **_: Any,
) -> None:
    _park(first, active, best_z, z_out)
    rows = _live(first, active)
    if rows.size == 0:
        return
    zz, fb = z[rows], fz[rows]
    g = fb - zz
    improved, still, _finite = _bookkeep(
        rows,
        first,
        np.sum(g * g, axis=1),
        np.sum(fb * fb, axis=1),
        tol,
        atol,
        tiny,
        best_res,
        active,
        status,
        iterations,
        n_stopped,
    )
    _finish(rows, improved, still, zz, zz + beta * g, best_z, z_out)


def lu_solve_partial_pivoting(A: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Batched Gaussian elimination with partial pivoting, as the Anderson kernel does it.

    ``A``: ``(S, m, m)``, ``rhs``: ``(S, m)``. The pivot is the first row of largest
    ``|a|`` (LAPACK's choice); no check for singularity (a zero pivot gives inf/NaN, which
    the ``||alpha||_1`` safeguard turns into a plain step).
    """
    A = np.array(A, copy=True)
    x = np.array(rhs, copy=True)
    S, m, _ = A.shape
    idx = np.arange(S)
    for c in range(m):
        p = c + np.argmax(np.abs(A[:, c:, c]), axis=1)
        Ac, Ap = A[idx, c].copy(), A[idx, p].copy()
        A[idx, c], A[idx, p] = Ap, Ac
        xc, xp_ = x[idx, c].copy(), x[idx, p].copy()
        x[idx, c], x[idx, p] = xp_, xc
        for r in range(c + 1, m):
            fct = A[:, r, c] / A[:, c, c]
            A[:, r, c + 1 :] -= fct[:, None] * A[:, c, c + 1 :]
            x[:, r] -= fct * x[:, c]
            A[:, r, c] = 0
    out = np.zeros_like(x)
    for r in range(m - 1, -1, -1):
        acc = x[:, r].copy()
        for c in range(r + 1, m):
            acc -= A[:, r, c] * out[:, c]
        out[:, r] = acc / A[:, r, r]
    return out


def anderson_weights(H: np.ndarray, count: int, reg: Any, max_coeff: Any) -> tuple[Any, Any]:
    """Mixing weights ``alpha`` (S, m) and the safeguard flag of the Anderson kernel."""
    S, m, _ = H.shape
    dt = H.dtype.type
    valid = np.arange(m) < count
    Hf = np.where(np.isfinite(H), H, dt(0))
    d = np.diagonal(Hf, axis1=1, axis2=2)
    d = np.where(d > 0, d, dt(1))
    dinv = dt(1) / np.sqrt(d)
    A = (Hf * dinv[:, :, None]) * dinv[:, None, :]
    A = A + np.eye(m, dtype=H.dtype) * np.where(valid, reg, dt(1)).astype(H.dtype)
    s = np.where(valid, dinv, dt(0))
    s = s / np.max(s, axis=1, keepdims=True)
    y = lu_solve_partial_pivoting(A, s) * s
    alpha = y / np.sum(y, axis=1, keepdims=True)
    l1 = np.sum(np.abs(alpha), axis=1)
    return alpha, np.isfinite(l1) & (l1 <= max_coeff)


def _ref_anderson_step(
    *,
    z,
    fz,
    z_out,
    X,
    G,
    H,
    best_z,
    best_res,
    active,
    status,
    iterations,
    n_stopped,
    n,
    m,
    e,
    beta,
    reg,
    max_coeff,
    tol,
    atol,
    tiny,
    first,
    **_: Any,
) -> None:
    _park(first, active, best_z, z_out)
    rows = _live(first, active)
    if rows.size == 0:
        return
    slot, count = e % m, min(e + 1, m)
    zz, fb = z[rows], fz[rows]
    g = fb - zz
    X[rows, slot] = zz
    G[rows, slot] = g
    dots = np.zeros((rows.size, m), dtype=z.dtype)
    for r in range(count):
        dots[:, r] = np.sum(g * (g if r == slot else G[rows, r]), axis=1)
    improved, still, finite = _bookkeep(
        rows,
        first,
        dots[:, slot],
        np.sum(fb * fb, axis=1),
        tol,
        atol,
        tiny,
        best_res,
        active,
        status,
        iterations,
        n_stopped,
    )
    rec = rows[finite]
    H[rec, slot, :] = dots[finite]
    H[rec, :, slot] = dots[finite]
    proposal = zz + beta * g
    if np.any(still):
        alpha, ok = anderson_weights(H[rows[still]], count, reg, max_coeff)
        a = alpha[:, :count, None]
        mixed = np.sum(a * X[rows[still], :count], axis=1) + beta * np.sum(
            a * G[rows[still], :count], axis=1
        )
        proposal[still] = np.where(ok[:, None], mixed, proposal[still])
    _finish(rows, improved, still, zz, proposal, best_z, z_out)


def _ref_broyden_step(
    *,
    z,
    fz,
    z_out,
    Zc,
    Gc,
    Hg,
    U,
    V,
    best_z,
    best_res,
    active,
    status,
    iterations,
    n_stopped,
    n,
    mem,
    e,
    eps,
    tol,
    atol,
    tiny,
    first,
    **_: Any,
) -> None:
    _park(first, active, best_z, z_out)
    rows = _live(first, active)
    if rows.size == 0:
        return
    zz, fb = z[rows], fz[rows]
    g = fb - zz
    gg, ff = np.sum(g * g, axis=1), np.sum(fb * fb, axis=1)
    if first:
        Zc[rows], Gc[rows], Hg[rows] = zz, g, -g
        improved, still, _finite = _bookkeep(
            rows,
            first,
            gg,
            ff,
            tol,
            atol,
            tiny,
            best_res,
            active,
            status,
            iterations,
            n_stopped,
        )
        _finish(rows, improved, still, zz, zz + g, best_z, z_out)
        return
    k = e - 1
    slot, cnt, restart = k % mem, (0 if k == 0 else (k - 1) % mem + 1), k % mem == 0
    s = zz - Zc[rows]
    Zc[rows], Gc[rows] = s, g  # as the kernel's pass A (a stopped sample keeps these)
    improved, still, _finite = _bookkeep(
        rows, first, gg, ff, tol, atol, tiny, best_res, active, status, iterations, n_stopped
    )
    proposal = zz.copy()
    go = rows[still]
    if go.size:
        gs, ss_, Ug, Vg = g[still], s[still], U[go], V[go]
        c = np.sum(Vg[:, :cnt] * gs[:, None, :], axis=2)
        d = np.sum(Ug[:, :cnt] * ss_[:, None, :], axis=2)
        hgn = np.sum(c[:, :, None] * Ug[:, :cnt], axis=1) - gs
        hv = np.sum(d[:, :, None] * Vg[:, :cnt], axis=1) - ss_
        hy = hgn - Hg[go]
        denom = np.sum(ss_ * hy, axis=1)
        scale = np.sqrt(np.sum(ss_ * ss_, axis=1)) * np.sqrt(np.sum(hy * hy, axis=1))
        ok = np.isfinite(denom) & (np.abs(denom) > eps * scale) & np.isfinite(scale)
        safe = np.where(ok, denom, 1).astype(z.dtype)
        vg = np.where(ok, np.sum(hv * gs, axis=1), 0).astype(z.dtype)
        u = np.where(ok[:, None], (ss_ - hy) / safe[:, None], 0).astype(z.dtype)
        U[go, slot] = u
        V[go, slot] = np.where(ok[:, None], hv, 0)
        base = -gs if restart else hgn
        hg_next = base + u * vg[:, None]
        Hg[go] = hg_next
        step = -hg_next
        fine = np.all(np.isfinite(step), axis=1)
        proposal[still] = np.where(fine[:, None], zz[still] + step, zz[still] + gs)
        Zc[go] = zz[still]
    _finish(rows, improved, still, zz, proposal, best_z, z_out)


#: kernel -> NumPy function of the kernel's parameters (keywords), mutating its outputs
REFERENCE: dict[str, Callable[..., None]] = {
    "picard_step": _ref_picard_step,
    "anderson_step": _ref_anderson_step,
    "broyden_step": _ref_broyden_step,
}


# --------------------------------------------------------------------------------------
# CPU emulation of the CUDA source
# --------------------------------------------------------------------------------------

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
            sig = ", ".join(_c_param(p, ctype) for p in params)
            args = ", ".join(p.name for p in params)
            lines.append(
                f'extern "C" int emu_{name}(unsigned grid, unsigned block, {sig}) {{ '
                f"return eqs_emu::launch(grid, block, [&]() {{ {name}({args}); }}); }}"
            )
    return "\n".join(lines) + "\n"


def emulation_source(extra_device_code: str = "", extra_kernels: Any = None) -> str:
    """C++ source of the CPU emulator: prelude + :func:`cuda_source` + launch wrappers.

    ``extra_device_code`` / ``extra_kernels`` (a dict like :data:`KERNELS` whose templates
    ``eqs_<name>_impl`` are in ``extra_device_code``) add test kernels.
    """
    extra = extra_kernels or {}
    return (
        EMULATION_PRELUDE
        + cuda_source()
        + extra_device_code
        + (_wrappers(extra) if extra else "")
        + _emulation_wrappers({**KERNELS, **extra})
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
    return Emulator(str(lib), {**KERNELS, **(extra_kernels or {})})


def parse_exported(source: str) -> dict[str, str]:
    """``extern "C" __global__`` kernels of a CUDA source: name -> parameter text."""
    pattern = r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)'
    return {m.group(1): " ".join(m.group(2).split()) for m in re.finditer(pattern, source)}
