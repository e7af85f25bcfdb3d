"""The benchmark's own pieces: ratios and targets, the JSON schema, and a CLI smoke run.

No timing is asserted: the smoke run checks that the command finishes, counts f-evaluations
correctly and writes a file with the stable schema.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eqsolve.bench import report

# the keys every measured row carries (the JSON schema the README and plots rely on)
ROW_KEYS = {
    "problem", "backend", "framework", "dtype", "library", "method", "variant", "name",
    "settings", "f_call_ms", "nfev", "converged", "samples_converged", "samples", "residual",
    "median_ms", "min_ms", "max_ms", "reps", "first_call_s", "compile_s", "floor_ms",
    "x_floor", "outside_f", "history",
}
TOP_KEYS = {
    "schema", "date", "command", "settings", "environment", "problems", "skipped", "rows",
    "targets", "elapsed_s",
}


def _row(library, method, variant, ms, nfev=10, converged=True, problem="tanh",
         backend="torch", framework="torch", outside_f=0.1):
    name = f"{library}.{method} ({variant})"
    return dict(problem=problem, backend=backend, framework=framework, dtype="float64",
                library=library, method=method, variant=variant, name=name, median_ms=ms,
                nfev=nfev, converged=converged, outside_f=outside_f)


def test_ratios_use_the_fastest_converged_peer_of_the_same_group():
    rows = [
        _row("eqsolve", "anderson", "default", 10.0),
        _row("eqsolve", "picard", "default", 6.0),
        _row("peer", "anderson", "defaults", 40.0),
        _row("peer", "picard", "defaults", 2.0, converged=False),  # fast but wrong: ignored
        _row("peer", "picard", "tuned", 8.0),
        _row("eqsolve", "anderson", "default", 1.0, backend="jax", framework="jax"),
    ]
    report.add_ratios(rows)
    assert rows[0]["vs_best_peer"] == pytest.approx(10.0 / 8.0)
    assert rows[0]["best_peer"] == "peer.picard (tuned)"
    assert rows[0]["like_for_like"] == {"peer.anderson (defaults)": pytest.approx(0.25)}
    assert rows[1]["like_for_like"] == {"peer.picard (tuned)": pytest.approx(0.75)}
    assert "vs_best_peer" not in rows[5]  # no peer in the jax group


def test_targets_report_figures_and_bounds():
    rows = [
        _row("eqsolve", "anderson", "default", 10.0, nfev=12, problem="sym"),
        _row("eqsolve", "picard", "default", 30.0, nfev=50, problem="sym"),
        _row("peer", "anderson", "defaults", 25.0, nfev=11, problem="sym"),
        _row("peer", "anderson", "tuned", 11.0, nfev=11, problem="sym"),
    ]
    report.add_ratios(rows)
    targets = {t["target"]: t for t in report.check_targets(rows, "anderson")}
    assert targets["f-evals <= fewest peer + 1"]["value"] == 1
    assert targets["f-evals <= fewest peer + 1"]["met"] is True
    assert targets["sym f-evals <= 0.3x plain"]["value"] == pytest.approx(12 / 50)
    assert targets["like for like vs defaults <= 0.5x"]["value"] == pytest.approx(0.4)
    assert targets["like for like vs defaults <= 0.5x"]["met"] is True
    assert targets["like for like vs tuned <= 0.8x"]["value"] == pytest.approx(10 / 11)
    assert targets["like for like vs tuned <= 0.8x"]["met"] is False
    assert targets["time vs fastest peer <= 1.0x"]["met"] is True


def test_outside_f_target_depends_on_jit():
    rows = [_row("eqsolve", "anderson", "default", 1.0, outside_f=0.2),
            _row("eqsolve", "anderson", "default", 1.0, outside_f=0.2, backend="jax",
                 framework="jax")]
    met = {t["backend"]: t["met"] for t in report.check_targets(rows, "anderson")}
    assert met == {"torch": True, "jax": False}


def test_json_is_strict(tmp_path):
    path = tmp_path / "r.json"
    report.write_json(path, {"rows": [{"x": float("nan"), "y": (1, 2), "z": float("inf")}]})
    data = json.loads(path.read_text())
    assert data["schema"] == report.JSON_SCHEMA
    assert data["rows"] == [{"x": None, "y": [1, 2], "z": None}]


def test_cli_smoke_run(tmp_path):
    """The command on the tiny problems, numpy only: finishes, and the file is complete."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "eqsolve.bench", "--size", "tiny", "--problems", "tanh,sym",
         "--backends", "numpy", "--reps", "1", "--peers", "none", "--no-plots",
         "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "one intra-op thread" in proc.stdout
    assert "== tanh" in proc.stdout and "== sym" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    assert TOP_KEYS <= set(data)
    assert data["environment"]["threads"]["OMP_NUM_THREADS"] == "1"
    rows = data["rows"]
    assert {(r["problem"], r["method"]) for r in rows} == {
        (p, s) for p in ("tanh", "sym") for s in ("auto", "picard", "anderson", "broyden")
    }
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        # the instrumented count agrees with eqsolve's own, and the curve has one point each
        assert r["nfev"] == r["nfev_reported"] == len(r["history"])
        assert r["converged"] and r["residual"] <= 2e-8


def test_cli_rejects_bad_arguments():
    proc = subprocess.run(
        [sys.executable, "-m", "eqsolve.bench", "--problems", "nope"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "unknown problem 'nope'" in proc.stderr


@pytest.mark.skipif(
    not Path(__file__).resolve().parents[1].joinpath("README.md").exists(), reason="no README"
)
def test_readme_opens_with_the_benchmark_command():
    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    assert "python -m eqsolve.bench" in first_block


def test_fewest_fevals_leaves_out_autodiff_newton_rows():
    rows = [
        _row("eqsolve", "anderson", "default", 1.0, nfev=20, backend="jax", framework="jax"),
        _row("optimistix", "newton", "defaults", 9.0, nfev=5, backend="jax", framework="jax"),
        _row("jaxopt", "anderson", "defaults", 2.0, nfev=30, backend="jax", framework="jax"),
    ]
    target = next(t for t in report.check_targets(rows, "anderson")
                  if t["target"].startswith("f-evals"))
    assert target["value"] == 20 - 30 and "jaxopt" in target["detail"]
