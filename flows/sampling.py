"""Draw samples: x₀ ~ N(0, I) at t=0, solved forward to t=1 (data)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flows.config import SolverConfig
from flows.ode import solve

__all__ = ["sample"]


@torch.no_grad()
def sample(
    field: nn.Module,
    n: int,
    shape: tuple[int, ...],
    solver: SolverConfig,
    chunk: int = 10_000,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """``n`` samples in model space, solved in chunks. Returns (samples, NFE summed over chunks)."""
    out, nfe = [], 0
    for start in range(0, n, chunk):
        z = torch.randn((min(chunk, n - start), *shape), generator=generator)
        sol = solve(field, z, 0.0, 1.0, solver)
        out.append(sol.x)
        nfe += sol.nfe.forward
    return torch.cat(out), nfe
