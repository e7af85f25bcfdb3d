"""The Solution contract through the differentiable entry points added for every
transformation and for SHINE, checked independently in float64 (tests/contract.py).

The torch explicit-args node (``et.fixed_point(f, z0, *args)``), the torch SHINE path (a
Broyden forward that also returns its factors), and the JAX ``custom_jvp`` solve (eagerly and
under ``jit``, also with SHINE) each build their ``Solution`` their own way. Each must claim
exactly what the plain ``eqsolve.solve`` claims (same value, status, residual, nfev) and obey
the contract, on a zero fixed point, 1e-30 and 1e30 scales and samples coupled through the
batch mean.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import AVAILABLE

CASES = ["zero", "tiny", "huge", "coupled"]
KW = {"tol": 1e-10, "max_iter": 200, "on_failure": "ignore"}


def _problem(case: str) -> tuple[np.ndarray, float, float]:
    """``f(z) = 0.5 z + coupling mean_b(z) + c``: its ``c``, coupling and atol."""
    scale = {"zero": 0.0, "tiny": 1e-30, "huge": 1e30, "coupled": 1.0}[case]
    c = scale * np.random.default_rng(5).standard_normal((4, 5))
    return c, (0.2 if case == "coupled" else 0.0), (1e-300 if case == "zero" else 0.0)


def _check(sol, plain, c: np.ndarray, coupling: float, atol: float) -> None:  # type: ignore[no-untyped-def]
    from conftest import to_numpy
    from contract import check_contract

    for field in ("value", "status", "residual", "iterations"):
        np.testing.assert_array_equal(np.asarray(to_numpy(getattr(sol, field))),
                                      np.asarray(to_numpy(getattr(plain, field))))

    def f64(z: np.ndarray) -> np.ndarray:
        return 0.5 * z + coupling * z.mean(axis=0, keepdims=True) + c

    check_contract(sol, f64, tol=KW["tol"], atol=atol, dtype="float64")


@pytest.mark.skipif("torch" not in AVAILABLE, reason="torch backend not selected")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", ["args", "shine"])
def test_torch_gradient_paths_keep_the_contract(case: str, path: str) -> None:
    import torch

    import eqsolve
    import eqsolve.torch as et

    c_np, coupling, atol = _problem(case)
    c = torch.tensor(c_np, requires_grad=True)  # a gradient is wanted: the paths attach
    z0 = torch.ones(4, 5, dtype=torch.float64)

    def f(z, c):  # type: ignore[no-untyped-def]
        return 0.5 * z + coupling * z.mean(dim=0, keepdim=True) + c

    solver = "broyden" if path == "shine" else "auto"
    plain = eqsolve.solve(lambda z: f(z, c.detach()), z0, solver=solver, atol=atol, **KW)
    if path == "args":
        sol = et.fixed_point(f, z0, c, solver=solver, atol=atol, **KW)
        extra = 0  # the node calls f again only in backward
    else:
        sol = et.fixed_point(lambda z: f(z, c), z0, solver=solver, atol=atol,
                             backward="shine", **KW)
        extra = 1  # one differentiable call of f at z*
    assert sol.value.requires_grad
    assert int(sol.nfev) == int(plain.nfev) + extra
    _check(sol, plain, c_np, coupling, atol)


@pytest.mark.skipif("jax" not in AVAILABLE, reason="jax backend not selected")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backward", ["auto", "shine"])
@pytest.mark.parametrize("jit", [False, True])
def test_jax_custom_jvp_solve_keeps_the_contract(case: str, backward: str, jit: bool) -> None:
    import jax
    import jax.numpy as jnp

    import eqsolve
    import eqsolve.jax as ej

    c_np, coupling, atol = _problem(case)
    c = jnp.asarray(c_np)
    z0 = jnp.ones((4, 5))

    def f(z, c):  # type: ignore[no-untyped-def]
        return 0.5 * z + coupling * jnp.mean(z, axis=0, keepdims=True) + c

    solver = "broyden" if backward == "shine" else "auto"
    plain = eqsolve.solve(lambda z: f(z, c), z0, solver=solver, atol=atol, **KW)

    def run(c, z0):  # type: ignore[no-untyped-def]
        return ej.fixed_point(f, z0, c, solver=solver, atol=atol, backward=backward, **KW)

    # z0 is an argument of the jitted function, not a closed-over constant: XLA folds
    # constants at compile time with other rounding, and the coupled case's step count is
    # sensitive to rounding (83 vs 86 steps seen), which would hide what is compared here
    sol = jax.jit(run)(c, z0) if jit else run(c, z0)
    assert int(sol.nfev) == int(plain.nfev)
    _check(sol, plain, c_np, coupling, atol)
    # and the derivative is defined there (finite where the solve converged)
    g = jax.grad(lambda c: jnp.sum(run(c, z0).value))(c)
    done = np.asarray(sol.converged)
    assert np.isfinite(np.asarray(g)[done]).all()
