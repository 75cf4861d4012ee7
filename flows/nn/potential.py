"""Potential field (OT-Flow): v = −∇ₓΦ, with the gradient and the exact Hessian trace in closed form.

Φ(x, t) = wᵀN(s) + ½ sᵀAᵀA s + bᵀs with s = (x, t), A of rank r and N a residual network
with the smooth activation σ(a) = log cosh a (σ' = tanh, σ'' = 1 − tanh², both bounded):

    u₀ = σ(K₀ s + b₀),   uᵢ = uᵢ₋₁ + h σ(Kᵢ uᵢ₋₁ + bᵢ)  (i = 1 … M−1, h = 1/(M−1)),   N(s) = u_{M−1}.

The gradient comes from one backward recursion written out (not autograd through the network):
zᵢ = ∂Φ/∂uᵢ, z_{M−1} = w, zᵢ₋₁ = zᵢ + h Kᵢᵀ(σ'(aᵢ) ⊙ zᵢ), ∇ₛ(wᵀN) = K₀ᵀ(σ'(a₀) ⊙ z₀). The trace of
the Hessian in x follows by a forward recursion on Jᵢ = ∂uᵢ/∂x (m × d per sample, kept transposed):

    tr ∇²ₓΦ = Σⱼ σ''(a₀)ⱼ z₀ⱼ ‖(K₀E)ⱼ‖² + h Σᵢ Σⱼ σ''(aᵢ)ⱼ zᵢⱼ ‖(Kᵢ Jᵢ₋₁)ⱼ‖² + ‖A E‖²_F,

with E the x-columns, so the divergence of v is exact at the cost of a few batched matrix products
instead of D vector-Jacobian products. ∂ₜΦ is the last entry of ∇ₛΦ, for the HJB penalty.
Onken, Wu Fung, Li, Ruthotto: OT-Flow, AAAI 2021.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.errors import ConfigError
from flows.nn.embedding import time_rows
from flows.nn.registry import FieldKind, check_augment, register_field

__all__ = ["Potential", "PotentialSettings", "log_cosh"]


def log_cosh(a: Tensor) -> Tensor:
    """σ(a) = log cosh a, computed without overflow: |a| + log(1 + e^{−2|a|}) − log 2."""
    a = a.abs()
    return a + F.softplus(-2 * a) - math.log(2)


class Potential(nn.Module):
    """Potential field on R^dim: ``forward(x, t)`` = −∇ₓΦ(x, t), (B, dim); ``dynamics`` adds the divergence
    (−tr ∇²ₓΦ, exact) and ∂ₜΦ; ``phi`` is Φ itself.

    Args:
        dim: d, the data dimension.
        width: m, the width of the residual network.
        depth: M ≥ 2, its number of layers (the opening layer and M − 1 residual layers).
        rank: r, the rank of the quadratic term (default min(10, d + 1), as OT-Flow).
    """

    analytic_divergence = True  # the ODE layer asks for ``dynamics`` instead of differentiating forward

    def __init__(self, dim: int, width: int = 64, depth: int = 3, rank: int | None = None):
        super().__init__()
        if depth < 2:
            raise ConfigError("Potential needs depth >= 2 (an opening layer and at least one residual layer)")
        self.dim, self.h = dim, 1.0 / (depth - 1)
        rank = rank if rank is not None else min(10, dim + 1)
        self.opening = nn.Linear(dim + 1, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.w = nn.Parameter(torch.ones(width, device="cpu"))
        self.A = nn.Parameter(torch.empty(rank, dim + 1, device="cpu"))
        nn.init.xavier_normal_(self.A)
        self.b = nn.Parameter(torch.zeros(dim + 1, device="cpu"))
        # (OT-Flow's constant c is left out: nothing the flow computes depends on it, so it would get no
        # gradient, which DDP refuses)

    # ------------------------------------------------------------------ Φ and its derivatives
    def _space_time(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.cat([x, time_rows(t, x.shape[0], x.dtype).reshape(-1, 1).expand(x.shape[0], 1)], dim=1)

    def phi(self, x: Tensor, t: Tensor) -> Tensor:
        """Φ(x, t), (B,)."""
        s = self._space_time(x, t)
        u = log_cosh(self.opening(s))
        for layer in self.layers:
            u = u + self.h * log_cosh(layer(u))
        quad = 0.5 * (s @ self.A.T).pow(2).sum(1)
        return u @ self.w + quad + s @ self.b

    def _forward_pass(self, s: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Pre-activations aᵢ and states uᵢ of the residual network."""
        pre = [self.opening(s)]
        states = [log_cosh(pre[0])]
        for layer in self.layers:
            pre.append(layer(states[-1]))
            states.append(states[-1] + self.h * log_cosh(pre[-1]))
        return pre, states

    def derivatives(self, x: Tensor, t: Tensor, trace: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """(∇ₓΦ (B, d), ∂ₜΦ (B,), tr ∇²ₓΦ (B,) or None), all by the recursions of the module docstring."""
        d, h = self.dim, self.h
        s = self._space_time(x, t)
        pre, states = self._forward_pass(s)
        tanh = [a.tanh() for a in pre]  # σ'
        # backward recursion: z = ∂Φ/∂uᵢ, kept per layer for the trace
        z = self.w.expand(s.shape[0], -1)
        zs = [z] * len(pre)
        for i in range(len(self.layers), 0, -1):  # residual layer i maps u_{i-1} → u_i
            zs[i] = z
            z = z + h * (tanh[i] * z) @ self.layers[i - 1].weight
        zs[0] = z
        quad = (s @ self.A.T) @ self.A  # ∇ₛ ½‖A s‖²
        grad = (tanh[0] * z) @ self.opening.weight + quad + self.b
        if not trace:
            return grad[:, :d], grad[:, d], None
        # forward recursion on Jᵀ = (∂u/∂x)ᵀ, (B, d, m): each layer is one (B·d, m) x (m, m) product
        k0 = self.opening.weight[:, :d]  # (m, d)
        tr = (1 - tanh[0].pow(2)).mul_(zs[0]) @ k0.pow(2).sum(1)
        batch, width = s.shape[0], k0.shape[0]
        jac_t = tanh[0].unsqueeze(1) * k0.T.contiguous()  # (B, d, m), contiguous: one GEMM below, not B
        for i, layer in enumerate(self.layers, start=1):
            kj_t = (jac_t.reshape(-1, width) @ layer.weight.T).view(batch, d, width)  # (∂aᵢ/∂x)ᵀ
            weight = (1 - tanh[i].pow(2)).mul_(zs[i])  # σ''(aᵢ) ⊙ zᵢ, (B, m)
            tr = tr + h * (kj_t.square().sum(1) * weight).sum(1)
            if i < len(self.layers):  # (single passes over the (B, d, m) tensors: they dominate memory traffic)
                jac_t = torch.addcmul(jac_t, tanh[i].unsqueeze(1), kj_t, value=h)
        tr = tr + self.A[:, :d].pow(2).sum()
        return grad[:, :d], grad[:, d], tr

    # ------------------------------------------------------------------ the field
    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """v(x, t) = −∇ₓΦ(x, t), (B, d)."""
        grad, _, _ = self.derivatives(x, t, trace=False)
        return -grad

    def dynamics(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(v, div v = −tr ∇²ₓΦ, ∂ₜΦ): what the ODE layer integrates, in one pass."""
        grad, phi_t, tr = self.derivatives(x, t, trace=True)
        return -grad, -tr, phi_t


@dataclass
class PotentialSettings:
    """``model.*`` for ``model.name=potential`` (vectors): width hidden[0], one opening + len(hidden) - 1
    residual layers."""

    name: Literal["potential"] = "potential"
    hidden: list[int] = field(default_factory=lambda: [64, 64, 64])
    rank: int = 0  # rank of the quadratic term (0: min(10, D + 1))
    augment: int = 0  # ANODE: extra dimensions (vectors) or channels (images) the field solves in (flows.augment)

    def check(self, prefix: str = "model.") -> None:
        check_augment(self.augment, prefix)
        if not self.hidden or min(self.hidden) <= 0:
            raise ConfigError(f"invalid config value: {prefix}hidden: widths > 0.")
        if len(set(self.hidden)) != 1 or len(self.hidden) < 2:
            raise ConfigError(
                f"invalid config value: {prefix}name=potential takes equal widths and at least two layers in "
                f"{prefix}hidden, e.g. [64, 64, 64]."
            )
        if self.rank < 0:
            raise ConfigError(f"invalid config value: {prefix}rank must be >= 0.")


def _build(s: PotentialSettings, shape: tuple[int, ...], context: object = None) -> Potential:
    return Potential(shape[0], s.hidden[0], len(s.hidden), s.rank or None)


register_field(FieldKind("potential", PotentialSettings, _build, data="vectors", analytic_divergence=True))
