"""Divergence of a vector field, as pure functions of an output ``v`` and its input ``x``.

Both return ``(div, frob)`` per sample: the trace of ∂v/∂x and a squared Frobenius norm of it
(exact for the exact trace; the unbiased ‖εᵀ ∂v/∂x‖² for Hutchinson), so the RNODE Jacobian
regularizer costs no extra vector-Jacobian product.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["divergence_exact", "divergence_hutchinson", "draw_probe"]


def divergence_exact(
    v: Tensor, x: Tensor, create_graph: bool = False, frobenius: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Exact trace by D vector-Jacobian products (batched into one vmapped backward pass).

    v, x: (B, *shape) with v computed from x. Returns div (B,) and ‖∂v/∂x‖²_F (B,) (None unless
    ``frobenius``).
    """
    batch, dim = x.shape[0], x[0].numel()
    if not v.requires_grad:  # v does not depend on x (e.g. a constant field)
        return v.new_zeros(batch), v.new_zeros(batch) if frobenius else None
    if dim <= 4:  # a few plain VJPs beat vmap's overhead (measured: 5-15% per step at D=2)
        flat = v.reshape(batch, dim)
        rows = [
            torch.autograd.grad(
                flat[:, i].sum(), x, create_graph=create_graph, retain_graph=True, materialize_grads=True
            )[0].reshape(batch, dim)
            for i in range(dim)
        ]
        div = sum(row[:, i] for i, row in enumerate(rows))
        return div, sum(row.pow(2).sum(1) for row in rows) if frobenius else None
    basis = torch.eye(dim, dtype=v.dtype, device=v.device).reshape(dim, 1, *x.shape[1:])
    basis = basis.expand(dim, batch, *x.shape[1:])
    (rows,) = torch.autograd.grad(
        v, x, basis, create_graph=create_graph, is_grads_batched=True, materialize_grads=True
    )  # rows[i, b] = e_iᵀ J_b, the i-th row of sample b's Jacobian
    rows = rows.reshape(dim, batch, dim)
    div = torch.diagonal(rows, dim1=0, dim2=2).sum(-1)
    return div, rows.pow(2).sum((0, 2)) if frobenius else None


def divergence_hutchinson(
    v: Tensor, x: Tensor, probe: Tensor, create_graph: bool = False, frobenius: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Hutchinson estimate εᵀ (∂v/∂x) ε with the given probe ε (same shape as x)."""
    if not v.requires_grad:
        return v.new_zeros(x.shape[0]), v.new_zeros(x.shape[0]) if frobenius else None
    (eps_jac,) = torch.autograd.grad(v, x, probe, create_graph=create_graph, materialize_grads=True)
    div = (eps_jac * probe).flatten(1).sum(1)
    return div, eps_jac.pow(2).flatten(1).sum(1) if frobenius else None


def draw_probe(x: Tensor, kind: str, generator: torch.Generator | None = None) -> Tensor:
    """A Rademacher (±1) or Gaussian probe shaped like x; draw it once per solve."""
    if kind == "rademacher":
        bits = torch.randint(0, 2, x.shape, generator=generator, device=x.device)
        return bits.to(x.dtype) * 2 - 1
    if kind == "gaussian":
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    raise ValueError(f"unknown probe {kind!r}: use 'rademacher' or 'gaussian'")
