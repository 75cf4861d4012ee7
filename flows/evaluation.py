"""Exact-likelihood evaluation with error bars (no Accelerate here: the CLI splits the work).

Per data point: log p in the reporting space (after dequantization / standardization), averaged
over ``probes`` Hutchinson probes (an unbiased estimate of log p, since the trajectory does not
depend on the probe) and importance-weighted over ``deq_samples`` uniform dequantizations,
log P(v) ≥ log (1/K Σ_k p(y_k)) (the K-sample bound used by flow matching and Flow++).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flows.config import SolverConfig
from flows.data.preprocess import Preprocess
from flows.likelihood import log_prob

__all__ = ["EvalOptions", "point_log_likelihood", "summarize", "tolerance_check"]


@dataclass
class EvalOptions:
    solver: SolverConfig
    trace: str = "exact"  # exact | hutchinson
    probes: int = 1  # Hutchinson probes per point
    probe: str = "rademacher"
    deq_samples: int = 1  # dequantization samples per point (discrete data)


@torch.no_grad()
def point_log_likelihood(
    field: nn.Module, raw: Tensor, pre: Preprocess, opts: EvalOptions, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, int]:
    """log p of each raw point in the reporting space.

    Returns (log p (B,), variance over probes of the per-probe estimates (B,), NFE), on raw's device;
    ``generator``, if given, must live on that device too.
    """
    probes = opts.probes if opts.trace == "hutchinson" else 1
    deq = opts.deq_samples if pre.levels is not None else 1
    b = raw.shape[0]
    reps = raw.repeat(deq * probes, *([1] * (raw.ndim - 1)))  # (deq * probes * B, ...)
    noise = torch.rand(reps.shape, generator=generator, device=raw.device) if pre.levels is not None else None
    x = pre(reps, noise=noise)
    res = log_prob(field, x, opts.solver, opts.trace, opts.probe, generator=generator)
    lp = (res.log_prob.double() + pre.log_det(x)).reshape(deq, probes, b)
    var = lp.var(1).mean(0) if probes > 1 else torch.zeros(b, dtype=torch.float64, device=lp.device)
    lp = lp.mean(1)  # unbiased over probes
    lp = torch.logsumexp(lp, 0) - math.log(deq)  # importance-weighted over dequantizations
    return lp, var, res.nfe.forward


def summarize(lp: Tensor, var: Tensor, probes: int, dim: int, levels: int | None) -> dict[str, float]:
    """Mean NLL with its standard error over points, and the part of it due to probe noise."""
    n = len(lp)
    nll = -lp.double()
    out = {
        "nll": nll.mean().item(),
        "nll_se": (nll.std() / math.sqrt(n)).item() if n > 1 else float("nan"),
        "nll_se_probes": (var.sum() / max(probes, 1)).sqrt().item() / n,
        "n": n,
    }
    if levels is not None:
        scale = 1 / (dim * math.log(2))
        out["bpd"] = (out["nll"] / dim + math.log(levels)) / math.log(2)
        out["bpd_se"] = out["nll_se"] * scale
    return out


@torch.no_grad()
def tolerance_check(
    field: nn.Module, raw: Tensor, pre: Preprocess, opts: EvalOptions, factor: float = 100.0, seed: int = 0
) -> dict[str, float]:
    """Re-solve ``raw`` with tolerances ``factor`` times tighter (same probes and dequantization noise).

    Returns the largest and mean absolute change of log p, and the change of the mean.
    """
    tight = SolverConfig(
        **{**opts.solver.__dict__, "atol": opts.solver.atol / factor, "rtol": opts.solver.rtol / factor}
    )
    base, _, _ = point_log_likelihood(field, raw, pre, opts, torch.Generator(raw.device).manual_seed(seed))
    ref, _, nfe = point_log_likelihood(
        field,
        raw,
        pre,
        EvalOptions(tight, opts.trace, opts.probes, opts.probe, opts.deq_samples),
        torch.Generator(raw.device).manual_seed(seed),
    )
    delta = (base - ref).abs()
    return {
        "max_abs_change": delta.max().item(),
        "mean_abs_change": delta.mean().item(),
        "mean_change": (base - ref).mean().item(),
        "n": len(raw),
        "atol": tight.atol,
        "rtol": tight.rtol,
        "nfe": nfe,
    }
