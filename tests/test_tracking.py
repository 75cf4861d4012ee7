"""Experiment trackers through Accelerate: TensorBoard event files hold what metrics.jsonl holds."""

import json

import pytest
from helpers import tiny_overrides

from flows.api import train
from flows.cli.train import main as train_main
from flows.config import TRACKERS, load_config
from flows.errors import ConfigError


def test_our_tracker_names_are_accelerates():
    from accelerate.utils import LoggerType

    assert set(TRACKERS) == {t.value for t in LoggerType}


def test_tensorboard_gets_the_scalars_the_config_and_the_picture(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "r"
    overrides = [
        *tiny_overrides(run_dir, steps=4),
        "train.log_with=tensorboard",
        "train.eval_every=2",
        "eval.plot=true",
    ]
    train(load_config(None, overrides))
    logs = [p.parent for p in (run_dir / "logs").rglob("events.out.tfevents.*")]
    assert logs, "no TensorBoard event file"
    tags: dict[str, list] = {}
    images = []
    for folder in set(logs):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0}).Reload()
        for tag in events.Tags()["scalars"]:
            tags.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
        images += events.Tags()["images"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for tag, key, keep in (("train/loss", "loss", "loss"), ("test/nll", "nll", "eval"), ("train/lr", "lr", "lr")):
        expected = [(r["step"], r[key]) for r in records if keep in r]  # the same numbers as metrics.jsonl
        got = sorted(tags[tag])
        assert [s for s, _ in got] == [s for s, _ in expected] and len(expected) >= 2, tag
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    assert "samples" in images  # the run's picture
    (hparams,) = (run_dir / "logs").rglob("hparams.yml")  # the config as hyperparameters
    assert "train.lr: 0.001" in hparams.read_text() and "data.name: checkerboard" in hparams.read_text()


def test_a_missing_tracker_package_names_the_pip_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("flows.tracking._installed", lambda name: name != "wandb")
    with pytest.raises(SystemExit) as exit_info:
        train_main([*tiny_overrides(tmp_path / "r"), "train.log_with=tensorboard,wandb"])
    assert exit_info.value.code == 2
    assert "pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written


def test_an_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match="Did you mean 'tensorboard'"):
        load_config(None, ["train.log_with=tensorbord"])
