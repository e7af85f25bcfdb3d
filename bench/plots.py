"""PNG figures of a benchmark run (matplotlib, headless ``Agg`` backend).

* ``residual_<problem>.png``: batch-max relative residual at each evaluated point against the
  f-evaluation count, one panel per backend, one line per row (eqsolve solid, peers dash-dot);
  the curves are those recorded by the instrumented ``f``, the same for every solver.
  eqsolve's default solver is drawn last, in black, thick and dashed, so that it stays
  visible where another solver's curve is the same (``auto`` often runs Anderson's steps).
* ``ratios.png``: each eqsolve row's median time over the fastest converged peer row of its
  framework, one group of bars per problem and backend, one bar per eqsolve solver (the line
  at 1x is parity; left of it eqsolve is faster), each bar labelled with its ratio.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .runner import DEFAULT_SOLVER  # drawn on top in the residual plots, outlined in ratios


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _is_default(row: dict[str, Any]) -> bool:
    return bool(row["library"] == "eqsolve" and row["method"] == DEFAULT_SOLVER)


def residual_plots(rows: list[dict[str, Any]], out: Path, tol: float) -> list[Path]:
    """One PNG per problem (see the module docstring); returns the files written."""
    plt = pyplot()
    # 18 distinct, dark enough colours (tab10 then Dark2); the default solver is black
    colors = [*plt.get_cmap("tab10").colors, *plt.get_cmap("Dark2").colors]
    written = []
    for problem in dict.fromkeys(r["problem"] for r in rows):
        mine = [r for r in rows if r["problem"] == problem and r.get("history")]
        backends = list(dict.fromkeys(r["backend"] for r in mine))
        if not backends:
            continue
        fig, axes = plt.subplots(
            1, len(backends), figsize=(5.6 * len(backends), 4.6), squeeze=False, sharey=True
        )
        for ax, backend in zip(axes[0], backends, strict=True):
            here = [r for r in mine if r["backend"] == backend]
            # the default solver last: on top of a curve it shares
            here.sort(key=_is_default)
            for i, r in enumerate(here):
                hist = [h if h is not None and h > 0 else float("nan") for h in r["history"]]
                style: dict[str, Any]
                if _is_default(r):
                    style = dict(color="black", linewidth=2.6, linestyle=(0, (4, 3)), zorder=5)
                elif r["library"] == "eqsolve":
                    style = dict(color=colors[i % len(colors)], linewidth=1.8, linestyle="-")
                else:
                    style = dict(color=colors[i % len(colors)], linewidth=1.2, linestyle="-.")
                ax.semilogy(range(1, len(hist) + 1), hist, label=r["name"], **style)
            ax.axhline(tol, color="grey", linewidth=0.8, linestyle=":", label=f"tol {tol:g}")
            # the scale of the converging rows: a diverging peer would squash every curve
            ours = [len(r["history"]) for r in here if r["library"] == "eqsolve"]
            if ours:
                ax.set_xlim(0, 3 * max(ours))
            ax.set_ylim(tol / 100, 10.0)
            ax.set_title(f"{problem} on {backend}")
            ax.set_xlabel("f evaluations")
            ax.grid(True, which="major", alpha=0.3)
            handles, labels = ax.get_legend_handles_labels()
            order = sorted(range(len(labels)), key=lambda k: not labels[k].endswith("(default)"))
            ax.legend([handles[k] for k in order], [labels[k] for k in order], fontsize=7)
        axes[0][0].set_ylabel("max relative residual  ||f(z)-z|| / ||f(z)||")
        fig.tight_layout()
        path = out / f"residual_{problem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _ratio_ticks(lo: float, hi: float) -> list[float]:
    """Readable log-scale ticks covering ``[lo, hi]``: 1, 2, 5 times powers of ten."""
    ticks = []
    for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        ticks += [m * 10.0**e for m in (1, 2, 5)]
    inside = [t for t in ticks if lo <= t <= hi]
    return inside if len(inside) >= 2 else [t for t in ticks if lo / 10 <= t <= hi * 10]


def ratio_plot(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """``ratios.png`` (see the module docstring), or ``None`` with nothing to compare."""
    mine = [r for r in rows if r["library"] == "eqsolve" and r.get("vs_best_peer")]
    if not mine:
        return None
    plt = pyplot()
    from matplotlib.patches import Patch

    groups = list(dict.fromkeys((r["problem"], r["backend"]) for r in mine))
    solvers = list(dict.fromkeys(r["method"] for r in mine))
    colors = dict(zip(solvers, plt.get_cmap("tab10").colors, strict=False))
    step = 1.0 / (len(solvers) + 1)  # bar height; groups are one unit apart
    fig, ax = plt.subplots(figsize=(10, 1.2 + (0.45 + 0.16 * len(solvers)) * len(groups)))
    values = []
    for g, key in enumerate(groups):
        for s, solver in enumerate(solvers):
            r = next((r for r in mine if (r["problem"], r["backend"]) == key
                      and r["method"] == solver), None)
            if r is None:
                continue
            y = g + (s - (len(solvers) - 1) / 2) * step
            v = r["vs_best_peer"]
            values.append(v)
            ax.barh(
                y,
                v,
                height=step * 0.9,
                color=colors[solver],
                edgecolor="black" if solver == DEFAULT_SOLVER else "none",
                linewidth=1.2,
            )
            ax.annotate(
                f"{v:.2f}x",
                (v, y),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
            )
    lo, hi = min(values + [1.0]) / 1.5, max(values + [1.0]) * 1.8
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ticks = _ratio_ticks(lo, hi)
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.minorticks_off()
    ax.set_yticks(range(len(groups)), [f"{p} / {b}" for p, b in groups], fontsize=9)
    ax.set_ylim(len(groups) - 0.5, -0.5)  # first group on top
    ax.axvline(1.0, color="black", linewidth=1.0)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_xlabel(
        "eqsolve median time / fastest converged peer row of the same problem and backend "
        "(log scale)",
        fontsize=8,
    )
    ax.set_title("eqsolve vs the fastest peer: below 1x eqsolve is faster")
    handles = [
        Patch(
            facecolor=colors[s],
            edgecolor="black" if s == DEFAULT_SOLVER else "none",
            label=f"eqsolve {s}" + (" (default)" if s == DEFAULT_SOLVER else ""),
        )
        for s in solvers
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = out / "ratios.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
