"""Divergence of a vector field, as pure functions of an output ``v`` and its input ``x``.

Both return ``(div, frob)`` per sample: the trace of ∂v/∂x and a squared Frobenius norm of it
(exact for the exact trace; the unbiased ‖εᵀ ∂v/∂x‖² for Hutchinson), so the RNODE Jacobian
regularizer costs no extra vector-Jacobian product.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flows.errors import unknown_value

__all__ = ["divergence_exact", "divergence_hutchinson", "divergence_jvp", "draw_probe"]


def divergence_exact(
    v: Tensor, x: Tensor, create_graph: bool = False, frobenius: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Exact trace by D vector-Jacobian products, one per input dimension.

    v, x: (B, *shape) with v computed from x. Returns div (B,) and ‖∂v/∂x‖²_F (B,) (None unless
    ``frobenius``). A plain loop: on CPU it beat one vmapped backward (``is_grads_batched``) at every
    size measured: 2x at D=64 with 10k points, 10x at D=64, batch 1000 with ``create_graph``.
    """
    batch, dim = x.shape[0], x[0].numel()
    if not v.requires_grad:  # v does not depend on x (e.g. a constant field)
        return v.new_zeros(batch), v.new_zeros(batch) if frobenius else None
    flat = v.reshape(batch, dim)
    div = v.new_zeros(batch)
    frob = v.new_zeros(batch) if frobenius else None
    for i in range(dim):
        (row,) = torch.autograd.grad(
            flat[:, i].sum(), x, create_graph=create_graph, retain_graph=True, materialize_grads=True
        )
        row = row.reshape(batch, dim)  # e_iᵀ J: the i-th row of each sample's Jacobian
        div = div + row[:, i]
        if frob is not None:
            frob = frob + row.pow(2).sum(1)
    return div, frob


def divergence_hutchinson(
    v: Tensor, x: Tensor, probe: Tensor, create_graph: bool = False, frobenius: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Hutchinson estimate εᵀ (∂v/∂x) ε with the given probe ε (same shape as x)."""
    if not v.requires_grad:
        return v.new_zeros(x.shape[0]), v.new_zeros(x.shape[0]) if frobenius else None
    (eps_jac,) = torch.autograd.grad(v, x, probe, create_graph=create_graph, materialize_grads=True)
    div = (eps_jac * probe).flatten(1).sum(1)
    return div, eps_jac.pow(2).flatten(1).sum(1) if frobenius else None


def divergence_jvp(
    fn: Callable[[Tensor], Tensor], x: Tensor, probe: Tensor | None = None, frobenius: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Forward mode: ``(v, div, frob)`` for v = fn(x) from Jacobian-vector products.

    With ``probe`` ε: Hutchinson's εᵀ (∂v/∂x) ε and ‖(∂v/∂x) ε‖² (unbiased for the squared Frobenius norm, like
    the reverse-mode ‖εᵀ ∂v/∂x‖², but not equal to it for the same ε). Without: the exact trace and ‖∂v/∂x‖²_F
    from the D columns (∂v/∂x) e_i, one vmapped JVP per input dimension. Differentiating the result is a
    first-order backward (no double backward), which torch.compile supports.
    """
    batch, dim = x.shape[0], x[0].numel()
    if probe is not None:
        v, jvp = torch.func.jvp(fn, (x,), (probe,))
        div = (jvp * probe).flatten(1).sum(1)
        return v, div, jvp.pow(2).flatten(1).sum(1) if frobenius else None
    basis = torch.eye(dim, dtype=x.dtype, device=x.device).reshape(dim, 1, *x.shape[1:]).expand(dim, *x.shape)
    v, columns = torch.func.vmap(lambda e: torch.func.jvp(fn, (x,), (e,)), out_dims=(None, 0))(basis)
    columns = columns.reshape(dim, batch, dim)  # columns[i, b] = (∂v/∂x) e_i of sample b
    div = columns.diagonal(dim1=0, dim2=2).sum(-1)
    return v, div, columns.pow(2).sum((0, 2)) if frobenius else None


def draw_probe(x: Tensor, kind: str, generator: torch.Generator | None = None) -> Tensor:
    """A Rademacher (±1) or Gaussian probe shaped like x; draw it once per solve."""
    if kind == "rademacher":
        bits = torch.randint(0, 2, x.shape, generator=generator, device=x.device)
        return bits.to(x.dtype) * 2 - 1
    if kind == "gaussian":
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    unknown_value("probe", str(kind), ["rademacher", "gaussian"])
