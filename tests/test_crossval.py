"""Small data: k-fold cross-validation below the threshold, today's validation split above it; the refit sees
every training row; a kill at any point resumes to the same model; eval.json says what was chosen."""

import json
import shutil
import signal
import sys

import numpy as np
import pytest
import torch
from helpers import FAST, ROOT, assert_same_tensors, kill_when, script, table, weights

import flows
from flows.config import load_config
from flows.training import crossval
from flows.training import trainer as trainer_module
from flows.training.crossval import STATE, fold_indices, small_data, still_falling, stopping_step

CONFIG = ROOT / "configs" / "tabular.yaml"
QUICK = [
    "train.time_limit=0.15",  # 9 s: folds of a few hundred steps
    "train.members=3",
    "train.evals_per_budget=5",  # cheap curves
    "model.hidden=[16,16]",
    "eval.solver.method=rk4",
    "eval.solver.step_size=0.25",
    "eval.trace=exact",
    *FAST,
]


@pytest.fixture(autouse=True)
def short_folds(monkeypatch):
    """Folds of a few hundred steps count as long enough here (the tests' budgets are seconds)."""
    monkeypatch.setattr(crossval, "MIN_FOLD_STEPS", 50)


def overrides(tmp_path, *extra):
    return [f"data.path={tmp_path / 't.npy'}", f"run_dir={tmp_path / 'r'}", *QUICK, *extra]


def test_the_folds_partition_the_rows_and_the_stop_is_the_pooled_minimum():
    parts = fold_indices(23, 5, 0)
    assert sorted(torch.cat(parts).tolist()) == list(range(23)) and {len(p) for p in parts} == {4, 5}
    a = {25: 3.0, 50: 2.0, 100: 2.5, 150: 9.0}  # a fold evaluated one step more than the other
    b = {25: 3.0, 50: 2.6, 100: 1.0}
    step, curve = stopping_step([a, b], [10, 30])  # rows weigh: 100 is best pooled though 50 is best for a
    assert step == 100 and set(curve) == {25, 50, 100}
    assert curve[100] == pytest.approx((10 * 2.5 + 30 * 1.0) / 40)
    step, _ = stopping_step([{25: float("nan"), 50: 4.0}, {25: 1.0, 50: 4.0}], [1, 1])
    assert step == 50  # a non-finite value on one fold rules its step out


def test_a_curve_still_falls_only_when_its_end_clearly_beats_its_middle():
    steps = range(100, 1100, 100)
    falling = [{s: 5.0 - s / 1000 + 0.01 * j for s in steps} for j in range(5)]
    assert still_falling(falling, 1000, 1000)
    assert not still_falling(falling, 800, 1000)  # not in the last tenth
    noisy = [{s: 4.0 + (0.05 if (s // 100 + j) % 2 else -0.05) for s in steps} for j in range(5)]
    assert not still_falling(noisy, 1000, 1000)  # flat: the end is no better than the middle


def test_the_small_data_path_is_taken_below_the_threshold_and_not_above(tmp_path):
    def cfg(rows, *extra):
        table(tmp_path / "train.npy", rows)
        table(tmp_path / "test.npy", 20)
        base = [f"data.path={tmp_path / 'train.npy'}", f"data.test_path={tmp_path / 'test.npy'}"]
        return load_config(CONFIG, [*base, f"run_dir={tmp_path / 'r'}", *extra])

    assert small_data(cfg(crossval.THRESHOLD - 1))
    assert not small_data(cfg(crossval.THRESHOLD))
    # no time budget, no validation split, a predefined validation file: today's behaviour
    assert not small_data(cfg(50, "train.time_limit=null"))
    assert not small_data(cfg(50, "data.val_fraction=0"))
    table(tmp_path / "val.npy", 10)
    assert not small_data(cfg(50, f"data.val_path={tmp_path / 'val.npy'}"))


def test_a_small_table_is_cross_validated_then_refit_on_every_training_row(tmp_path, monkeypatch):
    table(tmp_path / "t.npy", 60)  # column 0 is the row's index
    seen = []
    original = trainer_module.Trainer.__init__

    def spy(self, cfg, resume=False, data=None, stop_at=None):
        original(self, cfg, resume, data, stop_at)
        val = self.data.val[:, 0].tolist() if self.data.val is not None else None
        seen.append((cfg.run_dir, sorted(self.data.train[:, 0].tolist()), val, stop_at))

    monkeypatch.setattr(trainer_module.Trainer, "__init__", spy)
    run = flows.train(CONFIG, overrides=overrides(tmp_path))
    result = json.loads((tmp_path / "r" / "eval.json").read_text())
    state = json.loads((tmp_path / "r" / STATE).read_text())
    test_rows = set(range(60)) - {int(v) for v in seen[-1][1]}
    pool = sorted(set(range(60)) - test_rows)
    assert len(test_rows) == 12  # data.test_fraction=0.2; no validation split held out of the training rows
    folds = [s for s in seen if "/folds/" in s[0]]
    members = [s for s in seen if "/members/" in s[0]]
    assert len(folds) == crossval.FOLDS
    assert sorted(v for f in folds for v in f[2]) == pool  # every training row is a validation row once
    for _, train_rows, val, _ in folds:
        assert sorted(train_rows + val) == pool
    assert members and all(m[1] == pool and m[2] is None for m in members)  # the refit: every training row
    assert all(m[3] == state["stop_step"] for m in members)
    assert result["selection"] == "cross-validation" and result["rows"] == 48 and result["folds"] == crossval.FOLDS
    assert result["refit_members"] == len(members) == result["members"] and 1 <= len(members) <= 3
    assert result["stop_step"] == state["stop_step"] and result["cv_nll"] == min(state["cv_curve"].values())
    assert run.result["nll"] == result["nll"]
    model = flows.load(run)
    assert model.sample(5).shape == (5, 3) and torch.isfinite(model.log_prob(torch.zeros(2, 3))).all()


def test_a_context_run_with_few_rows_is_cross_validated(tmp_path):
    table(tmp_path / "t.npy", 60)
    run = flows.train(ROOT / "configs" / "posterior.yaml", overrides=overrides(tmp_path, "data.context_columns=[1]"))
    assert run.result["selection"] == "cross-validation"
    model = flows.load(run)
    x = torch.tensor([[0.5], [-1.0]])
    assert model.sample(4, context=x).shape == (2, 4, 2)
    assert torch.isfinite(model.log_prob(torch.zeros(2, 2), context=x)).all()


def test_a_budget_too_short_for_useful_folds_keeps_the_validation_split(tmp_path, monkeypatch):
    monkeypatch.setattr(crossval, "MIN_FOLD_STEPS", 10**9)
    table(tmp_path / "t.npy", 60)
    run = flows.train(CONFIG, overrides=overrides(tmp_path, "train.time_limit=0.03"))  # 1.8 s: no fold is useful
    result = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert result["selection"] == "validation split" and run.result["selection"] == "validation split"
    assert "member_val_nll" in result and not (tmp_path / "r" / "folds").exists()
    assert flows.load(run).sample(3).shape == (3, 3)


@pytest.mark.slow  # kill -9 and resume of a whole cross-validation
@pytest.mark.parametrize("kill_in", ["folds/2", "members/0"])
def test_a_kill_during_a_fold_or_a_refit_resumes_to_the_same_model(tmp_path, kill_in):
    table(tmp_path / "t.npy", 60)
    flows.train(CONFIG, overrides=overrides(tmp_path))  # the uninterrupted run: the reference
    reference = tmp_path / "r"
    state = json.loads((reference / STATE).read_text())
    # a second run with the same timing (the one measurement a run depends on), killed, then resumed
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(reference / "config.yaml", again / "config.yaml")
    timing = ("selection", "folds", "rows", "threshold", "step_seconds", "eval_seconds", "horizon", "timing_seconds")
    (again / STATE).write_text(json.dumps({k: state[k] for k in timing}))
    cmd = ["train.py", "--resume", str(again)]
    code = kill_when([sys.executable, *cmd], (again / kill_in / "metrics.jsonl").exists)
    assert code == -signal.SIGKILL and not (again / "eval.json").exists(), "finished before the kill"
    done = script(*cmd)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_tensors(weights(again), weights(reference))
    first, second = (json.loads((d / "eval.json").read_text()) for d in (reference, again))
    assert first["nll"] == second["nll"] and first["stop_step"] == second["stop_step"]
    assert np.isfinite(second["nll"])
