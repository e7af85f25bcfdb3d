"""Every JAX transformation through ``eqsolve.jax.fixed_point`` (issue 13, JAX part).

The solve's derivative is a ``custom_jvp`` whose tangent system ``(I - J_f) dz = J_theta
dtheta`` is solved by ``lax.custom_linear_solve``; reverse mode, higher orders and ``vmap``
follow from JAX. Each transformation is checked against references computed outside eqsolve:

(a) the dense implicit-function-theorem Jacobian ``dz*/dtheta = (I - J_f)^{-1} df/dtheta``
    (float64, ``jnp.linalg.solve``; ``J`` by ``jax.jacfwd`` of ``f`` at a ``z*`` converged to
    1e-14) for first-order quantities;
(b) an unrolled float64 solve (200 plain steps of a contraction with ``||W|| = 0.6``, so
    ``0.6**200`` below roundoff) differentiated by JAX itself, for every order.

Problems: the tanh cell ``tanh(z W^T + x U^T + b)`` and a multi-scale tuple state (widths 4
and 2, coupled through one 6x6 block matrix). Parameters are one flat vector ``theta``
(unravelled to a dict inside), so Jacobians are plain matrices.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import eqsolve  # noqa: E402
from eqsolve import ConvergenceWarning  # noqa: E402
from eqsolve.adapters import jax_tangent  # noqa: E402
from eqsolve.jax import JFB, AdjointInfo, Implicit, Phantom, fixed_point  # noqa: E402

jax.config.update("jax_enable_x64", True)  # conftest does this too; keep the file standalone

METHODS = ["anderson", "neumann", "gmres", "broyden"]
TOL = 1e-12  # forward and adjoint/tangent tolerance
BOUND = 1e-8  # relative error allowed against the references
B, P = 3, 2  # batch, input width


class Problem(NamedTuple):
    f: Any  # f(z, params, x)
    z0: Any  # x -> initial state
    unravel: Any  # flat theta -> params dict
    theta: Any  # flat float64 parameters
    x: Any  # (B, P)


def _contraction(rng: np.random.Generator, n: int, radius: float = 0.6) -> np.ndarray:
    W = rng.standard_normal((n, n))
    return W * (radius / np.linalg.norm(W, 2))


def tanh_problem(d: int = 5, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    params = {
        "W": _contraction(rng, d),
        "U": rng.standard_normal((d, P)) / np.sqrt(P),
        "b": 0.1 * rng.standard_normal(d),
    }
    theta, unravel = ravel_pytree(jax.tree_util.tree_map(jnp.asarray, params))

    def f(z, prm, x):
        return jnp.tanh(z @ prm["W"].T + x @ prm["U"].T + prm["b"])

    x = jnp.asarray(rng.standard_normal((B, P)))
    return Problem(f, lambda x: jnp.zeros((x.shape[0], d)), unravel, theta, x)


def multiscale_problem(seed: int = 1) -> Problem:
    """``z = (z1 (B, 4), z2 (B, 2))``; ``M`` (6x6, ``||M|| = 0.6``) couples both ways."""
    rng = np.random.default_rng(seed)
    params = {"M": _contraction(rng, 6), "U": rng.standard_normal((4, P)),
              "b": 0.3 * rng.standard_normal(2)}
    theta, unravel = ravel_pytree(jax.tree_util.tree_map(jnp.asarray, params))

    def f(zs, prm, x):
        z1, z2 = zs
        M = prm["M"]
        f1 = jnp.tanh(z1 @ M[:4, :4].T + z2 @ M[:4, 4:].T + x @ prm["U"].T)
        f2 = jnp.tanh(z2 @ M[4:, 4:].T + z1 @ M[4:, :4].T + prm["b"])
        return f1, f2

    x = jnp.asarray(rng.standard_normal((B, P)))
    return Problem(f, lambda x: (jnp.zeros((x.shape[0], 4)), jnp.zeros((x.shape[0], 2))),
                   unravel, theta, x)


PROBLEMS = {"tanh": tanh_problem, "multiscale": multiscale_problem}


def spec(method: str = "auto", **kw: Any) -> Implicit:
    options = {"restart": 5} if method == "gmres" else {}  # GMRES compiles fast with restart 5
    return Implicit(method, tol=TOL, max_iter=500, options=options, **kw)


def z_star(pb: Problem, theta: Any, x: Any, backward: Any = None, **kw: Any) -> Any:
    """The solve as a flat vector (picard forward: cheap to compile)."""
    sol = fixed_point(pb.f, pb.z0(x), pb.unravel(theta), x, tol=TOL, max_iter=500,
                      solver="picard", backward=backward or spec(), **kw)
    return ravel_pytree(sol.value)[0]


def unrolled(pb: Problem, theta: Any, x: Any, steps: int = 200) -> Any:
    """Reference (b): plain iteration, differentiated by JAX."""
    prm = pb.unravel(theta)
    z = jax.lax.fori_loop(0, steps, lambda i, z: pb.f(z, prm, x), pb.z0(x))
    return ravel_pytree(z)[0]


def ift_jacobian(pb: Problem, theta: Any, x: Any) -> Any:
    """Reference (a): dense ``(I - J_f)^{-1} df/dtheta`` at ``z*`` converged to 1e-14."""
    prm = pb.unravel(theta)
    z = jax.lax.fori_loop(0, 400, lambda i, z: pb.f(z, prm, x), pb.z0(x))
    zf, unz = ravel_pytree(z)

    def g(zf: Any, th: Any) -> Any:
        return ravel_pytree(pb.f(unz(zf), pb.unravel(th), x))[0]

    assert float(jnp.max(jnp.abs(g(zf, theta) - zf))) < 1e-14
    J, J_theta = jax.jacfwd(g, argnums=(0, 1))(zf, theta)
    return jnp.linalg.solve(jnp.eye(zf.size) - J, J_theta)


def rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def weights(pb: Problem, seed: int = 3) -> tuple[Any, Any]:
    """A tangent ``v`` of theta and a cotangent ``c`` of z* (flat)."""
    rng = np.random.default_rng(seed)
    n = unrolled(pb, pb.theta, pb.x, steps=1).size
    return (jnp.asarray(rng.standard_normal(pb.theta.size)),
            jnp.asarray(rng.standard_normal(n)))


def force_loss(z_fn: Any) -> Any:
    """Force matching: ``sum((dE/dx)^2)``, ``E = sum(z*(theta, x)^2)``, as a function of theta."""
    def loss(theta: Any, x: Any) -> Any:
        forces = jax.grad(lambda x: jnp.sum(z_fn(theta, x) ** 2))(x)
        return jnp.sum(forces**2)

    return loss


# ------------------------------------------------------------ every method, both problems


def _transforms(z_fn: Any, pb: Problem) -> Any:
    """jvp, jacfwd, jacrev, grad, hessian and force-matching grad-of-grad of ``z_fn``, jitted
    as one program (one compilation per case)."""
    v, c = weights(pb)

    def run(theta, x):
        z = lambda th: z_fn(th, x)  # noqa: E731
        loss = lambda th: jnp.sum(c * z(th))  # noqa: E731
        return {"jvp": jax.jvp(z, (theta,), (v,))[1], "jacfwd": jax.jacfwd(z)(theta),
                "jacrev": jax.jacrev(z)(theta), "grad": jax.grad(loss)(theta),
                "hessian": jax.hessian(loss)(theta),
                "grad(grad)": jax.grad(force_loss(z_fn))(theta, x)}

    return jax.jit(run)(pb.theta, pb.x)


@functools.cache
def references(problem: str) -> dict[str, Any]:
    """First order from the dense IFT (a), second order from the unrolled solve (b)."""
    pb = PROBLEMS[problem]()
    v, c = weights(pb)
    ref = ift_jacobian(pb, pb.theta, pb.x)
    out = _transforms(lambda th, x: unrolled(pb, th, x), pb)
    # the two references agree (the unrolled solve is converged)
    assert rel(out["jacfwd"], ref) <= 1e-12 and rel(out["grad"], c @ ref) <= 1e-12
    out.update(jvp=ref @ v, jacfwd=ref, jacrev=ref, grad=c @ ref)
    return out


# every method on the tanh cell; the tuple state (flattened to one (B, n) array before the
# linear solves, whatever the method) with the default method "auto" (the other tests use it
# too, through spec()): XLA compile time per case
# (~15 s for 21 while loops on a CI core) is what this file spends
CASES = [(m, "tanh") for m in METHODS] + [("auto", "multiscale")]


@pytest.mark.parametrize("method, problem", CASES)
def test_every_transformation_every_method(method, problem):
    """Each transformation, jitted, against the references, with the adjoint method set."""
    pb = PROBLEMS[problem]()
    got = _transforms(lambda th, x: z_star(pb, th, x, spec(method)), pb)
    ref = references(problem)
    errors = {k: rel(got[k], ref[k]) for k in got}
    assert max(errors.values()) <= BOUND, errors


# ---------------------------------------------------------- eager, third order, vmap


def test_eager_transformations():
    """No jit: jvp, grad and a Hessian-vector product, eagerly; repeated calls are cheap."""
    pb = tanh_problem()
    v, c = weights(pb)
    ref = ift_jacobian(pb, pb.theta, pb.x)

    def z(th, x=pb.x):
        return z_star(pb, th, x)

    assert rel(jax.jvp(z, (pb.theta,), (v,))[1], ref @ v) <= BOUND
    loss = lambda th: jnp.sum(c * z(th))  # noqa: E731
    assert rel(jax.grad(loss)(pb.theta), c @ ref) <= BOUND
    hvp_ref = jax.jvp(jax.grad(lambda th: jnp.sum(c * unrolled(pb, th, pb.x))), (pb.theta,),
                      (v,))[1]
    assert rel(jax.jvp(jax.grad(loss), (pb.theta,), (v,))[1], hvp_ref) <= BOUND
    # eagerly, the linear solves run as cached jitted programs (keyed on the operator's
    # jaxpr): new parameter values reuse them instead of compiling a while_loop per call
    jax.block_until_ready(jax.grad(loss)(pb.theta))
    cached = dict(jax_tangent._EAGER_SOLVES)
    for k in range(1, 3):
        jax.block_until_ready(jax.grad(loss)(pb.theta + 0.01 * k))
    assert cached and dict(jax_tangent._EAGER_SOLVES) == cached


def test_third_order_on_a_scalar():
    pb = tanh_problem()
    v, c = weights(pb)

    def third(z_fn):
        s = lambda a: jnp.sum(c * z_fn(pb.theta + a * v, pb.x))  # noqa: E731
        return jax.jit(jax.grad(jax.grad(jax.grad(s))))(0.0)

    got = third(lambda th, x: z_star(pb, th, x))
    ref = third(lambda th, x: unrolled(pb, th, x))
    assert rel(got, ref) <= BOUND and abs(float(ref)) > 1e-3


def test_vmap_over_per_sample_calls():
    """vmap of jacrev / jacfwd / hessian of one-sample solves (batch_axis=None)."""
    pb = tanh_problem()
    _, c = weights(pb)
    d = c.size // B
    ref = ift_jacobian(pb, pb.theta, pb.x).reshape(B, d, -1)

    def single(th, x):  # x: (P,) -> z*: (d,)
        prm = pb.unravel(th)
        return fixed_point(pb.f, jnp.zeros(d), prm, x, tol=TOL, max_iter=500, solver="picard",
                           batch_axis=None, backward=spec()).value

    def single_ref(th, x):
        prm = pb.unravel(th)
        return jax.lax.fori_loop(0, 200, lambda i, z: pb.f(z, prm, x), jnp.zeros(d))

    def transforms(fn):  # vmap over the samples of jacrev, jacfwd and hessian: one program
        scalar = lambda th, x, cb: jnp.sum(cb * fn(th, x))  # noqa: E731
        return jax.jit(lambda th, xs, cs: (
            jax.vmap(jax.jacrev(fn), in_axes=(None, 0))(th, xs),
            jax.vmap(jax.jacfwd(fn), in_axes=(None, 0))(th, xs),
            jax.vmap(jax.hessian(scalar), in_axes=(None, 0, 0))(th, xs, cs),
        ))(pb.theta, pb.x, c.reshape(B, d))

    jr, jf, H = transforms(single)
    H_ref = jax.jit(jax.vmap(jax.hessian(lambda th, x, cb: jnp.sum(cb * single_ref(th, x))),
                             in_axes=(None, 0, 0)))(pb.theta, pb.x, c.reshape(B, d))
    assert rel(jr, ref) <= BOUND and rel(jf, ref) <= BOUND and rel(H, H_ref) <= BOUND


def test_check_grads_forward_and_reverse_to_second_order():
    pb = tanh_problem(d=4)
    fn = jax.jit(lambda th: z_star(pb, th, pb.x))
    check_grads(fn, (pb.theta,), order=2, modes=("fwd", "rev"))


# ------------------------------------------------------------------- phantom and JFB


@pytest.mark.parametrize("backward, steps, lam", [(Phantom(3, 0.7), 3, 0.7), (JFB(), 1, 1.0)])
def test_inexact_modes_forward_and_reverse(backward, steps, lam):
    """Their tangent is the jvp of the unrolled map from z* held constant; the reverse mode
    (its transpose) is that map's vjp, as before the redesign."""
    pb = tanh_problem()
    v, c = weights(pb)
    x = pb.x
    z_fn = jax.jit(lambda th: z_star(pb, th, x, backward))
    z0 = jax.lax.stop_gradient(z_fn(pb.theta)).reshape(B, -1)

    def by_hand(th):
        prm, z = pb.unravel(th), z0
        for _ in range(steps):
            z = (1.0 - lam) * z + lam * pb.f(z, prm, x)
        return z.reshape(-1)

    np.testing.assert_allclose(jax.jvp(z_fn, (pb.theta,), (v,))[1],
                               jax.jvp(by_hand, (pb.theta,), (v,))[1], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(jax.vjp(z_fn, pb.theta)[1](c)[0],
                               jax.vjp(by_hand, pb.theta)[1](c)[0], rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------- correction states


def test_states_forward_mode():
    """Each state's tangent as if it were the fixed point: its own IFT solve at that point."""
    pb = tanh_problem()
    v, _ = weights(pb)

    def solve(th):
        sol = fixed_point(pb.f, pb.z0(pb.x), pb.unravel(th), pb.x, tol=TOL, max_iter=500,
                          solver="picard", backward=spec(), states=(2, 5))
        return sol.value, sol.states

    (z, states), (dz, d_states) = jax.jit(lambda th: jax.jvp(solve, (th,), (v,)))(pb.theta)
    for s, ds in zip((z, *states), (dz, *d_states), strict=True):
        def g(sf, th):
            return pb.f(sf.reshape(B, -1), pb.unravel(th), pb.x).reshape(-1)

        J, J_theta = jax.jacfwd(g, argnums=(0, 1))(s.reshape(-1), pb.theta)
        ref = jnp.linalg.solve(jnp.eye(s.size) - J, J_theta @ v)
        assert rel(ds.reshape(-1), ref) <= BOUND


# -------------------------------------------------------------- on_backward, failures


def test_on_backward_receives_adjoint_info_eagerly_and_under_jit():
    pb = tanh_problem()
    v, c = weights(pb)
    seen: list[AdjointInfo] = []

    def loss(th):
        sol = fixed_point(pb.f, pb.z0(pb.x), pb.unravel(th), pb.x, tol=TOL, max_iter=500,
                          solver="picard", backward=spec("gmres"), on_backward=seen.append)
        return jnp.sum(c * ravel_pytree(sol.value)[0])

    for run in (jax.grad(loss), jax.jit(jax.grad(loss)),
                lambda th: jax.jvp(loss, (th,), (v,))[1]):
        seen.clear()
        jax.block_until_ready(run(pb.theta))
        jax.effects_barrier()
        assert len(seen) == 1, len(seen)  # one linear solve: adjoint (rev) or tangent (fwd)
        info = seen[0]
        assert isinstance(info, AdjointInfo) and isinstance(info.residual, np.ndarray)
        assert info.iterations.shape == (B,) and bool(np.all(info.converged))
        assert bool(np.all(info.residual <= TOL)) and bool(np.all(info.iterations > 0))


def _callbacks(jaxpr) -> int:
    """How many ``debug_callback`` equations a (closed) jaxpr holds, sub-jaxprs included."""
    n = 0
    for e in jaxpr.eqns:
        n += e.primitive.name == "debug_callback"
        for p in e.params.values():
            for q in p if isinstance(p, (tuple, list)) else [p]:
                sub = getattr(q, "jaxpr", None)
                if sub is not None:
                    n += _callbacks(sub if hasattr(sub, "eqns") else sub.jaxpr)
    return n


def _small(z, a, x):  # J_f = diag(a_0 (1 - tanh^2)): |a_0| < 1 contracts
    return jnp.tanh(a[0] * z + a[1] * x)


def test_vmapped_linear_solves_report_once_with_every_sample():
    """Under vmap (jacrev maps the adjoint solve over every output) a linear solve reports
    once, with the samples of every mapped element, not once per element: debug.callback's
    own rule unrolled the report, 512 callbacks in a jacrev of a (8, 32) solve (XLA
    compiled that program in 14 s instead of 1.6 s)."""
    x = jnp.asarray([[0.3, -0.5, 0.9], [1.2, 0.1, -0.7]])
    seen: list[AdjointInfo] = []

    def z(a):
        sol = fixed_point(_small, jnp.zeros_like(x), a, x, tol=1e-12, max_iter=200,
                          solver="picard", backward=spec("gmres"), on_backward=seen.append)
        return sol.value.reshape(-1)

    a = jnp.asarray([0.6, 0.8])
    jac = jax.jit(jax.jacrev(z))
    # custom_linear_solve keeps both of its solves (tangent and transposed) in the program:
    # one callback each, whatever the number of mapped outputs (unrolled: 2 per output)
    assert _callbacks(jax.make_jaxpr(jac)(a).jaxpr) == 2
    got = jax.block_until_ready(jac(a))
    jax.effects_barrier()
    assert len(seen) == 1, len(seen)  # one adjoint solve per output (6), one report
    assert seen[0].iterations.shape == (x.size * x.shape[0],)
    assert bool(np.all(seen[0].converged)) and bool(np.all(seen[0].residual <= 1e-12))
    # the reference: dz/da = (I - J_f)^{-1} df/da, dense in float64, outside eqsolve
    zs = np.asarray(z(a)).reshape(x.shape)
    d = 1 - np.tanh(0.6 * zs + 0.8 * np.asarray(x)) ** 2
    ref = np.stack([d * zs, d * np.asarray(x)], axis=-1) / (1 - 0.6 * d)[..., None]
    assert np.max(np.abs(np.asarray(got) - ref.reshape(-1, 2))) <= 1e-10
    # nested vmap: still one report, every (outer, output, sample) flattened
    seen.clear()
    jax.block_until_ready(jax.jit(jax.vmap(jax.jacrev(z)))(jnp.stack([a, 0.9 * a])))
    jax.effects_barrier()
    assert len(seen) == 1 and seen[0].status.shape == (2 * x.size * x.shape[0],)


def test_on_backward_must_be_callable():
    with pytest.raises(TypeError, match="on_backward"):
        fixed_point(lambda z: 0.5 * z, jnp.zeros((2, 3)), on_backward="log")


def _expanding(z, a, x):  # J_f = a I with a = 1.5: the Neumann series diverges
    return a * z + x


def test_failed_tangent_solve_warns_and_raise_gives_nan_under_jit():
    """Non-contractive map: the forward (Anderson) solves it; the 'neumann' tangent solve
    cannot. Never a quiet number: a warning, and NaN with on_failure='raise' under jit."""
    x = jnp.ones((2, 3))
    a = jnp.asarray(1.5)

    def z(a, on_failure=None):
        sol = fixed_point(_expanding, jnp.zeros_like(x), a, x, solver="anderson", tol=1e-12,
                          backward=Implicit("neumann", max_iter=30, on_failure=on_failure))
        return jnp.sum(sol.value)

    for run in (jax.grad(z), lambda a: jax.jvp(z, (a,), (1.0,))[1]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            jax.block_until_ready(run(a))
            jax.effects_barrier()
        assert any(issubclass(w.category, ConvergenceWarning)
                   and "neumann" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for run in (jax.jit(jax.grad(lambda a: z(a, "raise"))),
                    jax.jit(lambda a: jax.jvp(lambda a: z(a, "raise"), (a,), (1.0,))[1])):
            assert bool(jnp.isnan(run(a)))
        jax.effects_barrier()
    assert any(issubclass(w.category, ConvergenceWarning) for w in caught)
    # the right answer exists (z* = x / (1 - a)): Anderson finds it
    g = jax.grad(lambda a: jnp.sum(fixed_point(_expanding, jnp.zeros_like(x), a, x,
                                               backward=Implicit("anderson")).value))(a)
    np.testing.assert_allclose(g, 6.0 / (1.0 - 1.5) ** 2, rtol=1e-6)


def test_generic_solve_under_grad_points_to_the_jax_adapter():
    """eqsolve.fixed_point (a lax.while_loop) cannot be reverse-differentiated: the error
    names eqsolve.jax.fixed_point; forward mode through the iterations still works."""
    def loss(w):
        return jnp.sum(eqsolve.fixed_point(lambda z: jnp.tanh(w * z + 1.0),
                                           jnp.zeros((2, 3))).value)

    for run in (jax.grad(loss), jax.jit(jax.grad(loss))):
        with pytest.raises(ValueError, match=r"eqsolve\.jax\.fixed_point"):
            run(0.5)
    assert np.isfinite(float(jax.jvp(loss, (0.5,), (1.0,))[1]))
