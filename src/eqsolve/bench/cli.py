"""``python -m eqsolve.bench``: eqsolve beside torchdeq, jaxopt, optimistix and scipy.optimize.

Runs every selected problem on every selected backend: eqsolve's solvers and the installed
peers of that framework, side by side, in one process. Prints one table per problem and
the performance targets, writes ``results.json`` and PNG plots to ``--out``.

Every backend is pinned to one intra-op thread (OMP/MKL/OpenBLAS, ``torch.set_num_threads``,
XLA's CPU flags). The variables must be set before NumPy loads, so when they are not already
set to one thread the command re-executes itself with them (and says so).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}
DEFAULT_BACKENDS = ("numpy", "torch", "jax")
GPU_BACKENDS = ("torch-cuda", "cupy")
TOL = {"float64": 1e-8, "float32": 1e-5}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from .problems import DEFAULT_PROBLEMS, PROBLEMS
    from .runner import EQSOLVE_SOLVERS

    ap = argparse.ArgumentParser(
        prog="python -m eqsolve.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--problems",
        default=",".join(DEFAULT_PROBLEMS),
        help=f"comma-separated, from {', '.join(PROBLEMS)} (default: %(default)s)",
    )
    ap.add_argument("--full", action="store_true", help="every problem (adds tanh-wide and conv)")
    ap.add_argument(
        "--backends",
        default=None,
        help="comma-separated, from numpy, torch, jax, torch-cuda, cupy (default: "
        "the installed ones of numpy, torch, jax, plus torch-cuda and cupy when a "
        "GPU is usable)",
    )
    ap.add_argument(
        "--solvers",
        default=",".join(EQSOLVE_SOLVERS),
        help="eqsolve solvers (default: %(default)s)",
    )
    ap.add_argument(
        "--peers",
        default="all",
        help="'all', 'none', or comma-separated libraries (torchdeq, jaxopt, optimistix, scipy)",
    )
    ap.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    ap.add_argument(
        "--tol",
        type=float,
        default=None,
        help="relative residual per sample (default 1e-8 float64, 1e-5 float32)",
    )
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5, help="timed runs per row after warm-up")
    ap.add_argument(
        "--row-budget",
        type=float,
        default=30.0,
        help="seconds of timed runs per row: a row whose solve takes longer than "
        "budget/reps gets fewer (at least 2) timed runs, shown in the table (default: "
        "%(default)s)",
    )
    ap.add_argument(
        "--backward",
        action="store_true",
        help="also measure gradients: error vs the dense float64 reference, "
        "backward time, memory held for backward",
    )
    ap.add_argument(
        "--size",
        default="default",
        choices=("default", "tiny"),
        help="'tiny' shrinks every problem (smoke runs, tests)",
    )
    ap.add_argument(
        "--out",
        default="bench-results",
        type=Path,
        help="folder for results.json and the PNG plots (default: %(default)s)",
    )
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.full:
        args.problems = ",".join(PROBLEMS)
    args.problems = split_csv(args.problems)
    for name in args.problems:
        if name not in PROBLEMS:
            ap.error(f"unknown problem {name!r}; choose from {', '.join(PROBLEMS)}")
    args.solvers = split_csv(args.solvers)
    for s in args.solvers:
        if s not in EQSOLVE_SOLVERS:
            ap.error(f"unknown solver {s!r}; choose from {', '.join(EQSOLVE_SOLVERS)}")
    if args.tol is None:
        args.tol = TOL[args.dtype]
    if args.tol <= 0 or args.reps < 1 or args.max_iter < 1:
        ap.error("--tol, --reps and --max-iter must be positive")
    return args


def split_csv(text: str) -> list[str]:
    """Split a comma-separated command-line list: ``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _pin_threads(argv: list[str]) -> None:
    """Re-execute with one thread per library unless the environment already says so."""
    if all(os.environ.get(k) == v for k, v in THREAD_ENV.items()):
        return
    if os.environ.get("EQSOLVE_BENCH_REEXEC"):  # never loop
        return
    print(
        "eqsolve.bench: pinning every library to one thread (re-executing with "
        + " ".join(f"{k}={shlex.quote(v)}" for k, v in THREAD_ENV.items())
        + ")",
        file=sys.stderr,
    )
    env = {**os.environ, **THREAD_ENV, "EQSOLVE_BENCH_REEXEC": "1"}
    os.execve(sys.executable, [sys.executable, "-m", "eqsolve.bench", *argv], env)


def _gpu_usable(backend: str) -> bool:
    try:
        if backend == "torch-cuda":
            import torch

            return bool(torch.cuda.is_available())
        if backend == "cupy":
            import cupy

            return bool(cupy.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken CUDA install means "no GPU rows"
        return False
    return False


def default_backends() -> list[str]:
    out = [b for b in DEFAULT_BACKENDS if importlib.util.find_spec(b) is not None]
    lib = {"torch-cuda": "torch", "cupy": "cupy"}
    out += [b for b in GPU_BACKENDS if importlib.util.find_spec(lib[b]) and _gpu_usable(b)]
    return out


def environment(backends: list[str]) -> dict[str, Any]:
    """Versions, threads, CPU and devices, for the JSON file."""
    from importlib import metadata

    versions = {}
    for dist in (
        "eqsolve",
        "numpy",
        "array-api-compat",
        "torch",
        "jax",
        "jaxlib",
        "cupy-cuda12x",
        "torchdeq",
        "jaxopt",
        "optimistix",
        "equinox",
        "lineax",
        "scipy",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": {k: os.environ.get(k) for k in THREAD_ENV},
        "versions": versions,
        "devices": {},
    }
    if "torch" in sys.modules:
        import torch

        env["threads"]["torch.get_num_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["devices"]["torch"] = torch.cuda.get_device_name(0)
    if "jax" in sys.modules:
        import jax

        env["devices"]["jax"] = [str(d) for d in jax.devices()]
    return env


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    _pin_threads(argv)
    from .session import run

    return run(args, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
