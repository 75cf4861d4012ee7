import pytest
import torch
from torch.autograd.functional import jacobian

from flows.errors import FlowsError
from flows.nn import TimeMLP
from flows.nn.unet import TimeUNet
from flows.objectives import MaximumLikelihood, MLESettings


@pytest.mark.parametrize("conditioning", ["concatsquash", "concat"])
@pytest.mark.parametrize("time_features", [0, 16])
def test_mlp_shapes_and_no_coupling_between_samples(time_features, conditioning):
    field = TimeMLP(3, [16, 16], time_features=time_features, conditioning=conditioning).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    assert field(x, t).shape == x.shape
    assert (field(x, t) - field(x, t + 0.5)).abs().max() > 1e-6  # the time reaches the output
    jac = jacobian(lambda y: field(y, t), x)  # (4, 3, 4, 3)
    off_diagonal = jac.clone()
    for i in range(4):
        off_diagonal[i, :, i] = 0
    assert off_diagonal.abs().max() == 0
    assert jac[0, :, 0].abs().max() > 0


@pytest.mark.parametrize("name", ["mlp", "mlp-features", "mlp-concat", "unet"])
def test_a_time_shared_by_the_batch_gives_the_per_sample_result(name):
    """The solver passes one time for the batch (a scalar or a stride-0 view): the backbones embed it
    once and broadcast; the output must equal giving every sample that time, gradients included."""
    torch.manual_seed(0)
    if name == "unet":
        field = TimeUNet((1, 8, 8), channels=8, groups=4, attention_resolutions=[4]).double()
        x = torch.randn(3, 1, 8, 8)
    else:
        conditioning = "concat" if name == "mlp-concat" else "concatsquash"
        features = 0 if name == "mlp" else 16
        field, x = TimeMLP(3, [16, 16], "tanh", features, conditioning).double(), torch.randn(5, 3)
    x = x.double().requires_grad_(True)
    t = torch.tensor(0.37, dtype=torch.float64)
    per_sample = field(x, t.repeat(len(x)))
    (g_ref,) = torch.autograd.grad(per_sample.square().sum(), x)
    for shared in (t, t.expand(len(x)), t.reshape(1)):
        out = field(x, shared)
        torch.testing.assert_close(out, per_sample, atol=1e-12, rtol=1e-12)
        (g,) = torch.autograd.grad(out.square().sum(), x)
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)
    with pytest.raises(FlowsError, match="expected"):
        field(x, t.repeat(len(x) + 1))


@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_mle_loss_is_finite_and_every_parameter_gets_a_gradient(adjoint, trace):
    torch.manual_seed(0)
    field = TimeMLP(2, [16, 16], time_features=8)
    settings = MLESettings(trace=trace, kinetic=0.01, jacobian=0.01)
    objective = MaximumLikelihood(field, settings, dict(adjoint=adjoint, atol=1e-4, rtol=1e-4))
    loss, stats = objective(torch.randn(32, 2))
    loss.backward()
    assert torch.isfinite(loss)
    assert stats["kinetic"] > 0 and stats["jacobian"] > 0
    assert stats["nfe"].forward > 0
    for name, p in field.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
