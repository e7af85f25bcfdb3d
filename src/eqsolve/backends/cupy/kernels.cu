// eqsolve: fused fixed-point solver steps for the CuPy backend (eqsolve/backends/cupy).
//
// One kernel per solver runs one whole iteration of core/loop.py after f was evaluated: it
// records the evaluated point, applies the stopping rule and the per-sample bookkeeping (best
// iterate, status, iteration count, freezing) and writes the next point to evaluate. The grid
// has one block per sample (blockIdx.x = sample b), so every per-sample reduction
// (||f(z) - z||^2, ||f(z)||^2, Gram rows, Broyden inner products) is a block reduction and
// needs no second launch; a frozen sample's block only parks its point at the best iterate.
// blockDim.x is a multiple of 32 and at most 256.
//
// * picard_step: z + beta g.
// * anderson_step: ring-buffer write of (z, g), the new Gram row/column against the ring, the
//   Jacobi-scaled ridge system (Hs + lambda I) x = s solved in shared memory by Gaussian
//   elimination with partial pivoting, the ||alpha||_1 safeguard and the mixing
//   sum_i alpha_i X_i + beta sum_i alpha_i G_i -- exactly core/anderson.py.
// * broyden_step: the limited-memory good-Broyden update of core/broyden.py (restart when the
//   memory is full, masked stale terms, skipped updates) and the step -H g.
//
// The kernels are templates eqs_<kernel>_impl<T>. Their extern "C" exports
// eqs_<kernel>_f32 / eqs_<kernel>_f64 are generated from the parameter table KERNELS of
// kernels.py and appended to this file by kernels.cuda_source(): a kernel's parameters here
// and there must agree (tests/test_cupy_fused.py checks it). EQS_MAX_HIST is kernels.py's
// MAX_HISTORY, EQS_MAX_WARPS its MAX_BLOCK / 32, EQS_* statuses those of core/solution.py.
//
// No includes: NVRTC (what CuPy runs), nvcc and the CPU emulator of the tests
// (tests/cupy_emulator.py) compile this text as it is.

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
