"""Faults as users meet them: kill -9, half-written saves, tampered checkpoints, bad input.

Every case must lose nothing: a resumed run equals an uninterrupted one, and a refused command
leaves the files of an existing run byte-identical.
"""

import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_overrides
from safetensors.torch import load_file

from flows.api import train
from flows.cli.evaluate import main as evaluate_main
from flows.cli.sample import main as sample_main
from flows.cli.train import DEFAULT_CONFIG
from flows.cli.train import main as train_main
from flows.config import load_config

STEPS = 30


def overrides(run_dir):
    # constant lr: a cosine schedule depends on train.steps, which the half-run test changes
    return [
        *tiny_overrides(run_dir, steps=STEPS),
        "train.save_every=3",
        "train.keep_checkpoints=2",
        "train.schedule=constant",
    ]


def config(run_dir, *extra):
    """The config train.py builds from the same arguments (the default file + overrides)."""
    return load_config(DEFAULT_CONFIG, [*overrides(run_dir), *extra])


def weights(run_dir):
    return {k: v for k, v in load_file(str(run_dir / "model.safetensors")).items() if k.startswith(("model.", "ema."))}


def snapshot(root):
    return {
        p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    train(config(run_dir))
    return run_dir


def kill_at(run_dir, step):
    """Start training in a subprocess and SIGKILL it once the log shows ``step``."""
    proc = subprocess.Popen(
        [sys.executable, "train.py", *overrides(run_dir)],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and f'"step": {step},' in log.read_text():
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


@pytest.mark.parametrize("kill_step", [4, 13, 22])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, reference, kill_step):
    run_dir = tmp_path / "run"
    code = kill_at(run_dir, kill_step)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    proc = subprocess.run(
        [sys.executable, "train.py", "--resume", str(run_dir)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    a, b = weights(reference), weights(run_dir)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0)
    steps = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == STEPS  # the repeated steps were trimmed from the log


def test_a_half_written_save_is_ignored(tmp_path, reference):
    run_dir = tmp_path / "run"
    train(config(run_dir, "train.steps=9"))
    # what a kill in the middle of a save leaves behind
    partial = run_dir / "checkpoints" / ".tmp_step_00000012"
    partial.mkdir()
    (partial / "optimizer.bin").write_bytes(b"\x80\x04 torn")
    (run_dir / ".model.safetensors.tmp999").write_bytes(b"torn")
    train(run_dir=run_dir, resume=True, overrides=[f"train.steps={STEPS}"])
    for key, value in weights(reference).items():
        torch.testing.assert_close(weights(run_dir)[key], value, atol=0, rtol=0)
    assert not partial.exists() and not (run_dir / ".model.safetensors.tmp999").exists()
    assert len(list((run_dir / "checkpoints").glob("step_*"))) == 2  # pruned to keep_checkpoints


def test_a_tampered_checkpoint_is_refused_without_running_code(tmp_path):
    run_dir = tmp_path / "run"
    train(config(run_dir, "train.steps=3"))
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt = next((run_dir / "checkpoints").glob("step_*"))
    torch.save({"state": Exploit()}, ckpt / "optimizer.bin")
    before = snapshot(run_dir)
    proc = subprocess.run(
        [sys.executable, "train.py", "--resume", str(run_dir), "train.steps=6"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "cannot resume" in proc.stderr and "refused" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()
    assert snapshot(run_dir) == before


@pytest.fixture
def finished_run(tmp_path):
    run_dir = tmp_path / "run"
    train(config(run_dir, "train.steps=3"))
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
