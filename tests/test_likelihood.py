import math

import torch
from torch.autograd.functional import jacobian

from flows.likelihood import log_prob, standard_normal_log_prob
from flows.nn import TimeMLP
from flows.ode import solve

TIGHT = dict(atol=1e-10, rtol=1e-10)


def test_linear_flow_log_density_is_the_closed_form_gaussian(linear_field):
    # x = expm(A) z with z ~ N(0, I)  ⇒  x ~ N(0, M Mᵀ), M = expm(A)
    m = torch.linalg.matrix_exp(linear_field.a.detach())
    gauss = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64), m @ m.T)
    x = gauss.sample((7,))
    with torch.no_grad():
        res = log_prob(linear_field, x, trace="exact", **TIGHT)
    torch.testing.assert_close(res.log_prob, gauss.log_prob(x), atol=1e-7, rtol=1e-7)


def test_constant_field_is_the_shifted_base():
    class Constant(torch.nn.Module):
        def forward(self, x, t):
            return torch.ones_like(x) * torch.tensor([1.0, -2.0], dtype=x.dtype)

    x = torch.randn(5, 2, dtype=torch.float64)
    res = log_prob(Constant(), x, trace="exact", **TIGHT)
    expected = standard_normal_log_prob(x - torch.tensor([1.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(res.log_prob, expected)


def test_mlp_flow_log_density_equals_change_of_variables():
    torch.manual_seed(0)
    field = TimeMLP(2, [32, 32]).double()
    with torch.no_grad():  # a clearly non-linear, non-volume-preserving flow
        for p in field.parameters():
            p.mul_(2.5)
    x = torch.randn(4, 2, dtype=torch.float64)

    def to_base(y):
        return solve(field, y[None], 1.0, 0.0, **TIGHT).x[0]

    expected = []
    for xi in x:
        z = to_base(xi)
        _, logdet = torch.linalg.slogdet(jacobian(to_base, xi))
        expected.append(standard_normal_log_prob(z[None])[0] + logdet)
    with torch.no_grad():
        res = log_prob(field, x, trace="exact", **TIGHT)
    torch.testing.assert_close(res.log_prob, torch.stack(expected), atol=1e-6, rtol=1e-6)
    assert (res.log_prob - standard_normal_log_prob(x)).abs().max() > 0.1  # not the identity


def test_hutchinson_log_prob_agrees_with_exact_on_average():
    torch.manual_seed(0)
    field = TimeMLP(3, [16]).double()
    n = 4000
    x = torch.randn(1, 3, dtype=torch.float64).expand(n, 3).contiguous()
    solver = dict(atol=1e-8, rtol=1e-8)
    with torch.no_grad():
        exact = log_prob(field, x[:1], trace="exact", **solver).log_prob[0]
        est = log_prob(field, x, trace="hutchinson", probe="gaussian", **solver).log_prob
    assert abs(est.mean() - exact) < 4 * est.std() / math.sqrt(n) + 1e-9


def test_sample_then_encode_recovers_the_noise():
    torch.manual_seed(0)
    field = TimeMLP(2, [16, 16]).double()
    z = torch.randn(10, 2, dtype=torch.float64)
    x = solve(field, z, 0.0, 1.0, **TIGHT).x
    with torch.no_grad():
        res = log_prob(field, x, trace="exact", **TIGHT)
    torch.testing.assert_close(res.z, z, atol=1e-7, rtol=1e-7)
