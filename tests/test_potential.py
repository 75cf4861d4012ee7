"""The potential field (OT-Flow): closed-form gradient, Hessian trace and ∂ₜΦ; HJB; training; likelihood."""

import math

import pytest
import torch
from helpers import tiny_overrides

import flows
from flows.config import load_config
from flows.errors import ConfigError
from flows.likelihood import log_prob
from flows.nn.potential import Potential, log_cosh
from flows.ode import solve

TIGHT = dict(atol=1e-10, rtol=1e-10)


def randomized(dim, width, depth, seed=0):
    torch.manual_seed(seed)
    field = Potential(dim, width, depth).double()
    with torch.no_grad():
        for p in field.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return field


def test_log_cosh_is_stable_and_its_derivative_is_tanh():
    a = torch.tensor([-800.0, -3.0, 0.0, 0.5, 800.0], dtype=torch.float64, requires_grad=True)
    y = log_cosh(a)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[1:4], torch.cosh(a[1:4]).log())
    (g,) = torch.autograd.grad(y.sum(), a)
    torch.testing.assert_close(g, a.tanh())


@pytest.mark.parametrize(("dim", "width", "depth"), [(1, 5, 2), (2, 8, 3), (7, 16, 4), (2, 3, 6)])
def test_gradient_time_derivative_and_hessian_trace_equal_autograds(dim, width, depth):
    field = randomized(dim, width, depth)
    x = torch.randn(6, dim, dtype=torch.float64, requires_grad=True)
    t = torch.rand(6, dtype=torch.float64, requires_grad=True)
    gx, gt = torch.autograd.grad(field.phi(x, t).sum(), (x, t), create_graph=True)
    hess_trace = sum(torch.autograd.grad(gx[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(dim))
    grad, phi_t, trace = field.derivatives(x, t)
    torch.testing.assert_close(grad, gx, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(phi_t, gt, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(trace, hess_trace, atol=1e-12, rtol=1e-10)
    v, div, _ = field.dynamics(x, t)
    torch.testing.assert_close(v, -gx)
    torch.testing.assert_close(div, -hess_trace)
    # one shared time (what the solver passes) gives the same as that time per row
    shared = field.derivatives(x, t[:1].expand(6))
    rows = field.derivatives(x, t[:1].repeat(6))
    for a, b in zip(shared, rows, strict=True):
        torch.testing.assert_close(a, b)


def quadratic(dim, seed=0):
    """w = 0, b = 0 and A's time column 0: Φ = ½ xᵀMx with M = AₓᵀAₓ, so v = −Mx is linear."""
    field = randomized(dim, 4, 2, seed)
    with torch.no_grad():
        field.w.zero_()
        field.b.zero_()
        field.A[:, dim] = 0
    m = field.A[:, :dim].T @ field.A[:, :dim]
    return field, m.detach()


def test_the_likelihood_of_a_quadratic_potential_is_the_closed_form_gaussian():
    # v = −Mx: x₁ = expm(−M) z, z ~ N(0, I) ⇒ x₁ ~ N(0, expm(−2M))
    field, m = quadratic(3)
    cov = torch.linalg.matrix_exp(-2 * m)
    gauss = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64), cov)
    x = gauss.sample((7,))
    for trace in ("exact", "hutchinson"):  # the potential's trace is exact either way
        with torch.no_grad():
            res = log_prob(field, x, trace=trace, **TIGHT)
        torch.testing.assert_close(res.log_prob, gauss.log_prob(x), atol=1e-7, rtol=1e-7)


def test_hjb_residual_is_zero_for_a_solution_and_positive_otherwise():
    # Φ = βᵀx + ½‖β‖² t solves ∂ₜΦ = ½‖∇ₓΦ‖² (a translation at constant speed)
    field = randomized(2, 4, 2)
    beta = torch.tensor([0.7, -1.3], dtype=torch.float64)
    with torch.no_grad():
        field.w.zero_()
        field.A.zero_()
        field.b.copy_(torch.cat([beta, 0.5 * beta.pow(2).sum().reshape(1)]))
    x = torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        sol = solve(field, x, 0.0, 1.0, trace="exact", hjb=True, **TIGHT)
        torch.testing.assert_close(sol.x, x - beta)  # v = −β
        assert sol.hjb.abs().max() < 1e-12
        field.b[2] += 0.1  # the wrong time dependence: residual 0.1 everywhere
        assert torch.allclose(
            solve(field, x, 0.0, 1.0, trace="exact", hjb=True, **TIGHT).hjb, torch.tensor(0.1).double()
        )
        other = randomized(2, 8, 3, seed=1)
        assert (solve(other, x, 0.0, 1.0, trace="exact", hjb=True, **TIGHT).hjb > 1e-3).all()


def test_adjoint_gradients_equal_direct_backprop_with_the_hjb_and_kinetic_terms():
    field = randomized(3, 8, 3)
    x = torch.randn(6, 3, dtype=torch.float64)
    grads = []
    for adjoint in (False, True):
        field.zero_grad()
        res = log_prob(field, x, kinetic=True, hjb=True, atol=1e-10, rtol=1e-10, adjoint=adjoint)
        (-res.log_prob.mean() + 0.1 * res.kinetic.mean() + 0.1 * res.hjb.mean()).backward()
        grads.append([p.grad.clone() for p in field.parameters()])
    for direct, adjoint in zip(*grads, strict=True):
        torch.testing.assert_close(adjoint, direct, atol=1e-6, rtol=1e-5)


def potential_overrides(run_dir, objective, steps=4):
    extra = ["objective.hjb=0.05", "objective.kinetic=0.01"] if objective == "mle" else ["objective.name=fm"]
    return [*tiny_overrides(run_dir, steps), "model.name=potential", "model.hidden=[8,8]", *extra]


@pytest.mark.parametrize("objective", ["mle", "fm"])
def test_mle_and_fm_train_a_potential_that_loads_samples_and_scores(tmp_path, objective):
    run = flows.train(None, overrides=potential_overrides(tmp_path / objective, objective))
    assert math.isfinite(run.result["nll"]) and run.result["trace"] == "exact"
    if objective == "mle":
        assert any("hjb" in r for r in run.metrics)
    model = flows.load(run)
    assert isinstance(model.field, Potential)
    x, info = model.sample(20, return_info=True, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all() and math.isfinite(info["kinetic_energy"])
    assert torch.isfinite(model.log_prob(x)).all()


def test_init_from_moves_a_potential_between_objectives(tmp_path):
    flows.train(None, overrides=potential_overrides(tmp_path / "fm", "fm", steps=2))
    run = flows.train(
        None,
        overrides=[*potential_overrides(tmp_path / "mle", "mle", steps=0)],
        train={"init_from": str(tmp_path / "fm")},
    )
    started, source = flows.load(run, weights="model"), flows.load(tmp_path / "fm")
    for a, b in zip(started.field.parameters(), source.field.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["objective.hjb=0.1"], "objective.hjb is the HJB penalty"),
        (["model.name=potential", "objective.jacobian=0.1"], "objective.jacobian needs"),
        (["model.name=potential", "model.hidden=[8,16]"], "equal widths"),
    ],
)
def test_potential_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
