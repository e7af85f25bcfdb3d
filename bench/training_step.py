"""``python -m bench.training_step``: one DEQ training step, eqsolve beside its peers and the floor.

What DEQ users run: a forward solve, the implicit backward and the parameter gradients of a
loss (``L = sum(c * z*)``), float32, at DEQ-training tolerances (1e-4 and 1e-6, ``max_iter``
100), on the problems of :mod:`bench.training_problems` (tanh cells at (d, B) = (128, 64) and
(512, 256), the trained ``digits`` cell and the ``conv`` cell). Rows per framework:

* eqsolve (both frameworks; JAX jitted): the defaults (``auto`` forward, ``auto`` adjoint),
  the default forward with the Anderson adjoint, Anderson forward and adjoint;
* torch: torchdeq ``get_deq(ift=True)`` (Anderson forward and backward; defaults and
  tuned), and the floor;
* JAX: jaxopt ``AndersonAcceleration(implicit_diff=True)`` (defaults and tuned), optimistix
  ``FixedPointIteration`` + ``ImplicitAdjoint(GMRES)``, and the floor.

The floor is backprop through ``K`` unrolled applications of the cell, ``K`` = the forward
f-evaluations of eqsolve's default solver on that framework: the same number of ``f`` calls
and VJPs as a DEQ step, so a DEQ step can approach it but hardly beat it. Each row prints its
median time (min-max over ``--reps`` steps after a warm-up; JAX: the warm-up compiles, its
time is shown separately), its ratio to the floor and to eqsolve's default, the largest
float64 residual of the ``z*`` it returned, and its gradient's relative error against the
dense float64 implicit-function-theorem reference. Writes ``training.json`` and
``training.png`` (ratio to the floor per row) to ``--out`` (default: a new folder under
``bench-results/``). Every library is pinned to one thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .cli import fresh_out_dir, pin_threads, split_csv
from .plots import pyplot
from .timing import time_call
from .training_problems import TRAINING_PROBLEMS, TrainingProblem, make_training_problem
from .training_types import StepRow

PROG = "python -m bench.training_step"
FRAMEWORKS = ("torch", "jax")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", default=",".join(TRAINING_PROBLEMS),
                    help="comma-separated, from %(default)s")
    ap.add_argument("--frameworks", default=None,
                    help="comma-separated, from torch, jax (default: the installed ones)")
    ap.add_argument("--tols", default="1e-4,1e-6", help="comma-separated (default %(default)s)")
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--reps", type=int, default=7, help="timed steps per row (default 7)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke runs, tests)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    args.problems = split_csv(args.problems)
    for p in args.problems:
        if p not in TRAINING_PROBLEMS:
            ap.error(f"unknown problem {p!r}; choose from {', '.join(TRAINING_PROBLEMS)}")
    if args.frameworks is None:
        args.frameworks = [f for f in FRAMEWORKS if importlib.util.find_spec(f) is not None]
    else:
        args.frameworks = split_csv(args.frameworks)
        for fw in args.frameworks:
            if fw not in FRAMEWORKS:
                ap.error(f"unknown framework {fw!r}; choose from {', '.join(FRAMEWORKS)}")
    try:
        args.tols = [float(t) for t in split_csv(args.tols)]
    except ValueError:
        ap.error(f"--tols must be comma-separated numbers, got {args.tols!r}")
    if not args.tols or any(t <= 0 for t in args.tols) or args.reps < 1 or args.max_iter < 1:
        ap.error("--tols, --reps and --max-iter must be positive")
    return args


def measure(row: StepRow, pr: TrainingProblem, ref: dict[str, np.ndarray], reps: int
            ) -> dict[str, Any]:
    """Warm up (JAX: compile), time ``reps`` steps, check the result in float64."""
    out: dict[str, Any] = {"framework": row.framework, "name": row.name,
                           "library": row.library, "method": row.method,
                           "variant": row.variant, "settings": row.settings}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            z, grads, nfev = row.to_numpy(row.step())
            out["first_call_s"] = time.perf_counter() - t0
            t = time_call(row.step, lambda o: row.to_numpy(o), reps)
    except Exception as exc:  # noqa: BLE001 - a failing row is reported, not fatal
        out["error"] = f"{type(exc).__name__}: {exc}"[:500]
        return out
    out.update(t.as_ms())
    out["nfev"] = nfev
    out["max_residual"] = float(np.max(pr.residual(z)))
    out["grad_rel_err"] = max(
        float(np.linalg.norm(grads[k] - ref[k]) / np.linalg.norm(ref[k])) for k in ref
    )
    return out


def _rows(fw: str, pr: TrainingProblem, tol: float, max_iter: int) -> tuple[int, list[StepRow]]:
    if fw == "torch":
        from . import training_torch as mod
    else:
        from . import training_jax as mod  # type: ignore[no-redef]
    K = mod.forward_fevals(pr, tol, max_iter)
    return K, mod.rows(pr, tol, max_iter, K)


def add_ratios(results: list[dict[str, Any]]) -> None:
    """``x_floor`` and ``x_default`` of each row, within its (problem, tol, framework)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["problem"], r["tol"], r["framework"]), []).append(r)
    for rows in groups.values():
        floor = next((r for r in rows if r["library"] == "unrolled" and "median_ms" in r), None)
        default = next((r for r in rows if r["variant"] == "default" and "median_ms" in r), None)
        for r in rows:
            if "median_ms" not in r:
                continue
            r["x_floor"] = r["median_ms"] / floor["median_ms"] if floor else None
            r["x_default"] = r["median_ms"] / default["median_ms"] if default else None


def format_rows(results: list[dict[str, Any]]) -> str:
    lines = []
    head = (f"  {'framework':9s} {'row':38s} {'ms median (min-max)':>24s} {'x floor':>8s} "
            f"{'x eqsolve':>9s} {'f-evals':>7s} {'max resid':>9s} {'grad err':>9s} "
            f"{'1st call s':>10s}")
    for key in dict.fromkeys((r["problem"], r["size"], r["tol"]) for r in results):
        lines += ["", f"{key[0]} ({key[1]}), float32, tol {key[2]:g}", head]
        for r in (r for r in results if (r["problem"], r["size"], r["tol"]) == key):
            if "error" in r:
                lines.append(f"  {r['framework']:9s} {r['name']:38s} failed: {r['error']}")
                continue
            span = f"{r['median_ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f})"
            xf = "-" if r.get("x_floor") is None else f"{r['x_floor']:.2f}"
            xd = "-" if r.get("x_default") is None else f"{r['x_default']:.2f}"
            nf = "-" if r.get("nfev") is None else str(r["nfev"])
            lines.append(
                f"  {r['framework']:9s} {r['name']:38s} {span:>24s} {xf:>8s} {xd:>9s} "
                f"{nf:>7s} {r['max_residual']:9.1e} {r['grad_rel_err']:9.1e} "
                f"{r['first_call_s']:10.2f}"
            )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> Path | None:
    """Bars of each row's time over the floor, one panel per (problem, tol)."""
    plt = pyplot()
    keys = list(dict.fromkeys((r["problem"], r["tol"]) for r in results))
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.2 + 0.28 * 11 * len(keys)),
                             squeeze=False)
    colors = {"torch": "tab:orange", "jax": "tab:blue"}
    for ax, key in zip(axes[:, 0], keys, strict=True):
        rows = [r for r in results if (r["problem"], r["tol"]) == key
                and r.get("x_floor") is not None and r["library"] != "unrolled"]
        labels = [f"{r['framework']}: {r['name']}" for r in rows]
        vals = [r["x_floor"] for r in rows]
        ax.barh(range(len(rows)), vals, color=[colors[r["framework"]] for r in rows])
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_xscale("log")
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.2f}x", va="center", fontsize=7)
        ax.set_title(f"{key[0]}, float32, tol {key[1]:g}: time / unrolled floor", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    pin_threads(argv, module="bench.training_step")
    if "torch" in args.frameworks:
        import torch

        torch.set_num_threads(1)
    out_dir = args.out or fresh_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for name in args.problems:
        pr = make_training_problem(name, quick=args.quick)
        ref = pr.reference_grads()
        size = "x".join(str(s) for s in pr.c.shape)
        for tol in args.tols:
            for fw in args.frameworks:
                K, rows = _rows(fw, pr, tol, args.max_iter)
                for row in rows:
                    r = measure(row, pr, ref, args.reps)
                    r.update(problem=name, size=size, tol=tol, K=K)
                    results.append(r)
                    print(f"  measured {name} tol={tol:g} {fw} {row.name}", file=sys.stderr)
    add_ratios(results)
    print(format_rows(results))
    from .machine import environment
    from .report import write_json

    write_json(out_dir / "training.json", {
        "command": " ".join([PROG, *argv]), "environment": environment(args.frameworks),
        "rows": results,
    })
    written = [out_dir / "training.json"]
    if not args.no_plots:
        p = plot(results, out_dir / "training.png")
        written += [p] if p else []
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
