"""Augmented flows (ANODE): the field solves in the data's dimensions plus ``A`` extra ones.

A flow is a homeomorphism: it cannot change the topology of its base, so a plain CNF carrying a Gaussian to
rings or to disconnected modes squeezes mass through thin bridges. Augmented neural ODEs (Dupont, Doucet and
Teh, 2019) solve in a larger space, ``(x, a)`` with ``a`` in R^A (vectors: D + A coordinates; images: C + A
channels), where paths can go around one another.

The density. The flow models the joint p(x, a) of the data and an augmentation drawn independently of it,
a ~ q = N(0, I) (augmented normalizing flows, Huang et al. 2020; VFlow, Chen et al. 2020, learn q(a | x) instead).
The data's density is then a marginal, log p(x) = log E_q[p(x, a) / q(a)], which no solve gives exactly. flows
reports the importance-weighted bound with K draws of a,

    L_K(x) = log (1/K) Σ_k p(x, a_k) / q(a_k),    E[L_K] ≤ E[L_4K] ≤ log p(x),

which tightens as K grows (Burda et al. 2016); K = 1 is the ELBO that maximum likelihood trains on. Every
report of an augmented flow's likelihood names it a lower bound and gives K. With Hutchinson's trace (images,
more than 64 dimensions) log p(x, a_k) is itself a noisy estimate, and the log-mean-exp of noisy terms is biased
upward by the noise: K = 1 (the ELBO, estimated without bias) is then the default, and a larger K is reported as
an "estimate", not a bound. Flow matching trains the same joint: its data are the pairs (x, a), its noise N(0, I) in
D + A dimensions.

A = 0 is a plain flow: nothing here is called and no random number is drawn.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flows.likelihood import standard_normal_log_prob

__all__ = ["augmented_shape", "draw", "join", "data_part", "log_q", "augment_of", "BOUND", "ESTIMATE", "likelihood"]

BOUND = "lower bound"  # what an augmented flow's log p(x) is (a plain flow's: "exact")
ESTIMATE = "estimate"  # K > 1 with Hutchinson traces: the log-mean-exp of noisy terms is biased upward


def likelihood(augment: int, trace: str, samples: int) -> str:
    """What a log-density with these settings is: "exact" (a plain flow), "lower bound" (in expectation: an exact
    trace, or K = 1, the ELBO, whose Hutchinson estimate is unbiased), or "estimate" (K > 1 over Hutchinson
    estimates: exp of a noisy log-density is biased upward, so the mean over K can exceed log p(x))."""
    if not augment:
        return "exact"
    return BOUND if trace == "exact" or samples == 1 else ESTIMATE


def augmented_shape(shape: tuple[int, ...], augment: int) -> tuple[int, ...]:
    """The shape the field solves in: ``(D + A,)`` for vectors, ``(C + A, H, W)`` for images."""
    return (shape[0] + augment, *shape[1:])


def augment_of(field: object) -> int:
    """The extra dimensions (vectors) or channels (images) a field was built with; 0 for a plain field."""
    return int(getattr(field, "augment", 0))


def draw(x: Tensor, augment: int, generator: torch.Generator | None = None) -> Tensor:
    """Augmentations a ~ N(0, I) for the rows of ``x``: ``(B, A)`` or ``(B, A, H, W)``, on x's device and dtype."""
    shape = (x.shape[0], augment, *x.shape[2:])
    return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)


def join(x: Tensor, a: Tensor) -> Tensor:
    """The augmented state (x, a): data coordinates first, then the augmentation."""
    return torch.cat([x, a], 1)


def data_part(state: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The data coordinates of augmented states ``(B, D + A)`` / ``(B, C + A, H, W)``: ``(B, *shape)``."""
    return state[:, : shape[0]]


def log_q(a: Tensor) -> Tensor:
    """log q(a) = log N(a; 0, I) per row, (B,)."""
    return standard_normal_log_prob(a)
