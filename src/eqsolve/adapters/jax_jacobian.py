"""Jacobian regularisation for JAX DEQs: a Hutchinson estimate of ``||J_f(z*)||_F^2``.

Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization", ICML 2021
(arXiv:2106.14342). Adding ``gamma * jacobian_reg(f, z*, *args, key=key)`` to the training
loss keeps the cell's Jacobian at the equilibrium small, so the fixed point stays well
conditioned and the forward and backward solvers need fewer iterations.

Math. For sample ``b`` with state ``z_b`` of ``d`` elements and per-sample Jacobian
``J_b = d f(z)_b / d z_b`` (``d x d``) at ``z*``, Hutchinson's identity gives

    ||J_b||_F^2 = tr(J_b^T J_b) = E_eps ||eps^T J_b||_2^2,        eps ~ N(0, I_d),

and each ``eps^T J_b`` is one vector-Jacobian product (``jax.vjp``; no Jacobian is formed).
With ``n`` probes ``eps_1 .. eps_n`` the per-sample estimate is

    R_b = (1 / (n d)) sum_k ||eps_k^T J_b||_2^2        (unbiased for ||J_b||_F^2 / d),

the per-element normalisation of the paper (its reference code divides the batch sum of
``||eps^T J||^2`` by ``B * d``, i.e. returns the batch mean of ``R_b``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp

from ..core.validation import JACOBIAN_REG_REDUCTIONS, check_jacobian_reg_arguments

__all__ = ["REDUCTIONS", "jacobian_reg"]

#: accepted ``reduction=`` values
REDUCTIONS = JACOBIAN_REG_REDUCTIONS


def cell_and_point(f: Any, z_star: Any) -> tuple[Any, list[Any], Any]:
    """``z_star`` as constant arrays (``lax.stop_gradient``), its leaves and tree, after
    checking that ``f`` is callable and every leaf real floating (the diagnostics at z*)."""
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    z = jax.tree_util.tree_map(lambda t: jax.lax.stop_gradient(jnp.asarray(t)), z_star)
    leaves, tree = jax.tree_util.tree_flatten(z)
    if not leaves:
        raise ValueError("z_star has no arrays")
    for t in leaves:
        if not jnp.issubdtype(t.dtype, jnp.floating):
            raise TypeError(f"z_star must hold real floating arrays, got dtype {t.dtype}")
    return z, leaves, tree


def output_leaves(out: Any, leaves: list[Any], tree: Any) -> tuple[list[Any], Any]:
    """The leaves and tree of ``f(z, *args)``, checked against z*'s ``leaves`` and ``tree``."""
    got, got_tree = jax.tree_util.tree_flatten(out)
    same: bool = cast(Any, got_tree) == tree
    if not same or any(o.shape != t.shape for o, t in zip(got, leaves, strict=True)):
        raise ValueError(
            f"f(z, *args) must return the structure and shapes of z_star: got {got_tree} "
            f"{[o.shape for o in got]} for {tree} {[t.shape for t in leaves]}"
        )
    return got, got_tree


def _per_sample_sq(v: Any, batch_axis: int | None) -> Any:
    """Sum of squares over every axis but the batch axis: ``(B,)`` (0-d for None)."""
    if batch_axis is None:
        return jnp.sum(jnp.square(v))
    axes = tuple(a for a in range(v.ndim) if a != batch_axis % v.ndim)
    return jnp.sum(jnp.square(v), axis=axes)


def jacobian_reg(
    f: Callable[..., Any],
    z_star: Any,
    *args: Any,
    key: Any,
    n_samples: int = 1,
    batch_axis: int | None = 0,
    reduction: str = "mean",
) -> Any:
    """Hutchinson estimate of ``||J_f(z*)||_F^2 / d`` per sample, as a differentiable loss term.

    One ``jax.vjp`` of ``z -> f(z, *args)`` at ``z*`` and ``n_samples`` VJPs
    ``eps^T J_f(z*)`` (vectorised with ``jax.vmap``). Plain JAX: works under ``jit``,
    ``vmap`` and ``grad`` (any order); the gradient reaches ``args`` and every array ``f``
    closes over. See the module docstring for the math.

    ``z*`` is wrapped in ``lax.stop_gradient``: the term is evaluated at the given point and
    differentiated with respect to ``args`` (and closed-over arrays) at fixed ``z*``, as in
    Bai et al.'s reference implementation. The dependence of ``z*`` on the parameters is
    deliberately ignored (it would need a second-order implicit derivative). So pass
    ``sol.value`` of :func:`eqsolve.jax.fixed_point` as it is; gradients of
    ``loss + gamma * reg`` are the implicit gradient of ``loss`` plus the partial derivative
    of ``reg``.

    Args:
        f: the cell, ``f(z, *args)`` with the same structure and shapes as ``z_star`` (the
            signature of :func:`eqsolve.jax.fixed_point`). Samples along ``batch_axis``
            should be independent (then the batch Jacobian is block diagonal and ``R_b``
            estimates sample ``b``'s block; otherwise the sum of ``R_b * d`` still
            estimates the squared Frobenius norm of the whole Jacobian).
        z_star: the point (usually the fixed point): an array or a pytree of arrays sharing
            the batch axis (multi-scale states; ``d`` is then their total number of elements
            per sample).
        *args: pytrees passed to ``f`` (parameters, input injection); differentiable.
        key: a ``jax.random`` key (``jax.random.key`` or ``jax.random.PRNGKey``), required:
            the probes are ``eps_k = jax.random.normal(keys[k], shape, dtype)`` with
            ``keys = jax.random.split(key, n_samples)`` (for a pytree state ``keys[k]`` is
            split once more, one key per leaf, in ``tree_leaves`` order).
        n_samples: probes ``eps`` averaged per sample (the paper uses 1).
        batch_axis: the axis of independent samples; ``None``: the whole state is one sample.
        reduction: ``"mean"`` (default): the scalar ``(1/B) sum_b R_b`` (the paper's
            normalisation); ``"none"``: the per-sample estimates ``R_b``, shape ``(B,)``
            (0-d when ``batch_axis`` is None).

    Returns:
        ``R`` as above: an estimate of ``||J_b||_F^2 / d`` (squared Frobenius norm divided by
        the per-sample dimension ``d``), averaged over the batch for ``"mean"``.

    Raises:
        ValueError / TypeError: bad arguments, or ``f`` returns a different structure.

    Reference:
        Bai, Koltun, Kolter (2021), "Stabilizing Equilibrium Models by Jacobian
        Regularization", ICML. Hutchinson (1989), "A stochastic estimator of the trace of the
        influence matrix for Laplacian smoothing splines".

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from eqsolve.jax import fixed_point, jacobian_reg
        >>> cell = lambda z, W, x: jnp.tanh(z @ W.T + x)
        >>> def loss(W, x, key):
        ...     z = fixed_point(cell, jnp.zeros_like(x), W, x).value
        ...     return jnp.mean(z**2) + 0.5 * jacobian_reg(cell, z, W, x, key=key)
        >>> W = 0.3 * jax.random.normal(jax.random.key(0), (8, 8))
        >>> x = jax.random.normal(jax.random.key(1), (4, 8))
        >>> g = jax.jit(jax.grad(loss))(W, x, jax.random.key(2))
    """
    check_jacobian_reg_arguments(n_samples, batch_axis, reduction)
    z, z_leaves, z_def = cell_and_point(f, z_star)
    out, vjp = jax.vjp(lambda zz: f(zz, *args), z)
    out_leaves, out_def = output_leaves(out, z_leaves, z_def)
    if batch_axis is None:
        d = sum(t.size for t in z_leaves)
    else:
        d = sum(t.size // max(t.shape[batch_axis], 1) for t in z_leaves)

    def one_probe(k: Any) -> Any:
        ks = [k] if len(out_leaves) == 1 else list(jax.random.split(k, len(out_leaves)))
        eps = [
            jax.random.normal(kk, o.shape, o.dtype) for kk, o in zip(ks, out_leaves, strict=True)
        ]
        (eps_j,) = vjp(jax.tree_util.tree_unflatten(out_def, eps))
        return sum(_per_sample_sq(v, batch_axis) for v in jax.tree_util.tree_leaves(eps_j))

    keys = jax.random.split(key, n_samples)
    est = jnp.sum(jax.vmap(one_probe)(keys), axis=0) / (n_samples * d)
    return jnp.mean(est) if reduction == "mean" else est
