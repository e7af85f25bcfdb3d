"""The worked example ``examples/digits_deq.py --quick`` runs for each installed framework.

Each run is a subprocess with one intra-op thread (as the example's CI size is meant to be
run). It must exit cleanly and print its final table with all four models, sensible
iteration counts, and a test accuracy above 80% for every model (the quick size reaches
about 93-96%; chance is 10%). Needs scikit-learn (its bundled digits data; no download).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import AVAILABLE

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "digits_deq.py"
THREADS = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}
# label, params, accuracy, s/epoch, fwd it train, fwd it test, bwd it, backward memory
ROW = re.compile(
    r"^(?P<label>\([abcd]\)) .+?\s+(?P<params>\d+)\s+(?P<acc>[\d.]+)%\s+(?P<sec>[\d.]+)\s+"
    r"(?P<fwd>\S+)\s+(?P<fwd_test>\S+)\s+(?P<bwd>\S+)\s+(?P<mem>[\d.]+) KiB$",
    re.M,
)


def _run_quick(example: pathlib.Path, backend: str) -> subprocess.CompletedProcess[str]:
    """``example --backend BACKEND --quick`` in a subprocess (one thread); it must exit 0."""
    proc = subprocess.run(
        [sys.executable, str(example), "--backend", backend, "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **THREADS},
        cwd=example.parent.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _table(stdout: str) -> dict[str, dict[str, str]]:
    assert "final table" in stdout, stdout
    table = stdout.split("final table", 1)[1]
    return {m["label"]: m.groupdict() for m in ROW.finditer(table)}


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_digits_deq_quick(backend: str) -> None:
    if backend not in AVAILABLE:
        pytest.skip(f"{backend} is not installed (or not selected by EQSOLVE_TEST_BACKENDS)")
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("scikit-learn is not installed (the example uses its bundled digits)")
    proc = _run_quick(EXAMPLE, backend)
    rows = _table(proc.stdout)
    assert sorted(rows) == ["(a)", "(b)", "(c)", "(d)"], proc.stdout
    for label, row in rows.items():
        assert float(row["acc"]) > 80.0, (label, proc.stdout)
        assert int(row["params"]) > 1000 and float(row["mem"]) > 0, (label, proc.stdout)
    for label in ("(b)", "(c)", "(d)"):  # every DEQ reports its forward iterations
        assert 1.0 <= float(rows[label]["fwd"]) <= 30.0, (label, proc.stdout)
    for label in ("(c)", "(d)"):  # and the implicit ones their backward (adjoint) iterations
        if backend == "jax":  # not reported by eqsolve.jax; the example skips its probe in CI
            assert rows[label]["bwd"] == "-", (label, proc.stdout)
        else:
            assert 1.0 <= float(rows[label]["bwd"]) <= 30.0, (label, proc.stdout)
    assert "epoch   1 | loss" in proc.stdout  # the per-epoch log


MULTISCALE = EXAMPLE.parent / "multiscale_deq.py"
# | model | params | test acc | s / epoch | fwd it (train / test) | converged | bwd it | memory |
MS_ROW = re.compile(
    r"^\| (?P<name>explicit|unrolled \(K=\d+\)|deq|deq\+correction) \| (?P<params>\d+) \| "
    r"(?P<acc>[\d.]+)% \| (?P<sec>[\d.]+) \| (?P<fwd>[^|]+) \| (?P<conv>[^|]+) \| "
    r"(?P<bwd>[^|]+) \| (?P<mem>[\d.]+) MiB \|$",
    re.M,
)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_multiscale_deq_quick(backend: str) -> None:
    """The multiscale convolutional DEQ (tuple state, fixed-point correction, Jacobian
    regularisation) trains at its quick size in both frameworks through the same model code:
    every model well above chance (10%; the quick DEQ reached about 60% in 3 epochs here),
    the DEQ's forward solves mostly converged, and the same parameter count everywhere."""
    if backend not in AVAILABLE:
        pytest.skip(f"{backend} is not installed (or not selected by EQSOLVE_TEST_BACKENDS)")
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("scikit-learn is not installed (the example uses its bundled digits)")
    proc = _run_quick(MULTISCALE, backend)
    rows = {m["name"].split(" ")[0]: m.groupdict() for m in MS_ROW.finditer(proc.stdout)}
    assert sorted(rows) == ["deq", "deq+correction", "explicit", "unrolled"], proc.stdout
    assert len({r["params"] for r in rows.values()}) == 1, proc.stdout
    for name, row in rows.items():
        assert float(row["acc"]) > 40.0, (name, proc.stdout)
        assert float(row["mem"]) > 0, (name, proc.stdout)
    for name in ("deq", "deq+correction"):
        fwd_train, fwd_test = (float(v) for v in rows[name]["fwd"].split("/"))
        assert 1.0 <= fwd_train <= 30.0 and 1.0 <= fwd_test <= 30.0, proc.stdout
    # the implicit DEQ's forward solves mostly converge (Jacobian regularisation)
    assert float(rows["deq"]["conv"].strip().rstrip("%")) >= 80.0, proc.stdout
    if backend == "torch":  # the torch adapter reports the adjoint iterations
        assert 1.0 <= float(rows["deq"]["bwd"]) <= 30.0, proc.stdout
