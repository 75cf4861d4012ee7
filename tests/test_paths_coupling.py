"""Probability paths, time sampling and couplings for flow matching."""

import itertools

import pytest
import torch

from flows.coupling import independent, ot_coupling
from flows.errors import ConfigError
from flows.paths import SCHEDULERS, AffinePath, sample_time


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_path_endpoints_and_velocity_match_a_finite_difference(name):
    path = AffinePath(SCHEDULERS[name]())
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, 4, 4, generator=g).double()
    assert torch.allclose(path.sample(x0, x1, torch.zeros(5, dtype=torch.float64)).xt, x0)
    assert torch.allclose(path.sample(x0, x1, torch.ones(5, dtype=torch.float64)).xt, x1)
    t, h = torch.rand(5, generator=g, dtype=torch.float64) * 0.9 + 0.05, 1e-6
    fd = (path.sample(x0, x1, t + h).xt - path.sample(x0, x1, t - h).xt) / (2 * h)
    torch.testing.assert_close(path.sample(x0, x1, t).dxt, fd, atol=1e-7, rtol=1e-6)


def test_cosine_path_preserves_variance():
    alpha, sigma, _, _ = SCHEDULERS["cosine"]()(torch.linspace(0, 1, 11))
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(11))


def test_time_sampling():
    g = torch.Generator().manual_seed(0)
    for kind in ("uniform", "logit_normal"):
        t = sample_time(10_000, kind, generator=g)
        assert t.shape == (10_000,) and t.min() > 0 and t.max() < 1
    t = sample_time(20_000, "logit_normal", mean=1.0, std=0.5, generator=g)
    assert abs(t.median().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.01
    with pytest.raises(ConfigError, match="time sampling: unknown value"):
        sample_time(3, "beta")


def pair_cost(x0, x1):
    return (x0 - x1).flatten(1).pow(2).sum(1).mean().item()


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_ot_coupling_equals_brute_force_over_permutations(n):
    for seed in range(5):
        g = torch.Generator().manual_seed(100 * n + seed)
        x0, x1 = torch.randn(n, 1, 2, 3, generator=g), torch.randn(n, 1, 2, 3, generator=g) + 1
        y0, y1 = ot_coupling(x0, x1)
        assert y0.shape == x0.shape and torch.equal(y1, x1)
        assert sorted(map(tuple, y0.flatten(1).tolist())) == sorted(map(tuple, x0.flatten(1).tolist()))
        best = min(pair_cost(x0[list(p)], x1) for p in itertools.permutations(range(n)))
        assert pair_cost(y0, x1) == pytest.approx(best, rel=1e-6)


def test_ot_coupling_lowers_the_mean_pair_cost():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(256, 2, generator=g), torch.randn(256, 2, generator=g) * 2 + 3
    assert pair_cost(*ot_coupling(x0, x1)) < 0.8 * pair_cost(*independent(x0, x1))
