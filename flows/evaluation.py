"""How a likelihood is computed and reported: per point, over processes, with error bars.

``point_log_likelihood`` is the one per-point routine (``Flow.log_prob`` batches it);
``gathered_log_prob`` splits points over Accelerate's processes and gathers them in input order (the
trainer's periodic and final evaluations and ``evaluate.py`` both use it); ``summarize`` turns log p
into NLL ± standard error (and bits/dim); ``tolerance_check`` re-solves at tighter tolerances.

Per data point: log p in the reporting space (after dequantization / standardization), averaged
over ``probes`` Hutchinson probes (an unbiased estimate of log p, since the trajectory does not
depend on the probe) and importance-weighted over ``deq_samples`` uniform dequantizations,
log P(v) ≥ log (1/K Σ_k p(y_k)) (the K-sample bound used by flow matching and Flow++).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

from flows.config import FIXED_STEP_METHODS, SolverConfig
from flows.data.preprocess import Preprocess
from flows.errors import FlowsError
from flows.likelihood import log_prob

if TYPE_CHECKING:
    from flows.model import Flow

__all__ = ["EvalOptions", "point_log_likelihood", "gathered_log_prob", "summarize", "tolerance_check"]


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


@torch.no_grad()
def gathered_log_prob(
    acc: Accelerator,
    flow: Flow,
    raw: Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **options: Any,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """``flow.log_prob`` of every row of ``raw``, split over the processes and gathered in input order.

    Every process calls it with the same ``raw``; ``options`` go to ``Flow.log_prob`` (trace, probes,
    method, ...), ``generator`` lives on ``acc.device`` (one per process). Returns (log p (N,),
    probe variance (N,), info: ``nfe`` per solve, ``seconds``, and the options ``Flow.log_prob`` used).
    One collective per call: shares are padded to equal size and gathered.
    """
    from flows.model import options_info

    info = options_info(flow.eval_options(**options))
    n, procs, rank = len(raw), acc.num_processes, acc.process_index
    per = -(-n // procs)  # each process takes a contiguous share of at most ``per`` points
    mine = torch.arange(rank * per, min(n, (rank + 1) * per), device="cpu")
    lps, variances, nfe = [], [], []
    start = time.perf_counter()
    for ib in tqdm(mine.split(batch_size), desc="evaluate", disable=not (progress and acc.is_local_main_process)):
        xb = raw[ib].to(acc.device)
        lp, part = flow.log_prob(xb, generator=generator, batch_size=len(xb), return_info=True, **options)
        lps.append(lp)
        variances.append(part["variance"])
        nfe.append(part["nfe"])
    # one gather of equal-sized, padded shares; the padding (index -1) is dropped
    padded = torch.full((per, 3), -1.0, dtype=torch.float64, device=acc.device)
    if len(mine):
        padded[: len(mine)] = torch.stack([torch.cat(lps), torch.cat(variances), mine.to(acc.device)], 1)
    gathered = acc.gather(padded) if procs > 1 else padded
    gathered = gathered[gathered[:, 2] >= 0]
    if gathered.shape[0] != n or not torch.equal(gathered[:, 2].cpu(), torch.arange(n, device="cpu").double()):
        raise FlowsError("internal error: the gathered points do not cover the data exactly once")
    solves = torch.tensor([[len(nfe), sum(nfe)]], dtype=torch.float64, device=acc.device)
    solves = (acc.gather(solves) if procs > 1 else solves).sum(0).tolist()
    info |= {"nfe": solves[1] / max(solves[0], 1), "seconds": time.perf_counter() - start}
    return gathered[:, 0], gathered[:, 1], info


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
    """Re-solve ``raw`` with tolerances ``factor`` times tighter (same probes and dequantization noise);
    a fixed-step solve is compared with dopri5 at atol = rtol = 1e-7.

    Returns the largest and mean absolute change of log p, and the change of the mean.
    """
    if opts.solver.method in FIXED_STEP_METHODS:
        tight = SolverConfig("dopri5", 1e-7, 1e-7, adjoint=False, max_steps=opts.solver.max_steps)
    else:
        tight = dataclasses.replace(opts.solver, atol=opts.solver.atol / factor, rtol=opts.solver.rtol / factor)
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
        "method": tight.method,
        "atol": tight.atol,
        "rtol": tight.rtol,
        "nfe": nfe,
    }
