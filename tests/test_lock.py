"""One writer per run directory: a second writer is refused, naming the holder; a lock left by kill -9 is not."""

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, env, script, tiny_overrides

from flows.training.lock import LOCK_FILE, RunLocked, run_lock

HOLD = (
    "import sys, time; from flows.training.lock import run_lock\n"
    "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)"
)


def hold(run_dir):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, env=env(), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold(run_dir)
    try:
        with pytest.raises(RunLocked, match=rf"in use by process {holder.pid} .*--resume"), run_lock(run_dir):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run_dir / LOCK_FILE).exists()  # left behind by the killed holder
    with run_lock(run_dir):  # stale: taken over
        assert str(os.getpid()) in (run_dir / LOCK_FILE).read_text()
    with run_lock(run_dir):  # released at the end of the body
        pass


def test_the_lock_is_only_taken_by_the_main_process_of_a_launch(tmp_path, monkeypatch):
    holder = hold(tmp_path / "run")
    try:
        monkeypatch.setenv("RANK", "1")  # another process of the same launch: the main one holds the lock
        with run_lock(tmp_path / "run"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


@pytest.mark.slow  # two train.py processes and a kill -9
def test_two_train_py_on_one_run_the_second_is_refused_and_a_resume_after_kill_9_runs(tmp_path):
    run_dir = tmp_path / "run"
    args = [*tiny_overrides(run_dir, steps=1_000_000), "train.save_every=5", "train.log_every=5"]
    first = subprocess.Popen(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((run_dir / "checkpoints").glob("*")):
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.05)
        second = script("train.py", "--resume", str(run_dir))
        assert second.returncode == 2
        assert f"in use by process {first.pid}" in second.stderr, second.stderr[-2000:]
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    resumed = script("train.py", "--resume", str(run_dir), "train.steps=40")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run_dir / "eval.json").exists()
