"""Implicit gradients of ``eqsolve.jax.fixed_point``: accuracy and jitted backward time.

For the DEQ cell ``f(z, params, x) = tanh(z W^T + x U^T + b)`` on the benchmark problems
(:mod:`bench.problems`) -- P1 (``tanh``: d=256, p=64, B=64, ||W||_2 = 0.9) and P4 (``sym``:
W = Q diag(linspace(0, 0.99, d)) Q^T, input injection scaled by 0.1) -- in float64 with
forward tol 1e-8, and loss ``sum(c * z*)`` (``c`` Gaussian), this prints per backward method:

* the relative error of ``d loss / d(W, U, b)`` against a dense float64 reference: ``z*`` by
  plain NumPy iteration to 1e-14, ``u_b = (I - J_b^T)^{-1} c_b`` by ``numpy.linalg.solve``
  per sample, ``s = u * (1 - z*^2)``, ``dW = s^T z*``, ``dU = s^T x``, ``db = sum s``;
* the wall time of the jitted backward alone (``jax.jit`` of the VJP function returned by
  ``jax.vjp``: the adjoint solve plus the final parameter VJP), and of the jitted
  forward + backward (``jax.jit(jax.grad(loss))``): median (min-max) of 5 runs after one
  warm-up, ``block_until_ready``; compile times reported separately.

"phantom" (5 steps, damping 0.5) and "jfb" are biased by definition: their error is the
bias, not a bug. One thread everywhere (XLA flags and OMP_NUM_THREADS are set before JAX is
imported): this VM stalls with more.

Usage, from the clone's root: python -m bench.jax_gradients [--problems P1,P4] [--methods ...]
[--json out.json] (``python bench/jax_gradients.py`` works too).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
).strip()
os.environ.setdefault("OMP_NUM_THREADS", "1")

if __package__ in (None, ""):  # run as a file: import the package bench from the clone's root
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import problems as bench_problems  # noqa: E402

jax.config.update("jax_enable_x64", True)

from eqsolve.jax import fixed_point  # noqa: E402

METHODS = ["neumann", "anderson", "broyden", "gmres", "phantom", "jfb"]
FORWARD_TOL = 1e-8
MAX_ITER = 1000


def make_problem(name: str, d: int = 256, p: int = 64, batch: int = 64, seed: int = 0):
    """P1 / P4 parameters from bench.problems, and a random cotangent ``c``."""
    if (d, p, batch) != (256, 64, 64):
        raise ValueError("bench.problems builds d=256, p=64, B=64 (or size='tiny')")
    pr = bench_problems.make_problem({"P1": "tanh", "P4": "sym"}[name], seed=seed)
    assert isinstance(pr, bench_problems.TanhProblem)
    params = {"W": pr.W, "U": pr.U, "b": pr.b}
    c = np.random.default_rng(seed + 1).standard_normal((batch, d))
    return params, pr.x, c


def cell(z: Any, params: Any, x: Any) -> Any:
    return jnp.tanh(z @ params["W"].T + x @ params["U"].T + params["b"])


def reference_gradient(params: dict, x: np.ndarray, c: np.ndarray) -> dict:
    """Dense float64 implicit gradient at a fixed point solved independently of eqsolve."""
    W, U, b = params["W"], params["U"], params["b"]
    inj = x @ U.T + b
    z = np.zeros_like(c)
    for _ in range(100_000):
        z_new = np.tanh(z @ W.T + inj)
        if np.max(np.abs(z_new - z)) <= 1e-14:
            z = z_new
            break
        z = z_new
    else:
        raise RuntimeError("reference fixed point did not converge")
    fz = np.tanh(z @ W.T + inj)
    J = (1.0 - fz**2)[:, :, None] * W[None]
    A = np.eye(W.shape[0])[None] - np.transpose(J, (0, 2, 1))
    u = np.linalg.solve(A, c[..., None])[..., 0]
    s = u * (1.0 - fz**2)
    return {"W": s.T @ fz, "U": s.T @ x, "b": s.sum(0)}


def rel_err(grads: dict, ref: dict) -> float:
    num = sum(float(np.sum((np.asarray(grads[k]) - ref[k]) ** 2)) for k in ref)
    den = sum(float(np.sum(ref[k] ** 2)) for k in ref)
    return float(np.sqrt(num / den))


def timed(fn: Any, *args: Any, repeats: int = 5) -> tuple[float, float, float, float, Any]:
    """Compile time, then median/min/max wall time of ``repeats`` runs after a warm-up."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times), min(times), max(times), out


def run(problem: str, methods: list[str]) -> list[dict]:
    params_np, x_np, c_np = make_problem(problem)
    ref = reference_gradient(params_np, x_np, c_np)
    params = {k: jnp.asarray(v) for k, v in params_np.items()}
    x, c = jnp.asarray(x_np), jnp.asarray(c_np)
    rows = []
    for method in methods:
        if method == "gmres" and importlib.util.find_spec("eqsolve.core.gmres") is None:
            print(f"  {problem} {method:9s} skipped: eqsolve.core.gmres is not available")
            continue

        def solve(params: Any, method: str = method) -> Any:
            return fixed_point(cell, jnp.zeros_like(c), params, x, tol=FORWARD_TOL,
                               max_iter=MAX_ITER, backward=method)

        def loss(params: Any, solve: Any = solve) -> Any:
            return jnp.sum(c * solve(params).value)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # backward only: VJP function (a pytree of residuals) from one eager forward
            sol, vjp_fn = jax.vjp(solve, params)
            ct = jax.tree_util.tree_map(
                lambda a: jnp.zeros(a.shape, jax.dtypes.float0)
                if not jnp.issubdtype(a.dtype, jnp.inexact) else jnp.zeros_like(a),
                sol,
            )
            ct = ct._replace(value=c)
            bw = timed(lambda f, g: f(g)[0], vjp_fn, ct)
            fb = timed(jax.grad(loss), params)
            jax.effects_barrier()
        warned = [str(w.message) for w in caught]
        grads = fb[4]
        row = {
            "problem": problem, "method": method,
            "forward_converged": bool(jnp.all(sol.converged)),
            "forward_iterations_max": int(jnp.max(sol.iterations)),
            "rel_error": rel_err(grads, ref),
            "rel_error_backward_only": rel_err(bw[4], ref),
            "backward_compile_s": bw[0], "backward_median_s": bw[1],
            "backward_min_s": bw[2], "backward_max_s": bw[3],
            "grad_compile_s": fb[0], "grad_median_s": fb[1],
            "grad_min_s": fb[2], "grad_max_s": fb[3],
            "warnings": warned,
        }
        rows.append(row)
        flag = "  (adjoint not converged: warned)" if warned else ""
        print(
            f"  {problem} {method:9s} rel.err {row['rel_error']:.2e}   backward "
            f"{1e3 * bw[1]:8.2f} ms ({1e3 * bw[2]:.2f}-{1e3 * bw[3]:.2f}), compile "
            f"{bw[0]:5.2f} s   fwd+bwd {1e3 * fb[1]:8.2f} ms, compile {fb[0]:5.2f} s{flag}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="P1,P4")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    opts = parser.parse_args()
    print(
        f"eqsolve.jax implicit gradients: float64, forward tol {FORWARD_TOL:g}, backward tol "
        f"default (= forward tol), d=256 p=64 B=64; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, one thread (XLA_FLAGS={os.environ['XLA_FLAGS']!r}); "
        "times: median (min-max) of 5 after warm-up"
    )
    rows = []
    for problem in opts.problems.split(","):
        rows += run(problem.strip(), [m.strip() for m in opts.methods.split(",")])
    if opts.json:
        env = {"jax": jax.__version__, "numpy": np.__version__, "python": platform.python_version(),
               "machine": platform.machine(), "xla_flags": os.environ["XLA_FLAGS"],
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
        with open(opts.json, "w") as fh:
            json.dump({"environment": env, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
