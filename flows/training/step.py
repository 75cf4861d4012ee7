"""One optimizer step: forward and backward in micro-batches, clipping, the update, the EMA, and the
metrics of a logging step. Failures go to the step guard.

Without a full record (and without a gradient scaler) nothing here waits for the device: a non-finite
gradient skips the update on the device (the fused optimizer's ``found_inf``, the EMA weighted by zero)
and is counted at the next checked step, where a step is checked at once.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from flows.context import Context
from flows.errors import SolverError
from flows.preprocess import Preprocess
from flows.training.ema import EMA
from flows.training.guard import StepGuard

__all__ = ["OptimizerStep"]


class OptimizerStep:
    def __init__(
        self,
        acc: Accelerator,
        objective: nn.Module,
        opt: Any,
        sched: Any,
        ema: EMA,
        guard: StepGuard,
        preprocess: Preprocess,
        grad_clip: float,
        grad_accum: int,
        agree_every_step: bool,
        context: Context | None = None,
    ):
        self.acc, self.objective, self.opt, self.sched, self.ema, self.guard = acc, objective, opt, sched, ema, guard
        self.preprocess, self.grad_accum, self.agree_every_step = preprocess, grad_accum, agree_every_step
        self.context = context  # a conditional run's: raw contexts → the field's input
        self.max_norm = grad_clip if grad_clip > 0 else float("inf")
        self.draw = acc.unwrap_model(objective).draw  # the unwrapped module's (DDP does not forward attributes)
        self.params = [p for p in objective.parameters() if p.requires_grad]  # cached: walked every step
        # Accelerate's optimizer wrapper probes for optional packages on every step (~0.25 ms); without a
        # gradient scaler it only forwards to the optimizer, so step that directly
        self.plain = opt.scaler is None
        self.optimizer_step = opt.optimizer.step if self.plain else opt.step
        self.zero_grad = opt.optimizer.zero_grad if self.plain else opt.zero_grad
        self.work = 1.0  # the work of the last step: 1, or its forward function evaluations (an ODE in the loss)

    def __call__(self, raw: Tensor, full_record: bool = True, context: Tensor | None = None) -> dict[str, Any] | None:
        """One step on the raw batch ``raw`` (and its raw ``context``, conditional runs); None if skipped, the
        metrics record if ``full_record``."""
        check = full_record or not self.plain
        if check:  # before the batch's dequantization noise is drawn: a stop saves the RNG state as it was
            self.guard.check_skipped()
        x = self.preprocess(raw)
        c = self.context.model(context) if context is not None else None
        z = self.context.whiten(x, c) if c is not None else x  # a conditional standardization, if any
        result = self._forward_backward(z, check, c)
        if isinstance(result, str):
            return self.guard.bad(result)
        loss, stats = result
        if self.plain:  # no scaler to unscale with: torch's (foreach) clipping, without Accelerate's checks
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        else:
            grad_norm = self.acc.clip_grad_norm_(self.params, self.max_norm)
        keep = None
        if check:
            if not torch.isfinite(grad_norm):
                return self.guard.bad("non-finite gradient")
        else:  # gradients are all-reduced, so every process takes the same decision
            keep = torch.isfinite(grad_norm)
            self.guard.skipped += ~keep
        if self.plain:  # the fused optimizer skips its update (step count included) where found_inf is 1
            self.opt.optimizer.found_inf = None if keep is None else (~keep).to(torch.float32)
        self.optimizer_step()
        self.sched.step()
        self.zero_grad(set_to_none=True)
        self.ema.update(keep)
        return self._record(x, loss, stats, grad_norm) if full_record else {}

    def _forward_backward(self, x: Tensor, check: bool, context: Tensor | None) -> tuple[Tensor, dict[str, Any]] | str:
        """Loss and gradients of the local batch, in ``grad_accum`` micro-batches through Accelerate's
        ``accumulate`` (gradients are synchronized over processes once, after the last one). The objective's
        random draws are made for the whole batch and sliced, so K micro-batches of B/K give the gradient of
        one batch of B. Returns (mean loss, stats of the first micro-batch), or the reason to skip the step.
        """
        acc, k = self.acc, self.grad_accum
        acc.step = 0  # Accelerate's micro-batch counter: a step always starts a cycle (after a skip, a resume)
        draws = self.draw(x, context)
        micro = zip(x.chunk(k), *(d.chunk(k) for d in draws.values()), strict=True) if k > 1 else [(x, *draws.values())]
        losses, first, nfe = [], {}, 0.0
        for xm, *dm in micro:
            with acc.accumulate(self.objective) if k > 1 else nullcontext():
                try:
                    loss, stats = self.objective(xm, dict(zip(draws, dm, strict=True)))
                    failure = None if not check or torch.isfinite(loss) else "non-finite loss"
                except SolverError as e:
                    loss, stats, failure = None, {}, str(e)
                forward = float(stats["nfe"].forward) if "nfe" in stats else 0.0
                if check or self.agree_every_step:  # one collective: the failure and the work, agreed
                    failed, forward = self.guard.any(failure is not None, forward)
                    if failed:
                        return failure or "non-finite loss on another process"
                nfe += forward
                if failure is not None:  # one process, between checks: nothing to agree on
                    return failure
                acc.backward(loss)  # divided by k when accumulating
            losses.append(loss.detach())
            first = first or stats
        # the step's work: its forward function evaluations when the loss solves an ODE (the same on every
        # process: agreed above, where several processes solve), else 1
        self.work = nfe or 1.0
        return (losses[0] if k == 1 else torch.stack(losses).mean()), first

    def _log_det(self, x: Tensor) -> float:
        """The mean log-det from data units to what the field models (preprocessing, conditional standardization)."""
        extra = self.context.whiten_log_det() if self.context is not None else 0.0
        return self.preprocess.log_det(x).mean().item() + extra

    def _record(self, x: Tensor, loss: Tensor, stats: dict[str, Any], grad_norm: Tensor) -> dict[str, Any]:
        """The metrics of a logging step, averaged over processes (one collective)."""
        nfe = stats.get("nfe")
        values = torch.tensor(
            [
                loss.item(),
                stats["nll"].item() - self._log_det(x) if "nll" in stats else torch.nan,
                stats.get("kinetic", torch.nan),
                stats.get("jacobian", torch.nan),
                stats.get("hjb", torch.nan),
                nfe.forward if nfe else torch.nan,
                nfe.backward if nfe else torch.nan,
            ],
            device=self.acc.device,
        )
        values = self.acc.reduce(values, "mean")
        names = ("loss", "nll", "kinetic", "jacobian", "hjb", "nfe_forward", "nfe_backward")
        record = {k: v for k, v in zip(names, values.tolist(), strict=True) if not math.isnan(v)}
        return record | {"grad_norm": float(grad_norm), "lr": self.sched.get_last_lr()[0]}
