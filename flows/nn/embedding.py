"""Time features for vector fields."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flows.errors import FlowsError

__all__ = ["TimeFeatures", "time_rows"]


class TimeFeatures(nn.Module):
    """t of shape (B,) → (B, dim): the raw time when ``dim == 1``, else sinusoidal features."""

    def __init__(self, dim: int, max_period: float = 100.0):
        super().__init__()
        self.dim = dim
        if dim > 1:
            half = dim // 2
            freqs = torch.exp(-math.log(max_period) * torch.arange(half, device="cpu") / max(half - 1, 1))
            self.register_buffer("freqs", freqs * 2 * math.pi, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        if self.dim == 1:
            return t[:, None]
        angles = t[:, None] * self.freqs
        feats = torch.cat([angles.cos(), angles.sin()], dim=1)
        return feats if feats.shape[1] == self.dim else torch.cat([feats, t[:, None]], dim=1)


def time_rows(t: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
    """The times a backbone embeds for a batch: one row when every sample shares the time (a scalar,
    or the stride-0 view ``t.expand(batch)`` that the ODE solver passes), else t itself (B,).

    Embedding one row and broadcasting it is exact and skips B-fold work in every time-conditioned
    layer (MLP 3x64, 10k points: the time gates cost as much as the layers themselves).
    """
    if t.ndim == 0 or t.numel() == 1 or t.stride(0) == 0:
        return t.reshape(-1)[:1].to(dtype)
    if t.shape != (batch,):
        raise FlowsError(f"t has shape {tuple(t.shape)}; expected () or ({batch},)")
    return t.to(dtype)
