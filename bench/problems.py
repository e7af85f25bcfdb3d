"""The benchmark problems, held once in float64 NumPy, built on any
backend (:class:`~bench.case.Case`), with float64 references.

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

from .case import Problem
from .conv import CONV_SIZES, ConvProblem
from .digits import DIGITS_BATCH, DIGITS_FILE, digits_accuracy, digits_problem, load_digits_cell
from .native import BACKENDS, DTYPES
from .tanh import TANH_SIZES, TanhProblem, random_tanh, tanh_fixed_point

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


def make_problem(name: str, *, size: str = "default", seed: int = 0) -> Problem:
    """The benchmark problem ``name`` (one of :data:`PROBLEMS`) at ``size`` ("default" or
    "tiny": small sizes for tests and smoke runs), drawn from ``default_rng(seed)``."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if name in ("tanh", "tanh-wide", "sym"):
        d, p, B = TANH_SIZES[size]
        return random_tanh(name, d, p, B, seed)
    if name == "digits":
        return digits_problem(DIGITS_BATCH[size], seed)
    if name == "conv":
        B, C, H, W, groups = CONV_SIZES[size]
        return ConvProblem.random(B, C, H, W, groups, seed=seed)
    raise ValueError(f"unknown problem {name!r}; choose one of {', '.join(PROBLEMS)}")

