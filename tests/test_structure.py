"""Multi-scale (tuple/list) states and the per-sample flattening of ``core.structure``."""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import array_namespace

import eqsolve
from conftest import AVAILABLE, from_numpy, to_numpy
from eqsolve.backends import get_backend
from eqsolve.core.structure import structure_of
from problems import tanh_cell

if "torch" in AVAILABLE:  # keep the suite single-threaded (a small VM stalls with >1 thread)
    import torch

    torch.set_num_threads(1)
else:  # pragma: no cover - torch is optional
    torch = None

B = 4
SHAPES = [(B, 3), (B, 2, 4), (B, 5)]  # 3 + 8 + 5 = 16 entries per sample
SIZES = [3, 8, 5]
CELL = tanh_cell(d=16, batch=B, radius=0.9, seed=11)


def multiscale_f(zs):
    """The 16-dim tanh cell acting on the three pieces (it couples all of them)."""
    xp = array_namespace(*zs)
    flat = xp.concat([xp.reshape(z, (B, -1)) for z in zs], axis=1)
    out = CELL(flat)
    pieces, offset = [], 0
    for shape, size in zip(SHAPES, SIZES, strict=True):
        pieces.append(xp.reshape(out[:, offset : offset + size], shape))
        offset += size
    return type(zs)(pieces)


def _leaves_np(seed=0):
    rng = np.random.default_rng(seed)
    return [0.1 * rng.standard_normal(s) for s in SHAPES]


@pytest.mark.parametrize("container", [tuple, list])
def test_multiscale_matches_flat_system(backend, container):
    leaves = _leaves_np()
    z0 = container(from_numpy(a, backend) for a in leaves)
    flat0 = np.concatenate([a.reshape(B, -1) for a in leaves], axis=1)

    # (the layout code is solver-independent: Picard keeps the JAX compile cheap; every
    # solver is run on a multi-scale state in test_multiscale_every_solver)
    sol = eqsolve.solve(multiscale_f, z0, solver="picard", tol=1e-10)
    ref = eqsolve.solve(CELL, flat0, solver="picard", tol=1e-10)  # NumPy, flat

    assert type(sol.value) is container
    assert len(sol.value) == 3
    for got, shape, leaf in zip(sol.value, SHAPES, z0, strict=True):
        assert tuple(got.shape) == shape
        assert type(got) is type(leaf)
        assert got.dtype == leaf.dtype
    for leaf, orig in zip(z0, leaves, strict=True):  # the caller's arrays are untouched
        np.testing.assert_array_equal(to_numpy(leaf), orig)
    got_flat = np.concatenate([to_numpy(v).reshape(B, -1) for v in sol.value], axis=1)
    np.testing.assert_allclose(got_flat, ref.value, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(to_numpy(sol.iterations), ref.iterations)
    assert int(sol.nfev) == ref.nfev
    np.testing.assert_allclose(to_numpy(sol.residual), ref.residual, rtol=0, atol=1e-15)
    assert to_numpy(sol.converged).all()


@pytest.mark.parametrize("solver", ["picard", "anderson", "broyden"])
def test_multiscale_every_solver(solver):
    leaves = _leaves_np(seed=1)
    sol = eqsolve.solve(multiscale_f, tuple(leaves), solver=solver, tol=1e-10)
    ref = eqsolve.solve(CELL, np.concatenate([a.reshape(B, -1) for a in leaves], axis=1),
                              solver=solver, tol=1e-10)
    got = np.concatenate([v.reshape(B, -1) for v in sol.value], axis=1)
    np.testing.assert_allclose(got, ref.value, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(sol.iterations, ref.iterations)
    # independent check of f(z) = z on the multi-scale state
    fz = multiscale_f(sol.value)
    for a, b in zip(fz, sol.value, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)


def test_multiscale_batch_on_last_axis():
    """Leaves of different ranks share the batch on axis -1."""
    leaves = _leaves_np(seed=2)
    moved = tuple(np.moveaxis(a, 0, -1).copy() for a in leaves)

    def f_last(zs):
        out = multiscale_f(tuple(np.moveaxis(z, -1, 0) for z in zs))
        return tuple(np.moveaxis(o, 0, -1) for o in out)

    sol = eqsolve.solve(f_last, moved, tol=1e-10, batch_axis=-1)
    ref = eqsolve.solve(multiscale_f, tuple(leaves), tol=1e-10)
    assert sol.converged.shape == (B,)
    for got, want in zip(sol.value, ref.value, strict=True):
        np.testing.assert_allclose(got, np.moveaxis(want, 0, -1), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(sol.iterations, ref.iterations)


def test_batch_size_mismatch_raises(backend):
    z0 = (from_numpy(np.zeros((3, 2)), backend), from_numpy(np.zeros((4, 2)), backend))
    with pytest.raises(ValueError, match="batch size"):
        eqsolve.solve(lambda z: z, z0)
    # the same arrays are fine as one system, and along an axis where the sizes agree
    structure_of(z0, None)
    assert structure_of(z0, 1).batch == 2


def test_empty_and_0d_inputs_raise():
    with pytest.raises(ValueError):
        structure_of((), 0)
    with pytest.raises(ValueError, match="0-d"):
        structure_of(np.float64(1.0) * np.ones(()), 0)
    with pytest.raises(ValueError, match="out of range"):
        structure_of(np.zeros((2, 3)), 2)
    with pytest.raises(ValueError, match="out of range"):
        structure_of(np.zeros((2, 3)), -3)


# --------------------------------------------------------------------------------------
# flatten / unflatten round trip
# --------------------------------------------------------------------------------------


def _expected_flat(leaves_np, batch_axis):
    """The (B, n) view, built independently with NumPy."""
    if batch_axis is None:
        return np.concatenate([a.reshape(-1) for a in leaves_np])[None, :]
    rows = [np.moveaxis(a, batch_axis, 0) for a in leaves_np]
    return np.concatenate([r.reshape(r.shape[0], -1) for r in rows], axis=1)


_TREES = {
    # batch of 2 on every axis used below (0, 1 and -1)
    "array": lambda rng: rng.standard_normal((2, 2, 3, 2)),
    "tuple": lambda rng: (rng.standard_normal((2, 2, 3, 2)), rng.standard_normal((2, 2)),
                          rng.standard_normal((2, 2, 4, 2))),
    "list": lambda rng: [rng.standard_normal((2, 2, 5, 2)), rng.standard_normal((2, 2, 1, 2))],
}


@pytest.mark.parametrize("kind", list(_TREES))
@pytest.mark.parametrize("batch_axis", [0, 1, -1, None])
def test_flatten_unflatten_round_trip(backend, kind, batch_axis):
    xp = get_backend(backend).xp
    tree_np = _TREES[kind](np.random.default_rng(0))
    leaves_np = tree_np if isinstance(tree_np, (tuple, list)) else [tree_np]
    tree = (type(tree_np)(from_numpy(a, backend) for a in tree_np)
            if isinstance(tree_np, (tuple, list)) else from_numpy(tree_np, backend))

    s = structure_of(tree, batch_axis)
    flat = s.flatten(xp, tree)
    expected = _expected_flat(leaves_np, batch_axis)
    assert tuple(flat.shape) == expected.shape
    assert s.batch == expected.shape[0] and s.n == expected.shape[1]
    np.testing.assert_array_equal(to_numpy(flat), expected)

    back = s.unflatten(xp, flat)
    if isinstance(tree_np, (tuple, list)):
        assert type(back) is type(tree_np)
        assert len(back) == len(tree_np)
        back_leaves = list(back)
    else:
        assert not isinstance(back, (tuple, list))
        back_leaves = [back]
    for got, want in zip(back_leaves, leaves_np, strict=True):
        assert tuple(got.shape) == want.shape
        np.testing.assert_array_equal(to_numpy(got), want)

    # unflatten of a different (B, n) matrix puts each row into its own sample
    marker = np.arange(expected.size, dtype=np.float64).reshape(expected.shape)
    tree2 = s.unflatten(xp, from_numpy(marker, backend))
    np.testing.assert_array_equal(to_numpy(s.flatten(xp, tree2)), marker)
    if batch_axis is not None:
        for got in (tree2 if isinstance(tree2, (tuple, list)) else [tree2]):
            rows = np.moveaxis(to_numpy(got), batch_axis, 0).reshape(expected.shape[0], -1)
            # every entry of sample b comes from row b of the marker matrix
            assert all(np.isin(rows[b], marker[b]).all() for b in range(expected.shape[0]))
