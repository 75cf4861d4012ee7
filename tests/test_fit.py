"""``flows.fit``: a flow from arrays in memory, on the same road as a table in a file."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import flows
from flows import ConfigError, DataError
from flows.cli.evaluate import main as evaluate_main
from flows.recipes import POSTERIOR, TABULAR

ROOT = Path(__file__).resolve().parents[1]
QUICK = {
    "train": {"time_limit": None, "steps": 120, "members": 1, "evals_per_budget": 0, "log_every": 1000},
    "model": {"hidden": [16, 16]},
}


def table(n: int = 400, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 2)) @ np.array([[1.0, 0.0], [0.8, 0.6]]) + [3.0, -1.0]


def test_the_built_in_recipes_are_the_yaml_files():
    for name, recipe in (("tabular", TABULAR), ("posterior", POSTERIOR)):
        loaded = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        loaded["data"].pop("path")
        assert loaded == recipe, name


def test_fit_from_a_numpy_array_keeps_nothing_on_disk(tmp_path, monkeypatch):
    work, scratch = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    scratch.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the temporary run goes
    x = table()
    flow = flows.fit(x, **QUICK)
    assert isinstance(flow, flows.Flow) and flow.path is None and flow.shape == (2,)
    assert list(work.iterdir()) == [] and list(scratch.glob("flows-*")) == []  # nothing written here, nor left
    samples = flow.sample(2000, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2000, 2)
    torch.testing.assert_close(samples.mean(0), torch.tensor([3.0, -1.0]), atol=0.35, rtol=0)  # in x's units
    lp = flow.log_prob(x[:50])
    assert lp.shape == (50,) and torch.isfinite(lp).all()
    assert flow.config.data.name == "tabular" and flow.config.objective.name == "fm"


def test_fit_with_a_context_is_a_conditional_flow_of_pairs(tmp_path):
    rng = np.random.default_rng(1)
    theta = rng.uniform(-2, 2, (600, 2))
    x = theta + 0.3 * rng.standard_normal((600, 2))  # pre-simulated pairs: p(theta | x)
    post = flows.fit(torch.as_tensor(theta), context=x, **QUICK)
    assert post.context is not None and post.context.dim == 2
    draws = post.sample(300, context=[1.0, -1.0])
    assert draws.shape == (300, 2)
    torch.testing.assert_close(draws.mean(0), torch.tensor([1.0, -1.0]), atol=0.4, rtol=0)
    assert post.log_prob(theta[:5], context=x[:5]).shape == (5,)


def test_a_kept_fit_is_a_run_to_evaluate_and_resume(tmp_path, capsys):
    x = table(300, seed=2)
    run = tmp_path / "fit"
    flow = flows.fit(x, run_dir=run, **QUICK)
    assert flow.path == run / "model.safetensors" and (run / "data.npz").is_file()
    np.testing.assert_array_equal(np.load(run / "data.npz")["x"], x.astype(np.float32))
    evaluate_main([str(run), "--check", "0"])
    assert "NLL" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="holds a run already"):
        flows.fit(x, run_dir=run, **QUICK)
    with pytest.raises(ConfigError, match="not the ones"):
        flows.fit(x + 1, run_dir=run, resume=True)
    again = flows.fit(x, run_dir=run, resume=True)  # finished: the same model
    torch.testing.assert_close(again.log_prob(x[:20]), flow.log_prob(x[:20]))


def test_bad_arrays_are_refused_with_the_reason():
    x = table(50)
    x[7, 1] = np.nan
    with pytest.raises(DataError, match="NaN or Inf values in 1 rows, the first row 7"):
        flows.fit(x)
    with pytest.raises(DataError, match="3 contexts for 50 rows"):
        flows.fit(table(50), context=np.zeros((3, 2)))
    with pytest.raises(DataError, match=r"\(N, D\) rows"):
        flows.fit(np.zeros((5, 2, 2)))
    with pytest.raises(ConfigError, match="data.path cannot be given"):
        flows.fit(table(50), data={"path": "x.npy"})
    with pytest.raises(ConfigError, match="run_dir="):
        flows.fit(table(50), resume=True)


def test_a_time_budgeted_runs_bar_counts_the_planned_steps(capsys):
    import re

    flows.fit(table(300), train={"time_limit": 0.05, "members": 1, "steps": 1_000_000}, model={"hidden": [16, 16]})
    totals = {int(t) for t in re.findall(r"\d+/(\d+) \[", capsys.readouterr().err)}
    planned = totals - {1_000_000}
    assert planned and max(planned) < 1_000_000, totals  # the plan's steps, not the train.steps cap
