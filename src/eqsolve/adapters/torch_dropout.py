"""Dropout that keeps a fixed point: one mask per forward solve (PyTorch).

An ordinary ``nn.Dropout`` inside a DEQ cell draws a new mask at every call of ``f``, so in
training mode ``f`` changes from one solver iteration to the next and has no fixed point:
the solve cannot converge and the implicit gradient is that of a map nobody solved.
*Variational* dropout (Gal & Ghahramani, "A Theoretically Grounded Application of Dropout
in Recurrent Neural Networks", NeurIPS 2016; used in DEQs by Bai, Kolter & Koltun, "Deep
Equilibrium Models", NeurIPS 2019) draws the mask once and reuses it for every call of
``f`` in one solve, so ``f`` is one fixed map per solve.

How a solve is told apart: :func:`eqsolve.torch.fixed_point` (and so ``DEQ``) runs inside
:func:`solve_scope`, which sets a fresh token in a ``contextvars.ContextVar``. A
:class:`VariationalDropout` draws its mask at its first call under a token and keeps it *in
that token*, reusing it for every later call under it -- also for the extra differentiable call
``f(z*)``, the phantom steps, and a backward pass that calls ``f`` again after the solve
(explicit ``args``: it re-enters the solve's scope, :func:`same_scope`, and finds that solve's
mask even if a later solve has drawn another). A solve nested in another's
``f`` (a DEQ inside a DEQ's cell) keeps the outer token: were its masks redrawn per inner
solve, the outer ``f`` would change at every outer iteration and have no fixed point.
Outside any solve (``f`` called by hand, ``jacobian_reg(f, z*)`` after the solve) the latest
mask is kept, so ``f`` is the map that was solved; it is redrawn there only when the input's
shape changes, or after :meth:`VariationalDropout.reset`.

:func:`dropout_watch` makes the first call of ``f`` in each solve look for the ordinary
kind: a global forward pre-hook, registered for that one call only, notes every
``nn.Dropout``-family module running in training mode with ``p > 0`` and a
``RuntimeWarning`` names them. (``torch.nn.functional.dropout`` called directly is not a
module and is not seen.)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .reporting import warn

__all__ = ["VariationalDropout", "dropout_watch", "same_scope", "solve_scope"]

class _Solve:
    """One solve's token. It holds the masks drawn in that solve (by module), so a backward
    that re-enters the scope later (:func:`same_scope`) finds that solve's masks even after
    another solve has drawn new ones; they are freed with the token (with the graph)."""

    __slots__ = ("masks",)

    def __init__(self) -> None:
        self.masks: dict[nn.Module, torch.Tensor] = {}


#: the current solve's token (``None`` outside every solve)
_SOLVE: contextvars.ContextVar[_Solve | None] = contextvars.ContextVar(
    "eqsolve_torch_solve", default=None
)

#: modules that draw a new mask at every call in training mode
_ORDINARY_DROPOUT = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


@contextlib.contextmanager
def solve_scope() -> Iterator[None]:
    """Everything inside is one forward solve: variational masks are drawn once in it.

    Only the outermost scope sets a token (see the module doc on nested solves).
    """
    token = _SOLVE.set(_SOLVE.get() or _Solve())
    try:
        yield
    finally:
        _SOLVE.reset(token)


def same_scope() -> Callable[[], contextlib.AbstractContextManager[None]]:
    """A context-manager factory that re-enters the current solve's scope later (a backward
    pass that calls ``f`` again after the solve returned uses the masks of that solve)."""
    token = _SOLVE.get()

    @contextlib.contextmanager
    def scope() -> Iterator[None]:
        reset = _SOLVE.set(token)
        try:
            yield
        finally:
            _SOLVE.reset(reset)

    return scope


def dropout_watch(f: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``f`` whose first call warns when an ordinary dropout module runs in training mode."""
    first = [True]

    def watched(z: Any) -> Any:
        if not first[0]:
            return f(z)
        first[0] = False
        seen: list[str] = []

        def hook(module: nn.Module, _args: Any) -> None:
            if isinstance(module, _ORDINARY_DROPOUT) and module.training and module.p > 0:
                seen.append(type(module).__name__)

        handle = nn.modules.module.register_module_forward_pre_hook(hook)
        try:
            out = f(z)
        finally:
            handle.remove()
        if seen:
            warn(
                f"f runs {', '.join(sorted(set(seen)))} in training mode: it draws a new mask "
                "at every call of f, so f has no fixed point and the solve and its gradient "
                "are not those of one map. Use eqsolve.torch.VariationalDropout (one mask per "
                "solve), or put the module in eval() mode.",
                RuntimeWarning,
            )
        return out

    return watched


class VariationalDropout(nn.Module):
    """Dropout with one mask per forward solve: ``x * m / (1 - p)``, ``m ~ Bernoulli(1 - p)``.

    Drop it into a DEQ cell where ``nn.Dropout`` would go. In training mode the mask is
    drawn at the first call in each :func:`eqsolve.torch.fixed_point` solve (or ``DEQ``
    forward) and reused for every later call of ``f`` in that solve, so ``f`` has a fixed
    point and the implicit gradient is that of the solved map. In eval mode (or ``p = 0``)
    it is the identity. The expected output is ``x`` (inverted dropout scaling).

    Args:
        p: probability of an element being zeroed, in ``[0, 1)``.
        shared_dims: dimensions of the input along which one mask entry is shared (the mask
            has size 1 there), e.g. ``(2, 3)`` for the spatial dimensions of an ``(N, C, H,
            W)`` feature map (channel dropout, like ``nn.Dropout2d``). Default: none, one
            entry per element.

    Example:
        >>> import torch, eqsolve.torch as et
        >>> drop = et.VariationalDropout(0.3)
        >>> W, x = 0.5 * torch.eye(4), torch.ones(2, 4)
        >>> sol = et.fixed_point(lambda z: torch.tanh(drop(z @ W.T) + x), torch.zeros(2, 4))
        >>> bool(sol.converged.all())
        True
    """

    def __init__(self, p: float = 0.5, shared_dims: Sequence[int] = ()):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"p must be a float in [0, 1), got {p!r}")
        dims = tuple(shared_dims)
        if any(isinstance(d, bool) or not isinstance(d, int) for d in dims):
            raise TypeError(f"shared_dims must be a sequence of ints, got {shared_dims!r}")
        self.p = float(p)
        self.shared_dims = dims
        self._mask: torch.Tensor | None = None  # the latest mask (used outside a solve)

    def reset(self) -> None:
        """Forget the mask: the next call in training mode draws a new one."""
        self._mask = None

    def _mask_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        shape = list(x.shape)
        for d in self.shared_dims:
            if not -x.ndim <= d < x.ndim:
                raise ValueError(
                    f"shared_dims entry {d} is out of range for an input of shape "
                    f"{tuple(x.shape)}"
                )
            shape[d] = 1
        return tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        scope = _SOLVE.get()
        shape = self._mask_shape(x)
        # in a solve: the mask drawn in that solve (also when a backward re-enters it after
        # later solves drew others); outside every solve: the latest one
        mask = self._mask if scope is None else scope.masks.get(self)
        if mask is None or tuple(mask.shape) != shape or mask.device != x.device:
            # a boolean mask: the same entries whatever dtype f runs in (autocast)
            mask = torch.empty(shape, device=x.device).bernoulli_(1.0 - self.p).bool()
            if scope is not None:
                scope.masks[self] = mask
        self._mask = mask
        return x.masked_fill(~mask, 0) / (1.0 - self.p)

    def extra_repr(self) -> str:
        shared = f", shared_dims={self.shared_dims}" if self.shared_dims else ""
        return f"p={self.p}{shared}"
