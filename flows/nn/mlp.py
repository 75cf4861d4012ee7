"""TimeMLP: a time-conditioned MLP vector field v(x, t) for vectors of any dimension."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from flows.nn.embedding import TimeFeatures

__all__ = ["TimeMLP", "ACTIVATIONS"]

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


class TimeMLP(nn.Module):
    """Vector field on R^dim. ``forward(x, t)``: x (B, dim), t (B,) → (B, dim).

    Smooth activations only: the divergence must be continuous for adaptive solvers.
    Samples never interact (no normalization across the batch).
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64, 64),
        activation: str = "tanh",
        time_features: int = 0,
    ):
        super().__init__()
        self.time = TimeFeatures(max(time_features, 1))
        widths = [dim, *hidden, dim]
        self.layers = nn.ModuleList(
            ConcatSquash(a, b, self.time.dim) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        temb = self.time(t.to(x.dtype).expand(x.shape[0]))
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h, temb)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h
