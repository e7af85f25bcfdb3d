"""``python -m bench``: eqsolve beside torchdeq, jaxopt, optimistix and scipy.optimize.

Run from the root of a clone of the repository (the benchmark is not part of the installed
package). Runs every selected problem on every selected backend: eqsolve's solvers and the
installed peers of that framework, side by side, in one process. Prints one table per
problem and the performance targets, and writes ``results.json`` and PNG plots to a fresh
folder ``bench-results/<date>_<time>/`` (or to ``--out``, which must not hold an earlier
run's results unless ``--overwrite`` is given).

Every backend is pinned to one intra-op thread (OMP/MKL/OpenBLAS, ``torch.set_num_threads``,
XLA's CPU flags). The variables must be set before NumPy loads, so when they are not already
set to one thread the command re-executes itself with them (and says so).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from pathlib import Path
from typing import NoReturn

from .machine import THREAD_ENV, default_backends
from .native import BACKENDS
from .peers import PEERS
from .problems import DEFAULT_PROBLEMS, PROBLEMS
from .runner import EQSOLVE_SOLVERS

PROG = "python -m bench"
TOL = {"float64": 1e-8, "float32": 1e-5}
#: where a run writes when ``--out`` is not given: a fresh sub-folder per run
RESULTS_ROOT = Path("bench-results")
#: files of a run; a folder holding any of them is an earlier run's
RUN_FILES = ("results.json", "ratios.png", "residual_*.png")
PEER_LIBRARIES = tuple(lib for libs in PEERS.values() for lib in libs)


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (the usage is long): ``prog: error: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = _Parser(
        prog=PROG,
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
        help=f"comma-separated, from {', '.join(BACKENDS)} (default: the installed ones of "
        "numpy, torch, jax, plus torch-cuda and cupy when a GPU is usable)",
    )
    ap.add_argument(
        "--solvers",
        default=",".join(EQSOLVE_SOLVERS),
        help="eqsolve solvers, comma-separated (default: %(default)s)",
    )
    ap.add_argument(
        "--peers",
        default="all",
        help=f"'all', 'none', or comma-separated libraries from {', '.join(PEER_LIBRARIES)} "
        "(default: %(default)s)",
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
        default=None,
        type=Path,
        help="folder for results.json and the PNG plots (default: a new folder "
        f"{RESULTS_ROOT}/<date>_<time>/ per run)",
    )
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="let --out replace an earlier run's results and plots",
    )
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.full:
        args.problems = ",".join(PROBLEMS)
    args.problems = _choose(ap, "problem", args.problems, PROBLEMS)
    args.solvers = _choose(ap, "solver", args.solvers, EQSOLVE_SOLVERS)
    if args.backends is not None:
        args.backends = _choose(ap, "backend", args.backends, tuple(BACKENDS))
    if args.peers not in ("all", "none"):
        args.peers = ",".join(_choose(ap, "peer library", args.peers, PEER_LIBRARIES))
    if args.tol is None:
        args.tol = TOL[args.dtype]
    if args.tol <= 0 or args.reps < 1 or args.max_iter < 1 or args.row_budget <= 0:
        ap.error("--tol, --reps, --max-iter and --row-budget must be positive")
    if args.out is not None and not args.overwrite:
        earlier = sorted({p.name for pattern in RUN_FILES for p in args.out.glob(pattern)})
        if earlier:
            ap.error(
                f"--out {args.out} already holds an earlier run's {', '.join(earlier)}; "
                "pass --overwrite to replace it, or leave --out out to write to a new folder "
                f"under {RESULTS_ROOT}/"
            )
    return args


def split_csv(text: str) -> list[str]:
    """Split a comma-separated command-line list: ``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _choose(ap: argparse.ArgumentParser, what: str, text: str, valid: tuple[str, ...]) -> list[str]:
    """The names of a comma-separated option, each checked against ``valid`` (exit 2)."""
    names = split_csv(text)
    if not names:
        ap.error(f"no {what} given; choose from {', '.join(valid)}")
    for name in names:
        if name not in valid:
            ap.error(f"unknown {what} {name!r}; choose from {', '.join(valid)}")
    return names


def fresh_out_dir(root: Path = RESULTS_ROOT, now: datetime.datetime | None = None) -> Path:
    """A new folder ``root/<YYYY-mm-dd_HH-MM-SS>`` (``-2``, ``-3``, ... if taken), created."""
    stamp = f"{(now or datetime.datetime.now()):%Y-%m-%d_%H-%M-%S}"
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        path = root / (stamp if i == 1 else f"{stamp}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free folder name for {stamp} under {root}")


def pin_threads(argv: list[str], module: str = "bench") -> None:
    """Re-execute ``python -m module *argv`` with one thread per library unless the
    environment already says so."""
    if all(os.environ.get(k) == v for k, v in THREAD_ENV.items()):
        return
    if os.environ.get("EQSOLVE_BENCH_REEXEC"):  # never loop
        return
    print(
        "bench: pinning every library to one thread (re-executing with "
        + " ".join(f"{k}={shlex.quote(v)}" for k, v in THREAD_ENV.items())
        + ")",
        file=sys.stderr,
    )
    env = {**os.environ, **THREAD_ENV, "EQSOLVE_BENCH_REEXEC": "1"}
    # the package's folder on the path, so that `-m bench` resolves wherever this runs from
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    pin_threads(argv)
    from .session import run  # after the re-execution: the run loads every backend

    if args.backends is None:
        args.backends = default_backends()
    if args.out is None:
        args.out = fresh_out_dir()
    return run(args, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
