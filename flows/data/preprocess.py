"""Maps raw data to the space the flow models, with the exact log-det of the map.

``x = (deq(raw) - shift) / scale`` where ``deq`` adds uniform noise and divides by ``levels``
for discrete data (values 0..levels-1 → [0, 1)). Likelihoods are reported in the space after
dequantization: ``log p_data(y) = log p_model(x) + log_det`` with ``log_det = -Σ log scale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Preprocess", "bits_per_dim"]


@dataclass
class Preprocess:
    shift: Tensor  # broadcastable to one sample, e.g. (D,) or ()
    scale: Tensor
    levels: int | None = None  # number of discrete values per dimension, None if continuous

    def __call__(self, raw: Tensor, dequantize: bool = True) -> Tensor:
        y = raw.float()
        if self.levels is not None:
            noise = torch.rand_like(y) if dequantize else torch.full_like(y, 0.5)
            y = (y + noise) / self.levels
        return (y - self.shift) / self.scale

    def inverse(self, x: Tensor) -> Tensor:
        """Model space → the reporting space ([0, 1) for discrete data, raw units otherwise)."""
        return x * self.scale + self.shift

    def log_det(self, dim: int) -> float:
        """Add to a model-space log-density to get the reporting-space log-density."""
        return -float(torch.log(self.scale.double()).expand(dim).sum())

    def tensors(self) -> dict[str, Tensor]:
        return {"preprocess.shift": self.shift.contiguous(), "preprocess.scale": self.scale.contiguous()}


def bits_per_dim(nll: Tensor | float, dim: int, levels: int) -> Tensor | float:
    """bits/dim of discrete data from the NLL (nats) of its dequantized version in [0, 1)^dim."""
    return (nll / dim + math.log(levels)) / math.log(2)
