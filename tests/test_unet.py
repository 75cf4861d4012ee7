"""The U-Net field: shapes, no coupling between samples, GroupNorm only, and its use in both objectives."""

import pytest
import torch
from torch import nn

from flows.errors import ConfigError
from flows.nn import MLPSettings, TimeUNet, UNetSettings, build_field
from flows.objectives import FMSettings, MLESettings, build_objective


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8), (1, 7, 7), (3, 5, 9), (1, 28, 28)])
def test_output_shape_matches_input_for_1_and_3_channels_and_odd_sizes(shape):
    net = TimeUNet(shape, channels=8, channel_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[4], groups=4)
    x = torch.randn(2, *shape)
    assert net(x, torch.rand(2)).shape == x.shape
    assert net(x, torch.tensor(0.3)).shape == x.shape  # a scalar time broadcasts
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def test_batch_jacobian_is_block_diagonal():
    torch.manual_seed(0)
    net = TimeUNet((2, 5, 5), channels=8, channel_mult=[1, 2], attention_resolutions=[3, 5], groups=4).double()
    for p in net.parameters():  # the zero-initialized residual branches would hide any coupling
        nn.init.normal_(p, std=0.2)
    x, t = torch.randn(3, 2, 5, 5, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda y: net(y, t), x)  # (3, 2, 5, 5, 3, 2, 5, 5)
    jac = jac.reshape(3, 50, 3, 50)
    for i in range(3):
        assert jac[i, :, i].abs().max() > 1e-3
        for j in range(3):
            if i != j:
                assert jac[i, :, j].abs().max() == 0


def test_build_field_refuses_the_wrong_backbone_for_the_data():
    with pytest.raises(ConfigError, match="model.name=unet"):
        build_field(MLPSettings(), (1, 8, 8))
    with pytest.raises(ConfigError, match="model.name=mlp"):
        build_field(UNetSettings(), (64,))


@pytest.mark.parametrize("objective", ["mle", "fm"])
def test_both_objectives_train_the_unet(objective):
    torch.manual_seed(0)
    cfg = UNetSettings(channels=8, channel_mult=[1, 2], attention_resolutions=[4], groups=4)
    field = build_field(cfg, (1, 8, 8))
    for p in field.parameters():
        nn.init.normal_(p, std=0.05)
    solver = dict(method="rk4", step_size=0.5, adjoint=objective == "mle")
    settings = MLESettings(trace="hutchinson", kinetic=0.01, jacobian=0.01) if objective == "mle" else FMSettings()
    obj = build_objective(field, settings, solver)
    loss, stats = obj(torch.randn(4, 1, 8, 8))
    assert torch.isfinite(loss)
    loss.backward()  # MLE: a double backward through attention and GroupNorm inside the adjoint
    missing = [n for n, p in field.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert ("nll" in stats) == (objective == "mle")
