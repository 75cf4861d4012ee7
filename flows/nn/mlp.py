"""TimeMLP: a time-conditioned MLP vector field v(x, t) (or v(x, t, c) with a context) for vectors of any dimension."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from flows.context import Context
from flows.errors import ConfigError, FlowsError
from flows.nn.embedding import TimeFeatures, time_rows
from flows.nn.registry import FieldKind, check_augment, register_field
from flows.nn.trials import TRIAL_WIDTHS, TrialEmbedding

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
    """Vector field on R^dim. ``forward(x, t, context=None)``: x (B, dim), t (B,) or () → (B, dim).

    conditioning: "concatsquash" gates every layer by the time (FFJORD); "concat" feeds the time
    features to the first layer of a plain MLP (zuko's CNF, torchcfm's MLP).
    With ``context_dim`` > 0 the field is conditional, v(x, t, c) with c (B, context_dim): c (through an
    optional embedding MLP of widths ``context_embedding``, trained with the field, as sbi's
    ``embedding_net``) enters the first layer beside x and every time gate beside the time features.
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
        context_dim: int = 0,
        context_embedding: Sequence[int] = (),
        context_shape: Sequence[int] = (),
    ):
        super().__init__()
        self.time = TimeFeatures(max(time_features, 1))
        self.context_dim = context_dim
        if len(context_shape) == 2:  # i.i.d. trials: a permutation-invariant embedding
            self.embed: nn.Module | None = TrialEmbedding(
                context_shape[1], context_embedding or TRIAL_WIDTHS, ACTIVATIONS[activation]
            )
            context_embedding = [self.embed.dim]
        else:
            self.embed = _embedding(context_dim, context_embedding, activation) if context_dim else None
        d_ctx = (context_embedding[-1] if context_embedding else context_dim) if context_dim else 0
        d_cond = self.time.dim + d_ctx  # what gates each layer: the time features and the (embedded) context
        widths = [dim + d_ctx, *hidden, dim]
        pairs = list(zip(widths[:-1], widths[1:], strict=True))
        if conditioning == "concatsquash":
            layers = [ConcatSquash(a, b, d_cond) for a, b in pairs]
        elif conditioning == "concat":
            layers = [ConcatInput(*pairs[0], d_cond), *(nn.Linear(a, b) for a, b in pairs[1:])]
        else:
            raise ConfigError(f"unknown conditioning {conditioning!r}: use 'concatsquash' or 'concat'")
        self.gated = conditioning == "concatsquash"
        self.layers = nn.ModuleList(layers)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        temb = self.time(time_rows(t, x.shape[0], x.dtype))  # (1, d) when t is shared: broadcast
        h, cond = x, temb
        if self.embed is not None:
            if context is None:
                raise FlowsError(f"this field is conditional: pass a context of {self.context_dim} features")
            c = self.embed(context.to(x.dtype))
            h, cond = torch.cat([x, c], 1), torch.cat([temb.expand(x.shape[0], -1), c], 1)
        elif context is not None:
            raise FlowsError("this field was built without a context: it takes none")
        for i, layer in enumerate(self.layers):
            h = layer(h, cond) if i == 0 or self.gated else layer(h)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h


def _embedding(dim: int, widths: Sequence[int], activation: str) -> nn.Module:
    """The context's embedding MLP (widths ``widths``, the field's activation), or the identity."""
    if not widths:
        return nn.Identity()
    layers: list[nn.Module] = []
    for a, b in zip([dim, *widths[:-1]], widths, strict=True):
        layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers[:-1])  # no activation after the last layer


@dataclass
class MLPSettings:
    """``model.*`` for ``model.name=mlp`` (vectors)."""

    name: Literal["mlp"] = "mlp"
    hidden: list[int] = field(default_factory=lambda: [64, 64, 64])  # hidden widths
    activation: Literal["tanh", "softplus", "silu", "elu"] = "tanh"
    time_features: int = 0  # 0: the raw time; >0: that many sinusoidal features
    conditioning: Literal["concatsquash", "concat"] = "concatsquash"  # time gates every layer, or enters once
    context_embedding: list[int] = field(default_factory=list)  # conditional runs: an MLP embedding the context
    augment: int = 0  # ANODE: extra dimensions (vectors) or channels (images) the field solves in (flows.augment)

    def check(self, prefix: str = "model.") -> None:
        check_augment(self.augment, prefix)
        if not self.hidden or min(self.hidden) <= 0:
            raise ConfigError(f"invalid config value: {prefix}hidden: widths > 0.")
        if self.context_embedding and min(self.context_embedding) <= 0:
            raise ConfigError(f"invalid config value: {prefix}context_embedding: widths > 0.")
        if self.time_features < 0:
            raise ConfigError(f"invalid config value: {prefix}time_features must be >= 0.")


def _build(s: MLPSettings, shape: tuple[int, ...], context: Context | None = None) -> TimeMLP:
    dim, trials = (context.dim, context.shape) if context is not None else (0, ())
    return TimeMLP(shape[0], s.hidden, s.activation, s.time_features, s.conditioning, dim, s.context_embedding, trials)


register_field(FieldKind("mlp", MLPSettings, _build, data="vectors", context="vector"))
