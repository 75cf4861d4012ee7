"""A mixture of flows as one model: p(x) = Σ_m w_m p_m(x).

A :class:`Mixture` is composed of its member flows: it holds no field of its own. The members model the same data
(they are trained on the same rows), so they share the data's shape, preprocessing, context and solver, and the
mixture offers every operation of a :class:`flows.Flow` on them: ``log_prob`` is exact (the log-sum-exp of the
members' exact log-densities, weighted; augmented members' bounds give a bound), ``sample`` draws each point from a
member chosen with probability w_m (``rsample`` and ``distribution`` too), and ``evaluate.py``, ``sample.py`` and
``flows.load`` treat it as one model. A mixture has no single latent space, so ``encode`` and ``decode`` are
refused: use ``model.members[k]``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flows.context import Context
from flows.errors import FlowsError
from flows.flow import Flow, mix
from flows.ode import SolverOptions
from flows.preprocess import Preprocess

__all__ = ["Mixture"]


class Mixture(Flow):
    """Member flows with weights that sum to 1 (``members``, ``weights``). ``shape``, ``preprocess``, ``context``,
    ``solver``, ``config`` and ``step`` are what the members share; there is no ``field`` (each member has its
    own: ``mixture.members[k].field``)."""

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
        self.members, self.weights = list(members), w
        self.solver, self.config, self.step = dict(first.solver), first.config, first.step
        self.path: Path | None = path

    # ------------------------------------------------------------------ what the members share
    @property
    def field(self) -> nn.Module:  # type: ignore[override]
        raise FlowsError(
            f"a mixture of {len(self.members)} flows has no single field: each member has its own, "
            "model.members[k].field"
        )

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.members[0].shape

    @property
    def preprocess(self) -> Preprocess:  # type: ignore[override]
        """The members' preprocessing (one, fitted on the rows they were all trained on)."""
        return self.members[0].preprocess

    @property
    def context(self) -> Context | None:  # type: ignore[override]
        """What the members are conditioned on (the same context, fitted on the same rows)."""
        return self.members[0].context

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def augment(self) -> int:
        return self.members[0].augment

    @property
    def _dtype(self) -> torch.dtype | None:
        return self.members[0]._dtype

    @property
    def _analytic(self) -> bool:
        return all(m._analytic for m in self.members)

    def _auto_trace(self, trace: str) -> str:
        traces = {m._auto_trace(trace) for m in self.members}
        return traces.pop() if len(traces) == 1 else "exact"  # members of different kinds: the exact trace

    def _check_guidance(self, guidance: float) -> None:
        for m in self.members:
            m._check_guidance(guidance)

    def _batch(
        self, n: int, default: int, *, trace: bool = False, context: Tensor | None = None, copies: int = 1
    ) -> int:
        return min(m._batch(n, default, trace=trace, context=context, copies=copies) for m in self.members)

    def parameters(self) -> Iterator[nn.Parameter]:
        """Every member's parameters, made trainable (the weights stay fixed)."""
        return itertools.chain.from_iterable(m.parameters() for m in self.members)

    def to(self, device: torch.device | str) -> Mixture:
        for m in self.members:
            m.to(device)
        return self

    def __repr__(self) -> str:
        return f"Mixture({len(self.members)} x {self.members[0]!r}, path={str(self.path) if self.path else None!r})"

    # ------------------------------------------------------------------ log-density
    def _log_prob_batch(
        self, raw: Tensor, opts: dict[str, Any], generator: torch.Generator | None, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor, int]:
        """log Σ_m w_m p_m(x) of one batch (p_m(x | c) with a context); the variance by the delta method."""
        return mix([m._log_prob_batch(raw, opts, generator, context) for m in self.members], self.weights)

    # ------------------------------------------------------------------ sampling
    def _draw(
        self,
        n: int,
        generator: torch.Generator | None,
        batch_size: int | None,
        progress: bool,
        solver: SolverOptions,
        context: Tensor | None = None,
        guidance: float = 0.0,
    ) -> tuple[Tensor, dict[str, Any]]:
        """Each point from a member drawn with probability w_m (multinomial counts, the order shuffled by the
        draw itself). Info: ``nfe`` summed over members, transport averaged over points, ``member`` (n,)."""
        device = self.device
        which = torch.multinomial(self.weights.to(device).float(), n, replacement=True, generator=generator)
        parts: dict[int, tuple[Tensor, dict[str, Any]]] = {}
        info: dict[str, Any] = {"nfe": 0, "kinetic_energy": 0.0, "straightness": 0.0}
        for m, member in enumerate(self.members):
            mask = which == m
            count = int(mask.sum())
            if count == 0:
                continue
            c = context[mask] if context is not None else None
            parts[m] = member._draw(count, generator, batch_size, progress, solver, c, guidance)
            info["nfe"] += parts[m][1]["nfe"]
            for key in ("kinetic_energy", "straightness"):
                info[key] += parts[m][1][key] * count / n
        # each member's points back at their places (index_put: differentiable when the members' draws are)
        order = torch.cat([(which == m).nonzero().flatten() for m in parts])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n, device=device)

        def gather(key: str | None) -> Tensor:
            values = [x if key is None else part[key] for x, part in parts.values()]
            return torch.cat([v.to(values[0].dtype) for v in values])[inverse]

        return gather(None), info | {"kinetic": gather("kinetic"), "noise": gather("noise"), "member": which}

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
