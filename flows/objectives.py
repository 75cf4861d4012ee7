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
    """−log p(x) + λ_K ∫‖v‖²dt + λ_J ∫‖∂v/∂x‖²_F dt  (FFJORD with RNODE regularization);
    for a potential field, + λ_HJB ∫|∂ₜΦ − ½‖∇Φ‖²| dt (OT-Flow's HJB penalty) instead of the Jacobian term."""

    def __init__(self, field: nn.Module, solver: SolverConfig, cfg: ObjectiveConfig):
        super().__init__()
        self.field, self.solver, self.cfg = field, solver, cfg

    def draw(self, x: Tensor) -> dict[str, Tensor]:
        """The step's random draws (none here: a Hutchinson probe is drawn inside each solve)."""
        return {}

    def forward(self, x: Tensor, draws: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Any]]:
        cfg = self.cfg
        res = log_prob(
            self.field,
            x,
            self.solver,
            cfg.trace,
            cfg.probe,
            kinetic=cfg.kinetic > 0,
            jacobian=cfg.jacobian > 0,
            hjb=cfg.hjb > 0,
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
        if res.hjb is not None:
            hjb = res.hjb.mean()
            loss = loss + cfg.hjb * hjb
            stats["hjb"] = hjb.detach()
        return loss, stats


class FlowMatching(nn.Module):
    """E ‖v(x_t, t) − dx_t/dt‖² over times, noise x₀ ~ N(0, I), data x₁, and their coupling.

    The mean is over samples and dimensions (the usual scale: ≈1 at the start for standardized data).
    Vectors and images alike; under mixed precision the loss itself is computed in float32.
    """

    def __init__(self, field: nn.Module, cfg: ObjectiveConfig, compile: bool = False):
        super().__init__()
        self.field, self.cfg = field, cfg
        self.path = AffinePath(SCHEDULERS[cfg.path]())
        self.coupling = COUPLINGS[cfg.coupling]
        # torch.compile'd field for the regression; kept out of the module tree (set through __dict__) so
        # that state dicts and checkpoints hold the plain field's keys and load with or without compile
        self.__dict__["_forward_field"] = torch.compile(field) if compile else field

    def draw(self, x1: Tensor) -> dict[str, Tensor]:
        """The noise x₀ and the times t for a batch, one row per sample: drawn for a whole batch, then sliced
        into micro-batches (gradient accumulation), they give the same per-sample draws as one batch."""
        cfg = self.cfg
        x0 = torch.randn_like(x1)
        t = sample_time(len(x1), cfg.time_sampling, cfg.logit_normal_mean, cfg.logit_normal_std, x1.device)
        return {"x0": x0, "t": t}

    def forward(self, x1: Tensor, draws: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Any]]:
        draws = draws or self.draw(x1)
        x0, x1 = self.coupling(draws["x0"], x1)  # ot: coupled within the (micro-)batch
        t = draws["t"]
        ps = self.path.sample(x0, x1, t)
        loss = (self._forward_field(ps.xt, t).float() - ps.dxt).pow(2).mean()
        return loss, {}


def build_objective(field: nn.Module, solver: SolverConfig, cfg: ObjectiveConfig, compile: bool = False) -> nn.Module:
    """``compile``: flow matching only (maximum likelihood needs a double backward, which compile does not do)."""
    if cfg.name == "mle":
        return MaximumLikelihood(field, solver, cfg)
    if cfg.name == "fm":
        return FlowMatching(field, cfg, compile)
    raise ValueError(f"unknown objective {cfg.name!r}")


def nonfinite(t: Tensor) -> bool:
    return not bool(torch.isfinite(t).all())
