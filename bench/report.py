"""Ratios, the performance targets of the benchmark issue, tables and the JSON file.

Ratios compare rows measured in the same run, on the same problem, backend and dtype:

* ``vs_best_peer``: a row's median time over the fastest converged peer row;
* ``like_for_like``: an eqsolve row's median over each converged peer row of the same method
  (plain/Picard, Anderson, Broyden), keyed by the peer row's name.

Targets (checked on eqsolve's default solver unless said otherwise; a target with nothing
to compare against is reported as "n/a", never as met):

* f-evals: at most the fewest of any converged peer row, plus one (Newton rows on JAX, whose
  Jacobian products are not counted as f-evaluations, are left out: see
  :func:`uncounted_derivatives`);
* on ``sym``: at most 0.3x eqsolve's plain iteration;
* like for like: at most 0.5x the peer's "defaults" row, 0.8x its "tuned" row (every eqsolve
  solver against the peer rows of its method);
* at most 1.0x the fastest converged peer row of any method;
* time outside ``f`` on ``tanh``: at most 25% on eager backends, 10% on jitted JAX.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

JSON_SCHEMA = "eqsolve-bench/1"

LIKE_METHODS = ("picard", "anderson", "broyden")


def _ok(row: dict[str, Any]) -> bool:
    return "error" not in row and bool(row.get("converged"))


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["problem"], r["backend"], r["dtype"]), []).append(r)
    return out


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Fill ``vs_best_peer`` and ``like_for_like`` in place (see the module docstring)."""
    for group in _groups(rows).values():
        peers = [r for r in group if r["library"] != "eqsolve" and _ok(r)]
        best = min(peers, key=lambda r: r["median_ms"], default=None)
        for r in group:
            if "error" in r:
                continue
            if best is not None:
                r["vs_best_peer"] = r["median_ms"] / best["median_ms"]
                r["best_peer"] = best["name"]
            if r["library"] == "eqsolve":
                r["like_for_like"] = {
                    p["name"]: r["median_ms"] / p["median_ms"]
                    for p in peers
                    if p["method"] == r["method"]
                }


def uncounted_derivatives(row: dict[str, Any]) -> bool:
    """Whether a row's f-evaluation count leaves out work on ``f``'s derivatives.

    Newton-type solvers on JAX (optimistix) apply ``J_f`` through autodiff (``jacfwd`` or
    ``linearize`` + JVPs): those products cost about as much as evaluations of ``f`` each,
    but they are not calls of ``f`` and the instrument does not count them. Their f-eval
    figure is shown but kept out of the f-evals target. (scipy's ``newton_krylov`` takes
    its Jacobian products by finite differences of ``f``, which are counted.)
    """
    return row.get("framework") == "jax" and str(row.get("method", "")).startswith("newton")


def check_targets(rows: list[dict[str, Any]], default_solver: str) -> list[dict[str, Any]]:
    """One entry per target and (problem, backend, dtype): the figure, the bound, met or not."""
    targets: list[dict[str, Any]] = []

    def add(
        key: tuple[str, str, str], name: str, value: float | None, bound: float, detail: str
    ) -> None:
        problem, backend, dtype = key
        targets.append(
            dict(
                problem=problem,
                backend=backend,
                dtype=dtype,
                target=name,
                value=value,
                bound=bound,
                met=None if value is None else bool(value <= bound),
                detail=detail,
            )
        )

    for key, group in _groups(rows).items():
        eq = {r["method"]: r for r in group if r["library"] == "eqsolve" and "error" not in r}
        peers = [r for r in group if r["library"] != "eqsolve" and _ok(r)]
        default = eq.get(default_solver)
        if default is None:
            continue
        counted = [r for r in peers if not uncounted_derivatives(r)]
        if counted:
            fewest = min(counted, key=lambda r: r["nfev"])
            add(
                key,
                "f-evals <= fewest peer + 1",
                default["nfev"] - fewest["nfev"],
                1,
                f"eqsolve {default_solver} {default['nfev']} vs {fewest['name']} "
                f"{fewest['nfev']} (value: difference)",
            )
        if peers:
            best = min(peers, key=lambda r: r["median_ms"])
            add(
                key,
                "time vs fastest peer <= 1.0x",
                default["median_ms"] / best["median_ms"],
                1.0,
                f"eqsolve {default_solver} {default['median_ms']:.2f} ms vs "
                f"{best['name']} {best['median_ms']:.2f} ms",
            )
        if key[0] == "sym" and "picard" in eq:
            add(
                key,
                "sym f-evals <= 0.3x plain",
                default["nfev"] / eq["picard"]["nfev"],
                0.3,
                f"{default['nfev']} vs plain {eq['picard']['nfev']}",
            )
        for method in LIKE_METHODS:
            mine = eq.get(method)
            if mine is None:
                continue
            for p in peers:
                if p["method"] != method:
                    continue
                bound = 0.5 if p["variant"] == "defaults" else 0.8
                add(
                    key,
                    f"like for like vs {p['variant']} <= {bound}x",
                    mine["median_ms"] / p["median_ms"],
                    bound,
                    f"eqsolve {method} {mine['median_ms']:.2f} ms vs {p['name']} "
                    f"{p['median_ms']:.2f} ms",
                )
        if key[0] == "tanh" and default.get("outside_f") is not None:
            jitted = default["framework"] == "jax"
            add(
                key,
                f"outside f <= {'10' if jitted else '25'}%",
                default["outside_f"],
                0.10 if jitted else 0.25,
                f"eqsolve {default_solver}: {100 * default['outside_f']:.0f}% of "
                f"{default['median_ms']:.2f} ms",
            )
    return targets


# ------------------------------------------------------------------------------- tables


def _fmt(x: Any, spec: str, width: int) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-".rjust(width)
    return format(x, spec).rjust(width)


def format_table(
    rows: Iterable[dict[str, Any]], backward: bool = False, reps: int | None = None
) -> str:
    """A fixed-width table of rows (one problem at a time reads best); rows timed on fewer
    than ``reps`` runs (the slow-row budget) say so at the end of the line. A failed row
    shows its whole error, and a row that did not converge its ``reason``, wrapped on the
    lines below it (never cut)."""
    head = (
        f"{'backend':10} {'solver':38} {'nfev':>5} {'iters':>5} {'conv':>7} {'max res':>9} "
        f"{'median ms':>10} {'(min-max)':>17} {'floor ms':>9} {'x floor':>7} "
        f"{'out f':>6} {'vs peer':>7} {'compile s':>9}"
    )
    if backward:
        head += f" {'grad err':>9} {'bwd ms':>8} {'bwd MB':>7}"
    lines = [head, "-" * len(head)]
    indent = 10 + 1 + 38 + 1  # the text of a failure starts after the backend and solver columns
    width = max(len(head) - indent, 40)

    def wrapped(text: str) -> list[str]:
        """``text`` wrapped to the table's width, every line indented past the name."""
        return [" " * indent + s for s in textwrap.wrap(text, width, break_on_hyphens=False)]

    for r in rows:
        name = r["name"][:38]
        if "error" in r:
            first, *rest = wrapped(f"failed: {r['error']}")
            lines.append(f"{r['backend']:10} {name:38} {first.lstrip()}")
            lines += rest
            continue
        conv = f"{r['samples_converged']}/{r['samples']}"
        line = (
            f"{r['backend']:10} {name:38} {r['nfev']:5d} {_fmt(r.get('iterations'), 'd', 5)} "
            f"{conv:>7} {_fmt(r['residual'], '.2e', 9)} {r['median_ms']:10.2f} "
            f"({r['min_ms']:7.2f}-{r['max_ms']:7.2f}) {r['floor_ms']:9.2f} "
            f"{_fmt(r['x_floor'], '.2f', 7)} {_fmt(_pct(r['outside_f']), '.0f', 5)}% "
            f"{_fmt(r.get('vs_best_peer'), '.2f', 7)} {_fmt(r.get('compile_s'), '.2f', 9)}"
        )
        if reps is not None and r.get("reps", reps) < reps:
            line += f"  ({r['reps']} timed runs)"
        if backward:
            mb = r.get("backward_bytes")
            line += (
                f" {_fmt(r.get('grad_rel_error'), '.1e', 9)} {_fmt(r.get('backward_ms'), '.2f', 8)}"
                f" {_fmt(None if mb is None else mb / 2**20, '.2f', 7)}"
            )
        lines.append(line)
        if r.get("reason"):
            lines += wrapped(f"not converged: {r['reason']}")
        if backward and r.get("backward_error"):
            lines += wrapped(f"backward failed: {r['backward_error']}")
    return "\n".join(lines)


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def format_targets(targets: list[dict[str, Any]]) -> str:
    lines = []
    for t in targets:
        mark = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        value = t["value"]
        shown = (
            f"{100 * value:.0f}%"
            if t["target"].startswith("outside f")
            else f"{value:.2f}"
            if isinstance(value, float)
            else str(value)
        )
        lines.append(
            f"  {mark:6} {t['problem']:9} {t['backend']:10} {t['target']:34} {shown:>8}  "
            f"({t['detail']})"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------- JSON


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tuples -> lists, numpy scalars -> Python numbers."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            x = x.item()
        except (TypeError, ValueError):
            return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write the results file (schema :data:`JSON_SCHEMA`, strict JSON: no NaN)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"schema": JSON_SCHEMA, **_clean(payload)}
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
