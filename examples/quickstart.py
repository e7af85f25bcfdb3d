"""eqsolve quickstart: one small DEQ layer, every solver, every installed backend.

Problem P1 of the benchmark suite: f(z) = tanh(z W^T + x U^T + b) with d=256, p=64, B=64 and
||W||_2 = 0.9, in float64, solved to a relative residual of 1e-8. For NumPy (always), PyTorch
and JAX (when installed; JAX under jax.jit) and each solver (the default "auto" first), it
prints the f-evaluations, whether every sample converged, and the median wall time of 5 solves
after a warm-up.

Run:  python examples/quickstart.py
"""

import os

# One intra-op thread per library (set before they are imported): faster for problems this
# small, and the way eqsolve's tests and benchmarks run.
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(var, "1")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import importlib.util  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import eqsolve  # noqa: E402

d, p, B = 256, 64, 64
rng = np.random.default_rng(0)
W = rng.standard_normal((d, d))
W *= 0.9 / np.linalg.norm(W, 2)
U = rng.standard_normal((d, p)) / np.sqrt(p)
b = 0.1 * rng.standard_normal(d)
x = rng.standard_normal((B, p))
inj = x @ U.T + b  # input injection, computed once: (B, d)


def setup(backend):
    """(asarray, tanh, wait) for one backend: how to make its arrays and time it honestly."""
    if backend == "torch":
        import torch

        torch.set_num_threads(1)
        return torch.asarray, torch.tanh, lambda sol: sol
    if backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)  # float64, like the NumPy rows
        return jax.numpy.asarray, jax.numpy.tanh, jax.block_until_ready
    return np.asarray, np.tanh, lambda sol: sol


def report(backend):
    asarray, tanh, wait = setup(backend)
    Wt, injb, z0 = asarray(W.T.copy()), asarray(inj), asarray(np.zeros((B, d)))

    def f(z):
        return tanh(z @ Wt + injb)

    for solver in ("auto", "picard", "anderson", "broyden"):  # "auto" is the default
        def solve(z0, solver=solver):
            return eqsolve.solve(f, z0, solver=solver, tol=1e-8, max_iter=200)

        if backend == "jax":
            import jax

            solve = jax.jit(solve)
        sol = wait(solve(z0))  # warm-up (and, for JAX, compilation)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            wait(solve(z0))
            times.append(time.perf_counter() - t0)
        converged = bool(np.asarray(sol.converged).all())
        print(f"{backend:8} {solver:9} {int(sol.nfev):7d} {converged!s:>9} "
              f"{1e3 * statistics.median(times):9.2f}")


print(f"P1 tanh DEQ layer: d={d} p={p} B={B}, float64, tol=1e-8, one thread")
print(f"{'backend':8} {'solver':9} {'f-evals':>7} {'converged':>9} {'median ms':>9}")
for backend in ["numpy"] + [n for n in ("torch", "jax") if importlib.util.find_spec(n)]:
    report(backend)
