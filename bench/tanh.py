"""The ``tanh`` cells (``tanh``, ``tanh-wide``, ``sym`` and the trained ``digits`` cell):
``f(z) = tanh(z W^T + x U^T + b)`` with float64 references (see :mod:`bench.problems`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .case import Case
from .native import Native, check_backend, rel_residual

__all__ = ["TANH_SIZES", "TanhProblem", "random_tanh", "tanh_fixed_point"]

TANH_SIZES = {"default": (256, 64, 64), "tiny": (16, 8, 4)}  # d, p, B


def tanh_fixed_point(
    W: np.ndarray, inj: np.ndarray, *, tol: float = 1e-14, max_newton: int = 50
) -> np.ndarray:
    """Float64 fixed point of ``z = tanh(z W^T + inj)`` per row of ``inj``: 20 plain steps
    from zero, then Newton with the dense Jacobian ``J_b = diag(1 - f_b^2) W`` until every
    sample's relative residual is ``<= tol`` (raises if it stays above 1e-12)."""
    W = np.asarray(W, dtype=np.float64)
    inj = np.asarray(inj, dtype=np.float64)
    eye = np.eye(W.shape[0])
    z = np.zeros_like(inj)
    for _ in range(20):
        z = np.tanh(z @ W.T + inj)
    res = np.inf
    for _ in range(max_newton):
        fz = np.tanh(z @ W.T + inj)
        res = float(np.max(rel_residual(fz, z)))
        if res <= tol:
            return fz
        A = eye[None] - (1.0 - fz**2)[:, :, None] * W[None]  # I - J_b
        z = z + np.linalg.solve(A, (fz - z)[..., None])[..., 0]
    fz = np.tanh(z @ W.T + inj)
    res = float(np.max(rel_residual(fz, z)))
    if res > 1e-12:
        raise RuntimeError(f"reference Newton solve stalled at relative residual {res:.3g}")
    return z


class TanhProblem:
    """``f(z) = tanh(z W^T + x U^T + b)`` on ``(B, d)`` states; parameters float64 NumPy.

    ``W``: ``(d, d)``, ``U``: ``(d, p)``, ``b``: ``(d,)``, ``x``: ``(B, p)``.
    """

    frameworks: tuple[str, ...] = ("numpy", "torch", "jax", "cupy")

    def __init__(
        self,
        name: str,
        W: np.ndarray,
        U: np.ndarray,
        b: np.ndarray,
        x: np.ndarray,
        *,
        info: dict[str, Any] | None = None,
    ):
        self.name = name
        self.W = np.ascontiguousarray(W, dtype=np.float64)
        self.U = np.ascontiguousarray(U, dtype=np.float64)
        self.b = np.ascontiguousarray(b, dtype=np.float64)
        self.x = np.ascontiguousarray(x, dtype=np.float64)
        d, p = self.U.shape
        if self.W.shape != (d, d) or self.b.shape != (d,) or self.x.ndim != 2:
            raise ValueError("expected W (d, d), U (d, p), b (d,), x (B, p)")
        if self.x.shape[1] != p:
            raise ValueError(f"x has {self.x.shape[1]} features, U expects {p}")
        self.info = dict(info or {})
        self._meta: dict[str, Any] | None = None
        self._z_star: np.ndarray | None = None
        self._A_T: np.ndarray | None = None  # (I - J_b^T) at z*, (B, d, d)

    # sizes -----------------------------------------------------------------------------
    @property
    def d(self) -> int:
        return int(self.W.shape[0])

    @property
    def p(self) -> int:
        return int(self.U.shape[1])

    @property
    def B(self) -> int:
        return int(self.x.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """State shape ``(B, d)``."""
        return (self.B, self.d)

    @property
    def inj(self) -> np.ndarray:
        """Input injection ``x U^T + b``, ``(B, d)`` float64."""
        return self.x @ self.U.T + self.b

    @property
    def meta(self) -> dict[str, Any]:
        """Sizes and the spectrum of W (``||J_b||_2 <= ||W||_2``, as ``|tanh'| <= 1``)."""
        if self._meta is None:
            self._meta = {
                "problem": self.name,
                "cell": "tanh(z W^T + x U^T + b)",
                "d": self.d,
                "p": self.p,
                "B": self.B,
                "state_shape": [self.B, self.d],
                "W_norm2": float(np.linalg.norm(self.W, 2)),
                "W_spectral_radius": float(np.max(np.abs(np.linalg.eigvals(self.W)))),
                **self.info,
            }
        return dict(self._meta)

    # float64 references ------------------------------------------------------------------
    def f64(self, z: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
        """The cell in float64 NumPy (``x`` defaults to the problem's input)."""
        x = self.x if x is None else np.asarray(x, dtype=np.float64)
        inj = self.inj if x is self.x else x @ self.U.T + self.b
        return np.tanh(np.asarray(z, dtype=np.float64) @ self.W.T + inj)

    def jacobian(self, z: np.ndarray) -> np.ndarray:
        """Per-sample ``J_b = d f_b / d z_b = diag(1 - f_b^2) W``, ``(B, d, d)`` float64."""
        fz = self.f64(z)
        return (1.0 - fz**2)[:, :, None] * self.W[None]

    def residual(self, z: Any) -> np.ndarray:
        """Per-sample ``||f(z) - z|| / ||f(z)||`` in float64."""
        z = np.asarray(z, dtype=np.float64).reshape(self.shape)
        return rel_residual(self.f64(z), z)

    def reference_fixed_point(self) -> np.ndarray:
        """``z*`` in float64 (Newton, relative residual <= 1e-14 per sample; cached)."""
        if self._z_star is None:
            self._z_star = tanh_fixed_point(self.W, self.inj)
        return self._z_star.copy()

    def reference_adjoint(self, g: np.ndarray) -> np.ndarray:
        """``u_b = (I - J_b(z*)^T)^{-1} g_b`` per sample, dense float64."""
        if self._A_T is None:
            J = self.jacobian(self.reference_fixed_point())
            self._A_T = np.eye(self.d)[None] - np.transpose(J, (0, 2, 1))
        g = np.asarray(g, dtype=np.float64).reshape(self.shape)
        return np.linalg.solve(self._A_T, g[..., None])[..., 0]

    def reference_input_grad(self, g: np.ndarray) -> np.ndarray:
        """``dL/dx`` for ``L = sum(z* * g)``: ``(u * (1 - f^2)) U`` with ``u`` the adjoint."""
        u = self.reference_adjoint(g)
        fz = self.f64(self.reference_fixed_point())
        return (u * (1.0 - fz**2)) @ self.U

    def local_spectrum(self) -> dict[str, float]:
        """Spectral radius and 2-norm of ``J_b(z*)`` (max and median over samples)."""
        J = self.jacobian(self.reference_fixed_point())
        rho = np.max(np.abs(np.linalg.eigvals(J)), axis=1)
        nrm = np.linalg.norm(J, 2, axis=(1, 2))
        return {
            "J_spectral_radius_max": float(rho.max()),
            "J_spectral_radius_median": float(np.median(rho)),
            "J_norm2_max": float(nrm.max()),
            "J_norm2_median": float(np.median(nrm)),
        }

    # native builds -----------------------------------------------------------------------
    def build(self, backend: str, dtype: str) -> Case:
        """The cell on ``backend`` ("numpy", "torch", "torch-cuda", "jax", "cupy") in
        ``dtype``: ``f(z) = tanh(z @ W^T + inj)`` with ``W^T`` and ``inj = x U^T + b``
        precomputed (in float64, then cast) as contiguous arrays."""
        fw = check_backend(backend, dtype, self.frameworks, self.name)
        nat = Native(backend, dtype)
        WT, UT, b = nat(self.W.T), nat(self.U.T), nat(self.b)
        inj, x, z0 = nat(self.inj), nat(self.x), nat(np.zeros(self.shape))
        f: Callable[[Any], Any]
        f_x: Callable[[Any, Any], Any]
        if fw == "numpy":

            def f(z: Any) -> Any:
                t = z @ WT
                t += inj
                return np.tanh(t, out=t)

            def f_x(z: Any, xx: Any) -> Any:
                return np.tanh(z @ WT + (xx @ UT + b))

        elif fw == "torch":
            import torch

            def f(z: Any) -> Any:
                return torch.tanh(torch.addmm(inj, z, WT))

            def f_x(z: Any, xx: Any) -> Any:
                return torch.tanh(torch.addmm(torch.addmm(b, xx, UT), z, WT))

        elif fw == "jax":
            import jax
            import jax.numpy as jnp

            hi = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes on GPUs

            f = jax.jit(lambda z: jnp.tanh(jnp.matmul(z, WT, precision=hi) + inj))
            f_x = jax.jit(
                lambda z, xx: jnp.tanh(
                    jnp.matmul(z, WT, precision=hi) + (jnp.matmul(xx, UT, precision=hi) + b)
                )
            )
        else:  # cupy
            import cupy

            def f(z: Any) -> Any:
                return cupy.tanh(z @ WT + inj)

            def f_x(z: Any, xx: Any) -> Any:
                return cupy.tanh(z @ WT + (xx @ UT + b))

        return nat.case(self, f, f_x, z0, x)

    def __repr__(self) -> str:
        return f"TanhProblem({self.name!r}, d={self.d}, p={self.p}, B={self.B})"


def random_tanh(name: str, d: int, p: int, batch: int, seed: int) -> TanhProblem:
    """``tanh`` (P1), ``tanh-wide`` (P2), ``sym`` (P4); same draws as bench/problems.py."""
    rng = np.random.default_rng(seed)
    if name in ("tanh", "tanh-wide"):
        W = rng.standard_normal((d, d))
        W *= (0.9 if name == "tanh" else 2.0) / np.linalg.norm(W, 2)
        scale = 1.0
    else:  # sym
        Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        W = Q @ np.diag(np.linspace(0.0, 0.99, d)) @ Q.T
        scale = 0.1
    U = rng.standard_normal((d, p)) / np.sqrt(p)
    b = 0.1 * rng.standard_normal(d)
    x = rng.standard_normal((batch, p))
    return TanhProblem(name, W, scale * U, scale * b, x, info={"seed": seed})
