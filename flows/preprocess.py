"""Maps raw data to the space the flow models, with the exact log-det of the map.

For discrete data (values 0..levels-1) the map is, in order:

1. uniform dequantization and scaling to [0, 1):  y = (raw + u) / levels,  u ~ U[0, 1)
2. optional logit transform with ``alpha`` (RealNVP / FFJORD):  s = logit(alpha + (1 - 2 alpha) y)
3. an affine map:  x = (s - shift) / scale

Likelihoods are reported in the space of y (the dequantized data in [0, 1)^D, or raw units for
continuous data): ``log p_y(y) = log p_x(x) + log|det ∂x/∂y|``. ``log_det(x)`` returns that
term per sample, computed from the model-space point x alone (every step is invertible).

Device: the constants follow the data they meet (``shift``/``scale`` are moved to x's device, a
no-op once ``to(device)`` has put them there, which the trainer and the CLIs do once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Preprocess", "bits_per_dim"]


@dataclass
class Preprocess:
    shift: Tensor  # broadcastable to one sample, e.g. (D,) or ()
    scale: Tensor
    levels: int | None = None  # number of discrete values per dimension, None if continuous
    logit_alpha: float = 0.0  # > 0: logit transform after dequantization (discrete data only)

    def to(self, device: torch.device | str) -> Preprocess:
        """The same map with its constants on ``device``."""
        return Preprocess(self.shift.to(device), self.scale.to(device), self.levels, self.logit_alpha)

    def _affine(self, x: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        dtype = dtype or self.shift.dtype
        return self.shift.to(x.device, dtype), self.scale.to(x.device, dtype)

    def __call__(self, raw: Tensor, dequantize: bool = True, noise: Tensor | None = None) -> Tensor:
        """Raw data → model space. ``noise``: the dequantization noise to use (default: fresh U[0, 1))."""
        y = raw if raw.is_floating_point() else raw.float()
        if self.levels is not None:
            if noise is None:
                noise = torch.rand_like(y) if dequantize else torch.full_like(y, 0.5)
            y = (y + noise) / self.levels
        if self.logit_alpha > 0:
            y = torch.logit(self.logit_alpha + (1 - 2 * self.logit_alpha) * y)
        shift, scale = self._affine(y)
        return (y - shift) / scale

    def inverse(self, x: Tensor) -> Tensor:
        """Model space → the reporting space ([0, 1) for discrete data, raw units otherwise)."""
        shift, scale = self._affine(x)
        s = x * scale + shift
        if self.logit_alpha > 0:
            s = (torch.sigmoid(s) - self.logit_alpha) / (1 - 2 * self.logit_alpha)
        return s

    def log_det(self, x: Tensor) -> Tensor:
        """log|det ∂x/∂y| per sample (B,), from model-space points x (B, ...), in float64.

        Add it to a model-space log-density to get the reporting-space log-density.
        """
        x = x.double()
        dim = x[0].numel()
        shift, scale = self._affine(x, torch.float64)
        out = -torch.log(scale).expand(x.shape[1:]).sum().expand(x.shape[0])
        if self.logit_alpha > 0:
            s = x * scale + shift
            # ds/dy = (1 - 2 alpha) / (p (1 - p)) with p = sigmoid(s)
            per = math.log(1 - 2 * self.logit_alpha) - F.logsigmoid(s) - F.logsigmoid(-s)
            out = out + per.reshape(x.shape[0], dim).sum(1)
        return out

    def tensors(self) -> dict[str, Tensor]:
        return {"preprocess.shift": self.shift.contiguous(), "preprocess.scale": self.scale.contiguous()}


def bits_per_dim(nll: Tensor | float, dim: int, levels: int) -> Tensor | float:
    """bits/dim of discrete data from the NLL (nats) of its dequantized version in [0, 1)^dim."""
    return (nll / dim + math.log(levels)) / math.log(2)
