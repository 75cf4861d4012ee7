"""A :class:`flows.Flow` as a ``torch.distributions.Distribution``: code written against ``torch.distributions``
(a learned prior in a VAE, a proposal, Monte-Carlo KL terms, ``TransformedDistribution``) takes a flow as it is.

>>> d = flow.distribution()                  # or flow.distribution(context=x_obs) for p(θ | x_obs)
>>> theta = d.rsample((256,))                # (256, *event_shape), differentiable
>>> loss = -d.log_prob(theta).mean()         # gradients reach the flow's parameters (flow.parameters())

The view copies nothing: ``log_prob`` is :meth:`flows.Flow.log_prob` with ``grad=True`` and ``rsample`` is
:meth:`flows.Flow.rsample`, with the options given to :meth:`flows.Flow.distribution` (``steps=8``, ``trace=``,
``batch_size=``, ...). K contexts make a batch of K distributions (``batch_shape`` (K,)).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

from flows.errors import FlowsError

__all__ = ["FlowDistribution"]

SOLVE_KEYS = {"method", "atol", "rtol", "steps", "compile", "generator", "batch_size"}  # every operation's
SAMPLE_KEYS = SOLVE_KEYS | {"guidance"}
LOG_PROB_KEYS = SOLVE_KEYS | {"trace", "probes", "deq_samples", "augment_samples"}


class FlowDistribution(Distribution):
    """p(x) (or p(x | c)) of a flow, with ``event_shape`` the flow's ``shape``; ``batch_shape`` is (K,) for K
    contexts and () for one context or none."""

    arg_constraints: dict[str, constraints.Constraint] = {}
    has_rsample = True

    def __init__(self, flow: Any, context: Any = None, **options: Any):
        unknown = set(options) - SAMPLE_KEYS - LOG_PROB_KEYS
        if unknown:
            raise FlowsError(f"distribution(): unknown option(s) {sorted(unknown)}; it takes {sorted(LOG_PROB_KEYS)}")
        self.flow, self.options = flow, options
        self._contexts = None  # (K, ...) rows for a batch of K distributions
        batch: tuple[int, ...] = ()
        if context is not None:
            if flow.context is None:
                raise FlowsError("distribution(context=...): this flow is unconditional: it takes no context")
            rows = flow.context.check(context, flow.device, "distribution")
            if _many(context, flow):
                self._contexts, batch = rows, (len(rows),)
        self.context = context
        super().__init__(torch.Size(batch), torch.Size(flow.shape), validate_args=False)

    @property
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, len(self.event_shape))

    def _pick(self, keys: set[str]) -> dict[str, Any]:
        return {k: v for k, v in self.options.items() if k in keys}

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        return self._draw(sample_shape, grad=True)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        return self._draw(sample_shape, grad=False)

    def _draw(self, sample_shape: torch.Size | tuple[int, ...], grad: bool) -> Tensor:
        shape = torch.Size(sample_shape)
        n = max(math.prod(shape), 1)
        x = self.flow.sample(n, context=self.context, grad=grad, **self._pick(SAMPLE_KEYS))
        if self._contexts is not None:  # (K, n, *event) -> (n, K, *event); one context gives (n, *event)
            x = x.movedim(0, 1) if len(self._contexts) > 1 else x.unsqueeze(1)
        return x.reshape(*shape, *self.batch_shape, *self.event_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        value = torch.as_tensor(value, device=self.flow.device)
        event, batch = len(self.event_shape), tuple(self.batch_shape)
        if tuple(value.shape[value.ndim - event :]) != tuple(self.event_shape):
            raise FlowsError(f"log_prob: expected values of shape (..., {tuple(self.event_shape)}), got {value.shape}")
        lead = value.shape[: value.ndim - event]
        if batch and tuple(lead[len(lead) - len(batch) :]) != batch:
            lead = torch.broadcast_shapes(lead, batch)
            value = value.expand(*lead, *self.event_shape)
        flat = value.reshape(-1, *self.event_shape)
        context = self.context
        if self._contexts is not None:  # each value meets its own distribution's context
            context = self._contexts.repeat(len(flat) // len(self._contexts), *([1] * (self._contexts.ndim - 1)))
        lp = self.flow.log_prob(flat, context=context, grad=True, **self._pick(LOG_PROB_KEYS))
        dtype = value.dtype if value.is_floating_point() else torch.get_default_dtype()
        return lp.to(dtype).reshape(lead)

    def __repr__(self) -> str:
        given = f", batch_shape={tuple(self.batch_shape)}" if self.batch_shape else ""
        return f"FlowDistribution(event_shape={tuple(self.event_shape)}{given}, flow={self.flow!r})"


def _many(context: Any, flow: Any) -> bool:
    """Whether ``context`` is K contexts (a batch) rather than one: labels given as a sequence, or vectors with one
    more dimension than one context."""
    c, ctx = torch.as_tensor(context, device="cpu"), flow.context
    if ctx.kind == "labels":
        return c.ndim >= 1
    if ctx.trials:  # one context: (M, d) or flattened (M d,)
        return c.ndim == 3 or (c.ndim == 2 and tuple(c.shape) != tuple(ctx.shape))
    return c.ndim == 2
