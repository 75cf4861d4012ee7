"""What several test files share: paths, tiny configs and data files, the checkout's scripts run in a subprocess
as a user would, kill -9 at a chosen moment, weight comparisons, and the tolerance of float32 work.

Imported as ``from helpers import ...`` (pytest puts tests/ on sys.path, as it does for conftest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from flows.api import train
from flows.cli.train import DEFAULT_CONFIG
from flows.config import load_config
from flows.errors import TrainingAborted
from flows.nn import TimeMLP
from flows.preprocess import Preprocess
from flows.training import Trainer

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

# torch.testing's float32 tolerances, for float32 work done twice in another order of its sums (permuted trials,
# other batch sizes, a compiled or forward-mode solve): how far two correct results may be apart on any CPU. A
# log-density that went through float64 after float32 work still carries the float32 error, so Flow.log_prob's
# float64 results are compared at these too; float64's defaults (1e-7) pass or fail with the CPU's summation order.
FLOAT32 = {"rtol": 1.3e-6, "atol": 1e-5}

# What a tabular run needs to finish in seconds (tests/test_tabular.py, test_mixture.py, test_crossval.py).
FAST = ["train.log_every=1", "eval.plot=false", "solver.atol=1e-3", "solver.rtol=1e-3"]


# ------------------------------------------------------------------ fields and configs
class LinearField(nn.Module):
    """v(x, t) = A x: its flow is expm(tA), its divergence tr(A)."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x @ self.a.T


def mlp_field(hidden=(16, 16), dim=2, seed=0, dtype=torch.float32) -> nn.Module:
    """A seeded tanh TimeMLP."""
    torch.manual_seed(seed)
    return TimeMLP(dim, list(hidden), activation="tanh").to(dtype)


def unit(dim: int, dtype=torch.float32) -> Preprocess:
    """The identity preprocessing of ``dim`` numbers."""
    return Preprocess(torch.zeros(dim, dtype=dtype), torch.ones(dim, dtype=dtype))


def tiny_overrides(run_dir: Path, steps: int = 3) -> list[str]:
    """A config that trains in seconds: small data, small net, fixed-step solver."""
    return [
        f"run_dir={run_dir}",
        f"train.steps={steps}",
        "train.batch_size=8",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.eval_every=0",
        "train.save_every=2",
        "data.train_size=64",
        "data.test_size=16",
        "model.hidden=[8,8]",
        "solver.method=rk4",
        "solver.step_size=0.25",
        "eval.solver.method=rk4",
        "eval.solver.step_size=0.25",
        "eval.plot=false",
    ]


STEPS = 30  # of a resumable run


def resumable_overrides(run_dir: Path) -> list[str]:
    """A run of STEPS steps that saves every 3 (kill -9 and resume: tests/test_reliability.py, test_schedule.py);
    constant lr: a cosine schedule depends on train.steps, which the half-run test changes."""
    return [
        *tiny_overrides(run_dir, steps=STEPS),
        "train.save_every=3",
        "train.keep_checkpoints=2",
        "train.schedule=constant",
    ]


def resumable_config(run_dir: Path, *extra: str):
    """The config train.py builds from the same arguments (the default file + overrides)."""
    return load_config(DEFAULT_CONFIG, [*resumable_overrides(run_dir), *extra])


def conditional_overrides(tmp_path: Path, run_dir: Path) -> list[str]:
    """A posterior-estimation run (maximum likelihood of p(theta | x)) on 64 simulated pairs (tmp_path/sims.npz)."""
    sims = tmp_path / "sims.npz"
    if not sims.exists():
        rng = np.random.default_rng(0)
        theta = rng.normal(size=(64, 2)).astype(np.float32)
        np.savez(sims, theta=theta, x=(theta + 0.3 * rng.normal(size=(64, 2))).astype(np.float32))
    keep = [o for o in tiny_overrides(run_dir, steps=3) if not o.startswith("data.")]
    return [*keep, "data.name=tabular", f"data.path={sims}", "data.key=theta", "data.context_key=x"]


def image_overrides(run_dir: Path, objective: str) -> list[str]:
    """A U-Net on 8x8 digit images, two steps."""
    return [
        f"run_dir={run_dir}",
        "data.name=digits",
        "data.image=true",
        f"objective.name={objective}",
        "objective.trace=hutchinson",
        "eval.trace=hutchinson",
        "model.name=unet",
        "model.channels=8",
        "model.channel_mult=[1,2]",
        "model.attention_resolutions=[4]",
        "model.groups=4",
        "train.steps=2",
        "train.batch_size=8",
        "train.eval_every=0",
        "train.save_every=2",
        "solver.method=rk4",
        "solver.step_size=0.5",
        "eval.solver.method=rk4",
        "eval.solver.step_size=0.5",
        "eval.batch_size=64",
    ]


# ------------------------------------------------------------------ data files
def table(path: Path, rows: int, cols: int = 3, seed: int = 0) -> Path:
    """A float32 .npy table: column 0 is the row's index (to trace where rows go), the others correlated
    Gaussians."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, cols))
    x[:, 1:] += x[:, :1]
    x[:, 0] = np.arange(rows)
    np.save(path, x.astype(np.float32))
    return path


def write_sims(path: Path, n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An .npz of simulated pairs: theta (n, 2) uniform on [-1, 1]², x (n, 3) = theta + noise and a noise column."""
    rng = np.random.default_rng(seed)
    theta = rng.uniform(-1, 1, size=(n, 2)).astype(np.float32)
    x = np.concatenate([theta + 0.1 * rng.normal(size=(n, 2)), rng.normal(size=(n, 1))], 1).astype(np.float32)
    np.savez(path, theta=theta, x=x)
    return theta, x


# ------------------------------------------------------------------ weights
def weights(run_dir: Path, *prefixes: str) -> dict[str, torch.Tensor]:
    """The tensors of a run's model.safetensors (those whose names start with one of ``prefixes``, if given)."""
    tensors = load_file(str(Path(run_dir) / "model.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith(prefixes or "")}


def model_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The raw (not averaged) weights of a run's model.safetensors."""
    return weights(run_dir, "model.")


def assert_same_tensors(actual: dict, expected: dict) -> None:
    """The same names, and every tensor equal to the bit (a resume, a repeat of the same seed on this machine)."""
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=0, rtol=0, msg=key)


def assert_same_weights(actual_run: Path, expected_run: Path) -> None:
    """Two runs' raw and averaged weights equal to the bit."""
    assert_same_tensors(weights(actual_run, "model.", "ema."), weights(expected_run, "model.", "ema."))


def assert_resume_is_exact(tmp_path: Path, *extra: str) -> None:
    """6 steps in one go == 4 steps, then a resume to 6 (weights equal to the bit)."""
    train(load_config(None, [*tiny_overrides(tmp_path / "full", steps=6), *extra]))
    part = load_config(None, [*tiny_overrides(tmp_path / "part", steps=4), *extra])
    train(part)
    with pytest.raises(TrainingAborted, match="already holds a run"):
        Trainer(part)
    trainer = Trainer(load_config(tmp_path / "part" / "config.yaml", ["train.steps=6"]), resume=True)
    assert trainer.progress.step == 4
    trainer.run()
    trainer.accelerator.end_training()
    assert_same_tensors(model_weights(tmp_path / "part"), model_weights(tmp_path / "full"))


# ------------------------------------------------------------------ subprocesses
def env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess: one thread (oversubscribed cores make torch many times slower), no
    progress bars."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **extra}


def run(args: list[str], extra_env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``args`` run in the checkout; its return code and output for the caller to check."""
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env(**(extra_env or {})), timeout=timeout)


def script(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A script of the checkout (``train.py``, ``evaluate.py``, ``sample.py``) run with this Python."""
    return run([sys.executable, *args], extra_env)


def launch(processes: int) -> list[str]:
    """``accelerate launch`` of ``processes`` CPU processes of one thread each (append the script and its
    arguments; run with ``extra_env={"ACCELERATE_USE_CPU": "1"}``)."""
    args = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    args += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    args += ["--num_cpu_threads_per_process", "1"]
    return args + (["--multi_gpu"] if processes > 1 else [])


def kill_when(args: list[str], ready: Callable[[], bool], timeout: float = 120) -> int:
    """Start ``args`` in the checkout, SIGKILL it once ``ready()`` holds (or it ended, or ``timeout`` passed);
    its return code (−SIGKILL when it was killed)."""
    proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def logged_step(run_dir: Path, step: int) -> Callable[[], bool]:
    """For :func:`kill_when`: whether the run's metrics.jsonl has logged ``step``."""
    log = Path(run_dir) / "metrics.jsonl"
    return lambda: log.exists() and f'"step": {step},' in log.read_text()
