"""eqsolve.torch.fixed_point(f, z0, *args): derivatives of every order and torch.func.

References computed outside eqsolve, in float64: the dense implicit-function theorem
(``dz*/dtheta = (I - J)^{-1} df/dtheta`` with ``J`` from ``torch.autograd.functional.jacobian``
at a ``z*`` converged to 1e-15) and a plain unrolled solve of a contraction (``||W|| = 0.6``,
200 steps: converged to machine precision) differentiated by torch itself, at any order and
under any torch.func transformation. The fixed point is solved to ``tol=1e-13``.
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

import eqsolve  # noqa: E402
import eqsolve.torch as et  # noqa: E402

torch.set_num_threads(1)
DT = torch.float64
B, D = 3, 5
TOL = 1e-13
SOLVE = {"tol": TOL, "max_iter": 300}
STEPS = 200  # plain steps of the unrolled reference: 0.6**200 ~ 1e-44


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _params(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, dtype=DT, generator=g)
    W *= 0.6 / torch.linalg.matrix_norm(W, 2)
    U = 0.5 * torch.randn(D, D, dtype=DT, generator=g)
    b = 0.1 * torch.randn(D, dtype=DT, generator=g)
    x = torch.randn(B, D, dtype=DT, generator=g)
    return W, U, b, x


def cell(z, W, U, b, x):  # type: ignore[no-untyped-def]
    return torch.tanh(z @ W.T + x @ U.T + b)


def solved(W, U, b, x, **kw):  # type: ignore[no-untyped-def]
    z0 = torch.zeros(x.shape[:-1] + (D,), dtype=DT)
    return et.fixed_point(cell, z0, W, U, b, x, **{**SOLVE, **kw}).value


def unrolled(W, U, b, x):  # type: ignore[no-untyped-def]
    z = torch.zeros(x.shape[:-1] + (D,), dtype=DT)
    for _ in range(STEPS):
        z = cell(z, W, U, b, x)
    return z


def loss(F):  # type: ignore[no-untyped-def]
    return lambda W, U, b, x: F(W, U, b, x).pow(2).sum()


def _leaves(params):  # type: ignore[no-untyped-def]
    return [p.clone().requires_grad_(True) for p in params]


def force_matching(F, params):  # type: ignore[no-untyped-def]
    """E = sum z*^2, F = dE/dx (create_graph), d sum(F^2) / d(W, U, b)."""
    W, U, b, x = params
    (Fx,) = torch.autograd.grad(F(W, U, b, x).pow(2).sum(), x, create_graph=True)
    return torch.autograd.grad(Fx.pow(2).sum(), (W, U, b))


# --------------------------------------------------------------------- first order, IFT


def test_first_order_matches_the_dense_implicit_function_theorem() -> None:
    W, U, b, x = _params()
    z = unrolled(W, U, b, x)
    for _ in range(5):  # Newton-free polish: the contraction is at machine precision
        z = cell(z, W, U, b, x)

    def F(zf, Wp, xp):  # type: ignore[no-untyped-def]
        return cell(zf.reshape(B, D), Wp, U, b, xp).reshape(-1)

    Jz, JW, Jx = torch.autograd.functional.jacobian(F, (z.reshape(-1), W, x))
    A = torch.eye(B * D, dtype=DT) - Jz
    ref_W = torch.linalg.solve(A, JW.reshape(B * D, -1)).reshape(B, D, D, D)
    ref_x = torch.linalg.solve(A, Jx.reshape(B * D, -1)).reshape(B, D, B, D)
    got_W, got_x = torch.autograd.functional.jacobian(
        lambda Wp, xp: solved(Wp, U, b, xp), (W, x)
    )
    assert rel(got_W, ref_W) < 1e-10
    assert rel(got_x, ref_x) < 1e-10


@pytest.mark.parametrize("method", ["auto", "anderson", "neumann", "gmres", "broyden"])
def test_implicit_methods_first_and_second_order(method: str) -> None:
    params = _leaves(_params(1))
    kw = {"backward": eqsolve.Implicit(method, tol=1e-12, max_iter=300)}
    got = torch.autograd.grad(loss(lambda *p: solved(*p, **kw))(*params), params)
    ref = torch.autograd.grad(loss(unrolled)(*params), params)
    assert max(rel(a, r) for a, r in zip(got, ref, strict=True)) < 1e-8
    got2 = force_matching(lambda *p: solved(*p, **kw), params)
    ref2 = force_matching(unrolled, params)
    assert max(rel(a, r) for a, r in zip(got2, ref2, strict=True)) < 1e-8


# ------------------------------------------------------------------ higher orders


def test_force_matching_double_backward_is_exact() -> None:
    params = _leaves(_params(2))
    got = force_matching(solved, params)
    ref = force_matching(unrolled, params)
    assert max(rel(a, r) for a, r in zip(got, ref, strict=True)) < 1e-10


def test_gradcheck_and_gradgradcheck() -> None:
    W, U, b, x = _params(3)
    Wr, xr = W.clone().requires_grad_(True), x[:2].clone().requires_grad_(True)

    def fn(Wp, xp):  # type: ignore[no-untyped-def]
        return solved(Wp, U, b, xp)

    assert torch.autograd.gradcheck(fn, (Wr, xr))
    assert torch.autograd.gradgradcheck(fn, (Wr, xr))


def test_third_order_on_a_scalar() -> None:
    W, U, b, x = _params(4)

    def energy(s, F):  # type: ignore[no-untyped-def]
        return F(s * W, U, b, x).pow(2).sum()

    def derivatives(F):  # type: ignore[no-untyped-def]
        s = torch.tensor(0.9, dtype=DT, requires_grad=True)
        (d1,) = torch.autograd.grad(energy(s, F), s, create_graph=True)
        (d2,) = torch.autograd.grad(d1, s, create_graph=True)
        (d3,) = torch.autograd.grad(d2, s)
        return torch.stack([d1, d2, d3]).detach()

    got, ref = derivatives(solved), derivatives(unrolled)
    assert float(((got - ref).abs() / ref.abs()).max()) < 1e-9


def _multiscale(z, W, V, x):  # type: ignore[no-untyped-def]
    a, c = z  # (B, D) and (B, 2, D): two "resolutions" coupled both ways
    a_new = torch.tanh(a @ W.T + 0.3 * c.mean(1) + x)
    c_new = torch.tanh(0.4 * c + (a @ V.T)[:, None, :] + 0.1 * x[:, None, :])
    return a_new, c_new


def test_tuple_state_first_and_second_order() -> None:
    W, U, _, x = _params(5)
    V = 0.3 * U
    params = _leaves((W, V, x))
    z0 = (torch.zeros(B, D, dtype=DT), torch.zeros(B, 2, D, dtype=DT))

    def solved_t(Wp, Vp, xp):  # type: ignore[no-untyped-def]
        return et.fixed_point(_multiscale, z0, Wp, Vp, xp, **SOLVE).value

    def unrolled_t(Wp, Vp, xp):  # type: ignore[no-untyped-def]
        z = z0
        for _ in range(STEPS):
            z = _multiscale(z, Wp, Vp, xp)
        return z

    def energy(F, Wp, Vp, xp):  # type: ignore[no-untyped-def]
        a, c = F(Wp, Vp, xp)
        return a.pow(2).sum() + (c * c.flip(-1)).sum()

    got = torch.autograd.grad(energy(solved_t, *params), params)
    ref = torch.autograd.grad(energy(unrolled_t, *params), params)
    assert max(rel(a, r) for a, r in zip(got, ref, strict=True)) < 1e-10

    def fm(F):  # type: ignore[no-untyped-def]
        Wp, Vp, xp = params
        (Fx,) = torch.autograd.grad(energy(F, Wp, Vp, xp), xp, create_graph=True)
        return torch.autograd.grad(Fx.pow(2).sum(), (Wp, Vp))

    assert max(rel(a, r) for a, r in zip(fm(solved_t), fm(unrolled_t), strict=True)) < 1e-10


# ------------------------------------------------------------------------ torch.func

TF = torch.func


def _per_sample(F):  # type: ignore[no-untyped-def]
    W, U, b, x = _params(6)

    def one(xi):  # type: ignore[no-untyped-def]
        if F is solved:
            return et.fixed_point(cell, torch.zeros(D, dtype=DT), W, U, b, xi, **SOLVE).value
        z = torch.zeros(D, dtype=DT)
        for _ in range(STEPS):
            z = cell(z, W, U, b, xi)
        return z

    return TF.vmap(one)(x)


TRANSFORMS = {
    "grad": lambda F, P: TF.grad(loss(F), argnums=(0, 1, 2, 3))(*P),
    "vjp": lambda F, P: TF.vjp(F, *P)[1](torch.ones(B, D, dtype=DT)),
    "jacrev": lambda F, P: TF.jacrev(F, argnums=(0, 3))(*P),
    "jvp": lambda F, P: TF.jvp(F, P, tuple(torch.ones_like(p) for p in P))[1],
    "jacfwd": lambda F, P: TF.jacfwd(F, argnums=(0, 3))(*P),
    "hessian": lambda F, P: TF.hessian(loss(F), argnums=2)(*P),
    "grad_grad": lambda F, P: TF.grad(
        lambda b: TF.grad(loss(F), argnums=2)(P[0], P[1], b, P[3]).pow(2).sum()
    )(P[2]),
    "vmap": lambda F, P: TF.vmap(F, in_dims=(None, None, None, 0))(
        *P[:3], torch.stack([P[3], 2 * P[3], -P[3]])
    ),
    "vmap_per_sample": lambda F, P: _per_sample(F),
    "vmap_of_grad": lambda F, P: TF.vmap(
        TF.grad(lambda xi, W: F(W, P[1], P[2], xi[None]).pow(2).sum(), argnums=1),
        in_dims=(0, None),
    )(P[3], P[0]),
    "vmap_of_vmap": lambda F, P: TF.vmap(TF.vmap(F, in_dims=(None, None, None, 0)),
                                         in_dims=(None, None, None, 0))(
        *P[:3], torch.stack([P[3][:, None], -P[3][:, None]])
    ),
    "vmap_of_hessian": lambda F, P: TF.vmap(
        TF.hessian(lambda xi: F(P[0], P[1], P[2], xi[None]).pow(2).sum())
    )(P[3]),
    "jacrev_of_vmap": lambda F, P: TF.jacrev(
        lambda W: TF.vmap(lambda xi: F(W, P[1], P[2], xi[None]))(P[3])
    )(P[0]),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_torch_func_transform_is_exact(name: str) -> None:
    P = _params(7)
    got, ref = TRANSFORMS[name](solved, P), TRANSFORMS[name](unrolled, P)
    got_l = list(got) if isinstance(got, (tuple, list)) else [got]
    ref_l = list(ref) if isinstance(ref, (tuple, list)) else [ref]
    assert max(rel(a, r) for a, r in zip(got_l, ref_l, strict=True)) < 1e-10


def test_functional_call_of_a_module() -> None:
    lin = torch.nn.Linear(D, D, dtype=DT)
    with torch.no_grad():
        lin.weight *= 0.6 / torch.linalg.matrix_norm(lin.weight, 2)
    x = _params(8)[3]
    params = {k: v.detach() for k, v in lin.named_parameters()}

    def f(z, weight, bias, xx):  # type: ignore[no-untyped-def]
        return torch.tanh(TF.functional_call(lin, {"weight": weight, "bias": bias}, (z,)) + xx)

    def F(p, how):  # type: ignore[no-untyped-def]
        if how == "solved":
            z0 = torch.zeros(B, D, dtype=DT)
            return et.fixed_point(f, z0, p["weight"], p["bias"], x, **SOLVE).value.sum()
        z = torch.zeros(B, D, dtype=DT)
        for _ in range(STEPS):
            z = f(z, p["weight"], p["bias"], x)
        return z.sum()

    got, ref = TF.grad(F)(params, "solved"), TF.grad(F)(params, "unrolled")
    assert max(rel(got[k], ref[k]) for k in ref) < 1e-10


# ------------------------------------------------------- Phantom, JFB, states, contract


@pytest.mark.parametrize("spec", [eqsolve.Phantom(4, 0.5), eqsolve.JFB()])
def test_phantom_and_jfb_are_autograd_through_their_unrolled_map(spec) -> None:  # type: ignore[no-untyped-def]
    params = _leaves(_params(9))
    sol = et.fixed_point(cell, torch.zeros(B, D, dtype=DT), *params, backward=spec, **SOLVE)
    z_star = sol.value.detach()

    def by_hand(W, U, b, x):  # type: ignore[no-untyped-def]
        z = z_star
        for _ in range(spec.steps):
            z = (1 - spec.damping) * z + spec.damping * cell(z, W, U, b, x)
        return z_star + (z - z.detach())

    def via_fixed_point(W, U, b, x):  # type: ignore[no-untyped-def]
        return solved(W, U, b, x, backward=spec)

    got = torch.autograd.grad(loss(via_fixed_point)(*params), params)
    ref = torch.autograd.grad(loss(by_hand)(*params), params)
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=0)
    for a, r in zip(force_matching(via_fixed_point, params), force_matching(by_hand, params),
                    strict=True):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-15)
    plain = eqsolve.solve(lambda z: cell(z, *(p.detach() for p in params)),
                          torch.zeros(B, D, dtype=DT), **SOLVE)
    assert torch.equal(sol.value.detach(), plain.value)
    assert sol.nfev == plain.nfev + spec.steps


def test_value_is_the_solvers_z_star_and_nfev_is_the_solves() -> None:
    params = _leaves(_params(10))
    sol = et.fixed_point(cell, torch.zeros(B, D, dtype=DT), *params, **SOLVE)
    plain = eqsolve.solve(lambda z: cell(z, *(p.detach() for p in params)),
                          torch.zeros(B, D, dtype=DT), **SOLVE)
    assert sol.value.requires_grad
    assert torch.equal(sol.value.detach(), plain.value)
    assert torch.equal(sol.residual, plain.residual) and sol.nfev == plain.nfev
    assert torch.equal(sol.status, plain.status)


def test_states_with_args_get_their_own_implicit_gradient() -> None:
    W, _, _, x = _params(11)
    Wr = W.clone().requires_grad_(True)

    def f(z, Wp, xp):  # type: ignore[no-untyped-def]
        return torch.tanh(z @ Wp.T + xp)

    sol = et.fixed_point(f, torch.zeros(B, D, dtype=DT), Wr, x, solver="anderson",
                         states=(1, 2, 5), **SOLVE)
    assert sol.states is not None and len(sol.states) == 3
    for k, state in enumerate(sol.states):
        g = torch.linspace(-1, 1, B * D, dtype=DT).reshape(B, D) * (k + 1)
        (got,) = torch.autograd.grad((state * g).sum(), Wr)
        z = state.detach()
        s = 1 - torch.tanh(z @ W.T + x) ** 2
        J = s[:, :, None] * W[None]  # J_b = diag(s_b) W
        u = torch.linalg.solve(torch.eye(D, dtype=DT) - J.transpose(1, 2), g)
        ref = torch.einsum("bi,bj->ij", s * u, z)
        assert rel(got, ref) < 1e-10, k


def test_deq_layer_with_args_and_adjoint_report() -> None:
    W, U, b, x = _leaves(_params(12))
    deq = et.DEQ(**SOLVE)
    z = deq(cell, torch.zeros(B, D, dtype=DT), W, U, b, x)
    (gW,) = torch.autograd.grad(z.pow(2).sum(), W)
    (ref,) = torch.autograd.grad(unrolled(W, U, b, x).pow(2).sum(), W)
    assert rel(gW, ref) < 1e-10
    assert deq.last_adjoint_info is not None and bool(deq.last_adjoint_info.converged.all())


def test_bfloat16_f_with_args() -> None:
    W, U, b, x = _params(13)
    params = _leaves([p.float() for p in (W, U, b, x)])
    sol = et.fixed_point(cell, torch.zeros(B, D), *params, tol=1e-2, f_dtype=torch.bfloat16)
    assert sol.value.dtype == torch.float32
    got = torch.autograd.grad(sol.value.sum(), params[0])[0]
    ref = torch.autograd.grad(unrolled(*(p.double() for p in params)).sum(), params[0])[0]
    assert rel(got.double(), ref) < 0.1


# ---------------------------------------------------------------------------- refusals


def test_closure_tensor_next_to_args_raises() -> None:
    W, U, b, x = _params(14)
    Wr = W.clone().requires_grad_(True)
    z0 = torch.zeros(B, D, dtype=DT)
    with pytest.raises(RuntimeError, match="not one of the positional args"):
        et.fixed_point(lambda z, xp: cell(z, Wr, U, b, xp), z0, x)
    with pytest.raises(RuntimeError, match="not one of the positional args"):
        TF.grad(lambda Wp: et.fixed_point(lambda z, xp: cell(z, Wp, U, b, xp), z0, x)
                .value.sum())(W)
    with pytest.raises(RuntimeError, match="not one of the positional args"):
        TF.jvp(lambda Wp: et.fixed_point(lambda z, xp: cell(z, Wp, U, b, xp), z0, x).value,
               (W,), (W,))
    with pytest.raises(RuntimeError, match="batched by vmap"):
        TF.vmap(lambda xi: et.fixed_point(lambda z, Wp: cell(z, Wp, U, b, xi),
                                          torch.zeros(D, dtype=DT), W).value)(x)


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_closure_path_under_torch_func_raises(transform: str) -> None:
    W, U, b, x = _params(15)
    z0 = torch.zeros(B, D, dtype=DT)

    def run(Wp):  # type: ignore[no-untyped-def]
        return et.fixed_point(lambda z: cell(z, Wp, U, b, x), z0).value.sum()

    with pytest.raises(RuntimeError, match="Pass them as positional args"):
        if transform == "grad":
            TF.grad(run)(W)
        else:
            TF.vmap(run)(torch.stack([W, W]))


def test_closure_path_double_backward_gives_the_new_advice() -> None:
    W, U, b, x = _params(16)
    Wr = W.clone().requires_grad_(True)
    sol = et.fixed_point(lambda z: cell(z, Wr, U, b, x), torch.zeros(B, D, dtype=DT))
    with pytest.raises(RuntimeError, match=r"positional args.*exact"):
        torch.autograd.grad(sol.value.sum(), Wr, create_graph=True)


def test_bad_args_and_outputs_raise() -> None:
    W, U, b, x = _params(17)
    z0 = torch.zeros(B, D, dtype=DT)
    with pytest.raises(TypeError, match=r"args\[1\].*torch.Tensor"):
        et.fixed_point(lambda z, xp, s: cell(z, W, U, b, xp) * s, z0, x, 0.5)
    with pytest.raises(ValueError, match="must return a state like z0"):
        et.fixed_point(lambda z, xp: cell(z, W, U, b, xp)[:, :2], z0, x)


@pytest.mark.parametrize("order", [1, 2])
def test_non_contractive_adjoint_failure_warns(order: int) -> None:
    W, U, b, x = _params(18)
    W4 = (4 * W).requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    spec = eqsolve.Implicit("neumann", max_iter=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", eqsolve.ConvergenceWarning)  # the forward's own
        z = solved(W4, U, b, xr, backward=spec, solver="anderson")
    with pytest.warns(eqsolve.ConvergenceWarning, match="implicit backward"):
        if order == 1:
            torch.autograd.grad(z.pow(2).sum(), W4)
        else:
            (Fx,) = torch.autograd.grad(z.pow(2).sum(), xr, create_graph=True)
            torch.autograd.grad(Fx.pow(2).sum(), W4)


# ------------------------------------------------------------ modules, dropout, memory


class _Cell(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(D, D, dtype=DT)
        self.inp = torch.nn.Linear(D, D, bias=False, dtype=DT)
        with torch.no_grad():
            self.lin.weight *= 0.6 / torch.linalg.matrix_norm(self.lin.weight, 2)
        self.drop = et.VariationalDropout(0.3)

    def forward(self, z, x):  # type: ignore[no-untyped-def]
        return torch.tanh(self.drop(self.lin(z)) + self.inp(x))


def test_module_f_with_args_gets_exact_second_order_gradients() -> None:
    torch.manual_seed(0)
    cell = _Cell()  # training mode: one dropout mask per solve, kept for backward
    x = _params(19)[3].requires_grad_(True)
    deq = et.DEQ(**SOLVE)
    params = list(cell.parameters())

    def fm(z):  # type: ignore[no-untyped-def]
        (Fx,) = torch.autograd.grad(z.pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(Fx.pow(2).sum(), params)

    got = fm(deq(cell, torch.zeros(B, D, dtype=DT), x))
    z = torch.zeros(B, D, dtype=DT)
    for _ in range(STEPS):  # outside a solve the module keeps the solve's mask
        z = cell(z, x)
    ref = fm(z)
    assert max(rel(a, r) for a, r in zip(got, ref, strict=True)) < 1e-10


def test_phantom_under_torch_func() -> None:
    W, U, b, x = _params(20)
    spec = eqsolve.Phantom(3, 0.5)
    z0 = torch.zeros(B, D, dtype=DT)
    g = TF.grad(lambda Wp: et.fixed_point(cell, z0, Wp, U, b, x, backward=spec, **SOLVE)
                .value.pow(2).sum())(W)
    Wr = W.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(
        et.fixed_point(cell, z0, Wr, U, b, x, backward=spec, **SOLVE).value.pow(2).sum(), Wr
    )
    torch.testing.assert_close(g, ref, rtol=1e-12, atol=0)
    v = TF.vmap(lambda xi: et.fixed_point(cell, torch.zeros(D, dtype=DT), W, U, b, xi,
                                          backward=spec, **SOLVE).value)(x)
    torch.testing.assert_close(v, unrolled(W, U, b, x), rtol=1e-12, atol=1e-13)


def test_no_reference_cycle_and_no_probe_without_grad() -> None:
    import gc
    import weakref

    W, U, b, x = _leaves(_params(21))
    gc.disable()
    try:
        value = solved(W, U, b, x)
        ref = weakref.ref(value.grad_fn)
        del value
        assert ref() is None  # freed by reference counting: no cycle through the node
    finally:
        gc.enable()
    with torch.no_grad():  # no gradient wanted: a closure tensor that requires grad is fine
        sol = et.fixed_point(lambda z, xp: cell(z, W, U, b, xp), torch.zeros(B, D, dtype=DT), x)
    assert not sol.value.requires_grad


def test_torch_compile_runs_the_solve_eagerly_inside_a_compiled_step() -> None:
    W, U, b, x = _leaves(_params(22))

    def step(W, U, b, x):  # type: ignore[no-untyped-def]
        z = et.fixed_point(cell, torch.zeros(B, D, dtype=DT), W, U, b, x, **SOLVE).value
        loss = (z.pow(2).sum() + 1.0) * 2.0
        return torch.autograd.grad(loss, (W, x))

    explained = torch._dynamo.explain(step)(W, U, b, x)
    assert explained.graph_break_count <= 2  # the fixed_point call (and autograd.grad)
    got = torch.compile(step, backend="eager")(W, U, b, x)
    for a, r in zip(got, step(W, U, b, x), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=0)


def test_plain_forward_ad_is_refused_clearly() -> None:
    import torch.autograd.forward_ad as fwAD

    W, U, b, x = _params(23)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="torch.func.jvp"):
        solved(fwAD.make_dual(W, torch.ones_like(W)), U, b, x)


def test_backward_none_with_args_is_the_plain_solve() -> None:
    params = _leaves(_params(24))
    sol = et.fixed_point(cell, torch.zeros(B, D, dtype=DT), *params, backward=None, **SOLVE)
    plain = eqsolve.solve(lambda z: cell(z, *(p.detach() for p in params)),
                          torch.zeros(B, D, dtype=DT), **SOLVE)
    assert not sol.value.requires_grad and sol.nfev == plain.nfev
    assert torch.equal(sol.value, plain.value)


def test_states_under_vmap_are_refused() -> None:
    W, U, b, x = _params(25)
    with pytest.raises(NotImplementedError, match="states= is not supported under"):
        TF.vmap(lambda xi: et.fixed_point(cell, torch.zeros(D, dtype=DT), W, U, b, xi,
                                          states=(1, 2)).value)(x)


# ------------------------------------------------ torch.distributed with explicit inputs


class _ArgsNet(torch.nn.Module):
    """The DDP model of test_distributed_torch with the DEQ's inputs passed as args."""

    def __init__(self, **deq_kwargs):  # type: ignore[no-untyped-def]
        from test_distributed_torch import _Net

        super().__init__()
        ref = _Net()
        self.W, self.inj, self.head = ref.W, ref.inj, ref.head
        self.deq = et.DEQ(tol=1e-12, max_iter=200, **deq_kwargs)

    def forward(self, x):  # type: ignore[no-untyped-def]
        z0 = torch.zeros(x.shape[0], self.W.shape[0], dtype=x.dtype)
        z = self.deq(lambda z, W, inj: torch.tanh(z @ W.T + inj), z0, self.W, self.inj(x))
        return self.head(z)


def _ddp_args_worker(rank, world, init_file, out_dir, sync_stop):  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    from test_distributed_torch import BATCH, _data, _init, _train

    _init(rank, world, init_file)
    ddp = torch.nn.parallel.DistributedDataParallel(_ArgsNet(sync_stop=sync_stop))
    x, y = _data()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    torch.save(_train(ddp, x[shard], y[shard]), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("sync_stop", [False, True])
def test_ddp_training_with_args_matches_single_process(tmp_path, sync_stop) -> None:  # type: ignore[no-untyped-def]
    import sys

    if sys.platform != "linux":
        pytest.skip("uses gloo file rendezvous (Linux only)")
    from test_distributed_torch import STEPS, _data, _launch, _Net, _train

    _launch(_ddp_args_worker, tmp_path, sync_stop)
    logs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, y = _data()
    ref = _train(_Net(), x, y)  # the closure model, one process, the full batch
    for step in range(STEPS):
        for name, g in ref[step]["grads"].items():
            assert float(g.abs().max()) > 0.0, name
            for log in logs:
                err = float((log[step]["grads"][name] - g).abs().max() / g.abs().max())
                assert err <= 1e-10, (step, name, err)
        if sync_stop:
            assert logs[0][step]["nfev"] == logs[1][step]["nfev"]
