"""Per-sample flattening of the solver state.

Solvers work on one ``(B, n)`` matrix: sample ``b`` is row ``b``. This module maps the
user's state to that view and back:

* a single array with the batch on ``batch_axis`` (moved to the front, the rest flattened);
* a tuple/list of arrays sharing the batch axis (the multi-resolution feature maps of a
  multiscale DEQ): each is flattened per sample and the pieces are concatenated;
* ``batch_axis=None``: the whole state is one system, viewed as ``(1, N)``.

``batch_axis="auto"`` (the default of every entry point) is ``0`` when every array of the
state has at least 2 dimensions (a ``(B, d)`` batch, ``(B, C, H, W)`` feature maps) and
``None`` otherwise: a 1-D or 0-D state -- what a scipy or optimistix user passes -- is one
system, never a batch of independent scalars (solving a coupled ``A @ z + c`` entry by entry
would report each entry converged at a wrong point).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

#: ``batch_axis`` type of the public entry points
BatchAxis = int | None | Literal["auto"]


@dataclass(frozen=True)
class Structure:
    """Shapes needed to go from the user's state to the ``(B, n)`` view and back."""

    container: type | None  # None for a single array, else tuple or list
    shapes: tuple[tuple[int, ...], ...]  # leaf shapes as the user gave them
    batch_axes: tuple[int | None, ...]  # normalised (non-negative) batch axis per leaf
    batch: int
    sizes: tuple[int, ...]  # per-sample number of entries of each leaf

    @property
    def n(self) -> int:
        return sum(self.sizes)

    def leaves(self, tree: Any) -> list[Any]:
        """The arrays of ``tree`` (a single array or a tuple/list) as a list."""
        return list(tree) if self.container is not None else [tree]

    @property
    def is_matrix(self) -> bool:
        """One ``(B, n)`` array with the batch first: the ``(B, n)`` view is the array itself."""
        return self.container is None and self.batch_axes == (0,) and len(self.shapes[0]) == 2

    def flatten(self, xp: Any, tree: Any) -> Any:
        """``tree`` -> ``(B, n)`` array."""
        if self.is_matrix:  # skips a reshape per f call (microseconds, every step)
            return tree
        parts = []
        for leaf, axis in zip(self.leaves(tree), self.batch_axes, strict=True):
            if axis is None:
                parts.append(xp.reshape(leaf, (1, -1)))
            else:
                if axis != 0:
                    leaf = xp.moveaxis(leaf, axis, 0)
                parts.append(xp.reshape(leaf, (self.batch, -1)))
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)

    def unflatten(self, xp: Any, flat: Any) -> Any:
        """``(B, n)`` array -> an object with the user's structure."""
        if self.is_matrix:
            return flat
        leaves = []
        offset = 0
        for shape, axis, size in zip(self.shapes, self.batch_axes, self.sizes, strict=True):
            piece = flat if len(self.sizes) == 1 else flat[:, offset : offset + size]
            offset += size
            if axis is None:
                leaves.append(xp.reshape(piece, shape))
            else:
                moved = (shape[axis],) + shape[:axis] + shape[axis + 1 :]
                leaf = xp.reshape(piece, moved)
                leaves.append(leaf if axis == 0 else xp.moveaxis(leaf, 0, axis))
        if self.container is None:
            return leaves[0]
        return self.container(leaves)


def resolve_batch_axis(z0: Any, batch_axis: BatchAxis) -> int | None:
    """``batch_axis`` with ``"auto"`` decided for ``z0`` (see the module docstring)."""
    if batch_axis != "auto":
        return batch_axis
    leaves = z0 if isinstance(z0, (tuple, list)) else [z0]
    return 0 if leaves and all(len(leaf.shape) >= 2 for leaf in leaves) else None


def structure_of(z0: Any, batch_axis: BatchAxis, name: str = "z0") -> Structure:
    """Describe ``z0`` (array or tuple/list of arrays) for :class:`Structure`.

    ``name``: what the error messages call the state (the caller's argument name).

    Raises:
        ValueError: empty sequence, a batch axis out of range for a leaf, leaves with
            different batch sizes, or a 0-d leaf with a batch axis.
    """
    if isinstance(z0, (tuple, list)) and len(z0) == 0:
        raise ValueError(f"{name} is an empty sequence; it needs at least one array")
    batch_axis = resolve_batch_axis(z0, batch_axis)
    if isinstance(z0, (tuple, list)):
        container: type | None = type(z0) if type(z0) in (tuple, list) else tuple
        leaves: Sequence[Any] = z0
    else:
        container, leaves = None, [z0]
    shapes: list[tuple[int, ...]] = []
    axes: list[int | None] = []
    sizes: list[int] = []
    batch = 1
    for i, leaf in enumerate(leaves):
        shape = tuple(int(s) for s in leaf.shape)
        where = name if container is None else f"{name}[{i}]"
        if batch_axis is None:
            axes.append(None)
            sizes.append(_prod(shape))
        else:
            if len(shape) == 0:
                raise ValueError(
                    f"{where} is 0-d but batch_axis={batch_axis}; "
                    "pass batch_axis=None to solve it as one system"
                )
            if not -len(shape) <= batch_axis < len(shape):
                raise ValueError(
                    f"batch_axis={batch_axis} is out of range for {where} of shape {shape}"
                )
            axis = batch_axis % len(shape)
            if i == 0:
                batch = shape[axis]
            elif shape[axis] != batch:
                raise ValueError(
                    f"every array of {name} must have the same batch size along batch_axis="
                    f"{batch_axis}: {name}[0] has {batch}, {where} has {shape[axis]}"
                )
            axes.append(axis)
            sizes.append(_prod(shape) // shape[axis] if shape[axis] else 0)
        shapes.append(shape)
    if batch == 0 or sum(sizes) == 0:
        raise ValueError(f"{name} has no entries (shapes {shapes}); nothing to solve")
    return Structure(container, tuple(shapes), tuple(axes), batch, tuple(sizes))


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def leaves_of(tree: Any) -> list[Any]:
    """The arrays of a state: ``[tree]``, or the entries of a tuple/list state."""
    return list(tree) if isinstance(tree, (tuple, list)) else [tree]


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """``fn`` applied leaf by leaf to states of one structure (tuple/list kept)."""
    if isinstance(tree, (tuple, list)):
        return type(tree)(fn(*xs) for xs in zip(tree, *rest, strict=True))
    return fn(tree, *rest)
