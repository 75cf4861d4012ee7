"""A flow as a differentiable object: ``grad=True``, ``rsample``, ``parameters()``, the ``Distribution`` view, and a
mixture composed of its members."""

import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from flows import Flow, FlowsError, Mixture
from flows.context import Context
from flows.distribution import FlowDistribution
from flows.nn import TimeMLP
from flows.preprocess import Preprocess

RK4 = {"steps": 8}  # a fixed-step solve: a smooth function of its inputs, so finite differences are meaningful


def small_flow(seed: int = 0, dtype=torch.float64, context: Context | None = None, dim: int = 2) -> Flow:
    torch.manual_seed(seed)
    width = context.dim if context is not None else 0
    field = TimeMLP(dim, hidden=(16, 16), time_features=4, context_dim=width).to(dtype)
    pre = Preprocess(torch.full((dim,), 0.3, dtype=dtype), torch.full((dim,), 1.5, dtype=dtype))
    flow = Flow(field.eval(), pre, (dim,), {"method": "rk4", "step_size": 0.125}, context=context)
    flow.field.requires_grad_(False)  # as flows.load gives it: frozen
    return flow


def test_log_prob_builds_no_graph_unless_asked():
    flow = small_flow()
    list(flow.parameters())  # trainable now
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    assert not flow.log_prob(x).requires_grad
    assert flow.log_prob(x, grad=True).requires_grad


def test_log_prob_gradients_match_finite_differences_for_inputs_and_parameters():
    flow = small_flow()
    x = torch.tensor([[0.4, -1.1], [1.3, 0.2]], dtype=torch.float64, requires_grad=True)
    weight = next(flow.parameters())
    total = flow.log_prob(x, grad=True).sum()
    gx, gw = torch.autograd.grad(total, (x, weight))

    def value(shift: torch.Tensor | float = 0.0) -> float:
        return float(flow.log_prob(x.detach() + shift).sum())

    h = 1e-5
    fd_x = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            step = torch.zeros_like(x)
            step[i, j] = h
            fd_x[i, j] = (value(step) - value(-step)) / (2 * h)
    torch.testing.assert_close(gx, fd_x, rtol=1e-4, atol=1e-8)
    with torch.no_grad():  # three entries of the first weight matrix
        for idx in [(0, 0), (3, 1), (7, 0)]:
            old = weight[idx].item()
            weight[idx] = old + h
            up = value()
            weight[idx] = old - h
            down = value()
            weight[idx] = old
            assert math.isclose(gw[idx].item(), (up - down) / (2 * h), rel_tol=1e-4, abs_tol=1e-8)


def test_rsample_is_reparameterized_and_sample_is_not():
    flow = small_flow()
    params = list(flow.parameters())
    gen = torch.Generator().manual_seed(3)
    x = flow.rsample(4, generator=gen)
    assert x.requires_grad and not flow.sample(4).requires_grad
    grads = torch.autograd.grad(x.pow(2).sum(), params, allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0
    # the same draw without a graph gives the same values
    again = flow.sample(4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x.detach(), again)


def test_discrete_samples_refuse_gradients():
    flow = small_flow()
    flow.preprocess = Preprocess(torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64), 17)
    with pytest.raises(FlowsError, match="integer levels"):
        flow.rsample(3)


def test_a_flow_fine_tunes_in_a_users_own_loop():
    flow = small_flow(dtype=torch.float32)
    target = torch.randn(512, 2, generator=torch.Generator().manual_seed(0)) * 0.5 + torch.tensor([2.0, -1.0])
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        batch = target[torch.randint(len(target), (128,))]
        loss = -flow.log_prob(batch, grad=True, **RK4).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first = -flow.log_prob(target).mean().item()
    assert losses[-1] < losses[0] - 0.5, losses  # it learns
    assert first < losses[0] - 0.5


def test_the_distribution_view_composes_with_torch_distributions():
    flow = small_flow(dtype=torch.float32)
    d = flow.distribution(**RK4)
    assert isinstance(d, FlowDistribution) and d.has_rsample
    assert d.batch_shape == () and d.event_shape == (2,)
    x = d.sample((5, 3))
    assert x.shape == (5, 3, 2) and not x.requires_grad
    lp = d.log_prob(x)
    assert lp.shape == (5, 3) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, flow.log_prob(x.reshape(-1, 2), **RK4).float().reshape(5, 3))
    # a Monte-Carlo KL term against a torch distribution, differentiable in the flow's parameters
    base = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    params = list(flow.parameters())
    s = d.rsample((64,))
    kl = (d.log_prob(s) - base.log_prob(s)).mean()
    grads = torch.autograd.grad(kl, params, allow_unused=True)
    assert torch.isfinite(kl) and any(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(NotImplementedError):
        kl_divergence(d, base)  # no closed form: torch says so, as for any distribution without one


def test_a_batch_of_contexts_is_a_batch_of_distributions():
    ctx = Context("vector", 3)
    flow = small_flow(dtype=torch.float32, context=ctx)
    contexts = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    d = flow.distribution(context=contexts, **RK4)
    assert d.batch_shape == (4,) and d.event_shape == (2,)
    x = d.sample((6,))
    assert x.shape == (6, 4, 2)
    lp = d.log_prob(x)
    assert lp.shape == (6, 4)
    for k in range(4):
        torch.testing.assert_close(lp[:, k], flow.log_prob(x[:, k], context=contexts[k], **RK4).float())
    one = flow.distribution(context=contexts[0], **RK4)
    assert one.batch_shape == () and one.sample((2,)).shape == (2, 2)
    with pytest.raises(FlowsError, match="unknown option"):
        flow.distribution(context=contexts[0], stpes=8)


def test_a_mixture_is_composed_of_its_members():
    members = [small_flow(seed=s, dtype=torch.float32) for s in (0, 1)]
    mixture = Mixture(members, [0.25, 0.75])
    with pytest.raises(FlowsError, match="no single field"):
        mixture.field  # noqa: B018
    assert mixture.shape == (2,) and mixture.preprocess is members[0].preprocess
    assert len(list(mixture.parameters())) == sum(len(list(m.field.parameters())) for m in members)
    x = torch.randn(6, 2)
    lp = mixture.log_prob(x, **RK4)
    expected = torch.logsumexp(
        torch.stack([m.log_prob(x, **RK4) for m in members]) + torch.tensor([0.25, 0.75]).double().log()[:, None], 0
    )
    torch.testing.assert_close(lp, expected)
    lp = mixture.log_prob(x, grad=True, **RK4)
    lp.sum().backward()
    assert all(p.grad is not None for m in members for p in m.field.parameters())
    s, info = mixture.sample(50, return_info=True, generator=torch.Generator().manual_seed(0))
    assert s.shape == (50, 2) and info["member"].shape == (50,) and info["noise"].shape == (50, 2)


def test_chunk_is_the_former_name_of_batch_size():
    flow = small_flow()
    with pytest.warns(DeprecationWarning, match="batch_size"):
        flow.sample(4, chunk=2)
    with pytest.raises(FlowsError, match="batch_size= only"):
        flow.sample(4, chunk=2, batch_size=3)
