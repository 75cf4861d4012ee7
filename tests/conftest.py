import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


class LinearField(nn.Module):
    """v(x, t) = A x: its flow is expm(tA), its divergence tr(A)."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x @ self.a.T


@pytest.fixture
def linear_field() -> LinearField:
    g = torch.Generator().manual_seed(0)
    return LinearField(0.5 * torch.randn(3, 3, generator=g, dtype=torch.float64))


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


def python() -> str:
    return sys.executable
