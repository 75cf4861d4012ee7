"""Faults as users meet them: kill -9, half-written saves, tampered checkpoints, bad input.

Every case must lose nothing: a resumed run equals an uninterrupted one, and a refused command
leaves the files of an existing run byte-identical.
"""

import hashlib
import signal
import sys

import numpy as np
import pytest
import torch
from helpers import STEPS, assert_same_weights, kill_when, logged_step, resumable_config, resumable_overrides, script

from flows.api import train
from flows.cli.evaluate import main as evaluate_main
from flows.cli.sample import main as sample_main
from flows.cli.train import main as train_main


def snapshot(root):
    return {
        p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    train(resumable_config(run_dir))
    return run_dir


def kill_at(run_dir, step):
    """Start training in a subprocess and SIGKILL it once the log shows ``step``; its return code."""
    return kill_when([sys.executable, "train.py", *resumable_overrides(run_dir)], logged_step(run_dir, step))


@pytest.mark.slow  # kill -9 and resume in subprocesses (a resume in process: test_a_half_written_save_is_ignored)
@pytest.mark.parametrize("kill_step", [4, 13, 22])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, reference, kill_step):
    run_dir = tmp_path / "run"
    code = kill_at(run_dir, kill_step)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    proc = script("train.py", "--resume", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    assert_same_weights(run_dir, reference)
    steps = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == STEPS  # the repeated steps were trimmed from the log


def test_a_half_written_save_is_ignored(tmp_path, reference):
    run_dir = tmp_path / "run"
    train(resumable_config(run_dir, "train.steps=9"))
    # what a kill in the middle of a save leaves behind
    partial = run_dir / "checkpoints" / ".tmp_step_00000012"
    partial.mkdir()
    (partial / "optimizer.bin").write_bytes(b"\x80\x04 torn")
    (run_dir / ".model.safetensors.tmp999").write_bytes(b"torn")
    train(run_dir=run_dir, resume=True, overrides=[f"train.steps={STEPS}"])
    assert_same_weights(run_dir, reference)
    assert not partial.exists() and not (run_dir / ".model.safetensors.tmp999").exists()
    assert len(list((run_dir / "checkpoints").glob("step_*"))) == 2  # pruned to keep_checkpoints


def test_a_tampered_checkpoint_is_refused_without_running_code(tmp_path):
    run_dir = tmp_path / "run"
    train(resumable_config(run_dir, "train.steps=3"))
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt = next((run_dir / "checkpoints").glob("step_*"))
    torch.save({"state": Exploit()}, ckpt / "optimizer.bin")
    before = snapshot(run_dir)
    proc = script("train.py", "--resume", str(run_dir), "train.steps=6")
    assert proc.returncode == 2
    assert "cannot resume" in proc.stderr and "refused" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()
    assert snapshot(run_dir) == before


@pytest.fixture
def finished_run(tmp_path):
    run_dir = tmp_path / "run"
    train(resumable_config(run_dir, "train.steps=3"))
    return run_dir


def bad_files(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: {lr: 1e-3\n")
    nan = np.ones((20, 2))
    nan[5, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "three.npy", np.ones((20, 3)))


@pytest.mark.parametrize(
    ("main", "args", "message"),
    [
        (train_main, ["run_dir={run}"], "already holds a run"),
        (train_main, ["--resume", "{run}", "train.lr=abc"], "expects float"),
        (train_main, ["--resume", "{run}", "train.batch_size=0"], "batch_size must be > 0"),
        (train_main, ["--resume", "{run}", "solver.atol=-1"], "solver.atol"),
        (train_main, ["--resume", "{run}", "model.hidden=[16,16]"], "does not match the config"),
        (train_main, ["--resume", "{run}", "train.stesp=9"], "Did you mean 'train.steps'"),
        (train_main, ["--config", "{tmp}/bad.yaml", "run_dir={run}"], "not valid YAML"),
        (train_main, ["data.name=tabular", "data.path={tmp}/nan.npy", "run_dir={run}"], "first bad row 5"),
        (train_main, ["data.name=tabular", "data.path={tmp}/missing.npy", "run_dir={run}"], "does not exist"),
        (evaluate_main, ["{run}", "--data", "{tmp}/nan.npy"], "first bad row 5"),
        (evaluate_main, ["{run}", "--data", "{tmp}/three.npy"], "of shape (2,)"),
        (evaluate_main, ["{run}", "--atol", "-1"], "must be positive"),
        (evaluate_main, ["{run}/checkpoints"], "no checkpoint"),
        (sample_main, ["{run}", "-n", "0"], "must be positive"),
        (sample_main, ["{run}", "--encode", "--data", "{tmp}/three.npy"], "of shape (2,)"),
        (train_main, ["solver.method=dopri55", "run_dir={tmp}/new"], "Did you mean 'dopri5'"),
        (train_main, ["eval.solver.method=rk5", "run_dir={tmp}/new"], "eval.solver.method: unknown value 'rk5'"),
        (train_main, ["--resume", "{run}", "solver.method=bogus"], "Valid: dopri5"),
        (evaluate_main, ["{run}", "--method", "dopri55"], "invalid choice: 'dopri55'"),
        (evaluate_main, ["{run}", "--trace", "hutchinsn"], "invalid choice: 'hutchinsn'"),
        (sample_main, ["{run}", "--method", "rk5"], "invalid choice: 'rk5'"),
        (sample_main, ["{run}", "--weights", "best"], "invalid choice: 'best'"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(tmp_path, finished_run, capsys, main, args, message):
    bad_files(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(run=finished_run, tmp=tmp_path) for a in args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "new").exists()  # no run directory left behind
