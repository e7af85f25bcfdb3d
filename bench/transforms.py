"""``python -m bench.transforms``: every transformation through the fixed point vs a reference.

For the cell ``f(z, W, x) = tanh(z W^T + x)`` (float64, B=3 samples of d=5, ``||W||_2 = 0.5``)
each framework's transformations of ``z*(W, x)`` through eqsolve (``tol=1e-13``, implicit
Anderson adjoint) are compared with the same transformation of an *unrolled* solve: 300
plain steps from ``z = 0`` (error ``0.5^300``, below roundoff), differentiated by the
framework itself, at every order. First-order rows are also checked against the dense
implicit-function-theorem Jacobian ``(I - J_f)^{-1} df/dx`` (NumPy, float64). Prints one
table, transformation x framework, with the relative error ``||eqsolve - reference|| /
||reference||`` (or the error the framework raises). ``--compile`` adds a DEQ training step
under ``torch.compile``: graph breaks, first-call (compile) time, step time against eager.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")

B, D, STEPS, TOL = 3, 5, 300, 1e-13


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((D, D))
    W *= 0.5 / np.linalg.norm(W, 2)
    return W, rng.standard_normal((B, D)), rng.standard_normal((B, D))


def _rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    den = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (den if den > 0 else 1.0))


def _compare(
    cases: dict[str, Callable[[Callable[..., Any]], Any]],
    eq: Callable[..., Any],
    ref: Callable[..., Any],
    to_numpy: Callable[[Any], Any],
) -> dict[str, float | str]:
    """Each case's transformation of eqsolve's solve against that of the unrolled one: the
    relative error, or the error the framework raised."""
    rows: dict[str, float | str] = {}
    for name, run in cases.items():
        try:
            rows[name] = _rel(to_numpy(run(eq)), to_numpy(run(ref)))
        except Exception as exc:  # noqa: BLE001 - an unsupported transformation is a row
            rows[name] = f"{type(exc).__name__}: {str(exc)[:80]}"
    return rows


def _sample_blocks(jac: np.ndarray) -> np.ndarray:
    """The per-sample blocks ``dz_b/dx_b`` ``(B, D, D)`` of a whole-batch ``(B, D, B, D)``
    Jacobian."""
    return np.stack([jac[b, :, b, :] for b in range(B)])


def dense_ift_dx(W: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``dz*_b/dx_b`` per sample, ``(B, D, D)``: ``(I - J)^{-1} diag(1 - z*^2)``."""
    z = np.zeros_like(x)
    for _ in range(STEPS):
        z = np.tanh(z @ W.T + x)
    s = 1.0 - z * z
    J = s[:, :, None] * W[None]
    return np.linalg.solve(np.eye(D)[None] - J, s[:, :, None] * np.eye(D)[None])


def torch_rows() -> dict[str, float | str]:
    import torch
    import torch.func as TF

    import eqsolve.torch as et

    torch.set_num_threads(1)
    Wn, xn, cn = _data()
    W, x, c = (torch.tensor(a) for a in (Wn, xn, cn))

    def cell(z: Any, W: Any, x: Any) -> Any:
        return torch.tanh(z @ W.T + x)

    def eq(W: Any, x: Any) -> Any:
        return et.fixed_point(cell, torch.zeros_like(x), W, x, tol=TOL).value

    def ref(W: Any, x: Any) -> Any:
        z = torch.zeros_like(x)
        for _ in range(STEPS):
            z = cell(z, W, x)
        return z

    def loss(solve: Callable[..., Any]) -> Callable[..., Any]:
        return lambda W, x: (solve(W, x) * c).sum()

    def force(solve: Callable[..., Any]) -> Any:
        Wl, xl = W.clone().requires_grad_(True), x.clone().requires_grad_(True)
        (F,) = torch.autograd.grad((solve(Wl, xl) ** 2).sum(), xl, create_graph=True)
        return torch.autograd.grad((F**2).sum(), Wl)[0]

    def third(solve: Callable[..., Any]) -> Any:
        s = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        h = (solve(s * W, x) * c).sum()
        (d1,) = torch.autograd.grad(h, s, create_graph=True)
        (d2,) = torch.autograd.grad(d1, s, create_graph=True)
        return torch.autograd.grad(d2, s)[0]

    def closure_grad(solve: Callable[..., Any]) -> Any:
        Wl = W.clone().requires_grad_(True)
        if solve is eq:
            z = et.fixed_point(lambda z: cell(z, Wl, x), torch.zeros_like(x), tol=TOL).value
        else:
            z = ref(Wl, x)
        return torch.autograd.grad((z * c).sum(), Wl)[0]

    def closure_force(solve: Callable[..., Any]) -> Any:
        if solve is ref:
            return force(ref)
        return force(lambda W, x: et.fixed_point(lambda z: cell(z, W, x), torch.zeros_like(x),
                                                 tol=TOL).value)

    def args_grad(solve: Callable[..., Any]) -> Any:
        Wl = W.clone().requires_grad_(True)
        return torch.autograd.grad(loss(solve)(Wl, x), Wl)[0]

    def per_sample(solve: Callable[..., Any]) -> Callable[..., Any]:
        return lambda Wi, xi: solve(Wi, xi[None])[0]

    tx = torch.ones_like(x)
    cases: dict[str, Callable[[Callable[..., Any]], Any]] = {
        "backward (autograd), closure f": closure_grad,
        "backward (autograd), f(z, *args)": args_grad,
        "double backward, force matching": force,
        "double backward, closure f": closure_force,
        "third order (create_graph)": third,
        "torch.func.grad": lambda s: TF.grad(loss(s))(W, x),
        "torch.func.vjp": lambda s: TF.vjp(lambda x: s(W, x), x)[1](c)[0],
        "torch.func.jvp": lambda s: TF.jvp(lambda x: s(W, x), (x,), (tx,))[1],
        "torch.func.jacrev": lambda s: TF.jacrev(lambda x: s(W, x))(x),
        "torch.func.jacfwd": lambda s: TF.jacfwd(lambda x: s(W, x))(x),
        "torch.func.hessian": lambda s: TF.hessian(lambda x: (s(W, x) * c).sum())(x),
        "torch.func.vmap (per sample)": lambda s: TF.vmap(per_sample(s), (None, 0))(W, x),
        "torch.func.vmap(grad)": lambda s: TF.vmap(
            TF.grad(lambda Wi, xi: per_sample(s)(Wi, xi).sum()), (None, 0))(W, x),
    }
    rows = _compare(cases, eq, ref, lambda t: t.detach().numpy())
    jac = TF.jacrev(lambda x: eq(W, x))(x).detach().numpy()
    rows["jacrev vs dense IFT"] = _rel(_sample_blocks(jac), dense_ift_dx(Wn, xn))
    return rows


def jax_rows() -> dict[str, float | str]:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    import eqsolve.jax as ej

    Wn, xn, cn = _data()
    W, x, c = (jnp.asarray(a) for a in (Wn, xn, cn))

    def cell(z: Any, W: Any, x: Any) -> Any:
        return jnp.tanh(z @ W.T + x)

    def eq(W: Any, x: Any) -> Any:
        return ej.fixed_point(cell, jnp.zeros_like(x), W, x, tol=TOL).value

    def ref(W: Any, x: Any) -> Any:
        return jax.lax.fori_loop(0, STEPS, lambda _, z: cell(z, W, x), jnp.zeros_like(x))

    def loss(s: Callable[..., Any]) -> Callable[..., Any]:
        return lambda W, x: jnp.sum(s(W, x) * c)

    def force(s: Callable[..., Any]) -> Any:
        def fm(W: Any) -> Any:
            F = jax.grad(lambda x: jnp.sum(s(W, x) ** 2))(x)
            return jnp.sum(F**2)

        return jax.grad(fm)(W)

    def third(s: Callable[..., Any]) -> Any:
        h = lambda t: jnp.sum(s(t * W, x) * c)  # noqa: E731
        return jax.grad(jax.grad(jax.grad(h)))(1.0)

    def per_sample(s: Callable[..., Any]) -> Callable[..., Any]:
        return lambda Wi, xi: s(Wi, xi[None])[0]

    tx = jnp.ones_like(x)
    cases: dict[str, Callable[[Callable[..., Any]], Any]] = {
        "jax.grad": lambda s: jax.grad(loss(s))(W, x),
        "jax.jit(jax.grad)": lambda s: jax.jit(jax.grad(loss(s)))(W, x),
        "jax.vjp": lambda s: jax.vjp(lambda x: s(W, x), x)[1](c)[0],
        "jax.jvp": lambda s: jax.jvp(lambda x: s(W, x), (x,), (tx,))[1],
        "jax.jacfwd": lambda s: jax.jacfwd(lambda x: s(W, x))(x),
        "jax.jacrev": lambda s: jax.jacrev(lambda x: s(W, x))(x),
        "jax.hessian": lambda s: jax.hessian(lambda x: jnp.sum(s(W, x) * c))(x),
        "jax.grad(jax.grad), force matching": force,
        "third order (grad^3)": third,
        "jax.vmap (per sample)": lambda s: jax.vmap(per_sample(s), (None, 0))(W, x),
        "jax.vmap(jax.grad)": lambda s: jax.vmap(
            jax.grad(lambda Wi, xi: per_sample(s)(Wi, xi).sum()), (None, 0))(W, x),
        "jax.jit(jax.hessian)": lambda s: jax.jit(
            jax.hessian(lambda x: jnp.sum(s(W, x) * c)))(x),
    }
    rows = _compare(cases, eq, ref, np.asarray)
    jac = np.asarray(jax.jacfwd(lambda x: eq(W, x))(x))
    rows["jacfwd vs dense IFT"] = _rel(_sample_blocks(jac), dense_ift_dx(Wn, xn))
    return rows


def torch_compile_rows(reps: int = 50) -> list[str]:
    """A DEQ training step (tanh cell, d=32, B=8, float32) eager and under ``torch.compile``
    (inductor), closure and explicit-args forms: graph breaks, first compile, step time."""
    import statistics
    import time

    import torch

    import eqsolve.torch as et

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 32, generator=g)
    W = (0.5 * W / torch.linalg.matrix_norm(W, 2)).requires_grad_(True)
    x = torch.randn(8, 32, generator=g)

    def cell(z: Any, W: Any, x: Any) -> Any:
        return torch.tanh(z @ W.T + x)

    def closure_step(W: Any, x: Any) -> Any:
        z = et.fixed_point(lambda z: cell(z, W, x), torch.zeros_like(x), tol=1e-5).value
        return torch.autograd.grad((z**2).sum(), W)[0]

    def args_step(W: Any, x: Any) -> Any:
        z = et.fixed_point(cell, torch.zeros_like(x), W, x, tol=1e-5).value
        return torch.autograd.grad((z**2).sum(), W)[0]

    def median_ms(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    lines = []
    for name, step in (("closure f", closure_step), ("f(z, *args)", args_step)):
        torch._dynamo.reset()
        breaks = torch._dynamo.explain(step)(W, x).graph_break_count
        torch._dynamo.reset()
        compiled = torch.compile(step)
        t0 = time.perf_counter()
        compiled(W, x)
        first = time.perf_counter() - t0
        step(W, x)
        lines.append(
            f"| torch.compile, {name} | {breaks} graph break(s), first call {first:.1f} s, step "
            f"{median_ms(lambda c=compiled: c(W, x)):.2f} ms vs eager "
            f"{median_ms(lambda s=step: s(W, x)):.2f} ms |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.transforms", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile", action="store_true",
                    help="also time a DEQ step under torch.compile (inductor; ~30 s)")
    args = ap.parse_args(argv)
    print("| framework | transformation | relative error vs reference |")
    print("|---|---|---|")
    for fw, rows_of in (("torch", torch_rows), ("jax", jax_rows)):
        if importlib.util.find_spec(fw) is None:
            print(f"| {fw} | (not installed) | |")
            continue
        for name, err in rows_of().items():
            shown = f"{err:.1e}" if isinstance(err, float) else f"fails: {err}"
            print(f"| {fw} | {name} | {shown} |")
    if args.compile and importlib.util.find_spec("torch") is not None:
        print("\n| torch.compile (tanh cell d=32, B=8, float32) | figures |\n|---|---|")
        for line in torch_compile_rows():
            print(line)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
