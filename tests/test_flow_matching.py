"""Flow matching: a known answer, one checkpoint format for both objectives, init_from, mixed precision."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import script, tiny_overrides

import flows
from flows.api import train
from flows.config import load_config
from flows.errors import CheckpointError, ConfigError
from flows.likelihood import log_prob
from flows.nn import TimeMLP
from flows.objectives import FlowMatching, FMSettings


@pytest.mark.parametrize("path,coupling", [("condot", "independent"), ("condot", "ot"), ("cosine", "independent")])
def test_gaussian_to_gaussian_nll_matches_the_closed_form(path, coupling):
    """Data N(μ, diag σ²): after a few hundred steps the model's held-out NLL is within 0.05 nats of the truth."""
    torch.manual_seed(0)
    mu, sigma = torch.tensor([1.0, -0.5]), torch.tensor([0.5, 1.5])
    field = TimeMLP(2, [32, 32], "silu", time_features=8)
    objective = FlowMatching(field, FMSettings(path=path, coupling=coupling))
    opt = torch.optim.Adam(field.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 400)
    for _ in range(400):
        loss, _ = objective(mu + sigma * torch.randn(256, 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    x = mu + sigma * torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model = -log_prob(field, x).log_prob.mean().item()
    truth = -torch.distributions.Normal(mu, sigma).log_prob(x).sum(1).mean().item()
    assert abs(model - truth) < 0.05, (model, truth)


def test_flow_matching_loss_on_a_known_path():
    """With the true conditional field of a point mass x₁ = c (v = (c − x_t) / (1 − t)) the loss is 0."""

    class Exact(torch.nn.Module):
        def forward(self, x, t):
            return (torch.tensor([2.0, -1.0]) - x) / (1 - t[:, None])

    loss, _ = FlowMatching(Exact(), FMSettings())(torch.tensor([[2.0, -1.0]]).expand(512, 2))
    assert loss.item() < 1e-8
    loss, _ = FlowMatching(lambda x, t: torch.zeros_like(x), FMSettings())(torch.zeros(20_000, 2))
    assert loss.item() == pytest.approx(1.0, abs=0.03)  # E‖x₀‖²/D with x₁ = 0: dx_t = −x₀


def fm_overrides(run_dir, steps=6):
    return [*tiny_overrides(run_dir, steps), "objective.name=fm", "train.lr=1e-2"]


def test_flow_matching_run_is_sampled_and_evaluated_by_the_same_commands(tmp_path):
    run_dir = tmp_path / "fm"
    result = train(load_config(None, fm_overrides(run_dir))).result
    assert math.isfinite(result["nll"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps and all(r["loss"] > 0 and "nll" not in r and "nfe_forward" not in r for r in steps)
    assert flows.load(run_dir).config.objective.name == "fm"
    proc = script("evaluate.py", str(run_dir), "--limit", "10", "--check", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run_dir / "eval_test.json").read_text())["n"] == 10
    proc = script("sample.py", str(run_dir), "-n", "30", "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.load(tmp_path / "s" / "samples.npz")["samples"].shape == (30, 2)


def test_init_from_continues_with_the_other_objective(tmp_path):
    train(load_config(None, fm_overrides(tmp_path / "fm")))
    source = flows.load(tmp_path / "fm")
    overrides = [*tiny_overrides(tmp_path / "mle", steps=0), f"train.init_from={tmp_path / 'fm'}"]
    train(load_config(None, overrides))  # zero steps: the exported weights are the initial ones
    started = flows.load(tmp_path / "mle", weights="model")
    for (name, a), b in zip(source.field.state_dict().items(), started.field.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    bad = [*tiny_overrides(tmp_path / "bad", steps=1), "model.hidden=[8,8,8]", f"train.init_from={tmp_path / 'fm'}"]
    with pytest.raises(CheckpointError, match="init_from"):
        train(load_config(None, bad))
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_mixed_precision_is_for_flow_matching_only(tmp_path):
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(None, [f"run_dir={tmp_path}", "train.mixed_precision=bf16"])
    proc = script("train.py", *fm_overrides(tmp_path / "bf16", 3), "train.mixed_precision=bf16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "bf16" / "eval.json").read_text())
    assert math.isfinite(result["nll"])  # evaluation runs in float32 outside autocast
