"""eqsolve.jax on 2 host devices: ``jax.shard_map`` (per-device and global stopping) and
``jit`` with a sharded batch; values and gradients must match the unsharded run.

JAX fixes its device count at import (``XLA_FLAGS=--xla_force_host_platform_device_count=2``),
and the test session has imported JAX already, so the sharded computations run in one
subprocess (this file run as a script); each test checks one part of what it reports. The
cell ``f(z) = tanh(z W^T + x)`` is solved in float64 with ``tol=1e-12``. Shard 0 starts at
the fixed point (it converges at the first evaluation), shard 1 from zeros (it needs ~30
iterations): the two devices need different iteration counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

import eqsolve.jax as ej  # noqa: E402

D, B, TOL = 8, 4, 1e-12


def _problem():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((D, D))
    W *= 0.9 / np.linalg.norm(W, 2)
    x = rng.standard_normal((B, D))
    return W, x


def _sharded_report() -> dict:
    """Runs in the 2-device subprocess: every quantity the tests check."""
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 2, jax.devices()
    mesh = jax.make_mesh((2,), ("batch",))
    W_np, x_np = _problem()
    W, x = jnp.asarray(W_np), jnp.asarray(x_np)
    c = jnp.asarray(np.random.default_rng(1).standard_normal((B, D)))

    def cell(z, W, x):
        return jnp.tanh(z @ W.T + x)

    z_star = ej.fixed_point(cell, jnp.zeros_like(x), W, x, tol=1e-14).value
    z0 = z_star.at[B // 2 :].set(0.0)  # shard 0 converged from the start, shard 1 not

    # unsharded reference: one device, same z0
    def loss_plain(W, x):
        sol = ej.fixed_point(cell, z0, W, x, tol=TOL)
        return jnp.sum(c * sol.value), sol

    (_, ref), ref_grads = jax.value_and_grad(loss_plain, argnums=(0, 1), has_aux=True)(W, x)

    batch = NamedSharding(mesh, P("batch"))
    rep = NamedSharding(mesh, P())
    Ws, xs, z0s, cs = (
        jax.device_put(W, rep),
        jax.device_put(x, batch),
        jax.device_put(z0, batch),
        jax.device_put(c, batch),
    )
    out: dict = {"ref_nfev": int(ref.nfev), "ref_iterations": np.asarray(ref.iterations).tolist()}

    def rel(a, b):
        a, b = np.asarray(a), np.asarray(b)  # gathered to the host: any sharding
        return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))

    def compare(name, value, iterations, grads, nfev):
        out[name] = {
            "value_err": rel(value, ref.value),
            "iterations": np.asarray(iterations).tolist(),
            "grad_W_err": rel(grads[0], ref_grads[0]),
            "grad_x_err": rel(grads[1], ref_grads[1]),
            "nfev": np.asarray(nfev).reshape(-1).tolist(),
        }

    # shard_map, per-device stopping (default) and global stopping (sync_stop="batch") with a
    # collective inside f: psum forward; its pvary's transpose is a psum in the VJP too
    def make_per_device(sync):
        def f(z, W, x):
            if sync is None:
                return cell(z, W, x)
            return cell(z, W, x) + 0.0 * jax.lax.psum(jnp.sum(z), "batch")

        def per_device(W, x, z0, c):
            sol = ej.fixed_point(f, z0, W, x, tol=TOL, sync_stop=sync)
            return jnp.sum(c * sol.value)[None], (sol.value, sol.iterations, sol.nfev[None])

        return per_device

    for mode, sync in (("shard_map_local", None), ("shard_map_global", "batch")):
        mapped = jax.shard_map(
            make_per_device(sync),
            mesh=mesh,
            in_specs=(P(), P("batch"), P("batch"), P("batch")),
            out_specs=(P("batch"), (P("batch"), P("batch"), P("batch"))),
        )

        def loss(W, x, mapped=mapped):
            partial, aux = mapped(W, x, z0s, cs)
            return jnp.sum(partial), aux

        with jax.set_mesh(mesh):
            (_, (value, iterations, nfev)), grads = jax.jit(
                jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
            )(Ws, xs)
        compare(mode, value, iterations, grads, nfev)

    # jit with the batch sharded over both devices (one SPMD loop, no shard_map), with the
    # mesh axis in "auto" (GSPMD: the compiler propagates the sharding)
    def loss_jit(W, x, z0, c):
        sol = ej.fixed_point(cell, z0, W, x, tol=TOL)
        return jnp.sum(c * sol.value), (sol.value, sol.iterations, sol.nfev)

    auto = jax.make_mesh((2,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = NamedSharding(auto, P("batch"))
    rep = NamedSharding(auto, P())
    args = (
        jax.device_put(W, rep),
        jax.device_put(x, batch),
        jax.device_put(z0, batch),
        jax.device_put(c, batch),
    )
    (_, (value, iterations, nfev)), grads = jax.jit(
        jax.value_and_grad(loss_jit, argnums=(0, 1), has_aux=True)
    )(*args)
    compare("jit_sharded", value, iterations, grads, nfev)
    out["jit_sharded"]["value_sharding"] = str(value.sharding.spec)

    # the same with Explicit mesh axes (jax.make_mesh's default since JAX 0.7): sharding is
    # part of the array types
    try:
        with jax.set_mesh(mesh):
            (_, (value, iterations, nfev)), grads = jax.jit(
                jax.value_and_grad(loss_jit, argnums=(0, 1), has_aux=True)
            )(Ws, xs, z0s, cs)
        compare("jit_explicit", value, iterations, grads, nfev)
    except Exception as exc:  # reported to the test, which expects this to work
        out["jit_explicit"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return out


@pytest.fixture(scope="module")
def report() -> dict:
    """Run this file as a script with 2 host devices; its last stdout line is the JSON."""
    env = dict(os.environ)
    # the device count goes first: XLA stops reading flags at a token without "--" (the
    # README's thread setting ends with one)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 " + env.get(
        "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        pytest.fail(f"2-device subprocess failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_reference_needs_different_iteration_counts_per_shard(report):
    its = report["ref_iterations"]
    assert its[: B // 2] == [0] * (B // 2)  # shard 0 starts converged
    assert min(its[B // 2 :]) > 5
    assert report["ref_nfev"] == max(its) + 1


def test_shard_map_per_device_stopping(report):
    r = report["shard_map_local"]
    # each device stopped on its own samples: device 0 after f(z0), device 1 later
    assert r["nfev"] == [1, report["ref_nfev"]]
    assert r["iterations"] == report["ref_iterations"]
    assert r["value_err"] <= 1e-12
    assert r["grad_W_err"] <= 1e-10 and r["grad_x_err"] <= 1e-10


def test_shard_map_global_stopping_with_collective_in_f(report):
    r = report["shard_map_global"]
    # both devices ran the same number of iterations (the psum in f would deadlock otherwise)
    assert r["nfev"] == [report["ref_nfev"]] * 2
    # stopped samples were frozen: per-sample results are those of the unsharded solve
    assert r["iterations"] == report["ref_iterations"]
    assert r["value_err"] <= 1e-12
    assert r["grad_W_err"] <= 1e-10 and r["grad_x_err"] <= 1e-10


def test_jit_with_sharded_batch(report):
    r = report["jit_sharded"]
    assert r["nfev"] == [report["ref_nfev"]]  # one SPMD loop: the stop is global
    assert r["iterations"] == report["ref_iterations"]
    assert r["value_err"] <= 1e-12
    assert r["grad_W_err"] <= 1e-10 and r["grad_x_err"] <= 1e-10
    assert "batch" in r["value_sharding"]  # the solution stays sharded over the batch


def test_jit_with_explicitly_sharded_batch(report):
    r = report["jit_explicit"]
    assert "error" not in r, r.get("error")
    assert r["nfev"] == [report["ref_nfev"]]
    assert r["value_err"] <= 1e-12
    assert r["grad_W_err"] <= 1e-10 and r["grad_x_err"] <= 1e-10


# --- argument checks (no second device needed) ---------------------------------------------


def test_sync_stop_outside_a_mapped_axis_is_a_clear_error():
    z0 = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="no enclosing mapped axis"):
        ej.fixed_point(lambda z: 0.5 * z + 1.0, z0, sync_stop="batch")


@pytest.mark.parametrize("bad", [1, ("batch", 2), object()])
def test_sync_stop_bad_type(bad):
    with pytest.raises(TypeError, match="sync_stop"):
        ej.fixed_point(lambda z: 0.5 * z + 1.0, jnp.zeros((2, 3)), sync_stop=bad)


def test_sync_stop_empty_tuple():
    with pytest.raises(ValueError, match="sync_stop"):
        ej.fixed_point(lambda z: 0.5 * z + 1.0, jnp.zeros((2, 3)), sync_stop=())


def test_sync_stop_under_vmap_axis_name():
    """Global stopping over a vmap axis: every mapped instance reports the same nfev."""
    x = jnp.asarray(np.linspace(0.1, 3.0, 4)[:, None, None] * np.ones((4, 1, 3)))

    def solve(xi):
        sol = ej.fixed_point(
            lambda z: 0.5 * jnp.tanh(z) + xi, jnp.zeros_like(xi), tol=1e-10, sync_stop="i"
        )
        return sol.nfev, sol.value

    nfev, value = jax.vmap(solve, axis_name="i")(x)
    assert len(set(np.asarray(nfev).tolist())) == 1
    np.testing.assert_allclose(value, 0.5 * np.tanh(value) + np.asarray(x), atol=1e-8)


if __name__ == "__main__":
    print(json.dumps(_sharded_report()))
