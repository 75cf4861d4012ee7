import pytest
import torch
from torch.autograd.functional import jacobian

from flows.config import ObjectiveConfig, SolverConfig
from flows.nn import TimeMLP
from flows.objectives import MaximumLikelihood


@pytest.mark.parametrize("time_features", [0, 16])
def test_mlp_shapes_and_no_coupling_between_samples(time_features):
    field = TimeMLP(3, [16, 16], time_features=time_features).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    assert field(x, t).shape == x.shape
    jac = jacobian(lambda y: field(y, t), x)  # (4, 3, 4, 3)
    off_diagonal = jac.clone()
    for i in range(4):
        off_diagonal[i, :, i] = 0
    assert off_diagonal.abs().max() == 0
    assert jac[0, :, 0].abs().max() > 0


@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_mle_loss_is_finite_and_every_parameter_gets_a_gradient(adjoint, trace):
    torch.manual_seed(0)
    field = TimeMLP(2, [16, 16], time_features=8)
    cfg = ObjectiveConfig(trace=trace, kinetic=0.01, jacobian=0.01)
    objective = MaximumLikelihood(field, SolverConfig(adjoint=adjoint, atol=1e-4, rtol=1e-4), cfg)
    loss, stats = objective(torch.randn(32, 2))
    loss.backward()
    assert torch.isfinite(loss)
    assert stats["kinetic"] > 0 and stats["jacobian"] > 0
    assert stats["nfe"].forward > 0
    for name, p in field.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
