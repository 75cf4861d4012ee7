"""TimeMLP: a time-conditioned MLP vector field v(x, t) for vectors of any dimension."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from flows.errors import ConfigError
from flows.nn.embedding import TimeFeatures, time_rows
from flows.nn.registry import FieldKind, register_field

__all__ = ["TimeMLP", "MLPSettings", "ACTIVATIONS"]

ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "silu": nn.SiLU, "elu": nn.ELU}


class ConcatSquash(nn.Module):
    """``Linear(x) * sigmoid(G t) + B t``: the time-gated layer of FFJORD."""

    def __init__(self, d_in: int, d_out: int, d_time: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.gate = nn.Linear(d_time, d_out)
        self.bias = nn.Linear(d_time, d_out, bias=False)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return self.linear(x) * self.gate(temb).sigmoid() + self.bias(temb)


class ConcatInput(nn.Module):
    """``Linear([x, t-features])``: time enters as extra inputs (the first layer only)."""

    def __init__(self, d_in: int, d_out: int, d_time: int):
        super().__init__()
        self.linear = nn.Linear(d_in + d_time, d_out)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return self.linear(torch.cat([x, temb.expand(x.shape[0], -1)], dim=1))


class TimeMLP(nn.Module):
    """Vector field on R^dim. ``forward(x, t)``: x (B, dim), t (B,) or () → (B, dim).

    conditioning: "concatsquash" gates every layer by the time (FFJORD); "concat" feeds the time
    features to the first layer of a plain MLP (zuko's CNF, torchcfm's MLP).
    Smooth activations only: the divergence must be continuous for adaptive solvers.
    Samples never interact (no normalization across the batch).
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64, 64),
        activation: str = "tanh",
        time_features: int = 0,
        conditioning: str = "concatsquash",
    ):
        super().__init__()
        self.time = TimeFeatures(max(time_features, 1))
        widths = [dim, *hidden, dim]
        pairs = list(zip(widths[:-1], widths[1:], strict=True))
        if conditioning == "concatsquash":
            layers = [ConcatSquash(a, b, self.time.dim) for a, b in pairs]
        elif conditioning == "concat":
            layers = [ConcatInput(*pairs[0], self.time.dim), *(nn.Linear(a, b) for a, b in pairs[1:])]
        else:
            raise ConfigError(f"unknown conditioning {conditioning!r}: use 'concatsquash' or 'concat'")
        self.gated = conditioning == "concatsquash"
        self.layers = nn.ModuleList(layers)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        temb = self.time(time_rows(t, x.shape[0], x.dtype))  # (1, d) when t is shared: broadcast
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h, temb) if i == 0 or self.gated else layer(h)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h


@dataclass
class MLPSettings:
    """``model.*`` for ``model.name=mlp`` (vectors)."""

    name: Literal["mlp"] = "mlp"
    hidden: list[int] = field(default_factory=lambda: [64, 64, 64])  # hidden widths
    activation: Literal["tanh", "softplus", "silu", "elu"] = "tanh"
    time_features: int = 0  # 0: the raw time; >0: that many sinusoidal features
    conditioning: Literal["concatsquash", "concat"] = "concatsquash"  # time gates every layer, or enters once

    def check(self, prefix: str = "model.") -> None:
        if not self.hidden or min(self.hidden) <= 0:
            raise ConfigError(f"invalid config value: {prefix}hidden: widths > 0.")
        if self.time_features < 0:
            raise ConfigError(f"invalid config value: {prefix}time_features must be >= 0.")


def _build(s: MLPSettings, shape: tuple[int, ...]) -> TimeMLP:
    return TimeMLP(shape[0], s.hidden, s.activation, s.time_features, s.conditioning)


register_field(FieldKind("mlp", MLPSettings, _build, data="vectors"))
