"""A multiscale convolutional DEQ (MDEQ-style) on scikit-learn's digits, in PyTorch or JAX.

    python examples/multiscale_deq.py --backend torch          # or --backend jax
    python examples/multiscale_deq.py --backend jax --quick    # reduced size (CI)

The model follows Bai, Koltun & Kolter, "Multiscale Deep Equilibrium Models" (NeurIPS 2020)
at toy size. The state is a tuple of feature maps at two resolutions, ``z = (z1, z2)`` with
``z1: (B, C1, 8, 8)`` and ``z2: (B, C2, 4, 4)``, and one cell updates both with
cross-resolution fusion and GroupNorm:

    x1, x2 = conv3x3(img), conv3x3_stride2(img)                     input injection
    y1 = relu(conv3x3(z1) + conv1x1(upsample2(z2)) + x1)            fine scale
    y2 = relu(conv3x3(z2) + conv3x3_stride2(z1) + x2)               coarse scale
    f(z) = (GroupNorm(y1), GroupNorm(y2))
    logits = [mean_hw(z1*), mean_hw(z2*)] V^T + c

The three 3x3 convolutions of the cell are weight-normalised with the framework's own tool
where it has one (``torch.nn.utils.parametrizations.weight_norm``) and by the formula
``w = g v / ||v||`` in JAX, which has none in its core. The model is written once, against a
small table of array operations (:class:`Ops`) that each framework fills in, so both run
the same code path from the same NumPy initialisation on the same mini-batches.

Four models are trained with Adam (cosine-decayed step size) and compared in the table:

  (a) explicit: the same layers applied once, from the injected features ``z = (relu(x1),
      relu(x2))`` -- a convolutional network of the same size;
  (b) unrolled: the same DEQ trained by backprop through ``K`` plain iterations from
      ``z = 0`` (``K`` = the mean forward iterations of (c) in its last epoch, rounded);
  (c) deq: ``fixed_point`` (Anderson, relative residual 1e-3, at most 30 iterations) with
      the implicit gradient and Jacobian regularisation (``0.5 * jacobian_reg`` added to
      the loss; ``--jac-reg`` sets the weight);
  (d) deq+correction: (c) with fixed-point correction (Bai, Koltun & Kolter, CVPR 2022):
      ``states=(2, 4)`` and the loss adds ``0.5 CE(states[0]) + 0.7 CE(states[1])``, with
      phantom gradients (``eqsolve.Phantom(5, 0.8)``) on the states and on ``z*``.

Columns: test accuracy after the last epoch; training time per epoch (JAX: compiled before
the timer starts); mean forward iterations per sample (training steps of the last epoch, and
on the test set); mean adjoint iterations per sample in the last epoch (PyTorch only: the
JAX adapter does not report them); memory held for backward by one training step (bytes of
the unique storages autograd saves, ``saved_tensors_hooks``; JAX: bytes of the residuals of
``jax.vjp`` of the loss, from ``jax.eval_shape``).
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
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

N_CLASSES, GROUPS = 10, 4
STATES, STATE_WEIGHTS, JAC_WEIGHT, TOL, MAX_ITER = (2, 4), (0.5, 0.7), 0.5, 1e-3, 30
WEIGHT_NORMED = ("c1", "c2", "down")


#: trained in this order ("unrolled" takes K from "deq"); the table lists them as (a)-(d)
MODELS = ("explicit", "deq", "deq+correction", "unrolled")
ORDER = ("explicit", "unrolled", "deq", "deq+correction")


def solve_options(name: str, train: bool) -> dict[str, Any]:
    """The DEQ rows' solver settings: (c) implicit gradient; (d) fixed-point correction with
    phantom gradients on the states and on z* (as in DEQ optical flow; with implicit
    gradients at the unconverged early states this model reached only 60-65% test accuracy
    after 6 epochs in trial runs)."""
    import eqsolve

    if name == "deq":
        return {"backward": eqsolve.Implicit()}
    return {"backward": eqsolve.Phantom(5, 0.8), "states": STATES if train else None}


@dataclass(frozen=True)
class Settings:
    backend: str
    epochs: int
    c1: int
    c2: int
    batch: int
    lr: float
    seed: int
    jac_reg: float = JAC_WEIGHT


@dataclass
class Row:
    name: str
    n_params: int
    acc: float = float("nan")
    epoch_s: list[float] = field(default_factory=list)
    fwd_train: float = float("nan")
    fwd_test: float = float("nan")
    bwd: float = float("nan")
    backward_bytes: int = 0
    converged: float = float("nan")  # fraction of training samples solved to TOL, last epoch


# ------------------------------------------------------------------------------ data, init


def load_digits_images(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The bundled 8x8 digits as ``(N, 1, 8, 8)`` float32, split 75/25, standardised."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=seed,
                                              stratify=y)
    mean, std = x_tr.mean(), x_tr.std()

    def prep(a: np.ndarray) -> np.ndarray:
        return ((a - mean) / std).reshape(-1, 1, 8, 8).astype(np.float32)

    return prep(x_tr), y_tr.astype(np.int64), prep(x_te), y_te.astype(np.int64)


def init_params(s: Settings) -> dict[str, np.ndarray]:
    """NumPy float32 weights for both frameworks; weight-normed convs as (direction, gain)."""
    rng = np.random.default_rng(s.seed)

    def conv(cout: int, cin: int, k: int, gain: float = 1.0) -> np.ndarray:
        return gain * rng.standard_normal((cout, cin, k, k)) / math.sqrt(cin * k * k)

    p = {
        "inj1": conv(s.c1, 1, 3), "inj2": conv(s.c2, 1, 3),
        "c1": conv(s.c1, s.c1, 3), "c2": conv(s.c2, s.c2, 3),
        "up": conv(s.c1, s.c2, 1, 0.5), "down": conv(s.c2, s.c1, 3),
        "gn1_w": np.ones(s.c1), "gn1_b": np.zeros(s.c1),
        "gn2_w": np.ones(s.c2), "gn2_b": np.zeros(s.c2),
        "V": rng.standard_normal((N_CLASSES, s.c1 + s.c2)) / math.sqrt(s.c1 + s.c2),
        "c": np.zeros(N_CLASSES),
    }
    for name in WEIGHT_NORMED:  # gain 0.5 per output channel: a contractive start
        p[name + "_g"] = np.full(p[name].shape[0], 0.5)
    return {k: v.astype(np.float32) for k, v in p.items()}


def batches(s: Settings, n: int, epoch: int) -> list[np.ndarray]:
    order = np.random.default_rng([s.seed, epoch]).permutation(n)
    return [order[i:i + s.batch] for i in range(0, n - s.batch + 1, s.batch)]


# ------------------------------------------------------------------------- the model, once


@dataclass(frozen=True)
class Ops:
    """The array operations the model needs, NCHW, filled in by each framework."""

    conv: Callable[[Any, Any, int], Any]  # (x, w, stride), 'same' padding for odd kernels
    relu: Callable[[Any], Any]
    upsample2: Callable[[Any], Any]  # nearest neighbour, x2 in H and W
    mean_hw: Callable[[Any], Any]  # (B, C, H, W) -> (B, C)
    concat: Callable[[list[Any]], Any]  # along the channel axis of (B, C) rows
    group_norm: Callable[[Any, Any, Any], Any]  # (x, weight, bias), GROUPS groups


def injection(ops: Ops, w: Callable[[str], Any], img: Any) -> tuple[Any, Any]:
    return ops.conv(img, w("inj1"), 1), ops.conv(img, w("inj2"), 2)


def cell(ops: Ops, w: Callable[[str], Any], z: tuple[Any, Any],
         x: tuple[Any, Any]) -> tuple[Any, Any]:
    z1, z2 = z
    y1 = ops.relu(ops.conv(z1, w("c1"), 1) + ops.conv(ops.upsample2(z2), w("up"), 1) + x[0])
    y2 = ops.relu(ops.conv(z2, w("c2"), 1) + ops.conv(z1, w("down"), 2) + x[1])
    return (ops.group_norm(y1, w("gn1_w"), w("gn1_b")),
            ops.group_norm(y2, w("gn2_w"), w("gn2_b")))


def head(ops: Ops, w: Callable[[str], Any], z: tuple[Any, Any]) -> Any:
    return ops.concat([ops.mean_hw(z[0]), ops.mean_hw(z[1])]) @ w("V").T + w("c")


# ------------------------------------------------------------------------------- PyTorch


def run_torch(s: Settings, data: tuple[np.ndarray, ...]) -> list[Row]:
    import torch
    import torch.nn.functional as F
    from torch.nn.utils.parametrizations import weight_norm

    import eqsolve.torch as et

    torch.manual_seed(s.seed)

    def conv(x: Any, w: Any, stride: int) -> Any:
        return F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2)

    ops = Ops(conv=conv, relu=torch.relu,
              upsample2=lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
              mean_hw=lambda x: x.mean(dim=(2, 3)), concat=lambda xs: torch.cat(xs, dim=1),
              group_norm=lambda x, g, b: F.group_norm(x, GROUPS, g, b))

    class Model(torch.nn.Module):
        def __init__(self, p: dict[str, np.ndarray]) -> None:
            super().__init__()
            self.raw = torch.nn.ParameterDict({
                k: torch.nn.Parameter(torch.from_numpy(v)) for k, v in p.items()
                if k not in WEIGHT_NORMED and not k.endswith("_g")})
            # the framework's weight normalisation: w = g v / ||v|| per output channel
            self.wn = torch.nn.ModuleDict()
            for k in WEIGHT_NORMED:
                holder = torch.nn.Module()
                holder.weight = torch.nn.Parameter(torch.from_numpy(p[k]))
                weight_norm(holder, "weight", dim=0)
                with torch.no_grad():
                    holder.parametrizations.weight.original0.copy_(
                        torch.from_numpy(p[k + "_g"]).reshape(-1, 1, 1, 1))
                self.wn[k] = holder

        def w(self, name: str) -> Any:
            return self.wn[name].weight if name in self.wn else self.raw[name]

    images_tr, y_tr, images_te, y_te = (torch.from_numpy(a) for a in data)
    rows = []
    for name in MODELS:
        model = Model(init_params(s))
        opt = torch.optim.Adam(model.parameters(), lr=s.lr)
        n_steps = s.epochs * (len(y_tr) // s.batch)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, n_steps)
        row = Row(name, sum(p.numel() for p in model.parameters()))
        k_unroll = max(1, round(rows[1].fwd_train)) if name == "unrolled" else 0
        if name == "unrolled":
            row.name = f"unrolled (K={k_unroll})"
        fwd_iters: list[float] = []
        bwd_iters: list[float] = []
        conv: list[float] = []  # fraction of samples whose forward solve converged

        def forward(img: Any, train: bool, name: str = name, k: int = k_unroll,
                    model: Any = model, fwd_iters: list[float] = fwd_iters,
                    bwd_iters: list[float] = bwd_iters,
                    conv: list[float] = conv) -> tuple[Any, Any]:
            x = injection(ops, model.w, img)
            f = lambda z: cell(ops, model.w, z, x)  # noqa: E731
            if name == "explicit":
                return head(ops, model.w, f((torch.relu(x[0]), torch.relu(x[1])))), 0.0
            z0 = (torch.zeros_like(x[0]), torch.zeros_like(x[1]))
            if name == "unrolled":
                z = z0
                for _ in range(k):
                    z = f(z)
                return head(ops, model.w, z), 0.0
            sol = et.fixed_point(f, z0, tol=TOL, max_iter=MAX_ITER, on_failure="ignore",
                                 **solve_options(name, train),
                                 on_backward=lambda info: bwd_iters.append(
                                     float(info.iterations.float().mean())))
            fwd_iters.append(float(sol.iterations.float().mean()))
            conv.append(float(sol.converged.float().mean()))
            logits = head(ops, model.w, sol.value)
            if not train:
                return logits, 0.0
            extra = [(wt, head(ops, model.w, st))
                     for wt, st in zip(STATE_WEIGHTS, sol.states or (), strict=False)]
            reg = s.jac_reg * et.jacobian_reg(f, sol.value) if s.jac_reg else 0.0
            return logits, (extra, reg)

        def loss_of(img: Any, y: Any, forward: Any = forward) -> Any:
            logits, aux = forward(img, True)
            loss = F.cross_entropy(logits, y)
            if aux:
                extra, reg = aux
                loss = loss + sum(wt * F.cross_entropy(lg, y) for wt, lg in extra) + reg
            return loss

        for epoch in range(s.epochs):
            fwd_iters.clear()
            bwd_iters.clear()
            conv.clear()
            t0 = time.perf_counter()
            for idx in batches(s, len(y_tr), epoch):
                opt.zero_grad()
                loss_of(images_tr[idx], y_tr[idx]).backward()
                opt.step()
                sched.step()
            row.epoch_s.append(time.perf_counter() - t0)
            row.fwd_train = float(np.mean(fwd_iters)) if fwd_iters else float("nan")
            row.bwd = float(np.mean(bwd_iters)) if bwd_iters else float("nan")
            row.converged = float(np.mean(conv)) if conv else float("nan")
            with torch.no_grad():
                fwd_iters.clear()
                logits, _ = forward(images_te, False)
                row.acc = float((logits.argmax(1) == y_te).float().mean())
                row.fwd_test = float(np.mean(fwd_iters)) if fwd_iters else float("nan")
            print(f"  {row.name:18s} epoch {epoch + 1:3d} | test acc {100 * row.acc:5.1f}% | "
                  f"fwd it {row.fwd_train:5.1f} | converged {100 * row.converged:5.1f}% | "
                  f"{row.epoch_s[-1]:.2f} s", flush=True)

        saved: dict[int, int] = {}

        def pack(t: Any, saved: dict[int, int] = saved) -> Any:
            st = t.untyped_storage()
            saved[st.data_ptr()] = st.nbytes()
            return t

        idx = batches(s, len(y_tr), 0)[0]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_of(images_tr[idx], y_tr[idx])
        loss.backward()
        row.backward_bytes = sum(saved.values())
        rows.append(row)
    return sorted(rows, key=lambda r: ORDER.index(r.name.split(" ")[0]))


# ----------------------------------------------------------------------------------- JAX


def run_jax(s: Settings, data: tuple[np.ndarray, ...]) -> list[Row]:
    import jax
    import jax.numpy as jnp

    from eqsolve.jax import fixed_point, jacobian_reg

    def conv(x: Any, w: Any, stride: int) -> Any:
        pad = w.shape[-1] // 2
        return jax.lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2,
                                            dimension_numbers=("NCHW", "OIHW", "NCHW"))

    def group_norm(x: Any, g: Any, b: Any) -> Any:
        n, c, h, wd = x.shape
        xg = x.reshape(n, GROUPS, c // GROUPS, h, wd)
        mu = xg.mean(axis=(2, 3, 4), keepdims=True)
        var = xg.var(axis=(2, 3, 4), keepdims=True)
        xn = ((xg - mu) / jnp.sqrt(var + 1e-5)).reshape(n, c, h, wd)
        return xn * g[None, :, None, None] + b[None, :, None, None]

    ops = Ops(conv=conv, relu=jax.nn.relu,
              upsample2=lambda x: jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3),
              mean_hw=lambda x: x.mean(axis=(2, 3)),
              concat=lambda xs: jnp.concatenate(xs, axis=1), group_norm=group_norm)

    def weights(p: dict[str, Any]) -> Callable[[str], Any]:
        def w(name: str) -> Any:
            if name in WEIGHT_NORMED:  # w = g v / ||v|| per output channel
                v = p[name]
                norm = jnp.sqrt(jnp.sum(v * v, axis=(1, 2, 3), keepdims=True))
                return p[name + "_g"][:, None, None, None] * v / norm
            return p[name]
        return w

    def cross_entropy(logits: Any, y: Any) -> Any:
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    def model(p: Any, img: Any, name: str, k: int, train: bool) -> tuple[Any, Any, Any, Any]:
        """logits, [(weight, logits of a correction state)], regulariser, iterations"""
        w = weights(p)
        x = injection(ops, w, img)
        zero = jnp.zeros((2,), img.dtype)
        if name == "explicit":
            z = cell(ops, w, (jax.nn.relu(x[0]), jax.nn.relu(x[1])), x)
            return head(ops, w, z), [], zero[0], zero
        z0 = (jnp.zeros_like(x[0]), jnp.zeros_like(x[1]))
        if name == "unrolled":
            z = z0
            for _ in range(k):
                z = cell(ops, w, z, x)
            return head(ops, w, z), [], zero[0], zero

        def f(z: Any, p: Any, x: Any) -> Any:
            return cell(ops, weights(p), z, x)

        sol = fixed_point(f, z0, p, x, tol=TOL, max_iter=MAX_ITER, on_failure="ignore",
                          **solve_options(name, train))
        it = jnp.stack([jnp.mean(sol.iterations.astype(jnp.float32)),
                        jnp.mean(sol.converged.astype(jnp.float32))])
        logits = head(ops, w, sol.value)
        if not train:
            return logits, [], zero[0], it
        extra = [(wt, head(ops, w, st)) for wt, st in zip(STATE_WEIGHTS, sol.states or (),
                                                         strict=False)]
        reg = (s.jac_reg * jacobian_reg(f, sol.value, p, x, key=jax.random.key(0))
               if s.jac_reg else zero[0])
        return logits, extra, reg, it

    images_tr, y_tr, images_te, y_te = (jnp.asarray(a) for a in data)
    rows = []
    for name in MODELS:
        params = {k: jnp.asarray(v) for k, v in init_params(s).items()}
        k_unroll = max(1, round(rows[1].fwd_train)) if name == "unrolled" else 0
        row = Row(name if name != "unrolled" else f"unrolled (K={k_unroll})",
                  sum(int(v.size) for v in params.values()))
        n_steps = s.epochs * (len(y_tr) // s.batch)

        def loss_fn(p: Any, img: Any, y: Any, name: str = name, k: int = k_unroll) -> Any:
            logits, extra, reg, it = model(p, img, name, k, True)
            loss = cross_entropy(logits, y) + reg
            return loss + sum(wt * cross_entropy(lg, y) for wt, lg in extra), it

        @jax.jit
        def step(p: Any, m: Any, v: Any, t: Any, img: Any, y: Any,
                 loss_fn: Any = loss_fn, n_steps: int = n_steps) -> tuple[Any, ...]:
            (_, it), g = jax.value_and_grad(loss_fn, has_aux=True)(p, img, y)
            lr = s.lr * 0.5 * (1 + jnp.cos(jnp.pi * t / n_steps))
            m = jax.tree_util.tree_map(lambda a, b: 0.9 * a + 0.1 * b, m, g)
            v = jax.tree_util.tree_map(lambda a, b: 0.999 * a + 0.001 * b * b, v, g)
            t1 = t + 1
            p = jax.tree_util.tree_map(
                lambda q, a, b: q - lr * (a / (1 - 0.9**t1)) / (jnp.sqrt(b / (1 - 0.999**t1))
                                                                + 1e-8), p, m, v)
            return p, m, v, it

        @jax.jit
        def evaluate(p: Any, img: Any, name: str = name, k: int = k_unroll) -> tuple[Any, Any]:
            logits, _, _, it = model(p, img, name, k, False)
            return logits, it

        m = jax.tree_util.tree_map(jnp.zeros_like, params)
        v = jax.tree_util.tree_map(jnp.zeros_like, params)
        first = batches(s, len(y_tr), 0)[0]
        jax.block_until_ready(step(params, m, v, 0.0, images_tr[first], y_tr[first]))  # compile
        jax.block_until_ready(evaluate(params, images_te))
        t = 0.0
        for epoch in range(s.epochs):
            its = []
            t0 = time.perf_counter()
            for idx in batches(s, len(y_tr), epoch):
                params, m, v, it = step(params, m, v, t, images_tr[idx], y_tr[idx])
                its.append(it)
                t += 1
            jax.block_until_ready(params)
            row.epoch_s.append(time.perf_counter() - t0)
            logits, it_test = evaluate(params, images_te)
            row.acc = float(jnp.mean(jnp.argmax(logits, axis=1) == y_te))
            if name.startswith("deq"):
                stats = np.mean([np.asarray(i) for i in its], axis=0)
                row.fwd_train, row.converged = float(stats[0]), float(stats[1])
                row.fwd_test = float(it_test[0])
            print(f"  {row.name:18s} epoch {epoch + 1:3d} | test acc {100 * row.acc:5.1f}% | "
                  f"fwd it {row.fwd_train:5.1f} | converged {100 * row.converged:5.1f}% | "
                  f"{row.epoch_s[-1]:.2f} s", flush=True)
        def vjp_fn(p: Any, idx: Any = first, loss_fn: Any = loss_fn) -> Any:
            return jax.vjp(lambda q: loss_fn(q, images_tr[idx], y_tr[idx])[0], p)[1]

        residuals = jax.eval_shape(vjp_fn, params)
        row.backward_bytes = sum(int(np.prod(r.shape)) * r.dtype.itemsize
                                 for r in jax.tree_util.tree_leaves(residuals)
                                 if hasattr(r, "dtype"))
        rows.append(row)
    return sorted(rows, key=lambda r: ORDER.index(r.name.split(" ")[0]))


# ---------------------------------------------------------------------------------- main


def table(rows: list[Row]) -> str:
    out = ["| model | params | test acc | s / epoch | fwd it (train / test) | converged | "
           "bwd it | memory for backward |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_epoch = float(np.median(r.epoch_s[1:] or r.epoch_s))
        fwd = "-" if math.isnan(r.fwd_train) else f"{r.fwd_train:.1f} / {r.fwd_test:.1f}"
        bwd = "-" if math.isnan(r.bwd) else f"{r.bwd:.1f}"
        conv = "-" if math.isnan(r.converged) else f"{100 * r.converged:.0f}%"
        out.append(f"| {r.name} | {r.n_params} | {100 * r.acc:.1f}% | {per_epoch:.2f} | "
                   f"{fwd} | {conv} | {bwd} | {r.backward_bytes / 2**20:.2f} MiB |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("torch", "jax"), default="torch")
    ap.add_argument("--quick", action="store_true", help="reduced size (CI)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--jac-reg", type=float, default=JAC_WEIGHT, help="weight (0: off)")
    a = ap.parse_args(argv)
    s = Settings(backend=a.backend, epochs=a.epochs or (3 if a.quick else 12),
                 c1=8 if a.quick else 16, c2=16 if a.quick else 32, batch=64,
                 lr=a.lr or (1e-2 if a.quick else 5e-3), seed=a.seed, jac_reg=a.jac_reg)
    data = load_digits_images(s.seed)
    print(f"multiscale DEQ on digits, {s.backend}: {s}", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unconverged solves are counted, not warned per step
        rows = (run_torch if s.backend == "torch" else run_jax)(s, data)
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
