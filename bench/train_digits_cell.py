"""Train the ``digits`` benchmark cell and write ``bench/data/digits_cell.npz``.

    python -m bench.train_digits_cell [--out PATH] [--epochs 30] [--seed 0]

from the clone's root (``python bench/train_digits_cell.py`` works too).

A deep-equilibrium classifier on scikit-learn's bundled 8x8 digits (``load_digits()``: 1797
images, no download):

* preprocessing: ``x = pixels / 16`` (the raw pixels are integers 0..16), so ``x`` is in
  [0, 1]; p = 64 inputs;
* split: ``numpy.random.default_rng(seed).permutation(1797)``; the first 360 images are the
  test split, the other 1437 the training split;
* cell ``f(z) = tanh(z W^T + x U^T + b)`` with d = 128, equilibrium ``z* = f(z*)``, linear
  head ``logits = z* H^T + c``; ``W`` starts as a Gaussian scaled to ``||W||_2 = 0.5``,
  ``U = N / sqrt(p)``, ``b = 0``, the head is ``torch.nn.Linear``'s default;
* training: float32, cross-entropy, Adam (lr 3e-3, cosine-annealed to 0 over the run),
  mini-batches of 64 (reshuffled by ``torch.randperm`` each epoch), ``--epochs`` epochs;
  the forward solve is eqsolve's own DEQ layer (``eqsolve.torch.DEQ``: Anderson, tol 1e-4,
  at most 50 iterations) and the gradient its implicit (adjoint) backward;
* contraction: after every optimiser step ``W`` is projected back onto
  ``||W||_2 <= 0.95`` (rescaled by ``0.95 / ||W||_2`` when larger). As ``|tanh'| <= 1`` this
  keeps ``||J_f(z)||_2 <= 0.95`` everywhere, so ``f`` is a global contraction and every
  solver (plain iteration included) converges on any input;
* test accuracy (stored) is evaluated independently in float64 NumPy on the stored float32
  weights: Newton fixed point of every test image (relative residual <= 1e-14), head,
  argmax (``bench.digits.digits_accuracy``; the tests recompute it).

The file holds ``W``, ``U``, ``b``, ``head_W``, ``head_b`` (float32; the benchmark casts them
to float64), the raw test images (``test_images``, uint8, divide by ``pixel_max``) and labels,
``test_accuracy``, ``train_accuracy``, and strings ``preprocessing``, ``contraction``,
``command``, ``versions``, plus ``seed``/``epochs``. Deterministic: ``torch.manual_seed``, the
NumPy generator, one thread, ``torch.use_deterministic_algorithms``; the zip entries carry a
fixed timestamp, so rerunning with the same versions on the same machine rewrites the same
bytes (other CPUs/library versions may differ in the last bits of the float32 weights).
Runs in well under a minute on one CPU thread.
"""

from __future__ import annotations

import os

# one thread everywhere, before any numerical library is imported
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

if __package__ in (None, ""):  # run as a file: import the package bench from the clone's root
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import io  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "data" / "digits_cell.npz"
N_TEST = 360
D = 128
W_INIT_NORM = 0.5
W_CAP = 0.95
LR = 3e-3
BATCH = 64


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with a fixed zip timestamp (byte-reproducible)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import sklearn
    import torch
    from sklearn.datasets import load_digits

    import eqsolve
    import eqsolve.torch as et
    from bench.digits import digits_accuracy, load_digits_cell

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(args.seed)

    digits = load_digits()
    images = digits.data.astype(np.uint8)  # (1797, 64), integers 0..16
    labels = digits.target.astype(np.uint8)
    perm = rng.permutation(images.shape[0])
    test_idx, train_idx = perm[:N_TEST], perm[N_TEST:]
    x_all = torch.from_numpy(images.astype(np.float32) / 16.0)
    y_all = torch.from_numpy(labels.astype(np.int64))
    x_train, y_train = x_all[train_idx], y_all[train_idx]
    p = x_all.shape[1]

    W0 = rng.standard_normal((D, D))
    W0 *= W_INIT_NORM / np.linalg.norm(W0, 2)
    W = torch.nn.Parameter(torch.from_numpy(W0.astype(np.float32)))
    U = torch.nn.Parameter(
        torch.from_numpy((rng.standard_normal((D, p)) / np.sqrt(p)).astype(np.float32))
    )
    b = torch.nn.Parameter(torch.zeros(D))
    head = torch.nn.Linear(D, 10)
    deq = et.DEQ(solver="anderson", tol=1e-4, max_iter=50, backward="anderson")
    opt = torch.optim.Adam([W, U, b, *head.parameters()], lr=LR)
    n_train = x_train.shape[0]
    steps_per_epoch = -(-n_train // BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)

    def logits(x: torch.Tensor) -> torch.Tensor:
        inj = x @ U.T + b
        z = deq(lambda z: torch.tanh(z @ W.T + inj), torch.zeros(x.shape[0], D))
        return head(z)

    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(n_train)
        total, correct, nfev = 0.0, 0, 0
        for start in range(0, n_train, BATCH):
            idx = order[start : start + BATCH]
            out = logits(x_train[idx])
            loss = torch.nn.functional.cross_entropy(out, y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():  # projection: ||W||_2 <= W_CAP keeps f a contraction
                norm = torch.linalg.matrix_norm(W, ord=2)
                if norm > W_CAP:
                    W.mul_(W_CAP / norm)
            total += loss.item() * idx.shape[0]
            correct += int((out.argmax(1) == y_train[idx]).sum())
            assert deq.last_solution is not None
            nfev += deq.last_solution.nfev
        print(
            f"epoch {epoch + 1:3d}  loss {total / n_train:.4f}  train acc {correct / n_train:.4f}"
            f"  ||W||_2 {float(torch.linalg.matrix_norm(W.detach(), ord=2)):.3f}  f-evals/batch "
            f"{nfev / steps_per_epoch:.1f}  {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
    train_time = time.perf_counter() - t0

    with torch.no_grad():
        train_acc_f32 = float((logits(x_train).argmax(1) == y_train).float().mean())
        test_acc_f32 = float((logits(x_all[test_idx]).argmax(1) == y_all[test_idx]).float().mean())

    # the command that regenerates these arrays (--out only moves the file)
    command = f"python bench/train_digits_cell.py --epochs {args.epochs} --seed {args.seed}"
    versions = (
        f"torch {torch.__version__}, numpy {np.__version__}, scikit-learn {sklearn.__version__}"
        f", eqsolve {getattr(eqsolve, '__version__', '?')}"
    )
    arrays: dict[str, np.ndarray] = {
        "W": W.detach().numpy(),
        "U": U.detach().numpy(),
        "b": b.detach().numpy(),
        "head_W": head.weight.detach().numpy(),
        "head_b": head.bias.detach().numpy(),
        "test_images": images[test_idx],
        "test_labels": labels[test_idx],
        "pixel_max": np.array(16.0),
        "seed": np.array(args.seed),
        "epochs": np.array(args.epochs),
        "train_accuracy": np.array(train_acc_f32),
        "test_accuracy": np.array(np.nan),  # filled in below, from the stored weights
        "preprocessing": np.array("x = pixels / 16 (load_digits pixels are integers 0..16)"),
        "contraction": np.array(
            f"||W||_2 <= {W_CAP} by projection after every Adam step (so ||J_f||_2 <= {W_CAP})"
        ),
        "split": np.array(
            f"default_rng({args.seed}).permutation(1797): first {N_TEST} test, rest train"
        ),
        "command": np.array(command),
        "versions": np.array(versions),
    }
    write_npz(args.out, arrays)
    # the stored accuracy: float64 NumPy on the stored weights, as the tests recompute it
    arrays["test_accuracy"] = np.array(digits_accuracy(load_digits_cell(args.out)))
    write_npz(args.out, arrays)

    cell = load_digits_cell(args.out)
    Wd = cell["W"]
    print(
        f"\ntrained {args.epochs} epochs in {train_time:.1f}s; "
        f"test accuracy {cell['test_accuracy']:.4f}"
        f" (float64; float32 torch {test_acc_f32:.4f}), train accuracy {train_acc_f32:.4f}"
    )
    print(
        f"||W||_2 = {np.linalg.norm(Wd, 2):.4f}, spectral radius of W = "
        f"{np.max(np.abs(np.linalg.eigvals(Wd))):.4f}"
    )
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
