"""Maps raw data to the space the flow models, with the exact log-det of the map.

For discrete data (values 0..levels-1) the map is, in order:

1. uniform dequantization and scaling to [0, 1):  y = (raw + u) / levels,  u ~ U[0, 1)
2. optional logit transform with ``alpha`` (RealNVP / FFJORD):  s = logit(alpha + (1 - 2 alpha) y)
3. an affine map:  x = (s - shift) / scale

Continuous data with declared bounds (a simulator's box prior, ``data.bounds``) is first mapped from each
bounded coordinate's interval (lo, hi) to the real line, s = logit((y - lo) / (hi - lo)), then
standardized: the flow works unbounded, every sample it returns lies strictly inside the box, and the
log-det of the map is counted, so the density is normalized on the box (no mass leaks out of it).

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
    low: Tensor | None = None  # continuous data: (D,) lower bounds (-inf: unbounded coordinate)
    high: Tensor | None = None  # (D,) upper bounds (+inf: unbounded)

    def to(self, device: torch.device | str) -> Preprocess:
        """The same map with its constants on ``device``."""
        low, high = (b.to(device) if b is not None else None for b in (self.low, self.high))
        return Preprocess(self.shift.to(device), self.scale.to(device), self.levels, self.logit_alpha, low, high)

    def _bounds(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(bounded mask, lo, width) on x's device in float64-safe form; unbounded coordinates get lo 0, width 1."""
        low, high = self.low.to(x.device, x.dtype), self.high.to(x.device, x.dtype)
        mask = torch.isfinite(low) & torch.isfinite(high)
        lo = torch.where(mask, low, torch.zeros_like(low))
        width = torch.where(mask, high - low, torch.ones_like(low))
        return mask, lo, width

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
        if self.low is not None:
            mask, lo, width = self._bounds(y)
            y = torch.where(mask, torch.logit((y - lo) / width), y)
        shift, scale = self._affine(y)
        return (y - shift) / scale

    def inverse(self, x: Tensor) -> Tensor:
        """Model space → the reporting space ([0, 1) for discrete data, raw units otherwise)."""
        shift, scale = self._affine(x)
        s = x * scale + shift
        if self.logit_alpha > 0:
            s = (torch.sigmoid(s) - self.logit_alpha) / (1 - 2 * self.logit_alpha)
        if self.low is not None:
            mask, lo, width = self._bounds(s)
            s = torch.where(mask, lo + width * torch.sigmoid(s), s)
        return s

    def inside(self, raw: Tensor) -> Tensor | None:
        """Which raw rows lie strictly inside the bounds ((N,) bool), or None without bounds / when all do."""
        if self.low is None:
            return None
        flat = raw.reshape(len(raw), -1)
        low, high = self.low.to(raw.device, raw.dtype), self.high.to(raw.device, raw.dtype)
        bounded = torch.isfinite(low) & torch.isfinite(high)  # as the map: a column with one bound is free
        inside = (((flat > low) & (flat < high)) | ~bounded).all(1)
        return None if bool(inside.all()) else inside

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
        if self.low is not None:
            s = x * scale + shift
            mask, _, width = self._bounds(s)
            # ds/dy = 1 / (width u (1 - u)) with u = sigmoid(s)
            per = -torch.log(width) - F.logsigmoid(s) - F.logsigmoid(-s)
            out = out + torch.where(mask, per, torch.zeros_like(per)).reshape(x.shape[0], dim).sum(1)
        return out

    def tensors(self) -> dict[str, Tensor]:
        out = {"preprocess.shift": self.shift.contiguous(), "preprocess.scale": self.scale.contiguous()}
        if self.low is not None:
            out |= {"preprocess.low": self.low.contiguous(), "preprocess.high": self.high.contiguous()}
        return out


def bits_per_dim(nll: Tensor | float, dim: int, levels: int) -> Tensor | float:
    """bits/dim of discrete data from the NLL (nats) of its dequantized version in [0, 1)^dim."""
    return (nll / dim + math.log(levels)) / math.log(2)
