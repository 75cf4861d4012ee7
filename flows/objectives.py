"""Training objectives: modules whose ``forward(x)`` returns ``(loss, stats)``.

Accelerate wraps the objective (not the field) for DDP; the field inside stays unwrapped so the
adjoint sees the real parameters. Objectives know nothing of Accelerate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from flows.config import ObjectiveConfig, SolverConfig
from flows.coupling import COUPLINGS
from flows.likelihood import log_prob
from flows.paths import SCHEDULERS, AffinePath, sample_time

__all__ = ["MaximumLikelihood", "FlowMatching", "build_objective"]


class MaximumLikelihood(nn.Module):
    """−log p(x) + λ_K ∫‖v‖²dt + λ_J ∫‖∂v/∂x‖²_F dt  (FFJORD with RNODE regularization)."""

    def __init__(self, field: nn.Module, solver: SolverConfig, cfg: ObjectiveConfig):
        super().__init__()
        self.field, self.solver, self.cfg = field, solver, cfg

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Any]]:
        cfg = self.cfg
        res = log_prob(
            self.field,
            x,
            self.solver,
            cfg.trace,
            cfg.probe,
            kinetic=cfg.kinetic > 0,
            jacobian=cfg.jacobian > 0,
        )
        nll = -res.log_prob.mean()
        loss = nll
        stats: dict[str, Any] = {"nll": nll.detach(), "nfe": res.nfe}
        if res.kinetic is not None:
            kinetic = res.kinetic.mean()
            loss = loss + cfg.kinetic * kinetic
            stats["kinetic"] = kinetic.detach()
        if res.jacobian is not None:
            jacobian = res.jacobian.mean()
            loss = loss + cfg.jacobian * jacobian
            stats["jacobian"] = jacobian.detach()
        return loss, stats


class FlowMatching(nn.Module):
    """E ‖v(x_t, t) − dx_t/dt‖² over times, noise x₀ ~ N(0, I), data x₁, and their coupling.

    The mean is over samples and dimensions (the usual scale: ≈1 at the start for standardized data).
    Vectors and images alike; under mixed precision the loss itself is computed in float32.
    """

    def __init__(self, field: nn.Module, cfg: ObjectiveConfig):
        super().__init__()
        self.field, self.cfg = field, cfg
        self.path = AffinePath(SCHEDULERS[cfg.path]())
        self.coupling = COUPLINGS[cfg.coupling]

    def forward(self, x1: Tensor) -> tuple[Tensor, dict[str, Any]]:
        cfg = self.cfg
        x0, x1 = self.coupling(torch.randn_like(x1), x1)
        t = sample_time(len(x1), cfg.time_sampling, cfg.logit_normal_mean, cfg.logit_normal_std, x1.device)
        ps = self.path.sample(x0, x1, t)
        loss = (self.field(ps.xt, t).float() - ps.dxt).pow(2).mean()
        return loss, {}


def build_objective(field: nn.Module, solver: SolverConfig, cfg: ObjectiveConfig) -> nn.Module:
    if cfg.name == "mle":
        return MaximumLikelihood(field, solver, cfg)
    if cfg.name == "fm":
        return FlowMatching(field, cfg)
    raise ValueError(f"unknown objective {cfg.name!r}")


def nonfinite(t: Tensor) -> bool:
    return not bool(torch.isfinite(t).all())
