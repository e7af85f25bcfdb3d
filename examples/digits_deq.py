"""A deep equilibrium (DEQ) classifier for scikit-learn's digits, in PyTorch or JAX.

    python examples/digits_deq.py --backend torch          # or --backend jax
    python examples/digits_deq.py --backend jax --quick    # reduced size (CI, < 30 s)

Options: ``--epochs`` (20; quick 4), ``--hidden`` (128; quick 32), ``--lr`` (3e-3; quick
1e-2), ``--batch`` (64), ``--seed`` (0), ``--jac-reg WEIGHT`` (10; 0 leaves model (d) out),
``--unroll-steps K`` (default: the mean forward iterations of (c)), ``--solver``
(anderson | broyden | picard; the backward uses the matching adjoint method).

The data are ``sklearn.datasets.load_digits()`` (1797 8x8 images, bundled with scikit-learn:
no download), split 75/25 (stratified, ``random_state=seed``) and standardised with the
training statistics. The model is the same in both frameworks, starts from the same NumPy
weights and sees the same mini-batches in the same order, so the two runs agree to the
printed digits for several epochs and then drift apart only by floating-point rounding:

    inj    = x U^T + b                  input injection   (64 -> hidden)
    z*     = tanh(z* W^T + inj)         the equilibrium, solved by eqsolve (Anderson,
                                        relative residual 1e-4, ||W||_2 = 0.5 at the start)
    logits = z* V^T + c                 linear head       (hidden -> 10)

trained with Adam (cosine-decayed step size; hand-written for JAX, ``torch.optim.Adam`` for
PyTorch) on the cross-entropy, with eqsolve's implicit (adjoint) gradient. Four models are
trained and compared in the final table:

  (a) an explicit 2-layer tanh MLP of about the same parameter count,
  (b) the same DEQ trained by backprop through K unrolled plain iterations from z = 0,
  (c) the DEQ through eqsolve (``eqsolve.torch.DEQ`` / ``eqsolve.jax.fixed_point``),
  (d) (c) plus Jacobian regularisation (Bai, Koltun & Kolter, ICML 2021): the loss gets
      ``WEIGHT * jacobian_reg(f, z*)``, a one-probe Hutchinson estimate of
      ``||J_f(z*)||_F^2 / hidden`` (``eqsolve.torch.jacobian_reg``/``eqsolve.jax.jacobian_reg``).

Columns: test accuracy after the last epoch; training time per epoch (JAX: compiled before
the timer starts, compile time printed separately); mean forward solver iterations per sample
over all training steps and on the test set at the end; mean backward (adjoint) iterations
per sample in the last epoch; memory held for backward by one training step (batch 64): the
bytes of the tensors autograd saves (``torch.autograd.graph.saved_tensors_hooks`` around the
forward, unique storages) resp. of the residuals of ``jax.vjp`` of the loss (the leaves of
its VJP function, from ``jax.eval_shape``: an eager ``jax.vjp`` gives the same leaves and
bytes). Parameters and the input batch are included where they are saved.

Backward iterations on JAX: ``eqsolve.jax.fixed_point`` does not report its adjoint solve
(the PyTorch adapter does, in ``DEQ.last_adjoint_info``). The JAX column (marked ``*``)
re-runs the same solve (``eqsolve.core.adjoint.adjoint_solve``, same method, tolerance and
cotangent) on a fixed training batch after every epoch, outside the timer; ``--quick``
skips it (it costs two more compilations per DEQ).

Measured on a 2-core VM shared with other jobs, one thread, default settings (timings vary
by 2x with the load). Seed 0: test accuracy (a) 97.8%, (b) 97.3%, (c) 98.0% torch / 98.2% jax,
(d) 97.8%; forward iterations per sample (c) 9.9 -> (d) 4.7 in training and 10.4 -> 3.9 on
the test set, adjoint iterations 7.9 -> 2.9. Seeds 0-4: (c) 96.2-98.0% (mean 97.2%) torch,
96.9-98.2% (mean 97.6%) jax; (d) 96.4-98.2% (mean 97.4%) in both; (d) always needed about
half the iterations of (c) (training 4.7-5.0 vs 9.9-10.5, test 3.9-4.2 vs 10.3-11.0). With
``--jac-reg 3`` (torch, seeds 0-4): 7.6-7.8 training iterations, mean accuracy 97.4% too.
A run takes about 40 s (torch) or 35 s (jax, two thirds of it compiling).

Threads: one intra-op thread per library (set below, before the imports; on problems this
small and on small VMs more threads only slow things down).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from digits_common import (  # noqa: E402  (examples/digits_common.py, beside this file)
    MODEL_PARAMS,
    Config,
    Data,
    Result,
    epoch_batches,
    init_params,
    learning_rate,
    load_data,
    log_epoch,
)

# ---------------------------------------------------------------------------------- PyTorch


def run_torch(
    cfg: Config, data: Data, init: dict[str, np.ndarray], kind: str, unroll_steps: int, gamma: float
) -> Result:
    import torch
    from torch import nn

    import eqsolve
    import eqsolve.torch as et

    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.ParameterDict(
                {
                    k: nn.Parameter(torch.from_numpy(init[k].copy()))
                    for k in MODEL_PARAMS["deq" if kind.startswith("deq") else kind]
                }
            )
            self.deq = et.DEQ(
                solver=cfg.solver,
                tol=cfg.tol,
                max_iter=cfg.max_iter,
                backward=eqsolve.Implicit(cfg.backward, max_iter=cfg.backward_max_iter),
                on_failure="ignore",
            )

        def cell(self, z: torch.Tensor, inj: torch.Tensor) -> torch.Tensor:
            return torch.tanh(z @ self.p["W"].T + inj)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
            p = self.p
            inj = x @ p["U"].T + p["b"]
            if kind == "explicit":
                z = torch.tanh(torch.tanh(inj) @ p["W2"].T + p["b2"])
                f = None
            else:
                f = lambda z: self.cell(z, inj)  # noqa: E731
                if kind == "unrolled":  # backprop through K plain iterations
                    z = torch.zeros_like(inj)
                    for _ in range(unroll_steps):
                        z = f(z)
                else:  # the equilibrium, with eqsolve's implicit backward
                    z = self.deq(f, torch.zeros_like(inj))
            return z @ p["V"].T + p["c"], (z, f)

    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)  # Hutchinson probes
    x_tr, y_tr = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_te, y_te = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    res = Result(kind, sum(p.numel() for p in model.parameters()))
    is_deq = kind.startswith("deq")

    def loss_of(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, (z, f) = model(xb)
        ce = nn.functional.cross_entropy(logits, yb)
        reg = et.jacobian_reg(f, z, generator=gen) if gamma > 0 else None
        return ce, reg

    fwd_all: list[float] = []
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        losses, regs, fwd, bwd, unconv = [], [], [], [], 0
        for idx in epoch_batches(cfg, len(y_tr), epoch):
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step, len(y_tr))
            step += 1
            ce, reg = loss_of(x_tr[idx], y_tr[idx])
            opt.zero_grad(set_to_none=True)
            (ce if reg is None else ce + gamma * reg).backward()
            opt.step()
            losses.append(ce.item())
            if reg is not None:
                regs.append(reg.item())
            if is_deq:
                sol, info = model.deq.last_solution, model.deq.last_adjoint_info
                fwd.append(sol.iterations.float().mean().item())
                unconv += int((~sol.converged).sum())
                bwd.append(info.iterations.float().mean().item())
        seconds = time.perf_counter() - t0
        res.epoch_times.append(seconds)
        fwd_all += fwd
        with torch.no_grad():
            logits, _ = model(x_te)
        acc = (logits.argmax(1) == y_te).float().mean().item()
        log_epoch(
            epoch,
            float(np.mean(losses)),
            float(np.mean(regs)) if regs else None,
            acc,
            float(np.mean(fwd)) if fwd else float("nan"),
            float(np.mean(bwd)) if bwd else float("nan"),
            unconv,
            seconds,
        )

    res.acc = acc
    if is_deq:
        res.fwd_train = float(np.mean(fwd_all))
        res.fwd_test = model.deq.last_solution.iterations.float().mean().item()
        res.bwd = float(np.mean(bwd))
    elif kind == "unrolled":
        res.fwd_train = res.fwd_test = float(unroll_steps)

    # memory held for backward: what autograd saves during one training step's forward
    saved: dict[int, int] = {}  # unique storages (views such as W.T share W's)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    idx = epoch_batches(cfg, len(y_tr), 0)[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ce, reg = loss_of(x_tr[idx], y_tr[idx])
    res.backward_bytes = sum(saved.values())
    return res


# -------------------------------------------------------------------------------------- JAX


def run_jax(
    cfg: Config, data: Data, init: dict[str, np.ndarray], kind: str, unroll_steps: int, gamma: float
) -> Result:
    import jax
    import jax.numpy as jnp

    import eqsolve
    import eqsolve.jax as ej

    is_deq = kind.startswith("deq")
    names = MODEL_PARAMS["deq" if is_deq else kind]
    params = {k: jnp.asarray(init[k]) for k in names}
    solve_opts = dict(
        solver=cfg.solver,
        tol=cfg.tol,
        max_iter=cfg.max_iter,
        on_failure="ignore",
        backward=eqsolve.Implicit(cfg.backward, max_iter=cfg.backward_max_iter),
    )

    def cell(z: Any, Wt: Any, inj: Any) -> Any:  # Wt = W^T, transposed once per forward
        return jnp.tanh(z @ Wt + inj)

    def forward(p: dict[str, Any], x: Any) -> tuple[Any, Any, Any]:
        inj = x @ p["U"].T + p["b"]
        iters = jnp.zeros(x.shape[0], dtype=jnp.int32)
        Wt = None
        if kind == "explicit":
            z = jnp.tanh(jnp.tanh(inj) @ p["W2"].T + p["b2"])
        elif kind == "unrolled":
            z, Wt = jnp.zeros_like(inj), p["W"].T
            for _ in range(unroll_steps):
                z = cell(z, Wt, inj)
        else:
            Wt = p["W"].T
            sol = ej.fixed_point(cell, jnp.zeros_like(inj), Wt, inj, **solve_opts)
            z, iters = sol.value, sol.iterations
        return z @ p["V"].T + p["c"], (z, Wt, inj), iters

    def cross_entropy(logits: Any, y: Any) -> Any:
        picked = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)

    def loss_fn(p: dict[str, Any], x: Any, y: Any, key: Any) -> tuple[Any, Any]:
        logits, (z, Wt, inj), iters = forward(p, x)
        ce = cross_entropy(logits, y)
        reg = ej.jacobian_reg(cell, z, Wt, inj, key=key) if gamma > 0 else jnp.zeros(())
        return ce + gamma * reg, (ce, reg, iters)

    base_key = jax.random.key(cfg.seed)
    # Adam, as torch.optim.Adam (betas 0.9, 0.999; eps 1e-8)
    b1, b2, eps = 0.9, 0.999, 1e-8

    @jax.jit
    def train_step(p: Any, opt: Any, x: Any, y: Any) -> tuple[Any, Any, Any]:
        m, v, t = opt
        key = jax.random.fold_in(base_key, t)  # fresh Hutchinson probes every step
        (_, (ce, reg, iters)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, y, key)
        t = t + 1
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        c1, c2 = 1 - b1 ** t.astype(jnp.float32), 1 - b2 ** t.astype(jnp.float32)
        lr = learning_rate(cfg, t - 1, len(data.y_train))  # t: steps taken, this one included
        p = jax.tree_util.tree_map(
            lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps), p, m, v
        )
        unconv = jnp.sum(iters >= cfg.max_iter) if is_deq else jnp.zeros((), jnp.int32)
        return p, (m, v, t), (ce, reg, jnp.mean(iters.astype(jnp.float32)), unconv)

    @jax.jit
    def evaluate(p: Any, x: Any, y: Any) -> tuple[Any, Any]:
        logits, _, iters = forward(p, x)
        return jnp.mean(jnp.argmax(logits, axis=1) == y), jnp.mean(iters.astype(jnp.float32))

    probe = is_deq and cfg.jax_probe_backward
    probe_bwd = _jax_adjoint_probe(cfg, cell, cross_entropy) if probe else None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    opt = (zeros, zeros, jnp.zeros((), jnp.int32))
    x_tr, y_tr = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_te, y_te = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    res = Result(kind, sum(int(a.size) for a in params.values()))
    probe_idx = epoch_batches(cfg, len(data.y_train), 0)[0]

    t0 = time.perf_counter()  # compile before timing (the results are discarded)
    jax.block_until_ready(train_step(params, opt, x_tr[probe_idx], y_tr[probe_idx]))
    jax.block_until_ready(evaluate(params, x_te, y_te))
    if probe_bwd is not None:
        jax.block_until_ready(probe_bwd(params, x_tr[probe_idx], y_tr[probe_idx]))
    res.compile_s = time.perf_counter() - t0

    fwd_all: list[float] = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        metrics = []
        for idx in epoch_batches(cfg, len(data.y_train), epoch):
            params, opt, m = train_step(params, opt, x_tr[idx], y_tr[idx])
            metrics.append(m)
        jax.block_until_ready(params)
        seconds = time.perf_counter() - t0
        res.epoch_times.append(seconds)
        ce, reg, fwd, unconv = (np.asarray(a) for a in zip(*metrics, strict=True))
        acc, fwd_test = (float(a) for a in evaluate(params, x_te, y_te))
        bwd = float("nan")
        if probe_bwd is not None:  # untimed: not reported by eqsolve.jax.fixed_point
            bwd = float(probe_bwd(params, x_tr[probe_idx], y_tr[probe_idx]))
        if is_deq:
            fwd_all += list(fwd)
        log_epoch(
            epoch,
            float(ce.mean()),
            float(reg.mean()) if gamma > 0 else None,
            acc,
            float(fwd.mean()) if is_deq else float("nan"),
            bwd,
            int(unconv.sum()),
            seconds,
        )

    res.acc = acc
    if is_deq:
        res.fwd_train, res.fwd_test, res.bwd = float(np.mean(fwd_all)), fwd_test, bwd
    elif kind == "unrolled":
        res.fwd_train = res.fwd_test = float(unroll_steps)

    # memory held for backward: the residuals jax.vjp keeps for one training step, i.e. the
    # leaves of its VJP function; from shapes and dtypes (jax.eval_shape: nothing is run or
    # compiled; an eager jax.vjp gives the same leaves and bytes, without duplicates)
    idx = epoch_batches(cfg, len(data.y_train), 0)[0]
    vjp_fn = jax.eval_shape(
        lambda p: jax.vjp(lambda q: loss_fn(q, x_tr[idx], y_tr[idx], base_key)[0], p)[1], params
    )
    held = [
        math.prod(leaf.shape) * leaf.dtype.itemsize
        for leaf in jax.tree_util.tree_leaves(vjp_fn)
        if not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    ]
    res.backward_bytes = sum(held)
    return res


def _jax_adjoint_probe(cfg: Config, cell: Any, cross_entropy: Any) -> Any:
    """Mean adjoint iterations per sample for one batch: the solve that the backward of
    ``eqsolve.jax.fixed_point`` runs (same method, tolerance, cotangent), repeated because
    the JAX adapter does not report it."""
    import jax
    import jax.numpy as jnp

    from eqsolve import solve
    from eqsolve.backends import get_backend
    from eqsolve.core.adjoint import adjoint_solve, default_adjoint_tol

    driver = get_backend("jax").run

    @jax.jit
    def probe(p: Any, x: Any, y: Any) -> Any:
        inj = x @ p["U"].T + p["b"]
        f = lambda z: cell(z, p["W"].T, inj)  # noqa: E731
        z = solve(
            f,
            jnp.zeros_like(inj),
            solver=cfg.solver,
            tol=cfg.tol,
            max_iter=cfg.max_iter,
            on_failure="ignore",
        ).value
        g = jax.grad(lambda z: cross_entropy(z @ p["V"].T + p["c"], y))(z)
        _, vjp = jax.vjp(f, z)
        tol = default_adjoint_tol(cfg.tol, float(jnp.finfo(z.dtype).eps))
        _, info = adjoint_solve(
            jnp,
            lambda v: vjp(v)[0],
            g,
            method=cfg.backward,
            tol=tol,
            max_iter=cfg.backward_max_iter,
            driver=driver,
        )
        return jnp.mean(info.iterations.astype(jnp.float32))

    return probe


# ------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("torch", "jax"), default="torch")
    ap.add_argument("--epochs", type=int, default=None, help="default 20 (quick: 4)")
    ap.add_argument("--hidden", type=int, default=None, help="default 128 (quick: 32)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument(
        "--lr",
        type=float,
        default=None,
        help="initial Adam step (cosine decay to 0), default 3e-3 (quick: 1e-2)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--jac-reg",
        type=float,
        default=None,
        metavar="WEIGHT",
        help="weight of the Jacobian regulariser in model (d); 0 skips (d). Default 10",
    )
    ap.add_argument(
        "--unroll-steps",
        type=int,
        default=None,
        help="K for model (b); default: the mean forward iterations of (c)",
    )
    ap.add_argument(
        "--solver",
        choices=("anderson", "broyden", "picard"),
        default="anderson",
        help="forward solver of (c) and (d); the backward uses the same method "
        "('picard' -> 'neumann')",
    )
    ap.add_argument("--quick", action="store_true", help="reduced size for CI (< 30 s per backend)")
    a = ap.parse_args(argv)
    quick = a.quick
    cfg = Config(
        backend=a.backend,
        epochs=a.epochs if a.epochs is not None else (4 if quick else 20),
        hidden=a.hidden if a.hidden is not None else (32 if quick else 128),
        batch=a.batch,
        lr=a.lr if a.lr is not None else (1e-2 if quick else 3e-3),
        seed=a.seed,
        jac_reg=a.jac_reg if a.jac_reg is not None else 10.0,
        unroll_steps=a.unroll_steps,
        solver=a.solver,
        backward="neumann" if a.solver == "picard" else a.solver,
    )
    if cfg.epochs < 1 or cfg.hidden < 1 or cfg.batch < 1 or cfg.jac_reg < 0:
        ap.error("--epochs, --hidden and --batch must be >= 1 and --jac-reg >= 0")
    if quick:
        # the JAX adjoint probe costs two more compilations per DEQ: not in the CI size
        cfg = replace(cfg, max_iter=30, backward_max_iter=30, jax_probe_backward=False)
    return cfg, quick


def main(argv: list[str] | None = None) -> int:
    cfg, quick = parse_args(argv)
    t_start = time.perf_counter()
    data = load_data(cfg.seed)
    init = init_params(cfg.seed, cfg.hidden)
    if cfg.backend == "torch":
        import torch

        run = run_torch
        version = f"torch {torch.__version__}"
    else:
        import jax

        run = run_jax
        version = f"jax {jax.__version__} ({jax.default_backend()})"
    print(
        f"digits DEQ | {version} | train {len(data.y_train)}, test {len(data.y_test)} | "
        f"hidden {cfg.hidden}, batch {cfg.batch}, {cfg.epochs} epochs, Adam lr {cfg.lr} | "
        f"forward {cfg.solver} tol {cfg.tol:g} max_iter {cfg.max_iter}, backward "
        f"{cfg.backward} | seed {cfg.seed}{' | quick' if quick else ''}",
        flush=True,
    )

    results: dict[str, Result] = {}
    plan = [
        ("explicit", "(a) explicit 2-layer MLP", 0.0),
        ("deq", "(c) DEQ, eqsolve implicit", 0.0),
    ]
    for kind, title, gamma in plan:
        print(f"{title}:", flush=True)
        results[kind] = run(cfg, data, init, kind, 0, gamma)
    k = cfg.unroll_steps or max(1, round(results["deq"].fwd_train))
    print(f"(b) DEQ, backprop through {k} unrolled steps:", flush=True)
    results["unrolled"] = run(cfg, data, init, "unrolled", k, 0.0)
    if cfg.jac_reg > 0:
        print(f"(d) DEQ + Jacobian regularisation (weight {cfg.jac_reg:g}):", flush=True)
        results["deq_jr"] = run(cfg, data, init, "deq_jr", 0, cfg.jac_reg)

    labels = {
        "explicit": "(a) explicit MLP",
        "unrolled": f"(b) DEQ unrolled, K={k}",
        "deq": "(c) DEQ eqsolve",
        "deq_jr": f"(d) DEQ eqsolve + JR {cfg.jac_reg:g}",
    }
    star = "*" if cfg.backend == "jax" else ""
    print(f"\nfinal table ({cfg.backend}, {cfg.epochs} epochs, hidden {cfg.hidden}):")
    header = (
        f"{'model':<26} {'params':>6} {'test acc':>8} {'s/epoch':>8} "
        f"{'fwd it train':>12} {'fwd it test':>11} {'bwd it' + star:>7} "
        f"{'bwd memory':>11}"
    )
    print(header)
    print("-" * len(header))

    def num(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:.1f}"

    for kind in ("explicit", "unrolled", "deq", "deq_jr"):
        if kind not in results:
            continue
        r = results[kind]
        print(
            f"{labels[kind]:<26} {r.n_params:>6} {100 * r.acc:>7.1f}% "
            f"{np.mean(r.epoch_times):>8.3f} {num(r.fwd_train):>12} {num(r.fwd_test):>11} "
            f"{num(r.bwd):>7} {r.backward_bytes / 1024:>8.1f} KiB"
        )
    if cfg.backend == "jax":
        compile_s = sum(r.compile_s for r in results.values())
        if cfg.jax_probe_backward:
            print(
                "* bwd it: eqsolve.jax.fixed_point does not report its adjoint solve; the same "
                "solve was re-run on a fixed training batch after each epoch (last one shown)"
            )
        else:
            print("* bwd it: not measured on JAX with --quick (see the module docstring)")
        print(f"JAX compile time {compile_s:.1f} s in total (not in s/epoch)")
    print(f"total wall time {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
