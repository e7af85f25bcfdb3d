"""Gradient accuracy, backward time and memory held for backward of ``eqsolve.torch``.

Usage::

    OMP_NUM_THREADS=1 python -m bench.torch_gradients [--json out.json] [--repeats 5]

from the clone's root (``python bench/torch_gradients.py`` works too).

Problems (:mod:`bench.problems`), float64, ``f(z) = tanh(z W^T + x U^T + b)``, d=256, p=64,
B=64, from ``numpy.random.default_rng(0)`` drawn in the order W (or Q), U, b, x:

* P1 ``tanh``: W Gaussian scaled to spectral norm 0.9; U = N/sqrt(p); b = 0.1 N; x = N.
* P4 ``sym``: W = Q diag(linspace(0, 0.99, d)) Q^T (Q from QR of a Gaussian); the input
  injection (U and b) scaled by 0.1.

Forward: Anderson to tol 1e-8 (max_iter 500). Loss ``sum(c * z*)`` with Gaussian ``c``.
Reference: the fixed point refined by Newton's method to machine precision, then the dense
``u_b = (I - J_b^T)^{-1} c_b`` per sample and the closed-form parameter/input gradients.
Relative error = ``||g - g_ref|| / ||g_ref||``, the largest over W, U, b, x. Every adjoint
method gets ``eqsolve.Implicit(method, max_iter=5000)`` so each is compared at its converged
accuracy (the default is the forward's max_iter, 500 here: plain Neumann iteration on P4
needs ~2000). Backward time: median (min-max)
of ``--repeats`` runs of ``loss.backward()`` alone, each after a fresh forward.

Memory: bytes of the tensors autograd saves for backward (``saved_tensors_hooks``) during the
call, with the forward solve capped at 10 and at 80 Picard iterations (``tol=1e-300``,
``on_failure="ignore"``), against backprop through a plain unrolled loop of 10 / 80 steps.
All torch work runs on one thread (this VM stalls with more).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import eqsolve
import eqsolve.torch as et

if __package__ in (None, ""):  # run as a file: import the package bench from the clone's root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench import problems as bench_problems  # noqa: E402

D, P, B = 256, 64, 64


def make_problem(kind: str, seed: int = 0) -> dict[str, np.ndarray]:
    """P1 (``tanh``) or P4 (``sym``) parameters from bench.problems, as a dict."""
    pr = bench_problems.make_problem(kind, seed=seed)  # default size: d=256, p=64, B=64
    assert isinstance(pr, bench_problems.TanhProblem)
    return {"W": pr.W, "U": pr.U, "b": pr.b, "x": pr.x}


def reference(pr: dict[str, np.ndarray], z: np.ndarray, c: np.ndarray) -> dict[str, np.ndarray]:
    W, U, b, x = pr["W"], pr["U"], pr["b"], pr["x"]
    inj = x @ U.T + b
    eye = np.eye(D)
    for _ in range(30):
        fz = np.tanh(z @ W.T + inj)
        J = (1.0 - fz**2)[:, :, None] * W[None]
        z = z - np.linalg.solve(eye - J, (z - fz)[..., None])[..., 0]
    fz = np.tanh(z @ W.T + inj)
    assert np.max(np.abs(fz - z)) < 1e-13
    J = (1.0 - fz**2)[:, :, None] * W[None]
    u = np.linalg.solve(eye - np.transpose(J, (0, 2, 1)), c[..., None])[..., 0]
    s = u * (1.0 - fz**2)
    return {"W": s.T @ fz, "U": s.T @ x, "b": s.sum(0), "x": s @ U}


class Problem:
    def __init__(self, kind: str):
        self.kind = kind
        self.np = make_problem(kind)
        t = {k: torch.tensor(v, requires_grad=True) for k, v in self.np.items()}
        self.t = t
        self.c = torch.tensor(np.random.default_rng(1).standard_normal((B, D)))
        self.z0 = torch.zeros(B, D, dtype=torch.float64)

    def f(self, z: torch.Tensor) -> torch.Tensor:
        t = self.t
        return torch.tanh(z @ t["W"].T + t["x"] @ t["U"].T + t["b"])

    def zero_grad(self) -> None:
        for v in self.t.values():
            v.grad = None


def measure_method(pr: Problem, method: str, repeats: int) -> dict[str, Any]:
    backward: Any = method
    if method in et.ADJOINT_METHODS:
        backward = eqsolve.Implicit(method, max_iter=5000)
    kwargs: dict[str, Any] = {"tol": 1e-8, "max_iter": 500, "backward": backward}
    infos: list[Any] = []
    times = []
    errs: dict[str, float] = {}
    for r in range(repeats + 1):  # the first run warms up
        pr.zero_grad()
        sol = et.fixed_point(pr.f, pr.z0, on_backward=infos.append, **kwargs)
        loss = (sol.value * pr.c).sum()
        t0 = time.perf_counter()
        loss.backward()
        dt = time.perf_counter() - t0
        if r > 0:
            times.append(dt)
        if r == 0:
            ref = reference(pr.np, sol.value.detach().numpy().copy(), pr.c.numpy())
            for k, g in ref.items():
                grad = pr.t[k].grad
                assert grad is not None
                got = grad.numpy()
                errs[k] = float(np.linalg.norm(got - g) / np.linalg.norm(g))
            fwd_iters = int(sol.iterations.max())
    out: dict[str, Any] = {
        "problem": pr.kind, "method": method, "rel_err_max": max(errs.values()),
        "rel_err": errs, "backward_s_median": statistics.median(times),
        "backward_s_min": min(times), "backward_s_max": max(times),
        "forward_iterations": fwd_iters,
    }
    if infos:
        out["adjoint_iterations_max"] = int(infos[0].iterations.max())
        out["adjoint_converged"] = bool(infos[0].converged.all())
    return out


def saved_bytes(fn: Any) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def measure_memory(pr: Problem) -> list[dict[str, Any]]:
    rows = []
    for label, backward in (("implicit (anderson)", "anderson"), ("phantom k=5", "phantom"),
                            ("jfb", "jfb")):
        row: dict[str, Any] = {"problem": pr.kind, "mode": label}
        for n in (10, 80):
            def run(n: int = n, backward: str = backward) -> None:
                sol = et.fixed_point(pr.f, pr.z0, solver="picard", tol=1e-300, max_iter=n,
                                     on_failure="ignore", backward=backward)
                assert int(sol.iterations.min()) == n
            row[f"bytes_{n}"] = saved_bytes(run)
        rows.append(row)
    row = {"problem": pr.kind, "mode": "unrolled backprop"}
    for n in (10, 80):
        def unrolled(n: int = n) -> None:
            z = pr.z0
            for _ in range(n):
                z = pr.f(z)
        row[f"bytes_{n}"] = saved_bytes(unrolled)
    rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write every figure to this JSON file")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    methods = ["neumann", "anderson", "broyden"]
    if importlib.util.find_spec("eqsolve.core.gmres") is not None:
        methods.append("gmres")
    else:
        print("gmres: eqsolve.core.gmres not present, row skipped")
    methods += ["phantom", "jfb"]
    env = {"eqsolve": eqsolve.__version__, "torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
           "device": "cpu", "dtype": "float64"}
    print("environment:", env)
    results: list[dict[str, Any]] = []
    memory: list[dict[str, Any]] = []
    for kind in ("tanh", "sym"):
        pr = Problem(kind)
        for m in methods:
            results.append(measure_method(pr, m, args.repeats))
        memory += measure_memory(pr)

    print(f"\nimplicit gradient vs dense float64 reference (d={D}, p={P}, B={B}, forward tol 1e-8)")
    print(f"{'problem':8} {'backward':9} {'rel.err(max)':>13} {'adj.iters':>9} "
          f"{'backward ms median (min-max)':>30}")
    for r in results:
        its = r.get("adjoint_iterations_max", "-")
        t = f"{1e3 * r['backward_s_median']:.2f} ({1e3 * r['backward_s_min']:.2f}-" \
            f"{1e3 * r['backward_s_max']:.2f})"
        print(f"{r['problem']:8} {r['method']:9} {r['rel_err_max']:13.2e} {its!s:>9} {t:>30}")
    print("\nbytes saved for backward (saved_tensors_hooks), forward capped at 10 / 80 iterations")
    print(f"{'problem':8} {'mode':22} {'10 iters':>12} {'80 iters':>12}")
    for r in memory:
        print(f"{r['problem']:8} {r['mode']:22} {r['bytes_10']:12d} {r['bytes_80']:12d}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "gradients": results, "memory": memory}, fh, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
