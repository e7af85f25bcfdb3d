"""Forward-solve figures for every eqsolve solver on P1 (``tanh``) and P4 (``sym``).

    python bench/core_timing.py [--reps 7] [--dtype float64] [--tol 1e-8]

Backends: numpy, torch (eager, CPU) and jax (the whole solve jitted). Every backend is
pinned to one thread (this VM stalls with more). For each (problem, backend, solver):
f-evaluations, max iterations, whether all samples converged, the median wall time of the
solve (min-max over ``--reps`` runs after one warm-up; JAX: ``block_until_ready``, compile
time excluded and shown separately), the floor ``nfev x median time of one f call``
measured in the same run, and the share of the solve's time spent outside ``f``
(``1 - floor / time``).
"""

from __future__ import annotations

import os

# one thread everywhere, before any numerical library is imported
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eqsolve  # noqa: E402
from problems import make_problem  # noqa: E402

SOLVERS = ("picard", "anderson", "broyden")


def _median_time(fn, reps: int, sync) -> tuple[float, float, float]:
    fn()  # warm-up
    sync(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def run_backend(name: str, problem, dtype: str, tol: float, reps: int) -> list[dict]:
    rows = []
    W, inj = problem.W.astype(dtype), problem.inj.astype(dtype)
    if name == "numpy":
        f = lambda z: np.tanh(z @ W.T + inj)  # noqa: E731
        z0 = np.zeros(problem.shape, dtype)
        sync = lambda out: out  # noqa: E731
        solve = lambda s: eqsolve.solve(f, z0, solver=s, tol=tol, max_iter=1000)  # noqa: E731
    elif name == "torch":
        import torch

        torch.set_num_threads(1)
        Wt, injt = torch.from_numpy(W.T.copy()), torch.from_numpy(inj)
        f = lambda z: torch.tanh(z @ Wt + injt)  # noqa: E731
        z0 = torch.zeros(problem.shape, dtype=getattr(torch, dtype))
        sync = lambda out: out  # noqa: E731
        solve = lambda s: eqsolve.solve(f, z0, solver=s, tol=tol, max_iter=1000)  # noqa: E731
    elif name == "jax":
        import jax
        import jax.numpy as jnp

        jax.config.update("jax_enable_x64", True)
        Wj, injj = jnp.asarray(W.T), jnp.asarray(inj)
        f = jax.jit(lambda z: jnp.tanh(z @ Wj + injj))
        z0 = jnp.zeros(problem.shape, dtype=dtype)

        def sync(out):
            return jax.block_until_ready(out)

        jitted = {
            s: jax.jit(lambda z, s=s: eqsolve.solve(f, z, solver=s, tol=tol, max_iter=1000))
            for s in SOLVERS
        }
        solve = lambda s: jitted[s](z0)  # noqa: E731
    else:
        raise ValueError(name)

    t_f, _, _ = _median_time(lambda: f(z0), max(reps, 50), sync)
    for s in SOLVERS:
        compile_s = None
        if name == "jax":
            t0 = time.perf_counter()
            sync(solve(s))
            compile_s = time.perf_counter() - t0
        sol = solve(s)
        med, lo, hi = _median_time(lambda s=s: solve(s), reps, sync)
        nfev = int(sol.nfev)
        floor = nfev * t_f
        rows.append(
            dict(
                problem=problem.name,
                backend=name,
                solver=s,
                dtype=dtype,
                nfev=nfev,
                iterations=int(np.max(np.asarray(sol.iterations))),
                converged=bool(np.all(np.asarray(sol.converged))),
                residual=float(np.max(np.asarray(sol.residual))),
                median_ms=1e3 * med,
                min_ms=1e3 * lo,
                max_ms=1e3 * hi,
                f_call_ms=1e3 * t_f,
                floor_ms=1e3 * floor,
                outside_f=max(0.0, 1.0 - floor / med),
                compile_s=compile_s,
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--problems", default="tanh,sym")
    ap.add_argument("--backends", default="numpy,torch,jax")
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--tol", type=float, default=1e-8)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    print("threads pinned to 1 (OMP/MKL/OpenBLAS, torch.set_num_threads(1), XLA single-threaded)")
    header = (
        f"{'problem':8} {'backend':7} {'solver':9} {'nfev':>5} {'conv':>5} {'max res':>9} "
        f"{'median ms':>10} {'(min-max)':>17} {'f ms':>7} {'floor ms':>9} {'outside f':>9}"
    )
    print(header)
    for pname in args.problems.split(","):
        problem = make_problem(pname)
        for be in args.backends.split(","):
            if importlib.util.find_spec(be) is None:
                print(f"{pname:8} {be:7} skipped: {be} is not installed")
                continue
            for r in run_backend(be, problem, args.dtype, args.tol, args.reps):
                extra = (
                    f"  (jit compile {r['compile_s']:.2f} s)" if r["compile_s"] is not None else ""
                )
                print(
                    f"{r['problem']:8} {r['backend']:7} {r['solver']:9} {r['nfev']:5d} "
                    f"{str(r['converged']):>5} {r['residual']:9.2e} {r['median_ms']:10.2f} "
                    f"({r['min_ms']:7.2f}-{r['max_ms']:7.2f}) {r['f_call_ms']:7.3f} "
                    f"{r['floor_ms']:9.2f} {100 * r['outside_f']:8.1f}%{extra}"
                )


if __name__ == "__main__":
    main()
