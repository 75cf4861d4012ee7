"""A permutation-invariant embedding of a context made of M exchangeable i.i.d. trials (deep sets).

A simulator that returns M independent draws of d numbers for one parameter (repeated experiments, SLCP's four
2-D points) has a posterior that depends on the trials only as a set. :class:`TrialEmbedding` maps each trial
through the same MLP φ, averages over the trials and maps the mean through ρ: ``ρ(mean_m φ(x_m))``, the same
output for any order of the trials (as sbi's ``PermutationInvariantEmbedding``; Zaheer et al. 2017, deep sets).
For trials of at most ``MOMENT_DIM`` numbers, ρ also reads the trials' first and second sample moments (mean x_m
and mean x_m x_mᵀ, upper triangle), the sufficient statistics of a Gaussian model that φ would otherwise have to
learn from few simulations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["TrialEmbedding", "TRIAL_WIDTHS"]

TRIAL_WIDTHS = (64, 64)  # φ's widths when model.context_embedding is not given; ρ keeps the last width
MOMENT_DIM = 8  # trials of at most this many numbers: ρ also reads their first and second moments


class TrialEmbedding(nn.Module):
    """(B, M d) flattened trials (or (B, M, d)) → (B, widths[-1]), invariant to the order of the M trials.

    Args:
        trial_dim: d, the numbers of one trial.
        widths: φ's layer widths (each followed by the activation); ρ is two layers of the last width.
        activation: a module class (smooth: the field's divergence must stay continuous).
    """

    def __init__(self, trial_dim: int, widths: Sequence[int], activation: type[nn.Module]):
        super().__init__()
        self.trial_dim = trial_dim
        layers: list[nn.Module] = []
        for a, b in zip([trial_dim, *widths[:-1]], widths, strict=True):
            layers += [nn.Linear(a, b), activation()]
        self.phi = nn.Sequential(*layers)
        out = widths[-1]
        self.moments = trial_dim <= MOMENT_DIM
        upper = torch.triu_indices(trial_dim, trial_dim, device="cpu")
        self.register_buffer("upper", upper, persistent=False)
        extra = trial_dim + upper.shape[1] if self.moments else 0
        self.rho = nn.Sequential(nn.Linear(out + extra, out), activation(), nn.Linear(out, out))
        self.dim = out

    def forward(self, c: Tensor) -> Tensor:
        trials = c.reshape(c.shape[0], -1, self.trial_dim)  # (B, M, d)
        pooled = [self.phi(trials).mean(1)]
        if self.moments:
            square = trials[:, :, self.upper[0]] * trials[:, :, self.upper[1]]  # (B, M, d(d+1)/2)
            pooled += [trials.mean(1), square.mean(1)]
        return self.rho(torch.cat(pooled, 1))
