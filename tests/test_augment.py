"""Augmented flows (``model.augment``): a plain flow at A = 0, an honest bound on log p(x) that tightens with K to
the closed form, the data's shapes, and every path a plain flow has (both objectives, images with labels, context
vectors, mixtures, checkpoints, init_from, resume)."""

import json
import math

import pytest
import torch
from helpers import (
    assert_resume_is_exact,
    assert_same_tensors,
    conditional_overrides,
    image_overrides,
    script,
    tiny_overrides,
)
from safetensors.torch import load_file
from torch import nn

import flows
from flows.api import train
from flows.config import load_config
from flows.errors import CheckpointError, ConfigError, FlowsError
from flows.flow import Flow
from flows.mixture import Mixture
from flows.nn import build_field
from flows.preprocess import Preprocess


class ScaledField(nn.Module):
    """v(s, t) = b ⊙ s on the augmented state s = (x, a): each coordinate scales by e^b from t=0 to t=1, so the
    joint factorizes, p(x, a) = N(x; 0, e^{2 b_x}) N(a; 0, e^{2 b_a}), and p(x) = N(x; 0, e^{2 b_x})."""

    augment = 1

    def __init__(self, bx: float, ba: float):
        super().__init__()
        self.b = nn.Parameter(torch.tensor([bx, ba], dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * self.b


def scaled_flow(bx: float, ba: float) -> Flow:
    pre = Preprocess(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    return Flow(ScaledField(bx, ba), pre, (1,), {"method": "dopri5", "atol": 1e-9, "rtol": 1e-9})


def true_log_prob(x: torch.Tensor, bx: float) -> torch.Tensor:
    var = math.exp(2 * bx)
    return -0.5 * (x[:, 0].double() ** 2 / var + math.log(2 * math.pi * var))


def test_the_bound_tightens_with_k_to_the_closed_form_from_below():
    flow = scaled_flow(0.3, -0.3)
    x = torch.linspace(-2.5, 2.5, 400, dtype=torch.float64)[:, None]
    truth = true_log_prob(x, 0.3)
    gen = torch.Generator().manual_seed(0)
    gaps = {}
    for k in (1, 4, 64):
        lp, info = flow.log_prob(x, augment_samples=k, generator=gen, return_info=True)
        assert info["likelihood"] == "lower bound" and info["augment_samples"] == k
        gaps[k] = (lp - truth).mean().item()
    # K = 1 is the ELBO: its gap is −KL(q ‖ p(a | x)) = E_q[log N(a; 0, σ²) − log N(a; 0, 1)], σ² = e^{−0.6}
    sigma2 = math.exp(-0.6)
    elbo_gap = -0.5 * math.log(sigma2) - 0.5 / sigma2 + 0.5
    assert gaps[1] == pytest.approx(elbo_gap, abs=0.02)
    assert gaps[1] < gaps[4] < gaps[64] <= 0.01  # below the truth in expectation, closer with K
    assert abs(gaps[64]) < 0.01


def test_an_augmentation_the_flow_leaves_alone_gives_the_exact_density_and_the_data_part():
    flow = scaled_flow(0.5, 0.0)  # a keeps q's law: every importance weight is p(x)
    x = torch.randn(50, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(flow.log_prob(x, augment_samples=1), true_log_prob(x, 0.5), atol=1e-6, rtol=0)
    s = flow.sample(4000, generator=torch.Generator().manual_seed(2))
    assert s.shape == (4000, 1) and s.std().item() == pytest.approx(math.exp(0.5), rel=0.05)
    for op in (flow.encode, flow.decode):
        with pytest.raises(FlowsError, match="augmented .*model.augment=1.*no single base point"):
            op(x)
    with pytest.raises(FlowsError, match="augment_samples must be positive"):
        flow.log_prob(x, augment_samples=0)


def test_fields_solve_in_the_augmented_space():
    mlp = build_field({"name": "mlp", "hidden": [8], "augment": 3}, (2,))
    assert mlp.augment == 3 and mlp(torch.zeros(4, 5), torch.zeros(())).shape == (4, 5)
    unet = build_field({"name": "unet", "channels": 8, "groups": 4, "channel_mult": [1], "augment": 2}, (1, 8, 8))
    assert unet(torch.zeros(2, 3, 8, 8), torch.zeros(())).shape == (2, 3, 8, 8)
    assert not hasattr(build_field({"name": "mlp", "hidden": [8], "augment": 0}, (2,)), "augment")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.augment=-1", "model.augment=-1: the number of extra dimensions"),
        ("eval.augment_samples=0", "eval.augment_samples must be > 0"),
    ],
)
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_augment_zero_is_todays_run_bit_for_bit(tmp_path):
    train(load_config(None, tiny_overrides(tmp_path / "plain", steps=3)))
    train(load_config(None, [*tiny_overrides(tmp_path / "zero", steps=3), "model.augment=0"]))
    a, b = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("plain", "zero"))
    assert_same_tensors(b, a)
    plain, zero = (json.loads((tmp_path / r / "eval.json").read_text()) for r in ("plain", "zero"))
    assert plain["nll"] == zero["nll"] and "likelihood" not in zero


@pytest.mark.parametrize("objective", ["mle", "fm"])
def test_both_objectives_train_an_augmented_flow_that_reports_its_bound(tmp_path, objective):
    run_dir = tmp_path / objective
    train(load_config(None, [*tiny_overrides(run_dir, steps=3), f"objective.name={objective}", "model.augment=2"]))
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["likelihood"] == "lower bound" and result["augment_samples"] == 8
    gap = result["bound_gap"]
    assert gap["n"] == 16 and math.isfinite(gap["gap"]) and gap["nll_4k"] <= gap["nll_k"] + 6 * gap["gap_se"] + 1e-9
    flow = flows.load(run_dir)
    assert flow.augment == 2 and flow.state_shape == (4,) and flow.likelihood == "lower bound"
    assert flow.field.layers[0].linear.in_features == 4
    x = flow.sample(10, generator=torch.Generator().manual_seed(0))
    assert x.shape == (10, 2)
    same = flow.sample(10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, same, atol=0, rtol=0)
    assert torch.isfinite(flow.log_prob(x)).all()
    if objective == "mle":  # evaluate.py says what it reports, and how tight it is
        out = tmp_path / "e.json"
        args = ["evaluate.py", str(run_dir), "--augment-samples", "2", "--gap-points", "5", "--json", str(out)]
        proc = script(*args, "--check", "0")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "lower bound on log p (importance-weighted over K=2 augmentations)" in proc.stdout
        written = json.loads(out.read_text())
        assert written["likelihood"] == "lower bound" and written["augment_samples"] == 2
        assert written["bound_gap"]["n"] == 5 and written["bound_gap"]["augment_samples"] == 2


def test_an_augmented_run_resumes_exactly(tmp_path):
    assert_resume_is_exact(tmp_path, "model.augment=1")


def test_augmented_images_with_labels_and_guidance(tmp_path):
    run_dir = tmp_path / "img"
    overrides = [*image_overrides(run_dir, "fm"), "model.augment=1", "data.labels=true", "objective.label_dropout=0.2"]
    train(load_config(None, [*overrides, "eval.augment_samples=2", "eval.periodic_size=8", "data.test_size=8"]))
    flow = flows.load(run_dir)
    assert flow.state_shape == (2, 8, 8)
    x = flow.sample(3, context=[0, 5], guidance=1.0, steps=2)
    assert x.shape == (2, 3, 1, 8, 8)
    # Hutchinson's trace: K = 1 (the ELBO, estimated without bias) by default; K > 1 is an estimate, not a bound
    lp, info = flow.log_prob(x[0], context=0, steps=2, return_info=True)
    assert torch.isfinite(lp).all() and info["trace"] == "hutchinson"
    assert info["augment_samples"] == 1 and info["likelihood"] == "lower bound"
    _, info = flow.log_prob(x[0], context=0, steps=2, augment_samples=2, return_info=True)
    assert info["likelihood"] == "estimate"
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["likelihood"] == "estimate" and "bound_gap" not in result  # K=2 asked: no gap of noise


def test_an_augmented_posterior_takes_context_vectors(tmp_path):
    run_dir = tmp_path / "post"
    train(load_config(None, [*conditional_overrides(tmp_path, run_dir), "model.augment=2"]))
    flow = flows.load(run_dir)
    theta = flow.sample(5, context=torch.zeros(2))
    assert theta.shape == (5, 2)
    assert torch.isfinite(flow.log_prob(theta, context=torch.zeros(2))).all()


def test_an_augmented_mixture_samples_and_bounds(tmp_path):
    run_dir = tmp_path / "mix"
    train(load_config(None, [*tiny_overrides(run_dir, steps=2), "model.augment=1", "train.members=2"]))
    model = flows.load(run_dir)
    assert isinstance(model, Mixture) and model.augment == 1
    x, info = model.sample(7, return_info=True)
    assert x.shape == (7, 2) and info["noise"].shape == (7, 3)
    lp, info = model.log_prob(x, return_info=True)
    assert torch.isfinite(lp).all() and info["likelihood"] == "lower bound"


def test_init_from_needs_the_same_augmentation(tmp_path):
    train(load_config(None, [*tiny_overrides(tmp_path / "a", steps=2), "model.augment=1"]))
    source = f"train.init_from={tmp_path / 'a'}"
    train(load_config(None, [*tiny_overrides(tmp_path / "b", steps=2), "model.augment=1", source]))
    with pytest.raises(CheckpointError, match="differs from this config's"):
        train(load_config(None, [*tiny_overrides(tmp_path / "c", steps=2), source]))


def test_a_potential_field_takes_an_augmentation(tmp_path):
    run_dir = tmp_path / "pot"
    overrides = [*tiny_overrides(run_dir, steps=2), "model.name=potential", "model.augment=1", "objective.hjb=0.1"]
    train(load_config(None, overrides))
    flow = flows.load(run_dir)
    assert flow.augment == 1 and flow.sample(4).shape == (4, 2)
