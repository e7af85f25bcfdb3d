"""Small deterministic DEQ cells for tests, built from numpy.random so every backend gets
bit-identical inputs (``bench/problems.py`` holds the full-size versions)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from array_api_compat import array_namespace


@dataclass(frozen=True)
class TanhCell:
    """``f(z) = tanh(z W^T + inj)`` with ``||W||_2 = radius`` (a contraction for radius < 1)."""

    W: np.ndarray
    inj: np.ndarray

    def __call__(self, z):
        xp = array_namespace(z)
        W = xp.asarray(self.W, dtype=z.dtype, device=_dev(z))
        inj = xp.asarray(self.inj, dtype=z.dtype, device=_dev(z))
        return xp.tanh(z @ xp.matrix_transpose(W) + inj)

    def z0(self, dtype: str = "float64") -> np.ndarray:
        return np.zeros(self.inj.shape, dtype=dtype)

    def jacobian(self, z: np.ndarray) -> np.ndarray:
        """Per-sample Jacobian ``J_b = diag(1 - f(z)_b^2) W`` in float64, ``(B, d, d)``."""
        z = np.asarray(z, dtype=np.float64)
        fz = np.tanh(z @ self.W.T + self.inj)
        return (1.0 - fz**2)[:, :, None] * self.W[None, :, :]

    def reference_adjoint(self, z_star: np.ndarray, g: np.ndarray) -> np.ndarray:
        """Dense float64 ``u_b = (I - J_b^T)^{-1} g_b`` at the fixed point ``z_star``."""
        J = self.jacobian(z_star)
        eye = np.eye(J.shape[-1])
        A = eye[None] - np.transpose(J, (0, 2, 1))
        return np.linalg.solve(A, np.asarray(g, np.float64)[..., None])[..., 0]

    def reference_fixed_point(self, tol: float = 1e-14, max_iter: int = 100_000) -> np.ndarray:
        """Float64 fixed point by plain iteration to ``tol`` (independent of eqsolve)."""
        z = np.zeros(self.inj.shape)
        for _ in range(max_iter):
            z_new = np.tanh(z @ self.W.T + self.inj)
            if np.max(np.abs(z_new - z)) <= tol:
                return z_new
            z = z_new
        raise RuntimeError("reference fixed point did not converge")


def tanh_cell(
    d: int = 16, batch: int = 4, radius: float = 0.9, seed: int = 0, sym: bool = False
) -> TanhCell:
    rng = np.random.default_rng(seed)
    if sym:  # real spectrum up to `radius`: slow for plain iteration
        Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        W = Q @ np.diag(np.linspace(0.0, radius, d)) @ Q.T
        inj = 0.1 * rng.standard_normal((batch, d))
    else:
        W = rng.standard_normal((d, d))
        W *= radius / np.linalg.norm(W, 2)
        inj = rng.standard_normal((batch, d))
    return TanhCell(W, inj)


def _dev(z):
    from array_api_compat import device

    return device(z)
