"""Likelihoods over processes, with error bars: the application side of ``Flow.log_prob``.

``evaluate`` is the one held-out evaluation (the trainer's periodic and final ones, a mixture's, ``evaluate.py``'s):
``gathered_log_prob`` splits points over Accelerate's processes, calls ``Flow.log_prob`` on each share and
gathers the results in input order; ``summarize`` turns log p into NLL ± standard error (and bits/dim);
``bound_report`` says what an augmented flow's number is. ``tolerance_check`` re-solves at tighter tolerances.
"""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from torch import Tensor
from tqdm.auto import tqdm

from flows.errors import FlowsError
from flows.flow import Flow
from flows.ode import FIXED_STEP_METHODS

__all__ = [
    "EVAL_BATCH",
    "Evaluation",
    "evaluate",
    "gathered_log_prob",
    "summarize",
    "describe",
    "tolerance_check",
    "bound_report",
]

EVAL_BATCH = 2000  # points per solve of an evaluation where the device's free memory cannot be read (a CPU)


@torch.no_grad()
def gathered_log_prob(
    acc: Accelerator,
    flow: Flow,
    raw: Tensor,
    batch_size: int | None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    context: Tensor | None = None,
    **options: Any,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """``flow.log_prob`` of every row of ``raw``, split over the processes and gathered in input order; a
    conditional flow's ``context``: one row per point (raw units), or None (a label-conditional flow's marginal).

    Every process calls it with the same ``raw``; ``options`` go to ``Flow.log_prob`` (trace, probes,
    method, ...), ``generator`` lives on ``acc.device`` (one per process). Returns (log p (N,),
    probe variance (N,), info: ``nfe`` per solve, ``seconds``, and the options ``Flow.log_prob`` used).
    One collective per call: shares are padded to equal size and gathered. ``batch_size``: points per solve, or
    None: what fits in the device's free memory (:meth:`Flow._log_prob_batch_size`), :data:`EVAL_BATCH` on a CPU.
    """
    info = flow._log_prob_options(**options)
    n, procs, rank = len(raw), acc.num_processes, acc.process_index
    per = -(-n // procs)  # each process takes a contiguous share of at most ``per`` points
    mine = torch.arange(rank * per, min(n, (rank + 1) * per), device="cpu")
    batch_size = batch_size or flow._log_prob_batch_size(max(len(mine), 1), info, context, EVAL_BATCH)
    lps, variances, nfe = [], [], []
    start = time.perf_counter()
    for ib in tqdm(mine.split(batch_size), desc="evaluate", disable=not (progress and acc.is_local_main_process)):
        xb = raw[ib].to(acc.device)
        cb = context[ib].to(acc.device) if context is not None else None
        lp, part = flow.log_prob(xb, context=cb, generator=generator, batch_size=len(xb), return_info=True, **options)
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
    info |= {"nfe": solves[1] / max(solves[0], 1), "seconds": time.perf_counter() - start, "batch_size": batch_size}
    return gathered[:, 0], gathered[:, 1], info


class Evaluation(NamedTuple):
    """What :func:`evaluate` returns: ``result`` (:func:`summarize`'s numbers and :func:`bound_report`'s), log p
    of every point in input order (N,), and ``info`` (:func:`gathered_log_prob`'s: nfe, seconds, trace, probes,
    deq_samples, augment_samples, likelihood, solver)."""

    result: dict[str, Any]
    lp: Tensor
    info: dict[str, Any]


@torch.no_grad()
def evaluate(
    acc: Accelerator,
    flow: Flow,
    raw: Tensor,
    batch_size: int | None,
    *,
    generator: torch.Generator | None = None,
    context: Tensor | None = None,
    progress: bool = False,
    gap_points: int = 2000,
    **options: Any,
) -> Evaluation:
    """The held-out evaluation of ``flow`` on ``raw`` (every process calls it with the same points): log p gathered
    over processes (:func:`gathered_log_prob`), NLL ± standard error and bits/dim (:func:`summarize`), and what an
    augmented flow's number is, with how tight its bound is on the first ``gap_points`` points (:func:`bound_report`;
    0: not measured). ``generator`` draws the probes and noise of both solves; ``options``: as ``Flow.log_prob``'s."""
    lp, var, info = gathered_log_prob(acc, flow, raw, batch_size, generator, progress, context, **options)
    result = summarize(lp, var, info["probes"], flow.dim, flow.levels)
    result |= bound_report(acc, flow, raw, batch_size, info, generator, context, gap_points, **options)
    return Evaluation(result, lp, info)


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
def bound_report(
    acc: Accelerator,
    flow: Flow,
    raw: Tensor,
    batch_size: int | None,
    info: dict[str, Any],
    generator: torch.Generator | None = None,
    context: Tensor | None = None,
    limit: int = 2000,
    **options: Any,
) -> dict[str, Any]:
    """What an evaluation's result says of its likelihood (``info``: what :func:`gathered_log_prob` returned):
    nothing for an exact one, reported as always; for an augmented flow, ``likelihood`` ("lower bound": the NLL is
    an upper bound; or "estimate") and ``augment_samples`` (K), and, for a bound with the exact trace, ``bound_gap``:
    how tight it is on the first ``limit`` points (0: not measured). Hutchinson's noise would make K against 4K a
    measure of the noise, not of the bound, so no gap is given there. ``options``: as ``Flow.log_prob``'s."""
    if info.get("likelihood", "exact") == "exact":
        return {}
    out = {"likelihood": info["likelihood"], "augment_samples": info["augment_samples"]}
    if limit > 0 and info["likelihood"] == "lower bound" and info["trace"] == "exact":
        args = (acc, flow, raw, batch_size, info["augment_samples"], generator, context, limit)
        out["bound_gap"] = _bound_gap(*args, **options)
    return out


def _bound_gap(
    acc: Accelerator,
    flow: Flow,
    raw: Tensor,
    batch_size: int | None,
    samples: int,
    generator: torch.Generator | None,
    context: Tensor | None,
    limit: int,
    **options: Any,
) -> dict[str, Any]:
    """The NLL bound with K = ``samples`` and with 4K augmentations on the first ``limit`` points (independent
    draws), and the gap, NLL_K − NLL_4K ≥ 0 in expectation, with its standard error over points. A gap inside its
    error says K draws have made the bound as tight as 4K would."""
    n = min(len(raw), limit)
    ctx = context[:n] if context is not None else None
    nll = {}
    for k in (samples, 4 * samples):
        lp, _, _ = gathered_log_prob(
            acc, flow, raw[:n], batch_size, generator, context=ctx, **options | {"augment_samples": k}
        )
        nll[k] = -lp.double()
    gap = nll[samples] - nll[4 * samples]
    return {
        "n": n,
        "augment_samples": samples,
        "nll_k": nll[samples].mean().item(),
        "nll_4k": nll[4 * samples].mean().item(),
        "gap": gap.mean().item(),
        "gap_se": (gap.std() / math.sqrt(n)).item() if n > 1 else float("nan"),
    }


def describe(result: dict[str, Any]) -> str:
    """One line of an evaluation's numbers: NLL ± se (bits/dim), points, trace, NFE, seconds; a bound says so."""
    bpd = f", {result['bpd']:.3f} bits/dim" if "bpd" in result else ""
    bound = ""
    if "augment_samples" in result:  # an augmented flow: the NLL bounds the true one from above
        gap = result.get("bound_gap")
        tight = f"; K to 4K tightens it by {gap['gap']:.4f} ± {gap['gap_se']:.4f}" if gap else ""
        what = "an upper bound" if result["likelihood"] == "lower bound" else "an estimate, not a bound"
        bound = f" ({what}: K={result['augment_samples']} augmentations{tight})"
    return (
        f"NLL {result['nll']:.4f} ± {result['nll_se']:.4f} nats{bpd}{bound} "
        f"({result['n']} points, {result['trace']} trace, NFE {result['nfe']:.0f}, {result['seconds']:.1f} s)"
    )


@torch.no_grad()
def tolerance_check(
    flow: Flow, raw: Tensor, factor: float = 100.0, seed: int = 0, context: Tensor | None = None, **options: Any
) -> dict[str, Any]:
    """Re-solve ``raw`` with tolerances ``factor`` times tighter (same probes and dequantization noise);
    a fixed-step solve is compared with dopri5 at atol = rtol = 1e-7. ``options``: as ``Flow.log_prob``'s.

    Returns the largest and mean absolute change of log p, and the change of the mean.
    """
    solver = flow._log_prob_options(**options)["solver"]
    if solver["method"] in FIXED_STEP_METHODS:
        tight = {"method": "dopri5", "atol": 1e-7, "rtol": 1e-7, "steps": None}
    else:
        tight = {"method": solver["method"], "atol": solver["atol"] / factor, "rtol": solver["rtol"] / factor}
    generator = torch.Generator(flow.device)
    base = flow.log_prob(raw, context=context, generator=generator.manual_seed(seed), batch_size=len(raw), **options)
    ref, info = flow.log_prob(
        raw,
        context=context,
        generator=generator.manual_seed(seed),
        batch_size=len(raw),
        return_info=True,
        **{**options, **tight},
    )
    delta = (base - ref).abs()
    return {
        "max_abs_change": delta.max().item(),
        "mean_abs_change": delta.mean().item(),
        "mean_change": (base - ref).mean().item(),
        "n": len(raw),
        "method": info["solver"]["method"],
        "atol": info["solver"]["atol"],
        "rtol": info["solver"]["rtol"],
        "nfe": round(info["nfe"]),  # one solve
    }
