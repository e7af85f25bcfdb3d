"""Spectral radius estimates against dense eigenvalues: ``python -m bench.spectral_accuracy``.

For tanh DEQ cells ``f(z) = tanh(z W^T + x)`` (``||W||_2 = 0.9``) of width 32, 64 and 128 in
float64, at their fixed points (solved to ``tol=1e-13``), it compares
``eqsolve.torch.spectral_radius`` (power iteration only, 80 and 300 steps; and the default
50 power + 30 Arnoldi steps) with ``max |numpy.linalg.eigvals(J_b)|`` of the dense
per-sample Jacobian ``J_b = diag(1 - z_b^2) W``: how many samples report ``converged`` and
the largest relative error among them and among all. ``rtol=1e-4``; start vectors from a
generator seeded 0, problems seeded per width, so the figures are reproducible.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import eqsolve.torch as et  # noqa: E402

CELLS = ((32, 256, 0), (64, 128, 1), (128, 64, 2))  # width d, batch B, seed
SETTINGS = ((80, 0), (300, 0), (50, 30))  # (iters, krylov)


def main() -> int:
    torch.set_num_threads(1)
    print(f"{'d':>4} {'B':>4} {'iters':>5} {'krylov':>6} {'converged':>10} "
          f"{'max err (conv.)':>16} {'max err (all)':>14}")
    for d, b, seed in CELLS:
        rng = np.random.default_rng(seed)
        W = rng.standard_normal((d, d))
        W *= 0.9 / np.linalg.norm(W, 2)
        x = rng.standard_normal((b, d))
        Wt, xt = torch.from_numpy(W), torch.from_numpy(x)

        def f(z: torch.Tensor, Wt: torch.Tensor = Wt, xt: torch.Tensor = xt) -> torch.Tensor:
            return torch.tanh(z @ Wt.T + xt)

        z = et.fixed_point(f, torch.zeros(b, d, dtype=torch.float64), tol=1e-13,
                           max_iter=500, backward=None).value
        J = (1 - z.numpy() ** 2)[:, :, None] * W[None]
        true = np.abs(np.linalg.eigvals(J)).max(axis=-1)
        for iters, krylov in SETTINGS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unconverged samples are counted below
                r = et.spectral_radius(f, z, iters=iters, krylov=krylov, rtol=1e-4,
                                       generator=torch.Generator().manual_seed(0))
            err = np.abs(r.radius.numpy() - true) / true
            c = r.converged.numpy()
            conv_err = f"{err[c].max():.1e}" if c.any() else "-"
            print(f"{d:>4} {b:>4} {iters:>5} {krylov:>6} {f'{c.sum()}/{b}':>10} "
                  f"{conv_err:>16} {err.max():>14.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
