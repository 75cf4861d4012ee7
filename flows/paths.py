"""Probability paths for flow matching: x_t = α_t x₁ + σ_t x₀ (x₀ noise at t=0, x₁ data at t=1).

Two schedulers: conditional OT (α_t = t, σ_t = 1 − t: straight lines at constant speed) and
variance preserving cosine (α_t = sin(πt/2), σ_t = cos(πt/2)). ``AffinePath.sample`` returns
one sample type, ``PathSample(x0, x1, t, xt, dxt)``, for vectors and images alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flows.errors import unknown_value

__all__ = ["PathSample", "AffinePath", "CondOTScheduler", "CosineScheduler", "sample_time", "SCHEDULERS"]


@dataclass
class PathSample:
    x0: Tensor  # noise (B, ...)
    x1: Tensor  # data (B, ...)
    t: Tensor  # (B,)
    xt: Tensor  # the point on the path at t
    dxt: Tensor  # d x_t / dt: the regression target


class CondOTScheduler:
    """α_t = t, σ_t = 1 − t (constant derivatives are returned as numbers: fewer tensor ops per step)."""

    def __call__(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor | float, Tensor | float]:
        return t, 1 - t, 1.0, -1.0


class CosineScheduler:
    """Variance preserving: α_t = sin(πt/2), σ_t = cos(πt/2), so α² + σ² = 1."""

    def __call__(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        a = 0.5 * math.pi * t
        return a.sin(), a.cos(), 0.5 * math.pi * a.cos(), -0.5 * math.pi * a.sin()


SCHEDULERS = {"condot": CondOTScheduler, "cosine": CosineScheduler}


class AffinePath:
    """x_t = α_t x₁ + σ_t x₀ and its time derivative, for any scheduler returning (α, σ, α', σ')."""

    def __init__(self, scheduler: CondOTScheduler | CosineScheduler):
        self.scheduler = scheduler

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
        shape = (-1, *([1] * (x1.ndim - 1)))
        alpha, sigma, d_alpha, d_sigma = (
            s.reshape(shape).to(x1.dtype) if isinstance(s, Tensor) else s for s in self.scheduler(t)
        )
        return PathSample(x0, x1, t, alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0)


def sample_time(
    n: int,
    kind: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Training times in (0, 1): uniform, or logit-normal (sigmoid of N(mean, std²)) as in SD3."""
    if kind == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))
    unknown_value("time sampling", str(kind), ["uniform", "logit_normal"])
