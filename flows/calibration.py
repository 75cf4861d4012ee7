"""Is a posterior estimate calibrated? Checks on held-out simulations (θ*, x), with θ* drawn from the prior.

For each pair, ``samples`` parameters are drawn from the estimate q(θ | x), and two ranks are taken:

- **simulation-based calibration** (SBC, Talts et al. 2018): the rank of each coordinate θ*_j among the samples'
  j-th coordinates. For the true posterior it is uniform on {0..S}, whatever the prior and simulator.
- **expected coverage of highest-posterior-density regions** (Hermans et al. 2022, sbi's ``run_tarp`` kin):
  the rank of log q(θ* | x) among log q(θ_s | x), from the exact ``log_prob``: the share α of samples denser
  than θ* is the level of the smallest HPD region holding θ*. The share of pairs with α ≤ γ is the empirical
  coverage of the level-γ regions; it equals γ at every level for the true posterior, falls below it for an
  over-confident estimate (regions too small) and rises above it for an under-confident one.

Ranks are made continuous with a seeded uniform jitter, (r + u) / (S + 1), so under calibration they are exactly
Uniform(0, 1) and the Kolmogorov-Smirnov test applies. The largest coverage error is the KS distance of the
coverage levels; ``band`` is the 95% Dvoretzky-Kiefer-Wolfowitz bound on it for N calibrated pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats

from flows.errors import FlowsError

__all__ = ["Calibration", "calibrate"]


@dataclass
class Calibration:
    """Ranks of N held-out pairs: ``sbc`` (N, D) and ``coverage_ranks`` (N,), both in [0, 1]; ``samples`` S."""

    sbc: np.ndarray
    coverage_ranks: np.ndarray
    samples: int

    @property
    def n(self) -> int:
        return len(self.coverage_ranks)

    def coverage(self, levels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(levels γ, empirical coverage: the share of pairs whose θ* lies in the level-γ HPD region)."""
        levels = np.linspace(0, 1, 101) if levels is None else np.asarray(levels)
        ranks = np.sort(self.coverage_ranks)
        return levels, np.searchsorted(ranks, levels, side="right") / self.n

    @property
    def band(self) -> float:
        """The 95% bound on the largest coverage error of N calibrated pairs (DKW)."""
        return math.sqrt(math.log(2 / 0.05) / (2 * self.n))

    def summary(self, alpha: float = 0.01) -> dict[str, Any]:
        """What the checks say (JSON): the largest coverage error and its sign, KS p-values, and a ``verdict``:
        "calibrated", "over-confident" or "under-confident" (the coverage test at level ``alpha``)."""
        ks = stats.kstest(self.coverage_ranks, "uniform")
        levels, cov = self.coverage()
        err = cov - levels
        worst = int(np.argmax(np.abs(err)))
        sbc_p = [float(stats.kstest(self.sbc[:, j], "uniform").pvalue) for j in range(self.sbc.shape[1])]
        bonferroni = alpha / max(len(sbc_p), 1)
        verdict = "calibrated"
        if ks.pvalue < alpha:
            verdict = "over-confident" if err.mean() < 0 else "under-confident"
        return {
            "pairs": self.n,
            "samples": self.samples,
            "verdict": verdict,
            "coverage_error_max": float(np.abs(err).max()),
            "coverage_error_at": float(levels[worst]),
            "coverage_error_mean": float(err.mean()),  # < 0: over-confident, > 0: under-confident
            "coverage_band_95": self.band,
            "coverage_p_value": float(ks.pvalue),
            "coverage": {f"{g:.2f}": float(c) for g, c in zip(levels[::10], cov[::10], strict=True)},
            "sbc_p_values": sbc_p,
            "sbc_uniform": bool(min(sbc_p) >= bonferroni),
            "test": f"Kolmogorov-Smirnov against Uniform(0, 1), level {alpha} (SBC: Bonferroni over parameters)",
        }


@torch.no_grad()
def calibrate(
    flow: Any,
    theta: Any,
    x: Any,
    samples: int = 100,
    batch: int = 100,
    seed: int = 0,
    **solve: Any,
) -> Calibration:
    """SBC and HPD-coverage ranks of a posterior estimate on held-out pairs.

    Args:
        flow: a :class:`flows.Flow` (or mixture) conditional on x, the estimate q(θ | x).
        theta: (N, D) parameters drawn from the prior, in data units.
        x: (N, ...) their simulations, one context each.
        samples: posterior samples S per pair.
        batch: pairs sampled at once (S x batch points per solve).
        seed: for the samples and the ranks' jitter.
        **solve: solver keywords of :meth:`flows.Flow.sample` and ``log_prob`` (default: the flow's).

    Returns:
        A :class:`Calibration`; ``.summary()`` says whether the estimate is calibrated.
    """
    if flow.context is None or flow.context.kind != "vector":
        raise FlowsError("calibration checks a posterior: a flow conditional on a context vector x")
    theta = torch.as_tensor(theta, device=flow.device).reshape(-1, flow.dim).float()
    x = flow.context.check(x, flow.device, "calibrate")
    if len(theta) != len(x) or len(theta) < 2:
        raise FlowsError(f"calibrate: {len(theta)} parameters and {len(x)} simulations: give N >= 2 pairs of each")
    if samples < 2:
        raise FlowsError("calibrate: samples must be >= 2")
    gen = torch.Generator(flow.device).manual_seed(seed)
    jitter = torch.Generator("cpu").manual_seed(seed + 1)
    sbc, cov = [], []
    for t, c in zip(theta.split(batch), x.split(batch), strict=True):
        draws = flow.sample(samples, context=c, generator=gen, **solve).reshape(len(c), samples, flow.dim)
        rows = c.repeat_interleave(samples, 0)
        lq = flow.log_prob(draws.reshape(-1, flow.dim), context=rows, generator=gen, **solve)
        lq_true = flow.log_prob(t, context=c, generator=gen, **solve)
        lq = lq.reshape(len(c), samples)
        below = (draws < t[:, None, :]).sum(1).cpu().double()  # (B, D): SBC ranks
        denser = (lq > lq_true[:, None]).sum(1).cpu().double()  # (B,): samples inside the HPD region at θ*'s level
        sbc.append(
            (below + torch.rand(below.shape, generator=jitter, dtype=torch.float64, device="cpu")) / (samples + 1)
        )
        cov.append(
            (denser + torch.rand(denser.shape, generator=jitter, dtype=torch.float64, device="cpu")) / (samples + 1)
        )
    return Calibration(torch.cat(sbc).numpy(), torch.cat(cov).numpy(), samples)
