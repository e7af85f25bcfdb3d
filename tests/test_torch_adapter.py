"""eqsolve.torch: differentiable fixed points and the DEQ layer.

Gradients are checked against a dense float64 reference built with NumPy from the
closed-form implicit gradient of ``f(z) = tanh(z W^T + x U^T + b)`` (Newton-refined fixed
point, ``u = (I - J^T)^{-1} c`` per sample), against ``torch.autograd.gradcheck``, and against
backprop through a converged unrolled loop. Torch runs on one thread (this VM stalls with
more).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import eqsolve  # noqa: E402
import eqsolve.torch as et  # noqa: E402
from eqsolve.core.solution import Status  # noqa: E402

torch.set_num_threads(1)
nn = torch.nn

EXACT = ["neumann", "anderson", "broyden"]
if importlib.util.find_spec("eqsolve.core.gmres") is not None:
    EXACT.append("gmres")


# ----------------------------------------------------------------------------- problems


def make_problem(kind: str, d: int = 16, p: int = 8, B: int = 4, seed: int = 0):
    """NumPy float64 ``(W, U, b, x)`` for the benchmark families, small.

    tanh (P1): W Gaussian with spectral norm 0.9; wide (P2): 2.0; sym (P4):
    ``Q diag(linspace(0, 0.99, d)) Q^T`` with the input injection (U, b) scaled by 0.1.
    """
    rng = np.random.default_rng(seed)
    if kind == "sym":
        Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        W = Q @ np.diag(np.linspace(0.0, 0.99, d)) @ Q.T
        scale = 0.1
    else:
        W = rng.standard_normal((d, d))
        W *= {"tanh": 0.9, "wide": 2.0}[kind] / np.linalg.norm(W, 2)
        scale = 1.0
    U = scale * rng.standard_normal((d, p)) / np.sqrt(p)
    b = scale * 0.1 * rng.standard_normal(d)
    x = rng.standard_normal((B, p))
    return W, U, b, x


class Cell(nn.Module):
    """``f(z, x) = tanh(z W^T + x U^T + b)`` with parameters W, U, b."""

    def __init__(self, W, U, b, dtype=torch.float64):
        super().__init__()
        self.W = nn.Parameter(torch.tensor(W, dtype=dtype))
        self.U = nn.Parameter(torch.tensor(U, dtype=dtype))
        self.b = nn.Parameter(torch.tensor(b, dtype=dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def reference_gradients(W, U, b, x, z_start, c):
    """Dense float64 gradients of ``sum(c * z*)`` w.r.t. W, U, b, x.

    The fixed point near ``z_start`` is refined by Newton's method to machine precision;
    then ``u_b = (I - J_b^T)^{-1} c_b``, ``s_b = u_b * (1 - z*_b^2)`` and
    ``dW = sum_b s_b z*_b^T``, ``dU = sum_b s_b x_b^T``, ``db = sum_b s_b``, ``dx_b = U^T s_b``.
    """
    inj = x @ U.T + b
    z = np.array(z_start, dtype=np.float64)
    eye = np.eye(W.shape[0])
    for _ in range(30):
        fz = np.tanh(z @ W.T + inj)
        J = (1.0 - fz**2)[:, :, None] * W[None]
        z = z - np.linalg.solve(eye - J, (z - fz)[..., None])[..., 0]
    fz = np.tanh(z @ W.T + inj)
    assert np.max(np.abs(fz - z)) < 1e-14, "reference Newton refinement failed"
    J = (1.0 - fz**2)[:, :, None] * W[None]
    u = np.linalg.solve(eye - np.transpose(J, (0, 2, 1)), c[..., None])[..., 0]
    s = u * (1.0 - fz**2)
    return {"W": s.T @ fz, "U": s.T @ x, "b": s.sum(0), "x": s @ U}, fz


def rel_err(a, b) -> float:
    a = a.detach().double().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def setup(kind, dtype, **kw):
    W, U, b, x = make_problem(kind, **kw)
    cell = Cell(W, U, b, dtype)
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    c = np.random.default_rng(123).standard_normal((x.shape[0], W.shape[0]))
    return cell, xt, c, (W, U, b, x)


def grads_of(cell, xt):
    return {"W": cell.W.grad, "U": cell.U.grad, "b": cell.b.grad, "x": xt.grad}


# ----------------------------------------------------------------------------- exact gradients


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("kind", ["tanh", "sym"])
@pytest.mark.parametrize(
    "dtype, tol, bound",
    [(torch.float64, 1e-10, 1e-7), (torch.float32, 1e-6, 1e-3)],
    ids=["f64", "f32"],
)
def test_exact_gradient_matches_dense_reference(method, kind, dtype, tol, bound):
    cell, xt, c, (W, U, b, x) = setup(kind, dtype)
    z0 = torch.zeros(x.shape[0], W.shape[0], dtype=dtype)
    spec = eqsolve.Implicit(method, max_iter=5000 if method == "neumann" else None)
    sol = et.fixed_point(lambda z: cell(z, xt), z0, tol=tol, max_iter=500, backward=spec)
    assert sol.value.grad_fn is not None and sol.value.dtype == dtype
    assert bool(sol.converged.all())
    (sol.value * torch.tensor(c, dtype=dtype)).sum().backward()
    ref, z_ref = reference_gradients(W, U, b, x, sol.value.detach().double().numpy(), c)
    assert np.max(np.abs(sol.value.detach().double().numpy() - z_ref)) < 100 * tol
    for name, g in grads_of(cell, xt).items():
        assert g is not None, name
        assert g.dtype == dtype
        assert rel_err(g, ref[name]) <= bound, (name, rel_err(g, ref[name]))


@pytest.mark.parametrize("method", EXACT)
def test_wide_problem_accurate_or_warned(method):
    """P2 (spectral norm 2): each method either gives the reference gradient or says it failed.

    J_f(z*) has spectral radius > 1 on one sample here, so plain Neumann iteration must
    diverge -- and warn -- while Anderson/Broyden solve the adjoint.
    """
    cell, xt, c, (W, U, b, x) = setup("wide", torch.float64)
    z0 = torch.zeros(x.shape[0], W.shape[0], dtype=torch.float64)
    sol = et.fixed_point(lambda z: cell(z, xt), z0, tol=1e-10, max_iter=500,
                         backward=eqsolve.Implicit(method, max_iter=500))
    assert bool(sol.converged.all())
    ref, z_ref = reference_gradients(W, U, b, x, sol.value.detach().numpy(), c)
    J = (1.0 - z_ref**2)[:, :, None] * W[None]
    radius = np.abs(np.linalg.eigvals(J)).max()
    assert radius > 1.0  # the premise of this test
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (sol.value * torch.tensor(c)).sum().backward()
    warned = [w for w in caught if issubclass(w.category, eqsolve.ConvergenceWarning)]
    errors = {k: rel_err(g, ref[k]) for k, g in grads_of(cell, xt).items()}
    if method == "neumann":
        assert warned, "Neumann iteration cannot converge with spectral radius > 1 and must say so"
        assert "method='neumann'" in str(warned[0].message)
    if not warned:
        assert max(errors.values()) <= 1e-7, errors


def test_gradcheck_wrt_input_and_weight():
    rng = np.random.default_rng(3)
    d, p, B = 3, 2, 2
    W0 = rng.standard_normal((d, d))
    W0 *= 0.8 / np.linalg.norm(W0, 2)
    U = torch.tensor(rng.standard_normal((d, p)), dtype=torch.float64)
    x = torch.tensor(rng.standard_normal((B, p)), dtype=torch.float64, requires_grad=True)
    W = torch.tensor(W0, dtype=torch.float64, requires_grad=True)

    def solve(x, W):
        z0 = torch.zeros(B, d, dtype=torch.float64)
        return et.fixed_point(lambda z: torch.tanh(z @ W.T + x @ U.T), z0, tol=1e-14,
                              max_iter=200, backward=eqsolve.Implicit(tol=1e-14),
                              atol=1e-300).value

    assert torch.autograd.gradcheck(solve, (x, W), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_agrees_with_backprop_through_converged_unrolled_loop():
    cell, xt, c, (W, U, b, x) = setup("tanh", torch.float64)
    ct = torch.tensor(c)
    z0 = torch.zeros(x.shape[0], W.shape[0], dtype=torch.float64)
    sol = et.fixed_point(lambda z: cell(z, xt), z0, tol=1e-12, backward="anderson")
    (sol.value * ct).sum().backward()
    implicit = {k: g.clone() for k, g in grads_of(cell, xt).items()}

    cell.zero_grad()
    xt.grad = None
    z = z0
    for _ in range(500):  # plain Picard iteration, recorded by autograd
        z = cell(z, xt)
    (z * ct).sum().backward()
    for name, g in grads_of(cell, xt).items():
        assert rel_err(implicit[name], g.numpy()) <= 1e-9, name


# ----------------------------------------------------------------------------- inexact modes


def _unrolled_inexact(cell, xt, z_star, steps, lam):
    z = z_star.detach()
    for _ in range(steps):
        z = (1.0 - lam) * z + lam * cell(z, xt)
    return z


@pytest.mark.parametrize(
    "backward, kwargs, steps, lam",
    [
        ("phantom", {}, 5, 0.5),
        (eqsolve.Phantom(steps=3, damping=0.7), {}, 3, 0.7),
        (eqsolve.Phantom(2, 1.0), {}, 2, 1.0),
        ("jfb", {}, 1, 1.0),
        (eqsolve.JFB(), {}, 1, 1.0),
    ],
)
def test_phantom_and_jfb_match_their_definition(backward, kwargs, steps, lam):
    cell, xt, c, (W, U, b, x) = setup("sym", torch.float64)
    ct = torch.tensor(c)
    z0 = torch.zeros(x.shape[0], W.shape[0], dtype=torch.float64)
    sol = et.fixed_point(lambda z: cell(z, xt), z0, tol=1e-8, backward=backward, **kwargs)
    (sol.value * ct).sum().backward()
    got = {k: g.clone() for k, g in grads_of(cell, xt).items()}

    core = eqsolve.solve(lambda z: cell(z, xt), z0, tol=1e-8)  # same z*, no graph
    assert sol.nfev == core.nfev + steps
    cell.zero_grad()
    xt.grad = None
    z = _unrolled_inexact(cell, xt, core.value, steps, lam)
    # the value is the solver's z* itself (the point its residual describes), bit for bit;
    # the gradient is that of the inexact iterate z_k
    torch.testing.assert_close(sol.value, core.value, rtol=0, atol=0)
    (z * ct).sum().backward()
    for name, g in grads_of(cell, xt).items():
        torch.testing.assert_close(got[name], g, rtol=1e-12, atol=1e-14, msg=name)
    # they are biased: not the implicit gradient
    ref, _ = reference_gradients(W, U, b, x, core.value.numpy(), c)
    assert rel_err(got["W"], ref["W"]) > 1e-3


# ----------------------------------------------------------------------------- memory


def _saved_bytes(fn):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


@pytest.mark.parametrize("backward", ["anderson", "phantom", "jfb"])
def test_memory_for_backward_does_not_grow_with_iterations(backward):
    cell, xt, c, (W, U, b, x) = setup("sym", torch.float64)
    z0 = torch.zeros(x.shape[0], W.shape[0], dtype=torch.float64)
    held = {}
    for n in (10, 80):
        nbytes, sol = _saved_bytes(lambda n=n: et.fixed_point(
            lambda z: cell(z, xt), z0, solver="picard", tol=1e-300, max_iter=n,
            on_failure="ignore", backward=backward))
        assert sol.iterations.tolist() == [n] * x.shape[0]  # the count really differs
        assert int(sol.status[0]) == int(Status.MAX_ITER)
        sol.value.sum().backward()  # and the backward still works
        assert cell.W.grad is not None
        held[n] = nbytes
    assert held[10] == held[80] > 0

    unrolled = {}
    for n in (10, 80):
        def run(n=n):
            z = z0
            for _ in range(n):
                z = cell(z, xt)
            return z
        unrolled[n], _ = _saved_bytes(run)
    assert unrolled[80] > 4 * unrolled[10]
    assert held[80] < unrolled[10]


# ----------------------------------------------------------------------------- structure


def test_multiscale_tuple_state():
    """A (B, d1) and a (B, 2, 3) state coupled through one W: the concatenated TanhCell."""
    d1, d2, p, B = 10, 6, 8, 4
    W, U, b, x = make_problem("tanh", d=d1 + d2, p=p, B=B, seed=5)
    cell = Cell(W, U, b)
    xt = torch.tensor(x, requires_grad=True)

    def f(state):
        z1, z2 = state
        pre = torch.cat([z1, z2.reshape(B, d2)], dim=1) @ cell.W.T + xt @ cell.U.T + cell.b
        out = torch.tanh(pre)
        return (out[:, :d1], out[:, d1:].reshape(B, 2, 3))

    z0 = (torch.zeros(B, d1, dtype=torch.float64), torch.zeros(B, 2, 3, dtype=torch.float64))
    sol = et.fixed_point(f, z0, tol=1e-11)
    assert isinstance(sol.value, tuple) and sol.value[1].shape == (B, 2, 3)
    c = np.random.default_rng(9).standard_normal((B, d1 + d2))
    c1, c2 = torch.tensor(c[:, :d1]), torch.tensor(c[:, d1:]).reshape(B, 2, 3)
    ((sol.value[0] * c1).sum() + (sol.value[1] * c2).sum()).backward()
    z_cat = torch.cat([sol.value[0].detach(), sol.value[1].detach().reshape(B, d2)], 1)
    ref, _ = reference_gradients(W, U, b, x, z_cat.numpy(), c)
    for name, g in grads_of(cell, xt).items():
        assert rel_err(g, ref[name]) <= 1e-8, name

    # the phantom gradient damps leaf by leaf and keeps the structure
    cell.zero_grad()
    ph = et.fixed_point(f, z0, tol=1e-11, backward=eqsolve.Phantom(steps=2))
    assert isinstance(ph.value, tuple) and ph.value[1].shape == (B, 2, 3)
    z_star = eqsolve.solve(f, z0, tol=1e-11).value  # the z* the phantom steps start from
    for got, want in zip(ph.value, z_star, strict=True):  # the value is z*, leaf by leaf
        assert torch.equal(got, want)
    cell.zero_grad()
    xt.grad = None
    ((ph.value[0] * c1).sum() + (ph.value[1] * c2).sum()).backward()
    got = {k: g.clone() for k, g in grads_of(cell, xt).items()}
    cell.zero_grad()
    xt.grad = None
    z = tuple(t.detach() for t in z_star)
    for _ in range(2):
        z = tuple(0.5 * a + 0.5 * b for a, b in zip(z, f(z), strict=True))
    ((z[0] * c1).sum() + (z[1] * c2).sum()).backward()
    for name, g in grads_of(cell, xt).items():  # with the gradient of the phantom iterate
        torch.testing.assert_close(got[name], g, rtol=1e-12, atol=1e-14, msg=name)


def test_batch_axis_none_single_system():
    W, U, b, x = make_problem("tanh", B=1, seed=2)
    cell = Cell(W, U, b)
    xt = torch.tensor(x[0], requires_grad=True)
    sol = et.fixed_point(lambda z: cell(z, xt), torch.zeros(W.shape[0], dtype=torch.float64),
                         tol=1e-11, batch_axis=None)
    assert sol.value.shape == (W.shape[0],)
    c = np.random.default_rng(4).standard_normal((1, W.shape[0]))
    (sol.value * torch.tensor(c[0])).sum().backward()
    ref, _ = reference_gradients(W, U, b, x, sol.value.detach().numpy()[None], c)
    assert rel_err(cell.W.grad, ref["W"]) <= 1e-8
    assert rel_err(xt.grad, ref["x"][0]) <= 1e-8


def test_gradients_reach_inputs_and_parameters_not_z0():
    cell, xt, c, (W, U, b, x) = setup("tanh", torch.float64)
    z0 = torch.zeros(x.shape[0], W.shape[0], dtype=torch.float64, requires_grad=True)
    sol = et.fixed_point(lambda z: cell(z, xt), z0, tol=1e-10)
    sol.value.sum().backward()
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads_of(cell, xt).values())
    assert z0.grad is None  # z* does not depend on the initial guess


def test_value_nfev_and_no_grad_modes():
    cell, xt, c, (W, U, b, x) = setup("tanh", torch.float64)
    z0 = torch.zeros(x.shape[0], W.shape[0], dtype=torch.float64)
    f = lambda z: cell(z, xt)  # noqa: E731
    core = eqsolve.solve(f, z0, tol=1e-9)
    sol = et.fixed_point(f, z0, tol=1e-9)
    assert sol.nfev == core.nfev + 1
    # the value is z* bit for bit (the point the residual describes), with f(z*)'s graph
    torch.testing.assert_close(sol.value, core.value, rtol=0, atol=0)
    assert sol.value.grad_fn is not None
    assert torch.equal(sol.iterations, core.iterations)
    with torch.no_grad():
        ng = et.fixed_point(f, z0, tol=1e-9)
    assert ng.value.grad_fn is None and ng.nfev == core.nfev and torch.equal(ng.value, core.value)
    none = et.fixed_point(f, z0, tol=1e-9, backward=None)
    assert not none.value.requires_grad and torch.equal(none.value, core.value)


# ----------------------------------------------------------------------------- the module


class Model(nn.Module):
    def __init__(self, W, U, b, **deq_kwargs):
        super().__init__()
        self.cell = Cell(W, U, b)
        self.drop = nn.Dropout(0.5)
        self.deq = et.DEQ(**deq_kwargs)

    def forward(self, x):
        x = self.drop(x)
        z0 = torch.zeros(x.shape[0], self.cell.W.shape[0], dtype=x.dtype)
        return self.deq(lambda z: self.cell(z, x), z0)


def test_deq_module_eval_mode_gradients():
    W, U, b, x = make_problem("tanh")
    model = Model(W, U, b, tol=1e-10, backward="broyden")
    model.eval()  # dropout off; gradients must still flow
    xt = torch.tensor(x, requires_grad=True)
    c = np.random.default_rng(7).standard_normal((x.shape[0], W.shape[0]))
    z = model(xt)
    assert z.grad_fn is not None
    (z * torch.tensor(c)).sum().backward()
    ref, _ = reference_gradients(W, U, b, x, z.detach().numpy(), c)
    assert rel_err(model.cell.W.grad, ref["W"]) <= 1e-7
    assert rel_err(xt.grad, ref["x"]) <= 1e-7
    assert list(model.deq.parameters()) == []
    last = model.deq.last_solution
    assert last is not None and not last.value.requires_grad and bool(last.converged.all())
    info = model.deq.last_adjoint_info
    assert info is not None and bool(info.converged.all())
    assert "backward=Implicit(method='broyden'" in repr(model.deq)


def test_deq_module_validates_at_construction():
    with pytest.raises(ValueError, match="backward"):
        et.DEQ(backward="adjoint")
    with pytest.raises(ValueError, match="tol"):
        et.DEQ(tol=-1.0)
    with pytest.raises(TypeError, match="mm"):
        et.DEQ(mm=3)


# ----------------------------------------------------------------------------- failures


def _small(dtype=torch.float64, kind="sym"):
    cell, xt, c, (W, U, b, x) = setup(kind, dtype)
    z0 = torch.zeros(x.shape[0], W.shape[0], dtype=dtype)
    return cell, xt, z0


def test_adjoint_non_convergence_warns_or_raises():
    cell, xt, z0 = _small()
    f = lambda z: cell(z, xt)  # noqa: E731
    neumann2 = eqsolve.Implicit("neumann", max_iter=2)
    sol = et.fixed_point(f, z0, tol=1e-10, max_iter=300, backward=neumann2)
    with pytest.warns(eqsolve.ConvergenceWarning, match="max_iter=2"):
        sol.value.sum().backward()

    sol = et.fixed_point(f, z0, tol=1e-10, max_iter=300, backward=neumann2, on_failure="raise")
    with pytest.raises(eqsolve.ConvergenceError, match="method='neumann'") as err:
        sol.value.sum().backward()
    assert not bool(err.value.solution.converged.any())

    sol = et.fixed_point(f, z0, tol=1e-10, max_iter=300, backward=neumann2, on_failure="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol.value.sum().backward()


def test_nonfinite_cotangent_is_reported():
    cell, xt, z0 = _small()
    sol = et.fixed_point(lambda z: cell(z, xt), z0, tol=1e-8)
    weights = torch.ones_like(z0)
    weights[1, 3] = float("nan")
    with pytest.warns(eqsolve.ConvergenceWarning, match="NaN/inf"):
        (sol.value * weights).sum().backward()


def test_not_differentiable_f_is_an_error():
    cell, xt, z0 = _small()

    def numpy_f(z):
        W = cell.W.detach().numpy()
        return torch.from_numpy(np.tanh(z.detach().numpy() @ W.T + 0.1))

    # f uses no tensor that requires grad (it leaves torch): nothing to differentiate, and
    # the result is the plain solve's (no extra call of f, no graph)
    sol = et.fixed_point(numpy_f, z0, tol=1e-8)
    plain = eqsolve.solve(numpy_f, z0, tol=1e-8)
    assert not sol.value.requires_grad and sol.nfev == plain.nfev
    assert torch.equal(sol.value, plain.value)

    sol = et.fixed_point(lambda z: cell(z.detach(), xt), z0, tol=1e-8)
    with pytest.warns(RuntimeWarning, match="does not depend on z"):
        sol.value.sum().backward()


def test_double_backward_is_refused():
    cell, xt, z0 = _small()
    sol = et.fixed_point(lambda z: cell(z, xt), z0, tol=1e-8)
    with pytest.raises(RuntimeError, match="higher-order gradients(.|\n)*positional args"):
        torch.autograd.grad(sol.value.sum(), cell.W, create_graph=True)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"backward": "adjoint"}, ValueError, "backward must be one of"),
        ({"backward": 3}, TypeError, "backward must be"),
        ({"on_failure": "loud"}, ValueError, "on_failure"),
        ({"tol": 0.0}, ValueError, "tol"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    cell, xt, z0 = _small()
    with pytest.raises(exc, match=match):
        et.fixed_point(lambda z: cell(z, xt), z0, **kwargs)


@pytest.mark.skipif("gmres" not in EXACT, reason="eqsolve.core.gmres is not installed")
def test_gmres_options_are_checked_and_used():
    cell, xt, c, (W, U, b, x) = setup("sym", torch.float64)
    z0 = torch.zeros(x.shape[0], W.shape[0], dtype=torch.float64)
    with pytest.raises(TypeError, match="Implicit.options for method='gmres'.*'m'"):
        eqsolve.Implicit("gmres", options={"m": 3})
    infos = []
    sol = et.fixed_point(lambda z: cell(z, xt), z0, tol=1e-10, max_iter=500,
                         backward=eqsolve.Implicit("gmres", options={"restart": 4}),
                         on_backward=infos.append)
    (sol.value * torch.tensor(c)).sum().backward()
    ref, _ = reference_gradients(W, U, b, x, sol.value.detach().numpy(), c)
    assert rel_err(cell.W.grad, ref["W"]) <= 1e-7
    assert bool(infos[0].converged.all()) and int(infos[0].iterations.max()) % 4 == 0


def test_bad_state_types():
    cell, xt, z0 = _small()
    with pytest.raises(TypeError, match="z0 must be a torch.Tensor"):
        et.fixed_point(lambda z: z, z0.numpy())
    with pytest.raises(TypeError, match=r"z0\[1\] must be a torch.Tensor"):
        et.fixed_point(lambda z: z, (z0, z0.numpy()))
    with pytest.raises(TypeError, match="f must be callable"):
        et.fixed_point(None, z0)


# ----------------------------------------------------------------------------- devices, DDP


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_gradients(dtype):
    cell, xt, c, (W, U, b, x) = setup("tanh", dtype)
    cell = cell.cuda()
    xg = xt.detach().cuda().requires_grad_()
    z0 = torch.zeros(x.shape[0], W.shape[0], dtype=dtype, device="cuda")
    tol, bound = (1e-10, 1e-7) if dtype == torch.float64 else (1e-6, 1e-3)
    sol = et.fixed_point(lambda z: cell(z, xg), z0, tol=tol)
    assert sol.value.device.type == "cuda"
    (sol.value * torch.tensor(c, dtype=dtype, device="cuda")).sum().backward()
    ref, _ = reference_gradients(W, U, b, x, sol.value.detach().double().cpu().numpy(), c)
    assert rel_err(cell.W.grad, ref["W"]) <= bound
    assert rel_err(xg.grad, ref["x"]) <= bound


def _ddp_worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    W, U, b, x = make_problem("tanh", B=4)
    model = Model(W, U, b, tol=1e-10)
    model.eval()  # no dropout: deterministic
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    c = np.random.default_rng(11).standard_normal((4, W.shape[0]))
    shard = slice(2 * rank, 2 * rank + 2)
    grads = []
    for _ in range(2):  # a second step would fail if the first left a reduction unfinished
        ddp.zero_grad()
        z = ddp(torch.tensor(x[shard]))
        (z * torch.tensor(c[shard])).sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.cell.named_parameters()})
    if rank == 0:
        torch.save(grads, out_file)
    dist.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="uses fork and gloo file init (Linux only)")
def test_distributed_data_parallel_gloo(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    out_file = str(tmp_path / "grads.pt")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # spawn, not fork: a process that has run autograd holds engine threads, and a child
    # forked while one of them holds a lock can hang forever (seen in CI under xdist)
    ctx = mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), out_file),
                             nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=2):  # raises if a worker failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail("DDP workers did not finish within 300 s")
    grads = torch.load(out_file)

    W, U, b, x = make_problem("tanh", B=4)
    c = np.random.default_rng(11).standard_normal((4, W.shape[0]))
    inj = x @ U.T + b
    sol = eqsolve.fixed_point(lambda z: np.tanh(z @ W.T + inj), np.zeros((4, W.shape[0])),
                              tol=1e-10)
    ref, _ = reference_gradients(W, U, b, x, sol.value, c)
    for step in grads:  # DDP averages the two ranks' gradients of their half-batch sums
        assert rel_err(step["W"], ref["W"] / 2) <= 1e-7
        assert rel_err(step["U"], ref["U"] / 2) <= 1e-7
        assert rel_err(step["b"], ref["b"] / 2) <= 1e-7
