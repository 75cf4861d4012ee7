"""Simulators for the simulation-based inference tests (importable as ``sbi_models:NAME`` with tests/ on the path).

Linear-Gaussian: θ ~ N(0, I_2), x = θ + σ ε: the posterior is N(x / (1 + σ²), σ² / (1 + σ²) I) in closed form.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

SIGMA = 0.5


def posterior_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) of θ | x under the N(0, I) prior."""
    shrink = 1 / (1 + SIGMA**2)
    return x * shrink, SIGMA**2 * shrink * torch.eye(len(x))


def linear(theta: torch.Tensor) -> torch.Tensor:
    return theta + SIGMA * torch.randn_like(theta)


def with_nans(theta: torch.Tensor) -> torch.Tensor:
    """Every tenth simulation fails (NaN), one more returns Inf."""
    x = linear(theta)
    x[::10] = float("nan")
    x[1, 0] = float("inf")
    return x


def trials(theta: torch.Tensor) -> torch.Tensor:
    """Four i.i.d. 2-D trials per parameter: (n, 4, 2)."""
    return theta[:, None, :] + SIGMA * torch.randn(len(theta), 4, 2)


def counted(theta: torch.Tensor) -> torch.Tensor:
    """``linear``, logging each call to $SBI_CALLS; kills its own process (SIGKILL) at call $SBI_KILL_AT."""
    log = Path(os.environ["SBI_CALLS"])
    calls = len(log.read_text().splitlines()) + 1 if log.exists() else 1
    with log.open("a") as f:
        f.write(f"{len(theta)}\n")
    if calls == int(os.environ.get("SBI_KILL_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    return linear(theta)


def wrong_rows(theta: torch.Tensor) -> torch.Tensor:
    return linear(theta)[:-1]


def raises(theta: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("the solver of the simulator diverged")


prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))


def slow(theta: torch.Tensor) -> torch.Tensor:
    """:func:`linear` that takes 1.5 s per call: longer, over a few batches, than a short collective timeout."""
    import time

    time.sleep(1.5)
    return linear(theta)
