"""eqsolve.torch under torch.distributed: 2 CPU processes (gloo, file rendezvous, loopback).

* ``DistributedDataParallel`` with default settings (no ``find_unused_parameters``) trains a
  small DEQ classifier-like model for a few SGD steps: at every step the all-reduced
  gradients equal the single-process gradient of the full batch (float64, to 1e-10), and both
  ranks hold bit-identical parameters, equal to the single-process ones.
* ``sync_stop``: a cell whose ``f`` contains a (differentiable) all-reduce, with rank inputs
  that need different numbers of forward *and* adjoint iterations. With the option both
  ranks make the same number of collective calls (forward and backward), and each rank's
  fixed point and gradient equal those of a plain solve of its own samples. (Without it the
  ranks would stop at different iterations and deadlock in ``f``'s collective: not tested.)

Workers are spawned (forking a process whose autograd engine threads may hold a lock can
hang the child) and watched with a deadline, so a deadlock fails the test instead of hanging
CI; gloo's own timeout is also lowered to 60 s.
"""

from __future__ import annotations

import datetime
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import eqsolve  # noqa: E402
import eqsolve.torch as et  # noqa: E402

torch.set_num_threads(1)
nn = torch.nn

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="uses fork and gloo file rendezvous (Linux only)"
)

WORLD = 2
DEADLINE_S = 180
D, P_IN, N_OUT, BATCH, STEPS = 12, 6, 3, 8, 3
TOL = 1e-12


def _launch(worker, tmp_path, *args) -> None:
    """Run ``worker(rank, world, init_file, out_dir, *args)`` on 2 processes; fail on timeout."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    # spawn, not fork: a process that has run autograd holds engine threads, and a child
    # forked while one of them holds a lock can hang (seen in CI under xdist)
    method = "spawn"
    ctx = mp.start_processes(
        worker,
        args=(WORLD, str(tmp_path / "init"), str(tmp_path), *args),
        nprocs=WORLD,
        join=False,
        start_method=method,
    )
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=2):  # raises ProcessRaisedException if a worker failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers did not finish within {DEADLINE_S}s (deadlock?)")


def _init(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )


# --------------------------------------------------------------------------- DDP training


class _Net(nn.Module):
    """Input injection -> DEQ ``z = tanh(z W^T + inj)`` -> linear head (all float64)."""

    def __init__(self, **deq_kwargs):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        W = torch.randn(D, D, generator=g, dtype=torch.float64)
        self.W = nn.Parameter(0.8 * W / torch.linalg.matrix_norm(W, 2))
        self.inj = nn.Linear(P_IN, D, dtype=torch.float64)
        self.head = nn.Linear(D, N_OUT, dtype=torch.float64)
        with torch.no_grad():
            for p in (*self.inj.parameters(), *self.head.parameters()):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / 2)
        self.deq = et.DEQ(tol=TOL, max_iter=200, **deq_kwargs)

    def forward(self, x):
        inj = self.inj(x)
        z0 = torch.zeros(x.shape[0], D, dtype=x.dtype)
        z = self.deq(lambda z: torch.tanh(z @ self.W.T + inj), z0)
        return self.head(z)


def _data():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((BATCH, P_IN))
    x[BATCH // 2 :] *= 4.0  # rank 1's half saturates tanh: different iteration counts
    y = rng.standard_normal((BATCH, N_OUT))
    return torch.tensor(x), torch.tensor(y)


def _train(model, x, y, step_fn=None):
    """SGD steps on the mean squared error; per step: grads, params after, forward nfev."""
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    net = model.module if hasattr(model, "module") else model
    log = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)  # mean over this process's samples
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
        opt.step()
        params = {n: p.detach().clone() for n, p in net.named_parameters()}
        log.append({"grads": grads, "params": params, "nfev": net.deq.last_solution.nfev})
    return log


def _ddp_train_worker(rank, world, init_file, out_dir, sync_stop):
    import torch.distributed as dist

    _init(rank, world, init_file)
    model = _Net(sync_stop=sync_stop)
    ddp = torch.nn.parallel.DistributedDataParallel(model)  # default settings
    x, y = _data()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    log = _train(ddp, x[shard], y[shard])
    torch.save(log, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("sync_stop", [False, True])
def test_ddp_training_matches_single_process(tmp_path, sync_stop):
    _launch(_ddp_train_worker, tmp_path, sync_stop)
    logs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    x, y = _data()
    ref = _train(_Net(), x, y)  # one process, the full batch
    for step in range(STEPS):
        r0, r1, single = logs[0][step], logs[1][step], ref[step]
        assert set(r0["grads"]) == {"W", "inj.weight", "inj.bias", "head.weight", "head.bias"}
        for name, g in single["grads"].items():
            assert float(g.abs().max()) > 0.0, name  # every parameter receives a gradient
            for r in (r0, r1):
                err = float((r["grads"][name] - g).abs().max() / g.abs().max())
                assert err <= 1e-10, (step, name, err)
            # DDP leaves the same averaged gradient, hence the same SGD step, on both ranks
            assert torch.equal(r0["params"][name], r1["params"][name]), (step, name)
            p_err = float((r0["params"][name] - single["params"][name]).abs().max())
            assert p_err <= 1e-10, (step, name, p_err)
        if sync_stop:  # both ranks made the same number of forward iterations
            assert r0["nfev"] == r1["nfev"] == max(r0["nfev"], r1["nfev"])


# ---------------------------------------------------------- collectives inside f: sync_stop


def _collective_problem(rank: int):
    rng = np.random.default_rng(10 + rank)
    g = np.random.default_rng(5)
    W = g.standard_normal((D, D))
    W *= 0.9 / np.linalg.norm(W, 2)
    x = rng.standard_normal((4, D))
    c = rng.standard_normal((4, D)) if rank == 1 else np.zeros((4, D))
    return W, x, c


def _collective_start(rank: int, W, x):
    """Rank 0 starts at its fixed point (0 forward iterations), rank 1 from zeros."""
    if rank == 1:
        return torch.zeros(x.shape, dtype=torch.float64)
    sol = eqsolve.solve(
        lambda z: np.tanh(z @ W.T + x),
        np.zeros(x.shape),
        tol=1e-15,
        max_iter=500,
        on_failure="ignore",
    )
    return torch.tensor(sol.value)


def _collective_worker(rank, world, init_file, out_dir, backward, group_kind):
    import torch.distributed as dist

    _init(rank, world, init_file)
    counts = {"forward": 0, "backward": 0}

    class AllReduceSum(torch.autograd.Function):
        """A differentiable all-reduce: collective in forward *and* backward."""

        @staticmethod
        def forward(ctx, t):
            counts["forward"] += 1
            t = t.clone()
            dist.all_reduce(t)
            return t

        @staticmethod
        def backward(ctx, g):
            counts["backward"] += 1
            g = g.clone()
            dist.all_reduce(g)
            return g

    sync = True if group_kind == "world" else dist.new_group(list(range(world)))
    W_np, x_np, c_np = _collective_problem(rank)
    W = nn.Parameter(torch.tensor(W_np))
    x = torch.tensor(x_np, requires_grad=True)

    def f(z):  # the collective contributes 0 * (...): the fixed point is each rank's own
        s = AllReduceSum.apply(z.sum(dim=1, keepdim=True))
        return torch.tanh(z @ W.T + x) + 0.0 * s

    infos = []
    sol = et.fixed_point(
        f,
        _collective_start(rank, W_np, x_np),
        tol=TOL,
        backward=backward,
        sync_stop=sync,
        on_backward=infos.append,
    )
    # rank 0's cotangent is zero: its adjoint converges at once, rank 1's does not
    (torch.tensor(c_np) * sol.value).sum().backward()
    torch.save(
        {
            "nfev": sol.nfev,
            "iterations": sol.iterations,
            "value": sol.value.detach(),
            "counts": counts,
            "grad_W": W.grad,
            "grad_x": x.grad,
            "adjoint_iterations": infos[0].iterations,
            "adjoint_converged": infos[0].converged,
        },
        f"{out_dir}/rank{rank}.pt",
    )
    dist.destroy_process_group()


@pytest.mark.parametrize("backward, group_kind", [("anderson", "world"), ("gmres", "group")])
def test_sync_stop_with_collective_in_f(tmp_path, backward, group_kind):
    _launch(_collective_worker, tmp_path, backward, group_kind)
    out = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # same number of collective calls on both ranks, forward and backward
    assert out[0]["nfev"] == out[1]["nfev"]
    assert out[0]["counts"] == out[1]["counts"]
    assert out[0]["counts"]["forward"] == out[0]["nfev"]  # every call of f, incl. f(z*)
    assert out[0]["counts"]["backward"] >= 2  # adjoint VJPs + the final one
    # the ranks needed different iteration counts: rank 0 none, in forward and backward
    assert int(out[0]["iterations"].max()) == 0 and int(out[1]["iterations"].min()) > 5
    assert int(out[0]["adjoint_iterations"].max()) == 0
    assert int(out[1]["adjoint_iterations"].min()) > 0
    assert all(bool(o["adjoint_converged"].all()) for o in out)

    for rank in range(WORLD):  # each rank's result is that of a plain, unsynchronised solve
        W_np, x_np, c_np = _collective_problem(rank)
        W = nn.Parameter(torch.tensor(W_np))
        x = torch.tensor(x_np, requires_grad=True)
        ref = et.fixed_point(
            lambda z, W=W, x=x: torch.tanh(z @ W.T + x),
            _collective_start(rank, W_np, x_np),
            tol=TOL,
            backward=backward,
        )
        (torch.tensor(c_np) * ref.value).sum().backward()
        o = out[rank]
        assert torch.equal(o["iterations"], ref.iterations)
        assert float((o["value"] - ref.value.detach()).abs().max()) <= 1e-12
        for got, want in ((o["grad_W"], W.grad), (o["grad_x"], x.grad)):
            scale = max(float(want.abs().max()), 1.0)
            assert float((got - want).abs().max()) <= 1e-10 * scale


# ------------------------------------------------------------------- single-process checks


def test_sync_stop_true_without_process_group_is_local():
    W = torch.tensor(np.diag(np.linspace(0.0, 0.5, 5)))
    f = lambda z: z @ W.T + 1.0  # noqa: E731
    plain = et.fixed_point(f, torch.zeros(3, 5, dtype=torch.float64), tol=1e-10)
    synced = et.fixed_point(f, torch.zeros(3, 5, dtype=torch.float64), tol=1e-10, sync_stop=True)
    assert plain.nfev == synced.nfev and torch.equal(plain.value, synced.value)
    deq = et.DEQ(tol=1e-10, sync_stop=True)
    assert torch.equal(deq(f, torch.zeros(3, 5, dtype=torch.float64)), plain.value)


@pytest.mark.parametrize("bad", ["world", 1, 0.5, object()])
def test_sync_stop_bad_values(bad):
    with pytest.raises(TypeError, match="sync_stop"):
        et.fixed_point(lambda z: 0.5 * z, torch.zeros(2, 3), sync_stop=bad)
    with pytest.raises(TypeError, match="sync_stop"):
        et.DEQ(sync_stop=bad)


def test_sync_stop_unsupported_backend():
    with pytest.raises(ValueError, match="sync_stop"):
        eqsolve.solve(lambda z: 0.5 * z, np.zeros((2, 3)), sync_stop=True)
