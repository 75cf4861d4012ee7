"""When things happen in a run: the learning-rate schedule, the evaluation schedule (every N steps and
at marks of the time budget), and model selection with patience. ``Progress`` holds the counters a
checkpoint saves."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from flows.config import Config, TrainConfig

__all__ = ["Progress", "lr_lambda", "EvalSchedule", "Selection"]


@dataclass
class Progress:
    step: int = 0
    bad_steps: int = 0
    train_time: float = 0.0  # seconds of training and periodic evaluation (the time budget)
    best_nll: float | None = None  # model selection on the validation split
    best_step: int = 0
    stale_evals: int = 0  # validation evaluations since the best one
    pending_skips: int = 0  # steps skipped on the device and not yet counted when the checkpoint was written


def lr_lambda(cfg: Config, time_fraction: Callable[[], float] = lambda: 0.0) -> Callable[[int], float]:
    """Linear warm-up, then constant or a cosine decay to zero at the end of the budget: ``train.steps``,
    or ``train.time_limit`` when that comes first (``time_fraction()``: the share of it used so far)."""
    warmup, total, cosine = max(cfg.train.warmup_steps, 1), cfg.train.steps, cfg.train.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        by_steps = (step - warmup) / (total - warmup) if total > warmup else 0.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, max(by_steps, time_fraction()))))

    return factor


class EvalSchedule:
    """Periodic evaluations: every ``train.eval_every`` steps, and (with a time limit) at each mark of
    ``marks()``. ``time_fraction`` is the share of the time budget used, the same on every process."""

    def __init__(self, tc: TrainConfig, processes: int):
        self.tc, self.processes = tc, processes
        self.time_fraction = 0.0
        self.last_eval_step = -1
        self.evals_by_time = 0  # marks already evaluated at

    def marks(self) -> list[float]:
        """Shares of the time budget at which to evaluate: K evenly spaced, and doubling ones before the
        first of them (1/2K, 1/4K, ...: a small table can overfit within the first 1/K of the budget)."""
        k = self.tc.evals_per_budget
        if not k:
            return []
        return sorted({*(i / k for i in range(1, k + 1)), *(2.0**-j / k for j in range(1, 9))})

    def marks_passed(self) -> int:
        return sum(m <= self.time_fraction for m in self.marks())

    def resume(self, train_time: float) -> None:
        """Continue the budget where a checkpoint stopped."""
        if self.tc.time_limit:
            self.time_fraction = train_time / (60 * self.tc.time_limit)
            self.evals_by_time = self.marks_passed()

    def due(self, step: int, log_now: bool) -> bool:
        tc = self.tc
        if tc.eval_every and step % tc.eval_every == 0:
            return True
        if not (tc.evals_per_budget and tc.time_limit) or not (log_now or self.processes == 1):
            return False
        return self.marks_passed() > self.evals_by_time

    def done(self, step: int) -> None:
        """A periodic evaluation ran at ``step``."""
        self.last_eval_step = step
        self.evals_by_time = self.marks_passed()


class Selection:
    """Keep the EMA weights with the best validation NLL; say when patience has run out."""

    def __init__(self, active: bool, patience: int, progress: Progress):
        self.active, self.patience, self.progress = active, patience, progress
        self.best: dict[str, Tensor] | None = None  # the kept EMA state dict

    def offer(self, nll: float, ema: nn.Module) -> bool:
        """Keep ``ema``'s weights if ``nll`` is the best so far; True when patience has run out."""
        progress = self.progress
        if not self.active or not math.isfinite(nll):
            return False
        if progress.best_nll is None or nll < progress.best_nll:
            progress.best_nll, progress.best_step, progress.stale_evals = nll, progress.step, 0
            self.best = {k: v.detach().clone() for k, v in ema.state_dict().items()}
        else:
            progress.stale_evals += 1
        return self.patience > 0 and progress.stale_evals >= self.patience

    def restore(self, ema: nn.Module) -> bool:
        """Put the kept weights back into ``ema``; False if none were kept."""
        if self.best is None:
            return False
        ema.load_state_dict(self.best)
        return True
