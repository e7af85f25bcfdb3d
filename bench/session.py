"""One benchmark run: plan the rows, measure them with a progress bar, report.

The plan is built first (every problem on every backend: eqsolve's solvers, then the
installed peers), so the progress bar knows its length; problems a backend cannot build
and peers that are missing are listed once, up front, with the reason.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eqsolve.backends import BackendUnavailableError

from . import report
from .case import Case, Problem
from .machine import environment
from .native import BACKENDS
from .peers import PEERS, PeerSolver, missing_peers, peer_solvers
from .problems import make_problem
from .runner import DEFAULT_SOLVER, EqsolveSolve, measure_backward, measure_row
from .timing import f_call_time


@dataclass
class _Planned:
    problem: Problem
    case: Case
    library: str
    method: str
    variant: str
    make: Any
    settings: dict[str, Any]
    peer: PeerSolver | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.library == "eqsolve":
            return f"eqsolve.{self.method}" + (
                " (default)" if self.method == DEFAULT_SOLVER else ""
            )
        return f"{self.library}.{self.method} ({self.variant})"


def _progress(total: int, disable: bool) -> Any:
    try:
        from tqdm import tqdm  # progress bar on stderr; optional (the bench extra has it)
    except ImportError:
        tqdm = None
    if tqdm is None or disable:
        return None
    return tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=False)


def _wanted_peer(peer: PeerSolver, selection: str) -> bool:
    if selection == "all":
        return True
    if selection == "none":
        return False
    return peer.library in [s.strip() for s in selection.split(",")]


def plan(args: argparse.Namespace, backends: list[str]) -> tuple[list[_Planned], list[str]]:
    """Every row to measure, and the lines saying what is skipped and why."""
    planned: list[_Planned] = []
    skipped: list[str] = []
    noted_missing: set[str] = set()
    for pname in args.problems:
        problem = make_problem(pname, size=args.size)
        for backend in backends:
            framework = BACKENDS.get(backend)
            if framework is None:
                skipped.append(f"{backend}: unknown backend")
                continue
            if framework not in problem.frameworks:
                skipped.append(
                    f"{pname} on {backend}: the problem runs on "
                    f"{', '.join(problem.frameworks)} only"
                )
                continue
            try:
                case = problem.build(backend, args.dtype)
            except (BackendUnavailableError, ImportError) as exc:
                skipped.append(f"{pname} on {backend}: {exc}")
                continue
            for s in args.solvers:
                planned.append(
                    _Planned(
                        problem,
                        case,
                        "eqsolve",
                        s,
                        "default",
                        EqsolveSolve(case, s, args.tol, args.max_iter),
                        {"solver": s, "tol": args.tol, "max_iter": args.max_iter},
                    )
                )
            if args.peers == "none":
                continue
            if framework not in noted_missing:
                noted_missing.add(framework)
                skipped += [f"peer on {framework}: {m}" for m in missing_peers(framework)]
                if not PEERS.get(framework):
                    skipped.append(f"peers on {framework}: none exist to compare with")
            for peer in peer_solvers(case, tol=args.tol, max_iter=args.max_iter):
                if _wanted_peer(peer, args.peers):
                    planned.append(
                        _Planned(
                            problem,
                            case,
                            peer.library,
                            peer.method,
                            peer.variant,
                            peer.make,
                            peer.settings,
                            peer,
                            {"notes": peer.notes, "call": peer.call},
                        )
                    )
    return planned, skipped


def run(args: argparse.Namespace, argv: list[str]) -> int:
    backends = list(args.backends)
    if any(BACKENDS.get(b) == "torch" for b in backends):
        import torch

        torch.set_num_threads(1)
    started = datetime.datetime.now().astimezone()
    command = "python -m bench" + ("" if not argv else " " + shlex.join(argv))
    print(f"bench  {started:%Y-%m-%d %H:%M %Z}  {command}")
    print(
        f"problems: {', '.join(args.problems)}   backends: {', '.join(backends)}   "
        f"dtype: {args.dtype}   tol: {args.tol:g} (per sample, relative)   reps: {args.reps}"
    )
    print(
        "threads: every library pinned to one intra-op thread "
        "(OMP/MKL/OpenBLAS=1, torch.set_num_threads(1), XLA single-threaded); "
        "times are medians after one warm-up call; JAX solves are jitted whole and their "
        "compile time is reported apart"
    )
    print(f"results: {args.out}/ (results.json and the PNG plots, written at the end)")
    planned, skipped = plan(args, backends)
    for line in skipped:
        print(f"skipped: {line}")
    rows: list[dict[str, Any]] = []
    bar = _progress(len(planned), args.no_progress)
    f_calls: dict[int, Any] = {}
    t_start = time.perf_counter()
    for i, item in enumerate(planned):
        case = item.case
        label = f"{case.problem}/{case.backend}/{item.name}"
        if bar is not None:
            bar.set_description_str(label[:60])
        else:
            print(f"[{i + 1}/{len(planned)}] {label}", file=sys.stderr, flush=True)
        if id(case) not in f_calls:
            f_calls[id(case)] = f_call_time(case, case.z0)
        f_call = f_calls[id(case)]
        row: dict[str, Any] = dict(
            problem=case.problem,
            backend=case.backend,
            framework=case.framework,
            dtype=case.dtype,
            library=item.library,
            method=item.method,
            variant=item.variant,
            name=item.name,
            settings=item.settings,
            **item.extra,
            f_call_ms=1e3 * f_call.median,
        )
        row.update(
            measure_row(
                case,
                item.problem,
                item.make,
                tol=args.tol,
                reps=args.reps,
                f_call=f_call,
                row_budget_s=args.row_budget,
                max_iter=args.max_iter,
                caveat=item.peer.caveat if item.peer is not None else "",
            )
        )
        if item.library == "eqsolve" and "error" not in row:
            sol = item.make.last_solution  # the counting run's Solution: eqsolve's own figures
            row["iterations"] = int(np.max(np.asarray(case.to_numpy(sol.iterations))))
            row["nfev_reported"] = int(sol.nfev)
        if args.backward and "error" not in row:
            row.update(
                measure_backward(
                    case,
                    item.problem,
                    solver=item.method if item.library == "eqsolve" else None,
                    grad=item.peer.grad if item.peer is not None else None,
                    tol=args.tol,
                    max_iter=args.max_iter,
                    reps=args.reps,
                )
            )
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    report.add_ratios(rows)
    for pname in args.problems:
        mine = [r for r in rows if r["problem"] == pname]
        if not mine:
            continue
        meta = next(p.case.meta for p in planned if p.case.problem == pname)
        print(f"\n== {pname}  ({', '.join(f'{k}={v}' for k, v in meta.items())})")
        print(report.format_table(mine, backward=args.backward, reps=args.reps))
    targets = report.check_targets(rows, DEFAULT_SOLVER)
    if targets:
        print(
            "\n== targets (eqsolve's default solver is "
            f"{DEFAULT_SOLVER}; like-for-like rows compare each eqsolve solver)"
        )
        print(report.format_targets(targets))
    elapsed = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    files = []
    if not args.no_plots:
        try:
            from .plots import ratio_plot, residual_plots

            files += residual_plots(rows, args.out, args.tol)
            ratio = ratio_plot(rows, args.out)
            files += [ratio] if ratio is not None else []
        except ImportError as exc:
            print(f"plots skipped: {exc} (pip install matplotlib, or the bench extra)")
    settings = {k: (str(v) if k == "out" else v) for k, v in vars(args).items()}
    report.write_json(
        args.out / "results.json",
        {
            "date": started.isoformat(timespec="seconds"),
            "command": command,
            "settings": settings,
            "environment": environment(backends),
            "problems": {p.case.problem: p.case.meta for p in planned},
            "skipped": skipped,
            "rows": rows,
            "targets": targets,
            "elapsed_s": elapsed,
        },
    )
    written = ["results.json", *(p.name for p in files)]
    print(f"\nwrote {', '.join(written)} to {args.out}/  ({elapsed:.0f} s)")
    return 0
