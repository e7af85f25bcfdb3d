"""Anderson acceleration that starts only where plain iteration is slow (the default solver).

Plain iteration ``z_{k+1} = z_k + beta g_k`` converges linearly at the rate of the spectral
radius of ``J_f`` at the fixed point. Anderson mixing improves that rate (Evans, Pollock,
Rebholz and Xiao 2020 prove the gain is a factor set by the optimisation gain of the
least-squares step), but each of its steps costs a Gram update, a small solve and a mixing
of ``m`` history vectors. Where plain iteration already contracts fast, the gain in steps is
small and the extra cost per step dominates (on this project's ``tanh`` problem, rate ~0.36,
both need 18 evaluations of ``f``).

So each sample starts with plain steps while recording the Anderson history, and switches to
Anderson mixing (for good) at the first step where its residual shrinks by less than
``start_ratio``:

    ||g_{k+1}|| > start_ratio * ||g_k||      (observed contraction, per sample)

With the default ``start_ratio = 0.4`` a sample whose plain iteration shrinks the residual
2.5-fold every step (1e-8 in about 20 steps) never pays for mixing, and a slowly contracting
one (``sym``: rate 0.94) mixes from its second step on, with the history of its first steps
already in the ring. The value was chosen on the benchmark problems (f-evaluations to 1e-8,
float64): ``tanh`` (per-step ratio at most 0.37) needs 18 with every value from 0.3 to 0.6
and stays plain from 0.4 up; ``digits`` needs 20 (= Anderson) with 0.3 or 0.4, 25 with 0.5
and 33 with 0.6; ``sym`` needs 56 (= Anderson) throughout. On eager
backends, while no sample has started, the step is exactly plain iteration plus one scaled
squared norm per sample and one host read: the plain steps' points and residuals are kept by
reference (no copy) and written into the ring, with the Gram matrix in one product, at the
step where the first sample starts (:meth:`AutoAnderson.update`). Under ``jax.jit`` the ring
and the Gram matrix are written every step, and both branches are traced and selected per
sample.

References:
    C. Evans, S. Pollock, L. G. Rebholz, M. Xiao, "A proof that Anderson acceleration
    improves the convergence rate in linearly converging fixed-point methods (but not in
    those converging quadratically)", SIAM J. Numer. Anal. 58 (2020).
    H. F. Walker and P. Ni, "Anderson acceleration for fixed-point iterations", SIAM J.
    Numer. Anal. 49 (2011).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from ._xp import set_at
from .anderson import Anderson, AndersonState
from .solver_base import check_positive, damped_step, register

#: eagerly, batches at least this large compute the mixing only for their started samples
#: while those are at most half of the batch (torch on the CPU, tanh cell: time / floor went
#: from 6.0 to 3.4 at B = 4096, n = 64 and from 2.5 to 2.2 at B = 1024, n = 128; at B = 256
#: it was 1.3 both ways at n = 512 and mixed at n = 128)
SUBSET_MIN_BATCH = 512


class AutoState(NamedTuple):
    F: Any  # (B, m, n) as in AndersonState
    G: Any  # (B, m, n)
    H: Any  # (B, m, m)
    inv_scale: Any  # (B,)
    started: Any  # (B,) bool: this sample mixes (it has seen a slow step)
    # eagerly, while no sample has started: the history not yet in F, G, H, as a tuple of
    # (slot, z_new, g_new, scaled squared norm of g_new), oldest first, at most m entries;
    # None once written (from the first started sample on). Under a trace always () and
    # unused: the ring is written every step there.
    pending: Any = ()


@register
@dataclass(frozen=True)
class AutoAnderson(Anderson):
    """Anderson mixing that starts per sample once plain iteration contracts slower than
    ``start_ratio`` per step (see the module docstring); the other arguments are
    :class:`~eqsolve.core.anderson.Anderson`'s."""

    start_ratio: float = 0.4
    name = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("start_ratio", self.start_ratio)

    # the state is an AutoState (Anderson's fields plus `started`); typed Any because it
    # extends, rather than matches, the parent's AndersonState
    def init(self, xp: Any, z: Any, g: Any) -> Any:
        s = super().init(xp, z, g)
        # from z, so it has z's batch layout (sharding, shard_map varying axes)
        started = xp.zeros_like(z[:, 0], dtype=xp.bool)
        return AutoState(s.F, s.G, s.H, s.inv_scale, started, ())

    def propose(self, xp: Any, state: Any, z: Any, g: Any, k: Any) -> Any:
        if isinstance(k, int) and state.pending is not None:  # eagerly, no sample started
            return damped_step(z, g, self.beta)
        if isinstance(k, int):  # eagerly, one host read decides how much mixing to compute
            batch = int(state.started.shape[0])
            count = int(xp.sum(xp.astype(state.started, xp.int32)))
            if count == batch:  # every sample mixes (Anderson's safeguard steps plainly)
                return super().propose(xp, _anderson(state), z, g, k)
            if count == 0:  # no sample has started: the step is plain iteration
                return damped_step(z, g, self.beta)
            if batch >= SUBSET_MIN_BATCH and 2 * count <= batch:
                return self._propose_started(xp, state, z, g, k)
        mixed = super().propose(xp, _anderson(state), z, g, k)
        return xp.where(state.started[:, None], mixed, damped_step(z, g, self.beta))

    def _propose_started(self, xp: Any, state: Any, z: Any, g: Any, k: Any) -> Any:
        """Eagerly, with at most half of a large batch started: the mixing computed for the
        started samples only (per sample it is the same computation; its small solves are
        what a large batch pays for), gathered back into place without a scatter (which the
        Array API does not have)."""
        idx = xp.nonzero(state.started)[0]

        def rows(a: Any) -> Any:
            return xp.take(a, idx, axis=0)

        sub = AndersonState(rows(state.F), rows(state.G), rows(state.H), rows(state.inv_scale))
        mixed = super().propose(xp, sub, rows(z), rows(g), k)
        # row b of `spread` is row (number of started samples up to b) - 1 of `mixed`
        pos = xp.cumulative_sum(xp.astype(state.started, xp.int64)) - 1
        spread = xp.take(mixed, xp.where(pos < 0, xp.zeros_like(pos), pos), axis=0)
        return xp.where(state.started[:, None], spread, damped_step(z, g, self.beta))

    def update(self, xp: Any, state: Any, z: Any, g: Any, z_new: Any, g_new: Any, k: Any) -> Any:
        """Record ``(z_new, g_new)`` and start the samples whose residual shrank by less than
        ``start_ratio``: ``||g_new|| > start_ratio ||g||`` in the scaled norms of the ring.

        Eagerly, while no sample has started (``state.pending`` not None), nothing is
        written: the new point is kept by reference with its scaled squared norm, and one
        host read tells whether some sample starts now. At that step the kept points go into
        the ring and the Gram matrix is computed whole (:meth:`_write_pending`); from then on
        (and always under a trace) every step writes the ring as Anderson does.
        """
        if isinstance(k, int) and state.pending is not None:
            return self._update_plain(xp, state, z_new, g_new, k)
        # squared residual norms of the newest history entry before (slot k % m) and after
        # (slot (k + 1) % m) this update: the Gram diagonal holds them. The bound is computed
        # first, as a new array: on eager backends the update writes the buffers in place
        # (with m = 1 into the same slot).
        prev, slot = k % self.m, (k + 1) % self.m
        bound = (self.start_ratio * self.start_ratio) * state.H[:, prev, prev]
        s = super().update(xp, _anderson(state), z, g, z_new, g_new, k)
        slow = s.H[:, slot, slot] > bound
        return AutoState(s.F, s.G, s.H, s.inv_scale, state.started | slow, state.pending)

    def _update_plain(self, xp: Any, state: Any, z_new: Any, g_new: Any, k: int) -> Any:
        """The eager update while no sample has started (see :meth:`update`)."""
        scaled = g_new * state.inv_scale[:, None]
        sq = xp.vecdot(scaled, scaled)  # the Gram diagonal entry the ring would hold
        # the newest entry's squared norm: the last kept one, or slot 0's (written by init)
        sq_prev = state.pending[-1][3] if state.pending else state.H[:, 0, 0]
        slow = sq > (self.start_ratio * self.start_ratio) * sq_prev
        pending = (*state.pending, ((k + 1) % self.m, z_new, g_new, sq))[-self.m :]
        if not bool(xp.any(slow)):
            return state._replace(pending=pending)
        F, G, H = self._write_pending(xp, state, pending)
        return AutoState(F, G, H, state.inv_scale, slow, None)

    def _write_pending(self, xp: Any, state: Any, pending: tuple[Any, ...]) -> tuple[Any, Any, Any]:
        """The ring and Gram matrix Anderson's updates would have written for ``pending``.

        Each kept point goes to its slot as :meth:`Anderson.update` writes it (``F = z + g``,
        ``G = g / ||g_0||``); slots no kept point reaches hold what they held (``init``'s
        first entry, or zeros). The Gram matrix of the whole ring is one product (zero rows
        for unused slots, as in the ring), equal to the row-by-row one up to rounding.
        """
        F, G = state.F, state.G
        for slot, z_i, g_i, _ in pending:
            F = set_at(F, (slice(None), slot, ...), z_i + g_i)
            G = set_at(G, (slice(None), slot, ...), g_i * state.inv_scale[:, None])
        return F, G, xp.matmul(G, xp.matrix_transpose(G))


def _anderson(state: AutoState) -> AndersonState:
    return AndersonState(state.F, state.G, state.H, state.inv_scale)
