"""Your own table: splits as named, any size, selection on validation, early stopping, the time budget,
per-row log-likelihoods, and the standard suite's loaders on tiny files in the published layout."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import FAST, ROOT, table
from safetensors.torch import load_file

from flows.api import train
from flows.config import DataConfig, load_config
from flows.data import build_data
from flows.data.suite import load_suite
from flows.errors import DataError
from flows.training import Trainer

CONFIG = ROOT / "configs/tabular_mle.yaml"


def test_a_60_row_table_trains_and_evaluates_with_the_default_config(tmp_path, capsys):
    cfg = load_config(CONFIG, [f"data.path={table(tmp_path / 't.npy', 60)}", f"run_dir={tmp_path / 'r'}"])
    assert cfg.train.batch_size > 60  # the default batch is larger than the table
    overrides = [f"data.path={tmp_path / 't.npy'}", f"run_dir={tmp_path / 'r'}", "train.steps=5"]
    result = train(load_config(CONFIG, overrides)).result
    assert "each batch is the whole table" in capsys.readouterr().out
    assert math.isfinite(result["nll"]) and result["n"] == 12 and "val_nll" in result
    from flows.cli.evaluate import main as evaluate_main

    evaluate_main([str(tmp_path / "r"), "--data", str(tmp_path / "t.npy"), "--check", "0", "--per-point"])
    points = np.load(tmp_path / "r" / "eval_data_points.npy")
    report = json.loads((tmp_path / "r" / "eval_data.json").read_text())
    assert points.shape == (60,) and np.isclose(-points.mean(), report["nll"])


def test_splits_are_used_as_named_and_held_out_rows_never_reach_training(tmp_path):
    data = build_data(DataConfig(name="tabular", path=str(table(tmp_path / "t.npy", 100)), val_fraction=0.1))
    train_ids, val_ids, test_ids = (set(s[:, 0].int().tolist()) for s in (data.train, data.val, data.test))
    assert len(test_ids) == 20 and len(val_ids) == 8 and len(train_ids) == 72
    assert train_ids | val_ids | test_ids == set(range(100)) and not (train_ids & (val_ids | test_ids))
    # predefined files: data.path is all training rows
    table(tmp_path / "test.npy", 7, seed=1)
    table(tmp_path / "val.npy", 5, seed=2)
    cfg = DataConfig(name="tabular", path=str(tmp_path / "t.npy"), test_path=str(tmp_path / "test.npy"))
    data = build_data(cfg)
    assert len(data.train) == 100 and data.val is None
    torch.testing.assert_close(data.test, torch.from_numpy(np.load(tmp_path / "test.npy")))
    cfg.val_path = str(tmp_path / "val.npy")
    data = build_data(cfg)
    assert len(data.train) == 100 and len(data.val) == 5
    # the trainer's batches hold training rows only
    overrides = [f"data.path={tmp_path / 't.npy'}", "data.val_fraction=0.2", f"run_dir={tmp_path / 'r'}", *FAST]
    trainer = Trainer(load_config(CONFIG, overrides))
    seen = set(torch.cat([next(trainer.batches()) for _ in range(3)])[:, 0].int().tolist())
    assert seen <= set(trainer.data.train[:, 0].int().tolist())
    assert not seen & set(trainer.data.val[:, 0].int().tolist())


def test_mismatched_columns_and_constant_columns_are_clear_errors(tmp_path):
    table(tmp_path / "t.npy", 30, cols=3)
    table(tmp_path / "other.npy", 10, cols=4)
    for key in ("test_path", "val_path"):
        cfg = DataConfig(name="tabular", path=str(tmp_path / "t.npy"), **{key: str(tmp_path / "other.npy")})
        with pytest.raises(DataError, match="has 4 columns but the training table"):
            build_data(cfg)
    x = np.random.default_rng(0).normal(size=(30, 3))
    x[:, 2] = 5.0
    np.save(tmp_path / "c.npy", x)
    with pytest.raises(DataError, match=r"column\(s\) \[2\] are constant"):
        build_data(DataConfig(name="tabular", path=str(tmp_path / "c.npy")))


def scripted(trainer: Trainer, nlls: list[float], snapshots: dict):
    """Replace the validation evaluation by a script of NLLs; remember the EMA weights at each one."""
    real = trainer.evaluate
    script = iter(nlls)

    def evaluate(which, **extra):
        if which != "periodic":
            return real(which, **extra)
        snapshots[trainer.progress.step] = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
        return {"nll": next(script)}

    trainer.evaluate = evaluate


def selection_run(tmp_path, nlls, *extra, resume=False):
    overrides = [
        f"data.path={tmp_path / 't.npy'}",
        f"run_dir={tmp_path / 'r'}",
        "train.eval_every=1",
        "train.time_limit=null",
        "train.evals_per_budget=0",  # evaluations every eval_every steps only (the script's)
        *FAST,
        *extra,
    ]
    cfg = load_config(tmp_path / "r" / "config.yaml" if resume else CONFIG, overrides)
    trainer, snapshots = Trainer(cfg, resume=resume), {}
    scripted(trainer, nlls, snapshots)
    return trainer, snapshots


def test_the_kept_model_is_the_best_by_validation_nll(tmp_path):
    table(tmp_path / "t.npy", 80)
    trainer, snapshots = selection_run(tmp_path, [3.0, 2.0, 1.5, 2.5, 3.0, 3.5], "train.steps=6")
    result = trainer.run()
    assert trainer.progress.best_step == 3 and result["best_step"] == 3 and result["val_nll"] == 1.5
    exported = load_file(str(tmp_path / "r" / "model.safetensors"))
    for k, v in snapshots[3].items():
        torch.testing.assert_close(exported[f"ema.{k}"], v.to(exported[f"ema.{k}"].dtype), rtol=0, atol=0)
    assert not torch.equal(snapshots[3]["module.layers.0.linear.weight"], snapshots[6]["module.layers.0.linear.weight"])


def test_early_stopping_stops_and_resume_keeps_the_best_and_the_patience(tmp_path, capsys):
    table(tmp_path / "t.npy", 80)
    trainer, _ = selection_run(tmp_path, [3.0, 2.0, 2.5, 2.6, 2.7], "train.steps=50", "train.patience=3")
    trainer.run()
    assert trainer.progress.step == 5 and "early stopping at step 5" in capsys.readouterr().out
    # the checkpoint keeps the best so far and the count of evaluations since; resuming continues both
    second = tmp_path / "second"
    second.mkdir()
    table(second / "t.npy", 80)
    trainer, snapshots = selection_run(second, [3.0, 2.0, 2.5], "train.steps=3", "train.patience=2")
    trainer.run()
    running_ema = {k: v.clone() for k, v in snapshots[3].items()}
    resumed, _ = selection_run(second, [2.6, 1.0], "train.steps=10", resume=True)
    assert (resumed.progress.best_nll, resumed.progress.best_step, resumed.progress.stale_evals) == (2.0, 2, 1)
    for k, v in snapshots[2].items():
        torch.testing.assert_close(resumed.selection.best[k], v, rtol=0, atol=0)
    for k, v in running_ema.items():  # training goes on from the running average, not from the best one
        torch.testing.assert_close(resumed.ema.state_dict()[k], v, rtol=0, atol=0)
    resumed.run()
    assert resumed.progress.step == 4 and "early stopping at step 4" in capsys.readouterr().out


def test_with_a_time_limit_the_schedule_ends_with_the_budget(tmp_path):
    table(tmp_path / "t.npy", 80)
    overrides = [
        f"data.path={tmp_path / 't.npy'}",
        f"run_dir={tmp_path / 'r'}",
        "train.time_limit=0.05",
        "train.members=1",  # one run's schedule (members: tests/test_mixture.py)
        "train.evals_per_budget=0",
        "train.steps=1000000",
        "train.warmup_steps=1",
        "solver.method=rk4",
        "solver.step_size=0.5",
        "data.val_fraction=0",
        *FAST,
    ]
    train(load_config(CONFIG, overrides))
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r]
    peak = load_config(tmp_path / "r" / "config.yaml").train.lr
    assert len(lrs) > 10 and records[-1]["step"] < 1_000_000  # stopped by the clock
    assert max(lrs) > 0.8 * peak and lrs[-1] < 0.05 * peak  # the cosine reached its end with the budget
    assert lrs[len(lrs) // 2] < max(lrs)


# ------------------------------------------------------------------ the standard suite
def test_power_and_miniboone_loaders_split_and_normalize_as_published(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power/data.npy", rng.normal(size=(1000, 8)))
    train, val, test = load_suite("power", tmp_path)
    assert [a.shape for a in (train, val, test)] == [(810, 6), (90, 6), (100, 6)]
    both = np.vstack((train, val))
    np.testing.assert_allclose(both.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(both.std(0), 1, atol=1e-4)
    (tmp_path / "miniboone").mkdir()
    raw = rng.normal(size=(500, 43)) * 3 + 1
    np.save(tmp_path / "miniboone/data.npy", raw)
    train, val, test = load_suite("miniboone", tmp_path)
    assert [a.shape for a in (train, val, test)] == [(405, 43), (45, 43), (50, 43)]
    mu, s = raw[:450].mean(0), raw[:450].std(0)
    np.testing.assert_allclose(test, (raw[450:] - mu) / s, rtol=1e-5, atol=1e-5)  # the last 10% is the test set


def test_hepmass_loader_keeps_signal_rows_and_drops_repeated_features(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "hepmass").mkdir()

    def write(name, rows, extra):
        x = rng.normal(size=(rows, 4 + extra))
        x[:, 0] = rng.integers(0, 2, rows)  # label
        x[:, 3] = np.where(rng.random(rows) < 0.5, -5.0, rng.normal(size=rows))  # repeats of its smallest value
        header = "# label," + ",".join(f"f{i}" for i in range(x.shape[1] - 1))
        np.savetxt(tmp_path / "hepmass" / name, x, delimiter=",", header=header, comments="")
        return x

    train_raw = write("1000_train.csv", 200, 0)
    test_raw = write("1000_test.csv", 50, 1)
    train, val, test = load_suite("hepmass", tmp_path)
    n_signal = int((train_raw[:, 0] == 1).sum())
    assert train.shape[1] == test.shape[1] == 2  # label dropped, the repeated feature dropped
    assert len(train) + len(val) == n_signal and len(val) == int(0.1 * n_signal)
    assert len(test) == int((test_raw[:, 0] == 1).sum())


def test_gas_needs_consent_to_unpickle_and_drops_correlated_columns(tmp_path):
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    base = rng.normal(size=(300, 3))
    frame = pd.DataFrame(
        {
            "Time": np.arange(300.0),
            "Meth": rng.normal(size=300),
            "Eth": rng.normal(size=300),
            "a": base[:, 0],
            "a2": base[:, 0] * 2 + 1e-3 * rng.normal(size=300),  # correlated > 0.98 with a
            "b": base[:, 1],
            "c": base[:, 2],
        }
    )
    (tmp_path / "gas").mkdir()
    frame.to_pickle(tmp_path / "gas/ethylene_CO.pickle")
    with pytest.raises(DataError, match="allow_pickle"):
        load_suite("gas", tmp_path)
    train, val, test = load_suite("gas", tmp_path, allow_pickle=True)
    assert train.shape[1] == 3 and len(test) == 30 and len(val) == 27 and len(train) == 243


def test_bsds300_loader_reads_the_three_splits(tmp_path):
    h5py = pytest.importorskip("h5py")
    (tmp_path / "BSDS300").mkdir()
    with h5py.File(tmp_path / "BSDS300/BSDS300.hdf5", "w") as f:
        for name, rows in (("train", 40), ("validation", 10), ("test", 12)):
            f[name] = np.random.default_rng(rows).normal(size=(rows, 63))
    train, val, test = load_suite("bsds300", tmp_path)
    assert [a.shape for a in (train, val, test)] == [(40, 63), (10, 63), (12, 63)]


def test_missing_suite_files_say_where_they_come_from(tmp_path):
    with pytest.raises(DataError, match=r"zenodo.org/record/1161203.*power/data.npy"):
        build_data(DataConfig(name="power", root=str(tmp_path)))
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone/data.npy", np.random.default_rng(0).normal(size=(100, 5)))
    data = build_data(DataConfig(name="miniboone", root=str(tmp_path)))
    assert data.val is not None and data.shape == (5,)


def test_dequantize_adds_uniform_noise_to_integer_columns_only(tmp_path):
    rng = np.random.default_rng(0)
    x = np.stack([rng.integers(0, 5, 50), rng.normal(size=50), rng.integers(0, 2, 50)], 1).astype(np.float32)
    np.save(tmp_path / "t.npy", x)
    plain = build_data(DataConfig(name="tabular", path=str(tmp_path / "t.npy")))
    noisy = build_data(DataConfig(name="tabular", path=str(tmp_path / "t.npy"), dequantize=True))
    delta = torch.cat([noisy.train - plain.train, noisy.test - plain.test])
    assert torch.equal(delta[:, 1], torch.zeros(50)) and (delta[:, [0, 2]] >= 0).all() and (delta < 1).all()
    assert delta[:, [0, 2]].std() > 0.2  # uniform noise, not a constant shift
    again = build_data(DataConfig(name="tabular", path=str(tmp_path / "t.npy"), dequantize=True))
    assert torch.equal(again.train, noisy.train)  # drawn once, from the seed


def test_the_closing_validation_evaluation_is_not_charged_to_the_time_budget(tmp_path):
    """With selection, a run whose last step had no evaluation gets one after the loop: outside the budget."""
    table(tmp_path / "t.npy", 80)
    trainer, _ = selection_run(tmp_path, [3.0, 2.0], "train.steps=4", "train.eval_every=3")
    seen = []
    scripted_evaluate = trainer.evaluate

    def evaluate(which, **extra):
        seen.append((which, trainer.progress.step, trainer.progress.train_time))
        return scripted_evaluate(which, **extra)

    trainer.evaluate = evaluate
    trainer.run()
    closing = [s for s in seen if s[0] == "periodic" and s[1] == 4]
    assert closing and trainer.progress.train_time == closing[0][2]
