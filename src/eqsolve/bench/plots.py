"""PNG figures of a benchmark run (matplotlib, headless ``Agg`` backend).

* ``residual_<problem>.png``: batch-max relative residual at each evaluated point against the
  f-evaluation count, one panel per backend, one line per row (eqsolve solid, peers dashed);
  the curves are those recorded by the instrumented ``f``, the same for every solver.
* ``ratios.png``: each eqsolve row's median time over the fastest converged peer row of its
  framework, per problem and backend (the line at 1 is parity).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def residual_plots(rows: list[dict[str, Any]], out: Path, tol: float) -> list[Path]:
    """One PNG per problem (see the module docstring); returns the files written."""
    plt = _pyplot()
    written = []
    for problem in dict.fromkeys(r["problem"] for r in rows):
        mine = [r for r in rows if r["problem"] == problem and r.get("history")]
        backends = list(dict.fromkeys(r["backend"] for r in mine))
        if not backends:
            continue
        fig, axes = plt.subplots(
            1, len(backends), figsize=(5.2 * len(backends), 4.2), squeeze=False, sharey=True
        )
        for ax, backend in zip(axes[0], backends, strict=True):
            for r in (r for r in mine if r["backend"] == backend):
                hist = [h if h is not None and h > 0 else float("nan") for h in r["history"]]
                ax.semilogy(
                    range(1, len(hist) + 1),
                    hist,
                    label=r["name"],
                    linestyle="-" if r["library"] == "eqsolve" else "--",
                    linewidth=2.0 if r["library"] == "eqsolve" else 1.2,
                )
            ax.axhline(tol, color="grey", linewidth=0.8, linestyle=":")
            # the scale of the converging rows: a diverging peer would squash every curve
            ours = [len(r["history"]) for r in mine if r["library"] == "eqsolve"]
            if ours:
                ax.set_xlim(0, 3 * max(ours))
            ax.set_ylim(tol / 100, 10.0)
            ax.set_title(f"{problem} on {backend}")
            ax.set_xlabel("f evaluations")
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("max relative residual  ||f(z)-z|| / ||f(z)||")
        fig.tight_layout()
        path = out / f"residual_{problem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def ratio_plot(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """``ratios.png`` (see the module docstring), or ``None`` with nothing to compare."""
    mine = [r for r in rows if r["library"] == "eqsolve" and r.get("vs_best_peer")]
    if not mine:
        return None
    plt = _pyplot()
    labels = [f"{r['problem']} / {r['backend']} / {r['method']}" for r in mine]
    values = [r["vs_best_peer"] for r in mine]
    fig, ax = plt.subplots(figsize=(7.5, 0.28 * len(mine) + 1.2))
    colors = ["tab:green" if v <= 1.0 else "tab:red" for v in values]
    ax.barh(range(len(mine)), values, color=colors)
    ax.set_yticks(range(len(mine)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("eqsolve median time / fastest converged peer row (same framework, same run)")
    fig.tight_layout()
    path = out / "ratios.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
