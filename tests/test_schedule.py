"""The learning-rate schedule is a function of the step and the work done, never of the clock: with a
time limit, a run that the step count ends repeats bit for bit, and a run killed and resumed after its
plan was fixed equals the uninterrupted one, also when the planned budget ends it."""

import json
import shutil
import signal
import sys

import pytest
from helpers import assert_same_weights, kill_when, logged_step, resumable_config, script

from flows.api import train
from flows.config import load_config
from flows.training.schedule import Plan, Progress, lr_lambda


def test_a_run_with_a_time_limit_that_the_step_count_ends_repeats_bit_for_bit(tmp_path):
    # cosine after 20 warm-up steps, a 12 s budget the 40 steps (~1 s) stay far from: the clock used to set
    # the lr of the first step after warm-up (a few % of the budget used by then)
    extra = ("train.schedule=cosine", "train.steps=40", "train.warmup_steps=20", "train.time_limit=0.2")
    train(resumable_config(tmp_path / "a", *extra))
    train(resumable_config(tmp_path / "b", *extra))
    assert_same_weights(tmp_path / "b", tmp_path / "a")


def test_the_schedule_reads_the_planned_work_not_the_clock():
    cfg = load_config(None, ["train.schedule=cosine", "train.warmup_steps=10", "train.steps=1000000"])
    progress = Progress()
    factor = lr_lambda(cfg, progress)
    assert factor(4) == 0.5 and factor(50) > 0.999999  # warm-up, then (no plan yet) the step cap only
    progress.work, progress.horizon = 500.0, 1000.0
    assert abs(factor(50) - 0.5) < 1e-12  # half the planned work: half-way down the cosine
    progress.work = 1000.0
    assert factor(50) == 0.0


def test_the_plan_fits_the_budget_with_its_evaluations():
    cfg = load_config(None, ["train.time_limit=1", "train.eval_every=0"])
    progress = Progress()
    plan = Plan(cfg.train, progress)
    for step in range(1, Plan.AT + 1):
        progress.step, progress.work = step, 10.0 * step  # 10 function evaluations a step
        plan.observe(0.1)  # 0.1 s a step: 0.01 s per unit
    assert plan.ready()
    horizon = plan.fix(used=10.0, eval_seconds=2.0, evals_left=8)  # 50 s left, 8 x 2.5 s of evaluations
    assert abs(horizon - (300 + Plan.SHARE * 30 / 0.01)) < 1e-6
    assert not plan.pending


def _resume(run_dir, *extra):
    return ["train.py", "--resume", str(run_dir), *extra]


@pytest.mark.slow  # kill -9 and resume in subprocesses
def test_kill_9_and_resume_equal_the_uninterrupted_run_when_the_planned_budget_ends_it(tmp_path):
    # a run whose plan is fixed at step 30 of a 3.6 s budget, with a checkpoint every 10 steps
    first = tmp_path / "first"
    extra = ("train.schedule=cosine", "train.steps=100000", "train.time_limit=0.06", "train.keep_checkpoints=1000")
    train(resumable_config(first, *extra, "train.save_every=10"))
    ckpt = first / "checkpoints" / "step_00000040"
    saved = json.loads((ckpt / "progress.json").read_text())
    horizon, per_step = saved["horizon"], saved["work"] / 40  # work: function evaluations
    assert horizon is not None and horizon > saved["work"] + 30 * per_step, saved  # fixed before step 40, and saved
    # from that checkpoint: once without interruption, once killed half-way and resumed; the clock is far
    # from ending either (a 10-minute limit: the saved plan ends both)
    for name in ("a", "b"):
        shutil.copytree(first, tmp_path / name)
        for later in (tmp_path / name / "checkpoints").glob("step_*"):
            if later.name > ckpt.name:
                shutil.rmtree(later)
        log = tmp_path / name / "metrics.jsonl"  # what a run killed at step 40 would have logged
        log.write_text("".join(line for line in log.read_text().splitlines(True) if json.loads(line)["step"] <= 40))
    train(run_dir=tmp_path / "a", resume=True, overrides=["train.time_limit=10"])
    kill_step = max(int(40 + (horizon - saved["work"]) / per_step / 2), 56)
    resume = [sys.executable, *_resume(tmp_path / "b", "train.time_limit=10")]
    code = kill_when(resume, logged_step(tmp_path / "b", kill_step))
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    assert (tmp_path / "b" / "checkpoints" / "step_00000050").exists()  # killed after it resumed and saved again
    done = script(*_resume(tmp_path / "b", "train.time_limit=10"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "planned work of the time budget is done" in done.stdout + done.stderr
    assert_same_weights(tmp_path / "b", tmp_path / "a")
