"""The ``conv`` problem: an MDEQ-style convolutional cell on ``(B, C, H, W)`` feature maps
(torch and jax only), with float64 references from dense per-sample Jacobians (see
:mod:`bench.problems`)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np

from eqsolve.backends import BackendUnavailableError

from .case import Case
from .native import Native, check_backend, rel_residual

__all__ = ["CONV_SIZES", "ConvProblem"]

CONV_SIZES = {"default": (16, 16, 8, 8, 4), "tiny": (2, 4, 4, 4, 2)}  # B, C, H, W, groups
_CONV_SCALE = 0.8  # conv2_scale
_GN_EPS = 1e-5


class ConvProblem:
    """``f(z) = GN2(x + conv2(relu(GN1(conv1(z)))))`` on ``(B, C, H, W)`` maps (see module
    docstring); parameters float64 NumPy, convolution weights OIHW."""

    name = "conv"
    frameworks: tuple[str, ...] = ("torch", "jax")

    def __init__(self, params: dict[str, np.ndarray], x: np.ndarray, groups: int, **info: Any):
        self.params = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in params.items()}
        self.x = np.ascontiguousarray(x, dtype=np.float64)
        self.groups = int(groups)
        B, C, H, W = self.x.shape
        if C % self.groups:
            raise ValueError(f"{C} channels do not split into {groups} groups")
        self.info = info
        self._z_star: np.ndarray | None = None
        self._A_T: np.ndarray | None = None  # (I - J_b^T) at z*, (B, n, n)
        self._ref: tuple[str, Native, Callable[[Any, Any], Any]] | None = None

    @classmethod
    def random(
        cls,
        B: int,
        C: int,
        H: int,
        W: int,
        groups: int,
        *,
        seed: int = 0,
        conv2_scale: float = _CONV_SCALE,
    ) -> ConvProblem:
        rng = np.random.default_rng(seed)
        fan_in = 9 * C
        params = {
            "K1": rng.standard_normal((C, C, 3, 3)) / np.sqrt(fan_in),
            "K2": conv2_scale * rng.standard_normal((C, C, 3, 3)) / np.sqrt(fan_in),
            "c1": 0.1 * rng.standard_normal(C),
            "c2": 0.1 * rng.standard_normal(C),
            "gamma1": 1.0 + 0.1 * rng.standard_normal(C),
            "gamma2": 1.0 + 0.1 * rng.standard_normal(C),
            "beta1": 0.1 * rng.standard_normal(C),
            "beta2": 0.1 * rng.standard_normal(C),
        }
        x = rng.standard_normal((B, C, H, W))
        return cls(params, x, groups, seed=seed, conv2_scale=conv2_scale)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """State shape ``(B, C, H, W)`` (the same as ``x``)."""
        B, C, H, W = self.x.shape
        return (int(B), int(C), int(H), int(W))

    @property
    def n(self) -> int:
        """State size per sample, ``C * H * W``."""
        return int(np.prod(self.shape[1:]))

    @property
    def meta(self) -> dict[str, Any]:
        B, C, H, W = self.shape
        return {
            "problem": self.name,
            "cell": "GN2(x + conv2(relu(GN1(conv1(z)))))",
            "B": B,
            "C": C,
            "H": H,
            "W": W,
            "groups": self.groups,
            "n": self.n,
            "state_shape": [B, C, H, W],
            "layout": "NCHW, weights OIHW, 3x3 convolutions, padding 1",
            "groupnorm_eps": _GN_EPS,
            **self.info,
        }

    # native cells ------------------------------------------------------------------------
    def _torch_cell(self, nat: Native) -> Callable[[Any, Any], Any]:
        import torch

        P = {k: nat(v) for k, v in self.params.items()}
        param_cell = torch_conv_cell(self.groups)

        def cell(z: Any, x: Any) -> Any:
            return param_cell(z, P, x)

        if nat.backend == "torch-cuda" and nat.dtype == "float32":
            cudnn: Any = torch.backends.cudnn
            conv = cudnn.conv  # float32 convolutions in IEEE float32, not TF32

            def cell_ieee(z: Any, x: Any) -> Any:
                prev = conv.fp32_precision
                conv.fp32_precision = "ieee"
                try:
                    return cell(z, x)
                finally:
                    conv.fp32_precision = prev

            return cell_ieee
        return cell

    def _jax_cell(self, nat: Native) -> Callable[[Any, Any], Any]:
        P = {k: nat(v) for k, v in self.params.items()}
        param_cell = jax_conv_cell(self.groups)

        def cell(z: Any, x: Any) -> Any:
            return param_cell(z, P, x)

        return cell

    def build(self, backend: str, dtype: str) -> Case:
        """The cell on "torch", "torch-cuda" or "jax" (jitted) in ``dtype``."""
        fw = check_backend(backend, dtype, self.frameworks, self.name)
        nat = Native(backend, dtype)
        x, z0 = nat(self.x), nat(np.zeros(self.shape))
        f: Callable[[Any], Any]
        f_x: Callable[[Any, Any], Any]
        if fw == "torch":
            cell = self._torch_cell(nat)

            def f(z: Any) -> Any:
                return cell(z, x)

            f_x = cell
        else:
            import jax

            jcell = self._jax_cell(nat)
            f = jax.jit(lambda z: jcell(z, x))
            f_x = jax.jit(jcell)
        return nat.case(self, f, f_x, z0, x)

    # float64 references ------------------------------------------------------------------
    def _ref_cell(self) -> tuple[str, Native, Callable[[Any, Any], Any]]:
        """The float64 cell used by the references: torch if installed, else jax (cached)."""
        if self._ref is None:
            fw = next((m for m in ("torch", "jax") if importlib.util.find_spec(m)), None)
            if fw is None:
                raise BackendUnavailableError("the conv problem's references need torch or jax")
            check_backend(fw, "float64", self.frameworks, self.name)
            nat = Native(fw, "float64")
            if fw == "torch":
                cell = self._torch_cell(nat)
            else:
                import jax

                cell = jax.jit(self._jax_cell(nat))
            self._ref = (fw, nat, cell)
        return self._ref

    def f64(self, z: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
        """The cell in float64 (torch if installed, else jax), NumPy in and out."""
        fw, nat, cell = self._ref_cell()
        x = self.x if x is None else x
        z = np.asarray(z, dtype=np.float64).reshape(self.shape)
        if fw == "torch":
            import torch

            with torch.no_grad():
                return nat.to_numpy(cell(nat(z), nat(x)))
        return np.asarray(cell(nat(z), nat(x)))

    def residual(self, z: Any) -> np.ndarray:
        """Per-sample ``||f(z) - z|| / ||f(z)||`` in float64 (over C, H, W)."""
        z = np.asarray(z, dtype=np.float64).reshape(self.shape)
        return rel_residual(self.f64(z), z)

    def _jacobians_and_vjp_x(
        self, z: np.ndarray, u: np.ndarray | None
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Dense per-sample ``J_b = d f_b / d z_b`` ``(B, n, n)`` (when ``u`` is None) or the
        input VJP ``u^T d f / d x`` (when given), float64."""
        fw, nat, cell = self._ref_cell()
        B, n = self.shape[0], self.n
        if fw == "torch":
            import torch

            zt, xt = nat(z), nat(self.x)
            if u is not None:
                xl = xt.clone().requires_grad_(True)
                (gx,) = torch.autograd.grad(cell(zt, xl), xl, nat(u))
                return None, nat.to_numpy(gx)
            J = np.empty((B, n, n))
            for i in range(B):
                xi = xt[i : i + 1]
                Ji = torch.func.jacrev(lambda zb, xi=xi: cell(zb[None], xi)[0])(zt[i])
                J[i] = nat.to_numpy(Ji).reshape(n, n)
            return J, None
        import jax

        jcell = cell
        zj, xj = nat(z), nat(self.x)
        if u is not None:

            @jax.jit
            def vjp_x(zz: Any, xx: Any, uu: Any) -> Any:
                return jax.vjp(lambda xv: jcell(zz, xv), xx)[1](uu)[0]

            return None, np.asarray(vjp_x(zj, xj, nat(u)))
        jac = jax.jit(jax.vmap(jax.jacrev(lambda zb, xb: jcell(zb[None], xb[None])[0])))
        return np.asarray(jac(zj, xj)).reshape(B, n, n), None

    def reference_fixed_point(self) -> np.ndarray:
        """``z*`` in float64: plain iteration from zero to relative residual 1e-14 (at most
        2000 steps), then dense Newton steps if that was not reached (cached)."""
        if self._z_star is None:
            z = np.zeros(self.shape)
            fz = self.f64(z)
            for _ in range(2000):
                z, fz = fz, self.f64(fz)
                if np.max(rel_residual(fz, z)) <= 1e-14:
                    break
            B, n = self.shape[0], self.n
            for _ in range(20):
                res = float(np.max(rel_residual(fz, z)))
                if res <= 1e-14:
                    break
                J, _ = self._jacobians_and_vjp_x(z, None)
                assert J is not None
                step = np.linalg.solve(np.eye(n)[None] - J, (fz - z).reshape(B, n, 1))
                z = z + step.reshape(self.shape)
                fz = self.f64(z)
            res = float(np.max(rel_residual(fz, z)))
            if res > 1e-12:
                raise RuntimeError(f"conv reference solve stalled at relative residual {res:.3g}")
            self._z_star = fz
        return self._z_star.copy()

    def reference_adjoint(self, g: np.ndarray) -> np.ndarray:
        """``u_b = (I - J_b(z*)^T)^{-1} g_b`` per sample from the dense Jacobian, float64."""
        B, n = self.shape[0], self.n
        if self._A_T is None:
            J, _ = self._jacobians_and_vjp_x(self.reference_fixed_point(), None)
            assert J is not None
            self._A_T = np.eye(n)[None] - np.transpose(J, (0, 2, 1))
        g = np.asarray(g, dtype=np.float64).reshape(B, n, 1)
        return np.linalg.solve(self._A_T, g).reshape(self.shape)

    def reference_input_grad(self, g: np.ndarray) -> np.ndarray:
        """``dL/dx = u^T df/dx`` at ``z*`` (``u`` the dense adjoint), ``(B, C, H, W)``."""
        u = self.reference_adjoint(g)
        _, gx = self._jacobians_and_vjp_x(self.reference_fixed_point(), u)
        assert gx is not None
        return gx

    def __repr__(self) -> str:
        B, C, H, W = self.shape
        return f"ConvProblem(B={B}, C={C}, H={H}, W={W}, groups={self.groups})"


def torch_conv_cell(groups: int) -> Callable[[Any, dict[str, Any], Any], Any]:
    """The conv cell ``cell(z, P, x)`` in torch, parameters ``P`` (keys of
    :meth:`ConvProblem.random`) passed explicitly (differentiable when they require grad)."""
    import torch
    import torch.nn.functional as F

    def cell(z: Any, P: dict[str, Any], x: Any) -> Any:
        h = F.conv2d(z, P["K1"], P["c1"], padding=1)
        h = torch.relu(F.group_norm(h, groups, P["gamma1"], P["beta1"], _GN_EPS))
        h = F.conv2d(h, P["K2"], P["c2"], padding=1)
        return F.group_norm(h + x, groups, P["gamma2"], P["beta2"], _GN_EPS)

    return cell


def jax_conv_cell(groups: int) -> Callable[[Any, dict[str, Any], Any], Any]:
    """The conv cell ``cell(z, P, x)`` in JAX (HIGHEST-precision convolutions), parameters
    ``P`` passed explicitly (a pytree JAX can differentiate)."""
    import jax
    import jax.numpy as jnp

    hi = jax.lax.Precision.HIGHEST

    def conv(h: Any, K: Any, c: Any) -> Any:
        out = jax.lax.conv_general_dilated(
            h,
            K,
            window_strides=(1, 1),
            padding=((1, 1), (1, 1)),
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
            precision=hi,
        )
        return out + c[None, :, None, None]

    def group_norm(h: Any, gamma: Any, beta: Any) -> Any:
        B, C, H, W = h.shape
        hg = h.reshape(B, groups, C // groups, H, W)
        mean = jnp.mean(hg, axis=(2, 3, 4), keepdims=True)
        var = jnp.mean(jnp.square(hg - mean), axis=(2, 3, 4), keepdims=True)
        hn = ((hg - mean) / jnp.sqrt(var + _GN_EPS)).reshape(B, C, H, W)
        return hn * gamma[None, :, None, None] + beta[None, :, None, None]

    def cell(z: Any, P: dict[str, Any], x: Any) -> Any:
        h = jax.nn.relu(group_norm(conv(z, P["K1"], P["c1"]), P["gamma1"], P["beta1"]))
        h = conv(h, P["K2"], P["c2"])
        return group_norm(h + x, P["gamma2"], P["beta2"])

    return cell
