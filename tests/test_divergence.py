import pytest
import torch
from torch.autograd.functional import jacobian

from flows.divergence import divergence_exact, divergence_hutchinson, draw_probe
from flows.nn import TimeMLP


def full_jacobians(field, x, t):
    def one(i):
        return jacobian(lambda y: field(y[None], t[i : i + 1])[0], x[i])

    return torch.stack([one(i) for i in range(len(x))])


@pytest.mark.parametrize("dim", [2, 5])  # the loop path (D <= 4) and the vmapped path
def test_exact_trace_equals_jacobian_trace(dim):
    torch.manual_seed(0)
    field = TimeMLP(dim, [16, 16], time_features=8).double()
    x = torch.randn(6, dim, dtype=torch.float64, requires_grad=True)
    t = torch.rand(6, dtype=torch.float64)
    div, frob = divergence_exact(field(x, t), x)
    jac = full_jacobians(field, x.detach(), t)
    torch.testing.assert_close(div, jac.diagonal(dim1=1, dim2=2).sum(-1))
    torch.testing.assert_close(frob, jac.pow(2).sum((1, 2)))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_mean_converges_to_exact(kind):
    torch.manual_seed(0)
    field = TimeMLP(4, [16], time_features=4).double()
    n = 20_000
    x = torch.randn(1, 4, dtype=torch.float64).expand(n, 4).clone().requires_grad_(True)
    t = torch.full((n,), 0.3, dtype=torch.float64)
    v = field(x, t)
    est, frob_est = divergence_hutchinson(v, x, draw_probe(x, kind))
    x1 = x[:1].detach().requires_grad_(True)
    exact, frob = divergence_exact(field(x1, t[:1]), x1)
    se = est.std() / n**0.5
    assert abs(est.mean() - exact[0]) < 4 * se + 1e-12
    assert abs(frob_est.mean() - frob[0]) < 4 * frob_est.std() / n**0.5
    assert se < 0.05 * exact.abs().max() + 1e-3  # the check is not vacuous


def test_rademacher_probe_values():
    p = draw_probe(torch.zeros(100, 3), "rademacher", torch.Generator().manual_seed(0))
    assert set(p.unique().tolist()) == {-1.0, 1.0}
