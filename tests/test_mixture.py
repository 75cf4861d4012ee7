"""Mixtures of flows (``train.members``): one model to every caller, exact log-density, samples in the
right proportions, one inference file, resume, and more members when the budget allows them."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from helpers import FAST, ROOT, assert_same_tensors, table
from safetensors.torch import load_file
from torch import nn

import flows
from flows.cli.evaluate import main as evaluate_main
from flows.cli.sample import main as sample_main
from flows.errors import FlowsError
from flows.flow import Flow
from flows.flowfile import read, read_weights, write
from flows.mixture import Mixture
from flows.nn import build_field
from flows.preprocess import Preprocess
from flows.training.members import choose

CONFIG = ROOT / "configs/tabular.yaml"
SOLVER = {"method": "dopri5", "atol": 1e-7, "rtol": 1e-7, "adjoint": False}


def mlp_flows(count, dim=3):
    pre = Preprocess(torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 0.5, 1.0]))
    out = []
    for seed in range(count):
        torch.manual_seed(seed)
        field = build_field({"name": "mlp", "hidden": [16, 16]}, (dim,)).eval()
        out.append(Flow(field, pre, (dim,), dict(SOLVER)))
    return out


def test_the_log_density_is_the_weighted_log_sum_exp_of_the_members():
    members = mlp_flows(3)
    x = torch.randn(50, 3) * 2
    each = torch.stack([m.log_prob(x) for m in members])
    mixture = Mixture(members)
    torch.testing.assert_close(mixture.log_prob(x), torch.logsumexp(each, 0) - math.log(3), rtol=0, atol=1e-10)
    weighted = Mixture(members, [0.5, 0.3, 0.2])
    expected = torch.logsumexp(each + torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()[:, None], 0)
    torch.testing.assert_close(weighted.log_prob(x), expected, rtol=0, atol=1e-10)
    with pytest.raises(FlowsError, match="summing to 1"):
        Mixture(members, [0.5, 0.5, 0.5])


class Shift(nn.Module):
    """v(x, t) = c: the flow moves the base Gaussian by c."""

    def __init__(self, c):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, x, t):
        return self.c.expand_as(x)


def test_samples_come_from_the_members_in_their_proportions_and_the_density_is_exact():
    pre = Preprocess(torch.zeros(2), torch.ones(2))
    members = [Flow(Shift([-6.0, 0.0]), pre, (2,), dict(SOLVER)), Flow(Shift([6.0, 0.0]), pre, (2,), dict(SOLVER))]
    mixture = Mixture(members, [0.25, 0.75])
    x, info = mixture.sample(4000, generator=torch.Generator().manual_seed(0), return_info=True)
    right = (x[:, 0] > 0).double()
    assert abs(right.mean().item() - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 4000)
    assert torch.equal(right.bool(), info["member"] == 1)  # each point from the member it was drawn from
    # the closed form: 0.25 N((-6, 0), I) + 0.75 N((6, 0), I)
    gauss = torch.distributions.Normal(0.0, 1.0)
    points = torch.tensor([[-6.0, 0.3], [5.0, -1.0], [0.0, 0.0]])
    exact = torch.logsumexp(
        torch.stack(
            [
                math.log(0.25) + gauss.log_prob(points - torch.tensor([-6.0, 0.0])).sum(1),
                math.log(0.75) + gauss.log_prob(points - torch.tensor([6.0, 0.0])).sum(1),
            ]
        ),
        0,
    )
    torch.testing.assert_close(mixture.log_prob(points).float(), exact, rtol=0, atol=1e-4)
    with pytest.raises(FlowsError, match="no single latent space"):
        mixture.encode(points)


def test_a_mixture_is_one_inference_file_and_its_first_member_starts_init_from(tmp_path):
    members = mlp_flows(3)
    states = [m.field.state_dict() for m in members]
    ema = [{f"module.{k}": v for k, v in s.items()} | {"n_averaged": torch.tensor(1)} for s in states]
    common = {"preprocess": members[0].preprocess, "field": {"name": "mlp", "hidden": [16, 16]}, "solver": SOLVER}
    write(
        tmp_path / "m.safetensors",
        model_state=states[0],
        ema_state=ema[0],
        shape=(3,),
        step=7,
        members=list(zip(states[1:], ema[1:], strict=True)),
        weights=[0.2, 0.3, 0.5],
        **common,
    )
    loaded = read(tmp_path / "m.safetensors")
    assert isinstance(loaded, Mixture) and len(loaded.members) == 3 and loaded.step == 7
    x = torch.randn(20, 3)
    torch.testing.assert_close(loaded.log_prob(x), Mixture(members, [0.2, 0.3, 0.5]).log_prob(x), rtol=0, atol=0)
    state, _, _ = read_weights(tmp_path / "m.safetensors")
    for k, v in states[0].items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)


def test_the_mixture_keeps_every_member_but_those_clearly_worse_on_validation():
    rng = torch.Generator().manual_seed(0)
    good = torch.randn(2, 200, generator=rng, dtype=torch.float64) - 1.0  # two comparable members
    bad = torch.full((1, 200), -30.0, dtype=torch.float64)  # far worse everywhere
    val = torch.cat([good, bad])
    assert sorted(choose(val)) == [0, 1]
    assert choose(bad) == [0]


@pytest.fixture(autouse=True)
def members_path(monkeypatch):
    """The members path of tables at or above the small-data threshold (below it: tests/test_crossval.py)."""
    monkeypatch.setattr("flows.training.crossval.THRESHOLD", 0)


def members_run(tmp_path, *extra):
    overrides = [
        f"data.path={tmp_path / 't.npy'}",
        f"run_dir={tmp_path / 'r'}",
        "train.members=3",
        "train.time_limit=null",
        "train.steps=30",
        "train.eval_every=10",
        "train.save_every=10",
        "train.keep_checkpoints=10",
        *FAST,
        *extra,
    ]
    return flows.train(CONFIG, overrides=overrides)


def test_a_members_run_is_one_model_to_load_evaluate_and_sample_and_resumes_exactly(tmp_path):
    table(tmp_path / "t.npy", 120)
    run = members_run(tmp_path)
    result = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert result["members"] == 3 and len(result["member_val_nll"]) == 3 and run.result["nll"] == result["nll"]
    model = flows.load(run)
    chosen = result["chosen"]
    assert (len(model.members) if isinstance(model, Mixture) else 1) == len(chosen)
    # the equal-weight mixture's validation NLL is no worse than its members' average (Jensen)
    chosen_nll = [result["member_val_nll"][i] for i in chosen]
    assert result["val_nll"] <= sum(chosen_nll) / len(chosen_nll) + 1e-9
    # evaluate.py and sample.py take it as one model
    evaluate_main([str(tmp_path / "r"), "--per-point", "--check", "0"])
    report = json.loads((tmp_path / "r" / "eval_test.json").read_text())
    assert np.isclose(report["nll"], result["nll"], rtol=0, atol=1e-9)
    sample_main([str(tmp_path / "r"), "-n", "10", "--out", str(tmp_path / "s")])
    with np.load(tmp_path / "s" / "samples.npz") as saved:
        assert saved[saved.files[0]].shape == (10, 3)
    # kill during member 2 (its last checkpoints gone, nothing of the mixture written), then resume
    before = load_file(str(tmp_path / "r" / "model.safetensors"))
    for name in ("model.safetensors", "eval.json"):
        (tmp_path / "r" / name).unlink()
    last = tmp_path / "r" / "members" / "2"
    (last / "member.json").unlink()
    (last / "eval.json").unlink()
    for step in (20, 30):
        shutil.rmtree(last / "checkpoints" / f"step_{step:08d}")
    flows.train(run_dir=tmp_path / "r", resume=True)
    assert_same_tensors(load_file(str(tmp_path / "r" / "model.safetensors")), before)


@pytest.mark.slow  # two time budgets
def test_a_longer_budget_trains_more_members_when_validation_stops_them_early(tmp_path):
    table(tmp_path / "t.npy", 120)
    counts = {}
    for minutes in (0.04, 0.16):
        shutil.rmtree(tmp_path / "r", ignore_errors=True)
        run = members_run(
            tmp_path,
            "train.members=30",
            f"train.time_limit={minutes}",
            "train.steps=1000000",
            "train.eval_every=5",
            "train.patience=1",
            "train.save_every=100000",
        )
        counts[minutes] = run.result["members"]
    assert counts[0.16] > counts[0.04] >= 1, counts
