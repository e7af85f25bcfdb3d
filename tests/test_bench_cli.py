"""The benchmark's own pieces: ratios and targets, the JSON schema, the table's failure
reasons, the command line (errors, output folders), the package's layout, and a CLI smoke run.

No timing is asserted: the smoke run checks that the command finishes, counts f-evaluations
correctly and writes a file with the stable schema.
"""

from __future__ import annotations

import ast
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import cli, report, runner

ROOT = Path(__file__).resolve().parents[1]

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


def _bench(*args, cwd=ROOT, timeout=120):
    """``python -m <args>`` from ``cwd`` with the clone's root on the path (as from a clone)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore::RuntimeWarning"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def test_cli_smoke_run(tmp_path):
    """The command on the tiny problems, numpy only: finishes, and the file is complete.

    Run without --out from a scratch folder: it writes to a new bench-results/<time>/ there.
    """
    proc = _bench("bench", "--size", "tiny", "--problems", "tanh,sym", "--backends", "numpy",
                  "--reps", "1", "--peers", "none", "--no-plots", "--no-progress",
                  cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "one intra-op thread" in proc.stdout
    assert "== tanh" in proc.stdout and "== sym" in proc.stdout
    (out,) = (tmp_path / "bench-results").iterdir()
    assert f"to {Path('bench-results') / out.name}/" in proc.stdout  # it says where it wrote
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
        assert "reason" not in r


def test_bad_backend_is_a_one_line_error():
    proc = _bench("bench", "--backends", "numpy,tensorflow")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "python -m bench: error: unknown backend 'tensorflow'; choose from numpy, torch, "
        "torch-cuda, jax, cupy (see python -m bench --help)"
    )
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--problems", "nope"], "unknown problem 'nope'; choose from tanh, tanh-wide, sym, "
                                 "digits, conv"),
        (["--solvers", "anderson,newton"], "unknown solver 'newton'; choose from auto, picard, "
                                           "anderson, broyden"),
        (["--peers", "scipy,jaxop"], "unknown peer library 'jaxop'; choose from torchdeq, "
                                     "jaxopt, optimistix, scipy"),
        (["--backends", ","], "no backend given; choose from numpy"),
        (["--dtype", "float16"], "invalid choice: 'float16'"),
        (["--reps", "0"], "must be positive"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_an_earlier_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {out} already holds an earlier run's results.json" in err
    assert "--overwrite" in err
    assert cli.parse_args(["--out", str(out), "--overwrite"]).out == out
    assert cli.parse_args(["--out", str(tmp_path / "new")]).out == tmp_path / "new"
    # without --out every run gets a folder of its own, even within the same second
    now = datetime.datetime(2026, 12, 1, 10, 44, 3)
    first = cli.fresh_out_dir(tmp_path / "bench-results", now)
    second = cli.fresh_out_dir(tmp_path / "bench-results", now)
    assert first.name == "2026-12-01_10-44-03" and second.name == "2026-12-01_10-44-03-2"
    assert first.is_dir() and second.is_dir()


# ------------------------------------------------------------------ failures explain themselves


def test_a_failed_row_shows_its_whole_error_and_reason():
    error = ("MemoryError: not run: the dense 16384x16384 Jacobian of the whole flattened "
             "batch would take 2.00 GiB, over this benchmark's 256 MiB limit; the newton-krylov "
             "row is the matrix-free alternative")
    ok = dict(_row("eqsolve", "auto", "default", 1.0), iterations=9, samples_converged=4,
              samples=4, residual=1e-9, min_ms=1.0, max_ms=1.0, floor_ms=0.5, x_floor=2.0,
              outside_f=0.5)
    diverged = dict(ok, name="jaxopt.broyden (tuned)", samples_converged=0,
                    residual=float("nan"), reason="diverged: the iterate became NaN/inf at "
                    "f-evaluation 149 of 150 (best 5.0e-05 at f-evaluation 34). Known cause: "
                    "history_size=20 is a ring buffer that overwrites the oldest secant pair")
    failed = dict(_row("optimistix", "newton", "defaults", 1.0), error=error)
    table = report.format_table([ok, failed, diverged])
    lines = table.splitlines()
    width = len(lines[0])
    assert all(len(line) <= width for line in lines)
    flat = " ".join(" ".join(lines).split())
    assert "failed: " + error in flat  # whole, not cut
    assert "not converged: " + diverged["reason"] in flat
    assert "not converged" not in " ".join(lines[:3])  # a converged row has no reason


def _case(f, z0):
    from bench.case import Case

    return Case("toy", "numpy", "numpy", "float64", f, z0, None, None)  # type: ignore[arg-type]


class _Toy:
    """f(z) = 0.5 z + 1 (fixed point 2), checked in float64 like a benchmark problem."""

    @staticmethod
    def f(z):
        return 0.5 * z + 1.0

    def residual(self, z):
        fz = self.f(z)
        return np.linalg.norm(fz - z, axis=1) / np.linalg.norm(fz, axis=1)


def _measure(make, **kw):
    from bench.timing import Timing

    toy = _Toy()
    case = _case(toy.f, np.zeros((3, 4)))
    return runner.measure_row(case, toy, make, tol=1e-8, reps=1,
                              f_call=Timing(1e-6, 1e-6, 1e-6, 1), **kw)


def test_a_diverging_row_says_why():
    def make(f):
        def solve():
            z = np.zeros((3, 4))
            for _ in range(3):
                z = f(z)
            z = f(z * np.inf)  # the iterate overflows
            return z

        return solve

    row = _measure(make, max_iter=100, caveat="Known cause: a toy.")
    assert not row["converged"] and row["samples_converged"] == 0
    assert row["reason"] == (
        "diverged: the iterate became NaN/inf at f-evaluation 4 of 4 (best 1.4e-01 at "
        "f-evaluation 3); 3/3 samples of the answer are not finite. Known cause: a toy."
    )


def test_a_row_stopped_short_or_at_the_cap_says_so():
    def make_steps(n):
        def make(f):
            def solve():
                z = np.zeros((3, 4))
                for _ in range(n):
                    z = f(z)
                return z

            return solve

        return make

    short = _measure(make_steps(5), max_iter=100)
    assert short["reason"].startswith(
        "stopped after 5 f-evaluations short of the tolerance: worst residual 1.6e-02 > 2x tol "
        "on 3/3 samples (best"
    )
    capped = _measure(make_steps(10), max_iter=10)
    assert capped["reason"].startswith("hit the iteration budget (10 f-evaluations >= "
                                       "max_iter=10) with worst residual")
    done = _measure(make_steps(60), max_iter=100)
    assert done["converged"] and "reason" not in done


def test_an_exception_is_kept_whole():
    long = "x" * 400 + " end of the sentence"

    def make(f):
        raise MemoryError(long + "\nsecond line")

    row = _measure(make)
    assert row["error"] == f"MemoryError: {long}"


# ------------------------------------------------------------------------ layout and shim


def _bench_modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "bench").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def test_bench_has_no_import_circle_and_no_long_file():
    modules = _bench_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        assert len(path.read_text().splitlines()) <= 600, path
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                cands = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            deps |= {c for c in cands if c in modules and c != name}
        graph[name] = deps
    # a module may import its own package's __init__ only if that does not import it back
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in graph[n]:
            if state.get(m) == 1:
                raise AssertionError(f"import circle: {' -> '.join(stack + [n, m])}")
            if m not in state:
                visit(m, stack + [n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])
    assert "bench.session" in graph and "bench.cli" not in graph["bench.session"]


def test_the_installed_package_holds_only_the_shim():
    shim = ROOT / "src" / "eqsolve" / "bench"
    assert sorted(p.name for p in shim.iterdir() if p.name != "__pycache__") == [
        "__init__.py", "__main__.py"]
    assert not (ROOT / "src" / "eqsolve" / "bench" / "data").exists()


def test_old_command_forwards_with_a_deprecation_warning():
    proc = _bench("eqsolve.bench", "--backends", "nope")
    assert proc.returncode == 2
    assert "DeprecationWarning: python -m eqsolve.bench is deprecated" in proc.stderr
    assert "run python -m bench" in proc.stderr
    assert "unknown backend 'nope'" in proc.stderr


def test_old_command_outside_a_clone_says_where_the_benchmark_went(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "eqsolve.bench"], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("eqsolve.bench: the benchmark moved out of the eqsolve package "
                                  "to the repository's bench/ folder")
    assert "python -m bench" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not ROOT.joinpath("README.md").exists(), reason="no README")
def test_readme_opens_with_the_benchmark_command():
    text = ROOT.joinpath("README.md").read_text()
    first_block = text.split("```bash", 1)[1].split("```", 1)[0].strip()
    command = 'pip install -c constraints.txt -e ".[torch,jax,bench]" && python -m bench'
    assert first_block == command


def test_fewest_fevals_leaves_out_autodiff_newton_rows():
    rows = [
        _row("eqsolve", "anderson", "default", 1.0, nfev=20, backend="jax", framework="jax"),
        _row("optimistix", "newton", "defaults", 9.0, nfev=5, backend="jax", framework="jax"),
        _row("jaxopt", "anderson", "defaults", 2.0, nfev=30, backend="jax", framework="jax"),
    ]
    target = next(t for t in report.check_targets(rows, "anderson")
                  if t["target"].startswith("f-evals"))
    assert target["value"] == 20 - 30 and "jaxopt" in target["detail"]
