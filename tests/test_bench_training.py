"""The training-step workload (``python -m bench.training_step``): a quick run per framework.

No timing is asserted. The run must finish, every row must be measured, and eqsolve's rows
must return a ``z*`` meeting the tolerance in float64 and a parameter gradient that agrees
with the dense float64 implicit-function-theorem reference (computed in bench, outside
eqsolve).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import AVAILABLE

ROOT = Path(__file__).resolve().parents[1]
PEERS = {"torch": ("torchdeq",), "jax": ("jaxopt", "optimistix")}


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_quick_training_step_run(framework, tmp_path):
    if framework not in AVAILABLE:
        pytest.skip(f"{framework} is not among this session's backends")
    for lib in PEERS[framework]:
        pytest.importorskip(lib)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.training_step", "--quick", "--problems",
         "tanh-128,conv", "--tols", "1e-6", "--reps", "1", "--frameworks", framework,
         "--out", str(tmp_path), "--no-plots"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "training.json").read_text())["rows"]
    libs = {r["library"] for r in rows}
    assert libs == {"eqsolve", "unrolled", *PEERS[framework]}
    for r in rows:
        assert "error" not in r, r
        assert r["x_floor"] is not None and np.isfinite(r["median_ms"])
        if r["library"] == "eqsolve":
            assert r["max_residual"] <= 2e-6, r  # tol 1e-6 in float32, checked in float64
            assert r["grad_rel_err"] <= 1e-4, r
        if r["library"] == "unrolled":
            assert r["x_floor"] == 1.0 and r["nfev"] == r["K"]
