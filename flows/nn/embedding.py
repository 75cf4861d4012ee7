"""Time features for vector fields."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["TimeFeatures"]


class TimeFeatures(nn.Module):
    """t of shape (B,) → (B, dim): the raw time when ``dim == 1``, else sinusoidal features."""

    def __init__(self, dim: int, max_period: float = 100.0):
        super().__init__()
        self.dim = dim
        if dim > 1:
            half = dim // 2
            freqs = torch.exp(-math.log(max_period) * torch.arange(half) / max(half - 1, 1))
            self.register_buffer("freqs", freqs * 2 * math.pi, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        if self.dim == 1:
            return t[:, None]
        angles = t[:, None] * self.freqs
        feats = torch.cat([angles.cos(), angles.sin()], dim=1)
        return feats if feats.shape[1] == self.dim else torch.cat([feats, t[:, None]], dim=1)
