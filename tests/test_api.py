"""The Python API a user holds: flows.load / flows.train and Flow.sample / log_prob / encode / decode."""

import numpy as np
import pytest
import torch
from helpers import image_overrides, tiny_overrides

import flows
from flows.cli.evaluate import main as evaluate_main
from flows.config import load_config
from flows.data import build_data
from flows.errors import ConfigError, FlowsError

TIGHT = dict(method="dopri5", atol=1e-7, rtol=1e-7)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An MLE run and an FM run on 2D data, and a U-Net run on 8x8 digit images, each trained for a few steps."""
    root = tmp_path_factory.mktemp("api")
    made = {}
    for name, overrides in {
        "mle": tiny_overrides(root / "mle", steps=4),
        "fm": [*tiny_overrides(root / "fm", steps=4), "objective.name=fm"],
        "unet": [*image_overrides(root / "unet", "fm"), "eval.plot=false"],
    }.items():
        made[name] = flows.train(None, overrides=overrides)
    return made


@pytest.mark.parametrize("name", ["mle", "fm", "unet"])
def test_a_loaded_run_samples_encodes_decodes_and_scores_in_data_units(runs, name):
    model = flows.load(runs[name])
    assert model.path == runs[name].path / "model.safetensors"
    gen = torch.Generator().manual_seed(0)
    x, info = model.sample(12, generator=gen, return_info=True)
    assert x.shape == (12, *model.shape) and torch.isfinite(x).all()
    assert info["nfe"] > 0 and info["noise"].shape == x.shape and np.isfinite(info["straightness"])
    data = build_data(model.config.data).test[:10]
    z = model.encode(data, **TIGHT)
    assert z.shape == data.shape and torch.isfinite(z).all()
    back = model.decode(z, **TIGHT)
    if model.levels is not None:  # discrete data: the same integer levels come back
        assert torch.equal(back, data.float())
        assert x.eq(x.round()).all() and x.min() >= 0 and x.max() <= model.levels - 1
    else:
        torch.testing.assert_close(back, data, atol=1e-4, rtol=1e-4)
    lp = model.log_prob(data)
    assert lp.shape == (10,) and lp.dtype == torch.float64 and torch.isfinite(lp).all()


@pytest.mark.parametrize(
    ("name", "extra"), [("mle", []), ("fm", []), ("unet", ["--probes", "2", "--deq-samples", "2"])]
)
def test_log_prob_equals_evaluate_py_to_the_last_digit(runs, tmp_path, name, extra):
    run = runs[name]
    points = tmp_path / "points.npy"
    args = [str(run.path), "--batch-size", "4", "--seed", "3", "--check", "0", "--limit", "10"]
    evaluate_main([*args, "--json", str(tmp_path / "e.json"), "--per-point", str(points), *extra])
    model = flows.load(run)
    data = build_data(model.config.data).test[:10]
    options = {"probes": 2, "deq_samples": 2} if extra else {}
    lp = model.log_prob(data, generator=torch.Generator().manual_seed(3), batch_size=4, **options)
    assert np.array_equal(lp.numpy(), np.load(points))


def test_a_model_moves_with_to_and_so_do_its_results(runs):
    model = flows.load(runs["mle"], device="cpu")
    assert model.device == torch.device("cpu")
    model.to("meta")
    assert model.device.type == "meta" and model.preprocess.shift.device.type == "meta"
    z = torch.empty(3, 2, device="meta")
    assert model.field(z, torch.zeros(3, device="meta")).device.type == "meta"
    assert "meta" in repr(model)


def test_train_takes_sections_and_a_config_object_and_returns_a_run_load_opens(tmp_path):
    run = flows.train(
        None,
        run_dir=tmp_path / "a",
        overrides=tiny_overrides(tmp_path / "ignored", steps=2),
        train={"steps": 3},
        model={"hidden": [4, 4]},
    )
    assert run.path == tmp_path / "a" and run.config.train.steps == 3 and np.isfinite(run.result["nll"])
    assert run.load().step == 3 and flows.load(run.path).config.model.hidden == [4, 4]
    assert [r["step"] for r in run.metrics if "loss" in r] == [1, 2, 3]
    cfg = load_config(None, tiny_overrides(tmp_path / "b", steps=2))
    # a second Accelerator in this process; overrides and sections apply on top of a Config object
    again = flows.train(
        cfg, overrides=["train.batch_size=4"], train={"mixed_precision": "no"}, objective={"name": "fm"}
    )
    assert again.config.objective.name == "fm" and again.config.train.batch_size == 4 and again.load().step == 2
    resumed = flows.train(run_dir=tmp_path / "b", resume=True, train={"steps": 4})
    assert resumed.load().step == 4


def test_bad_arguments_are_clear_errors(runs):
    model = flows.load(runs["mle"])
    with pytest.raises(ConfigError, match="Did you mean 'dopri5'"):
        model.sample(4, method="dopri55")
    with pytest.raises(ConfigError, match="compile compiles a fixed-step solve"):  # sample.py --compile without --steps
        model.sample(4, method="dopri5", compile=True)
    with pytest.raises(FlowsError, match="trace must be"):
        model.log_prob(torch.zeros(2, 2), trace="hutch")
    with pytest.raises(FlowsError, match=r"expected a batch of shape \(N, 2\)"):
        model.log_prob(torch.zeros(2, 3))
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        flows.train(None, train={"stepz": 3})
    with pytest.raises(flows.CheckpointError, match="weights must be"):
        flows.load(runs["mle"], weights="best")
