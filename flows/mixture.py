"""A mixture of flows as one model: p(x) = Σ_m w_m p_m(x).

The members share the data's preprocessing and shape (they are trained on the same rows), so a mixture
is a :class:`flows.Flow` to every caller: ``log_prob`` is exact (the log-sum-exp of the members' exact
log-densities, weighted; augmented members' bounds give a bound), ``sample`` draws each point from a member
chosen with probability w_m, and ``evaluate.py``, ``sample.py`` and ``flows.load`` treat it as one model. A
mixture has no single latent space, so ``encode`` and ``decode`` are refused: use ``model.members[k]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from flows.errors import FlowsError
from flows.flow import Flow
from flows.ode import SolverOptions

__all__ = ["Mixture"]


class Mixture(Flow):
    """Members (:class:`Flow`) with weights that sum to 1. The attributes a single flow has (``field``,
    ``preprocess``, ``shape``, ``solver``, ``config``, ``step``, ``path``) are the first member's."""

    def __init__(self, members: list[Flow], weights: Tensor | list[float] | None = None, path: Any = None):
        if not members:
            raise FlowsError("a mixture needs at least one member")
        first = members[0]
        if any(m.shape != first.shape or m.levels != first.levels or m.augment != first.augment for m in members):
            raise FlowsError("the members of a mixture must model the same data (shape, levels and augmentation)")
        w = torch.full((len(members),), 1.0 / len(members), dtype=torch.float64, device="cpu")
        if weights is not None:
            w = torch.as_tensor(weights, dtype=torch.float64, device="cpu").flatten()
            if len(w) != len(members) or (w < 0).any() or not math.isclose(float(w.sum()), 1.0, rel_tol=1e-6):
                raise FlowsError(f"mixture weights must be {len(members)} non-negative numbers summing to 1")
        super().__init__(
            first.field, first.preprocess, first.shape, first.solver, first.config, first.step, path, first.context
        )
        self.members, self.weights = members, w

    def to(self, device: torch.device | str) -> Mixture:
        for m in self.members:
            m.to(device)
        first = self.members[0]
        self.field, self.preprocess, self.context = first.field, first.preprocess, first.context
        return self

    def __repr__(self) -> str:
        return f"Mixture({len(self.members)} x {super().__repr__()})"

    # ------------------------------------------------------------------ log-density
    def _log_prob_batch(
        self, raw: Tensor, opts: dict[str, Any], generator: torch.Generator | None, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor, int]:
        """log Σ_m w_m p_m(x) of one batch (p_m(x | c) with a context). The variance (Hutchinson probes) is the
        delta method's: Σ_m r_m² var_m, with r_m the members' responsibilities."""
        parts = [m._log_prob_batch(raw, opts, generator, context) for m in self.members]
        lps = torch.stack([p[0] for p in parts])  # (M, B)
        weighted = lps + self.weights.to(lps.device).log()[:, None]
        lp = torch.logsumexp(weighted, 0)
        resp = (weighted - lp).exp()
        var = (resp**2 * torch.stack([p[1] for p in parts])).sum(0)
        return lp, var, sum(p[2] for p in parts)

    # ------------------------------------------------------------------ sampling
    def _draw(
        self,
        n: int,
        generator: torch.Generator | None,
        chunk: int,
        progress: bool,
        solver: SolverOptions,
        context: Tensor | None = None,
        guidance: float = 0.0,
    ) -> tuple[Tensor, dict[str, Any]]:
        """Each point from a member drawn with probability w_m (multinomial counts, the order shuffled by the
        draw itself). Info: ``nfe`` summed over members, transport averaged over points, ``member`` (n,)."""
        device = self.device
        which = torch.multinomial(self.weights.to(device).float(), n, replacement=True, generator=generator)
        out = torch.empty((n, *self.shape), device=device)
        noise = torch.empty((n, *self.state_shape), device=device)  # an augmented flow's noise: D + A
        kinetic = torch.empty(n, device=device)
        info: dict[str, Any] = {"nfe": 0, "kinetic_energy": 0.0, "straightness": 0.0}
        for m, member in enumerate(self.members):
            mask = which == m
            count = int(mask.sum())
            if count == 0:
                continue
            c = context[mask] if context is not None else None
            x, part = member._draw(count, generator, chunk, progress, solver, c, guidance)
            out[mask], noise[mask], kinetic[mask] = x.to(out.dtype), part["noise"].to(out.dtype), part["kinetic"]
            info["nfe"] += part["nfe"]
            for key in ("kinetic_energy", "straightness"):
                info[key] += part[key] * count / n
        return out, info | {"kinetic": kinetic, "noise": noise, "member": which}

    # ------------------------------------------------------------------ no single latent space
    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise FlowsError(
            f"a mixture of {len(self.members)} flows has no single latent space: encode with one member, "
            "model.members[k].encode(x)"
        )

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        raise FlowsError(
            f"a mixture of {len(self.members)} flows has no single latent space: decode with one member, "
            "model.members[k].decode(z)"
        )
