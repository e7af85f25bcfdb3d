"""The benchmark problems of shared/BENCHMARKS.md, held once in float64 NumPy, built on any
backend (:class:`~eqsolve.bench.case.Case`), with float64 references.

Problems (``make_problem(name, size=..., seed=...)``):

``tanh`` (P1), ``tanh-wide`` (P2), ``sym`` (P4)
    ``f(z) = tanh(z W^T + x U^T + b)``, draws from ``numpy.random.default_rng(seed)`` in the
    order W (or Q), U, b, x (the definitions, and so the numbers, of the former
    ``bench/problems.py``). ``tanh``: W Gaussian scaled to ``||W||_2 = 0.9``; ``tanh-wide``:
    ``||W||_2 = 2.0``; ``sym``: ``W = Q diag(linspace(0, 0.99, d)) Q^T`` and the input
    injection scaled by 0.1 (folded into U and b). ``U = N / sqrt(p)``, ``b = 0.1 N``,
    ``x = N``. Sizes: d=256, p=64, B=64 (``tiny``: d=16, p=8, B=4).
``digits``
    The same cell with weights trained on scikit-learn's bundled 8x8 digits by
    ``bench/train_digits_cell.py`` (stored in ``data/digits_cell.npz``; d=128, p=64). ``x`` is
    a batch of held-out test images, pixels scaled to [0, 1] (``x = pixels / 16``): the first
    B=64 of the stored test split for ``seed=0`` (``tiny``: B=4), a seeded random choice of
    B test images otherwise.
``conv``
    An MDEQ-style convolutional cell on ``(B, C, H, W)`` feature maps (torch and jax only)::

        f(z) = GN2( x + conv2( relu( GN1( conv1(z) ) ) ) )

    3x3 convolutions with bias and zero padding 1 (NCHW, weights OIHW), GroupNorm with
    ``groups`` groups, eps 1e-5 and an affine scale/shift; ``x`` is the injected feature map.
    It is MDEQ's residual block without the residual branch and the last GroupNorm: ``conv2``
    is scaled (``conv2_scale``) so that the cell contracts near its fixed point and plain
    iteration converges in tens of steps. Draws from ``default_rng(seed)`` in the order
    K1, K2, c1, c2, gamma1, gamma2, beta1, beta2, x: ``K1 = N / sqrt(9 C)``,
    ``K2 = conv2_scale * N / sqrt(9 C)``, ``c = 0.1 N``, ``gamma = 1 + 0.1 N``,
    ``beta = 0.1 N``, ``x = N``. Sizes: B=16, C=16, 8x8, 4 groups (``tiny``: B=2, C=4, 4x4,
    2 groups).

Every backend gets the same inputs: parameters are float64 NumPy, cast to the dtype (so float32
inputs are bit-identical across backends). The references (``residual``,
``reference_fixed_point``, ``reference_adjoint``, ``reference_input_grad``) are float64 and
independent of eqsolve: dense per-sample Jacobians and Newton's method.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import BackendUnavailableError
from .case import Case, Problem

__all__ = [
    "BACKENDS",
    "DEFAULT_PROBLEMS",
    "DIGITS_FILE",
    "DTYPES",
    "PROBLEMS",
    "SIZES",
    "ConvProblem",
    "TanhProblem",
    "digits_accuracy",
    "load_digits_cell",
    "make_problem",
    "tanh_fixed_point",
]

PROBLEMS = ("tanh", "tanh-wide", "sym", "digits", "conv")
DEFAULT_PROBLEMS = ("tanh", "sym", "digits")
SIZES = ("default", "tiny")
DTYPES = ("float32", "float64")
#: backend name -> the framework whose arrays it uses
BACKENDS = {
    "numpy": "numpy",
    "torch": "torch",
    "torch-cuda": "torch",
    "jax": "jax",
    "cupy": "cupy",
}
#: the trained digits cell (written by ``bench/train_digits_cell.py``)
DIGITS_FILE = Path(__file__).resolve().parent / "data" / "digits_cell.npz"

_TANH_SIZES = {"default": (256, 64, 64), "tiny": (16, 8, 4)}  # d, p, B
_DIGITS_BATCH = {"default": 64, "tiny": 4}
_CONV_SIZES = {"default": (16, 16, 8, 8, 4), "tiny": (2, 4, 4, 4, 2)}  # B, C, H, W, groups
_CONV_SCALE = 0.8  # conv2_scale
_GN_EPS = 1e-5


def make_problem(name: str, *, size: str = "default", seed: int = 0) -> Problem:
    """The benchmark problem ``name`` (one of :data:`PROBLEMS`) at ``size`` ("default" or
    "tiny": small sizes for tests and smoke runs), drawn from ``default_rng(seed)``."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if name in ("tanh", "tanh-wide", "sym"):
        d, p, B = _TANH_SIZES[size]
        return _random_tanh(name, d, p, B, seed)
    if name == "digits":
        return _digits(_DIGITS_BATCH[size], seed)
    if name == "conv":
        B, C, H, W, groups = _CONV_SIZES[size]
        return ConvProblem.random(B, C, H, W, groups, seed=seed)
    raise ValueError(f"unknown problem {name!r}; choose one of {', '.join(PROBLEMS)}")


# --------------------------------------------------------------------------- backends


def _check(backend: str, dtype: str, frameworks: tuple[str, ...], name: str) -> str:
    """The framework of ``backend``; errors for unknown names and missing libraries/devices."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    fw = BACKENDS[backend]
    if fw not in frameworks:
        raise ValueError(
            f"problem {name!r} cannot be built on {backend!r}: it runs on {', '.join(frameworks)}"
        )
    if importlib.util.find_spec(fw) is None:
        raise BackendUnavailableError(f"backend {backend!r} needs {fw}, which is not installed")
    if backend == "torch-cuda":
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailableError("backend 'torch-cuda' needs a CUDA GPU visible to torch")
    if backend == "cupy":
        import cupy

        if not cupy.cuda.is_available():
            raise BackendUnavailableError("backend 'cupy' needs a CUDA GPU visible to cupy")
    if fw == "jax" and dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    return fw


class _Native:
    """Moves float64 NumPy arrays onto one backend in one dtype; sync/to_numpy for the Case."""

    def __init__(self, backend: str, dtype: str):
        self.backend, self.dtype = backend, dtype
        self.framework = BACKENDS[backend]
        self.sync: Callable[[Any], Any] = _identity
        self.to_numpy: Callable[[Any], np.ndarray] = np.asarray
        self.device_name = "cpu"
        if self.framework == "torch":
            import torch

            self.device = torch.device("cuda" if backend == "torch-cuda" else "cpu")
            self.device_name = str(self.device)
            self.to_numpy = _torch_to_numpy
            if backend == "torch-cuda":
                self.sync = _torch_cuda_sync
        elif self.framework == "jax":
            import jax

            self.sync = jax.block_until_ready
            self.device_name = str(jax.devices()[0])
        elif self.framework == "cupy":
            import cupy

            self.sync = _cupy_sync
            self.device_name = f"cuda:{cupy.cuda.Device().id}"
            self.to_numpy = cupy.asnumpy

    def case(
        self,
        problem: Any,
        f: Callable[[Any], Any],
        f_x: Callable[[Any, Any], Any],
        z0: Any,
        x: Any,
    ) -> Case:
        """The :class:`Case` of ``problem`` (its ``name`` and ``meta``) on this backend."""
        return Case(
            problem=problem.name,
            backend=self.backend,
            framework=self.framework,
            dtype=self.dtype,
            f=f,
            z0=z0,
            x=x,
            f_x=f_x,
            sync=self.sync,
            to_numpy=self.to_numpy,
            meta={**problem.meta, "device": self.device_name},
        )

    def __call__(self, a: np.ndarray) -> Any:
        """``a`` (float64 NumPy) cast to the dtype first, then moved: identical inputs."""
        a = np.ascontiguousarray(np.asarray(a, dtype=np.float64).astype(self.dtype))
        if self.framework == "torch":
            import torch

            return torch.from_numpy(a.copy()).to(self.device)
        if self.framework == "jax":
            import jax.numpy as jnp

            out = jnp.asarray(a)
            if out.dtype != a.dtype:
                raise RuntimeError(f"jax made {out.dtype} of {a.dtype} (is jax_enable_x64 off?)")
            return out
        if self.framework == "cupy":
            import cupy

            return cupy.asarray(a)
        return a


def _identity(a: Any) -> Any:
    return a


def _torch_to_numpy(a: Any) -> np.ndarray:
    return np.asarray(a.detach().cpu().numpy())


def _torch_cuda_sync(a: Any) -> Any:
    import torch

    torch.cuda.synchronize()
    return a


def _cupy_sync(a: Any) -> Any:
    import cupy

    cupy.cuda.get_current_stream().synchronize()
    return a


def _rel_residual(fz: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per-sample ``||f(z) - z|| / ||f(z)||`` (2-norms over all non-batch axes)."""
    B = fz.shape[0]
    num = np.linalg.norm((fz - z).reshape(B, -1), axis=1)
    den = np.linalg.norm(fz.reshape(B, -1), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), num)


# --------------------------------------------------------------------------- tanh cells


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
        res = float(np.max(_rel_residual(fz, z)))
        if res <= tol:
            return fz
        A = eye[None] - (1.0 - fz**2)[:, :, None] * W[None]  # I - J_b
        z = z + np.linalg.solve(A, (fz - z)[..., None])[..., 0]
    fz = np.tanh(z @ W.T + inj)
    res = float(np.max(_rel_residual(fz, z)))
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
        return _rel_residual(self.f64(z), z)

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
        fw = _check(backend, dtype, self.frameworks, self.name)
        nat = _Native(backend, dtype)
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


def _random_tanh(name: str, d: int, p: int, batch: int, seed: int) -> TanhProblem:
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


# --------------------------------------------------------------------------- digits

_DIGITS_ARRAYS = ("W", "U", "b", "head_W", "head_b")


def load_digits_cell(path: str | Path | None = None) -> dict[str, Any]:
    """The trained digits cell: weights (``W``, ``U``, ``b``, ``head_W``, ``head_b``) as
    float64, ``test_x`` (preprocessed test images, float64), ``test_labels`` (int64), and
    the scalar/str entries (``test_accuracy``, ``preprocessing``, ``command``, ...)."""
    path = DIGITS_FILE if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; regenerate it with python bench/train_digits_cell.py"
        )
    out: dict[str, Any] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            a = data[key]
            if key in _DIGITS_ARRAYS:
                out[key] = a.astype(np.float64)
            elif key == "test_images":
                out["test_x"] = a.astype(np.float64) / float(data["pixel_max"])
            elif key == "test_labels":
                out[key] = a.astype(np.int64)
            elif a.ndim == 0:
                out[key] = a.item()
            else:
                out[key] = a
    return out


def digits_accuracy(cell: dict[str, Any]) -> float:
    """Test accuracy of a :func:`load_digits_cell` dict: float64 Newton fixed point of every
    test image (to 1e-14), linear head, argmax."""
    inj = cell["test_x"] @ cell["U"].T + cell["b"]
    z = tanh_fixed_point(cell["W"], inj)
    pred = np.argmax(z @ cell["head_W"].T + cell["head_b"], axis=1)
    return float(np.mean(pred == cell["test_labels"]))


def _digits(batch: int, seed: int) -> TanhProblem:
    cell = load_digits_cell()
    n_test = cell["test_x"].shape[0]
    if seed == 0:
        idx = np.arange(batch)
    else:
        idx = np.sort(np.random.default_rng(seed).choice(n_test, batch, replace=False))
    info = {
        "seed": seed,
        "test_indices": idx.tolist() if batch <= 16 else f"{batch} of {n_test} (seed {seed})",
        "preprocessing": cell["preprocessing"],
        "test_accuracy": cell["test_accuracy"],
        "contraction": cell["contraction"],
        "trained_by": cell["command"],
    }
    return TanhProblem("digits", cell["W"], cell["U"], cell["b"], cell["test_x"][idx], info=info)


# --------------------------------------------------------------------------- conv cell


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
        self._ref: tuple[str, _Native, Callable[[Any, Any], Any]] | None = None

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
    def _torch_cell(self, nat: _Native) -> Callable[[Any, Any], Any]:
        import torch
        import torch.nn.functional as F

        P = {k: nat(v) for k, v in self.params.items()}
        G = self.groups

        def cell(z: Any, x: Any) -> Any:
            h = F.conv2d(z, P["K1"], P["c1"], padding=1)
            h = torch.relu(F.group_norm(h, G, P["gamma1"], P["beta1"], _GN_EPS))
            h = F.conv2d(h, P["K2"], P["c2"], padding=1)
            return F.group_norm(h + x, G, P["gamma2"], P["beta2"], _GN_EPS)

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

    def _jax_cell(self, nat: _Native) -> Callable[[Any, Any], Any]:
        import jax
        import jax.numpy as jnp

        P = {k: nat(v) for k, v in self.params.items()}
        G = self.groups
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
            hg = h.reshape(B, G, C // G, H, W)
            mean = jnp.mean(hg, axis=(2, 3, 4), keepdims=True)
            var = jnp.mean(jnp.square(hg - mean), axis=(2, 3, 4), keepdims=True)
            hn = ((hg - mean) / jnp.sqrt(var + _GN_EPS)).reshape(B, C, H, W)
            return hn * gamma[None, :, None, None] + beta[None, :, None, None]

        def cell(z: Any, x: Any) -> Any:
            h = jax.nn.relu(group_norm(conv(z, P["K1"], P["c1"]), P["gamma1"], P["beta1"]))
            h = conv(h, P["K2"], P["c2"])
            return group_norm(h + x, P["gamma2"], P["beta2"])

        return cell

    def build(self, backend: str, dtype: str) -> Case:
        """The cell on "torch", "torch-cuda" or "jax" (jitted) in ``dtype``."""
        fw = _check(backend, dtype, self.frameworks, self.name)
        nat = _Native(backend, dtype)
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
    def _ref_cell(self) -> tuple[str, _Native, Callable[[Any, Any], Any]]:
        """The float64 cell used by the references: torch if installed, else jax (cached)."""
        if self._ref is None:
            fw = next((m for m in ("torch", "jax") if importlib.util.find_spec(m)), None)
            if fw is None:
                raise BackendUnavailableError("the conv problem's references need torch or jax")
            _check(fw, "float64", self.frameworks, self.name)
            nat = _Native(fw, "float64")
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
        return _rel_residual(self.f64(z), z)

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
                if np.max(_rel_residual(fz, z)) <= 1e-14:
                    break
            B, n = self.shape[0], self.n
            for _ in range(20):
                res = float(np.max(_rel_residual(fz, z)))
                if res <= 1e-14:
                    break
                J, _ = self._jacobians_and_vjp_x(z, None)
                assert J is not None
                step = np.linalg.solve(np.eye(n)[None] - J, (fz - z).reshape(B, n, 1))
                z = z + step.reshape(self.shape)
                fz = self.f64(z)
            res = float(np.max(_rel_residual(fz, z)))
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
