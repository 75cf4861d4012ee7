"""Files written whole or not at all (``flows.files``), and the one held-out evaluation (``flows.evaluation.evaluate``)
that the trainer, a mixture's members and evaluate.py all go through."""

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import FAST, ROOT, table

import flows
import flows.training.members  # noqa: F401 - imported before its names are spied on
from flows import evaluation
from flows.cli.evaluate import main as evaluate_main
from flows.files import atomic_path, atomic_write, leftovers, temporary


def test_a_write_replaces_the_content_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text("old")
    assert atomic_write(path, json.dumps({"nll": 1.5})) == path
    assert json.loads(path.read_text()) == {"nll": 1.5}
    atomic_write(path, b"\x00bytes", fsync=True)
    assert path.read_bytes() == b"\x00bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_a_writer_that_raises_midway_leaves_the_old_content_and_no_temporary_file(tmp_path):
    path = tmp_path / "pairs.npz"
    np.savez(path, x=np.arange(3))
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="killed"), atomic_path(path) as tmp, tmp.open("wb") as f:
        f.write(b"half of a new file")
        raise RuntimeError("killed")
    assert path.read_bytes() == before
    assert not tmp.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["pairs.npz"]
    # a writer that wants a path writes the temporary one; the target appears only once it is whole
    with atomic_path(tmp_path / "new.npz") as tmp, tmp.open("wb") as f:
        np.savez(f, x=np.arange(4))
        assert not (tmp_path / "new.npz").exists()
    with np.load(tmp_path / "new.npz") as saved:
        assert saved["x"].tolist() == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.npz", "pairs.npz"]


def test_leftovers_are_the_temporary_files_of_killed_writers_of_any_process(tmp_path):
    path = tmp_path / "model.safetensors"
    assert temporary(path).parent == tmp_path and temporary(path).name == f".model.safetensors.tmp{os.getpid()}"
    killed = [tmp_path / ".model.safetensors.tmp12", temporary(path)]
    for stale in killed:
        stale.write_text("half")
    (tmp_path / ".eval.json.tmp12").write_text("another file's")
    assert leftovers(path) == sorted(killed)


def spy(monkeypatch: pytest.MonkeyPatch, function: Callable, calls: list[str]) -> None:
    """Count the calls of ``function`` under every name a ``flows`` module holds it by, recording each caller as
    ``module:function``."""

    def counted(*args, **kwargs):
        frame = sys._getframe(1)
        calls.append(f"{frame.f_globals['__name__']}:{frame.f_code.co_name}")
        return function(*args, **kwargs)

    for module in [m for name, m in sys.modules.items() if name == "flows" or name.startswith("flows.")]:
        for name, value in list(vars(module).items()):
            if value is function:
                monkeypatch.setattr(module, name, counted)


def test_the_trainer_the_members_and_evaluate_py_go_through_one_evaluation(tmp_path, monkeypatch):
    monkeypatch.setattr("flows.training.crossval.THRESHOLD", 0)  # the members path, not the cross-validation
    calls: dict[str, list[str]] = {"evaluate": [], "summarize": [], "bound_report": []}
    for name, found in calls.items():
        spy(monkeypatch, getattr(evaluation, name), found)
    overrides = [
        f"data.path={table(tmp_path / 't.npy', 120)}",
        f"run_dir={tmp_path / 'r'}",
        "train.members=2",
        "train.time_limit=null",
        "train.steps=6",
        "train.eval_every=3",
        "train.save_every=6",
        *FAST,
    ]
    run = flows.train(ROOT / "configs/tabular.yaml", overrides=overrides)
    evaluate_main([str(tmp_path / "r"), "--check", "0"])
    callers = calls["evaluate"]
    # each member's periodic and final evaluations, then the mixture's, then evaluate.py's
    assert callers[-2:] == ["flows.training.members:mix", "flows.cli.evaluate:go"], callers
    assert set(callers[:-2]) == {"flows.training.trainer:evaluate"} and len(callers) >= 2 * 2 + 2, callers
    # the steps of the pipeline are taken nowhere else
    assert set(calls["summarize"]) == set(calls["bound_report"]) == {"flows.evaluation:evaluate"}, calls
    assert len(calls["summarize"]) == len(callers)
    written = json.loads(Path(tmp_path / "r" / "eval_test.json").read_text())
    assert written["nll"] == pytest.approx(run.result["nll"], abs=1e-9)
