"""Cost of eqsolve's eager PyTorch step beside its floor: ``python -m bench.step_overhead``.

For the ``tanh`` cell ``f(z) = tanh(z W^T + x)`` (``||W||_2 = 0.9``) at the sizes of issue 12
(B x n = 64x128, 64x256, 4096x64, 256x512), float32 (tol 1e-6) and float64 (tol 1e-10), and
the solvers picard, anderson and auto, it prints

* time / floor: the median over ``--reps`` of (solve time) / (time of ``nfev`` calls of
  ``f`` measured right after it, in the same process), one intra-op thread;
* the non-view ATen operations one step dispatches beyond ``f``'s own, counted with a
  ``TorchDispatchMode`` on a d=32, B=8 float64 problem (load-independent).

Timings on a shared VM vary; compare rows of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import eqsolve  # noqa: E402

SIZES = ((64, 128), (64, 256), (4096, 64), (256, 512))
SOLVERS = ("picard", "anderson", "auto")
_VIEWS = {
    "view", "_unsafe_view", "t", "transpose", "select", "slice", "unsqueeze", "squeeze",
    "expand", "as_strided", "detach", "alias", "reshape", "permute", "_reshape_alias",
    "unbind", "split", "narrow", "diagonal", "lift_fresh",
}


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if str(func.overloadpacket.__name__) not in _VIEWS:
            self.n += 1
        return func(*args, **(kwargs or {}))


def problem(B: int, n: int, dtype: torch.dtype, seed: int = 0) -> tuple[Any, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=dtype)
    W *= 0.9 / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(B, n, generator=g, dtype=dtype)
    Wt = W.T.contiguous()
    return (lambda z: torch.tanh(z @ Wt + x)), torch.zeros(B, n, dtype=dtype)


def ops_per_step(solver: str) -> float:
    f, z0 = problem(8, 32, torch.float64)
    with torch.no_grad():
        # warm-up: constants the solvers cache on first use are not a per-step cost
        eqsolve.solve(f, z0, solver=solver, tol=1e-30, max_iter=20, on_failure="ignore")
        one = _Count()
        with one:
            f(z0)
        totals = {}
        for steps in (10, 20):  # tol=1e-30: every sample stays active
            c = _Count()
            with c:
                eqsolve.solve(f, z0, solver=solver, tol=1e-30, max_iter=steps,
                              on_failure="ignore")
            totals[steps] = c.n
    return (totals[20] - totals[10]) / 10 - one.n


def time_over_floor(
    solver: str, B: int, n: int, dtype: torch.dtype, reps: int
) -> tuple[float, int]:
    f, z0 = problem(B, n, dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-10
    ratios = []
    with torch.no_grad():
        nfev = int(eqsolve.solve(f, z0, solver=solver, tol=tol, max_iter=200).nfev)  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            eqsolve.solve(f, z0, solver=solver, tol=tol, max_iter=200)
            t1 = time.perf_counter()
            for _ in range(nfev):
                f(z0)
            ratios.append((t1 - t0) / (time.perf_counter() - t1))
    return statistics.median(ratios), nfev


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.step_overhead", description=__doc__)
    parser.add_argument("--reps", type=int, default=7, help="timed solves per row (default 7)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("non-view ATen operations per step beyond f (torch, d=32, B=8, float64):")
    for s in SOLVERS:
        print(f"  {s:9s} {ops_per_step(s):5.1f}")
    time_over_floor("picard", *SIZES[0], torch.float32, 3)  # warm the process up, discarded
    print("time / floor (f-evals x one f call), float32 / float64, median of", args.reps)
    print(f"  {'B x n':10s}" + "".join(f"{s:>22s}" for s in SOLVERS))
    for B, n in SIZES:
        cells = []
        for s in SOLVERS:
            r32, k32 = time_over_floor(s, B, n, torch.float32, args.reps)
            r64, k64 = time_over_floor(s, B, n, torch.float64, args.reps)
            cells.append(f"{r32:5.2f} / {r64:4.2f} ({k32}/{k64})")
        print(f"  {f'{B}x{n}':10s}" + "".join(f"{c:>22s}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
