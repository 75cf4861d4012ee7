"""When things happen in a run: the learning-rate schedule, the time budget as a fixed amount of work
(``Plan``), the evaluation schedule (every N steps and at marks of the budget), and model selection with
patience. ``Progress`` holds the counters a checkpoint saves.

Reproducibility: the learning rate and the evaluation marks are functions of the step and of the work
done (steps, or function evaluations when the loss solves an ODE), never of the clock. The clock enters
once: early in a run with ``train.time_limit``, ``Plan`` measures the seconds per unit of work and fixes
the work that fits the budget (``Progress.horizon``), and the checkpoint saves it. So a run that the
step count ends is bit-identical across repeats, and a resumed run equals the uninterrupted one bit for
bit once its plan is fixed, whatever ends it (the clock remains a safety stop at the budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from flows.config import Config, TrainConfig

__all__ = ["Progress", "lr_lambda", "Plan", "EvalSchedule", "Selection"]


@dataclass
class Progress:
    step: int = 0
    bad_steps: int = 0
    train_time: float = 0.0  # seconds of training and periodic evaluation (the time budget)
    best_nll: float | None = None  # model selection on the validation split
    best_step: int = 0
    stale_evals: int = 0  # validation evaluations since the best one
    pending_skips: int = 0  # steps skipped on the device and not yet counted when the checkpoint was written
    work: float = 0.0  # work done: steps, or forward function evaluations when the loss solves an ODE
    horizon: float | None = None  # with a time limit: the work at which the budget ends, fixed once by ``Plan``

    def budget_fraction(self) -> float:
        """The share of the planned work done (0 until the plan is fixed)."""
        return min(1.0, self.work / self.horizon) if self.horizon else 0.0


def lr_lambda(cfg: Config, progress: Progress | None = None) -> Callable[[int], float]:
    """Linear warm-up, then constant or a cosine decay to zero at the end of the budget: ``train.steps``,
    or the planned work of ``train.time_limit`` when that comes first (``progress.budget_fraction()``).
    A function of the step and the work done: no clock."""
    warmup, total, cosine = max(cfg.train.warmup_steps, 1), cfg.train.steps, cfg.train.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        by_steps = (step - warmup) / (total - warmup) if total > warmup else 0.0
        by_work = progress.budget_fraction() if progress is not None else 0.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, max(by_steps, by_work))))

    return factor


class Plan:
    """The time budget as a fixed amount of work, measured once.

    Once the steps since step ``FROM`` number ``AT`` and take ``MEASURE`` of the budget, their seconds per
    unit of work and the seconds of one periodic evaluation give the work that fits what is left of
    ``train.time_limit``, the evaluations still due included; ``Progress.horizon`` keeps it (and the
    checkpoint with it). Until then the learning rate follows warm-up and ``train.steps`` only, so the
    clock decides when the plan is made but never the learning rate of a step before it.
    """

    FROM, AT = 5, 30  # measure the steps in between (the first ones pay one-off costs: allocation, compiling)
    MEASURE = 0.02  # ... and at least this share of the budget (the cosine has not moved by then)
    EVAL_MARGIN = 1.25  # evaluations get slower as the field trains (more function evaluations)
    SHARE = 0.9  # of the training time left: steps vary, and the clock should not be what ends a run

    def __init__(self, tc: TrainConfig, progress: Progress):
        self.tc, self.progress = tc, progress
        start = progress.step
        self.begin = start + self.FROM if start else self.FROM
        self.at = max(self.AT, self.begin + 10) if start else self.AT  # a resume before the plan: measure afresh
        self.mark: tuple[float, float] | None = None  # (work, step seconds) where measuring began
        self.step_seconds = 0.0  # seconds of training steps (evaluations excluded) since this process started

    @property
    def pending(self) -> bool:
        return self.tc.time_limit is not None and self.progress.horizon is None

    def observe(self, seconds: float) -> None:
        """One training step took ``seconds`` (call after ``progress.step`` and ``progress.work`` moved on)."""
        self.step_seconds += seconds
        if self.progress.step == self.begin:
            self.mark = (self.progress.work, self.step_seconds)

    def ready(self) -> bool:
        """This process has measured enough: ``AT`` steps and ``MEASURE`` of the budget (a short measurement
        is at the mercy of one slow step)."""
        if not self.pending or self.progress.step < self.at or self.mark is None:
            return False
        assert self.tc.time_limit is not None
        return self.step_seconds - self.mark[1] >= self.MEASURE * 60 * self.tc.time_limit

    def fix(self, used: float, eval_seconds: float, evals_left: int) -> float:
        """Fix ``progress.horizon`` from the seconds ``used`` of the budget so far (agreed over processes),
        the seconds of one periodic evaluation and the number still due by marks; returns the horizon."""
        progress, tc = self.progress, self.tc
        assert self.mark is not None and tc.time_limit is not None
        work0, seconds0 = self.mark
        work_rate = max(self.step_seconds - seconds0, 1e-9) / max(progress.work - work0, 1e-9)  # seconds per unit
        left = max(60 * tc.time_limit - used, 0.0)
        per_eval = self.EVAL_MARGIN * eval_seconds
        reserve = per_eval * evals_left
        per_work = work_rate
        if tc.eval_every:  # evaluations every N steps: their cost spread over the work of N steps
            work_per_step = (progress.work - work0) / max(progress.step - self.begin, 1)
            per_work += per_eval / (tc.eval_every * work_per_step)
        train_seconds = self.SHARE * max(left - reserve, 0.5 * left)  # evaluations: at most half of what is left
        progress.horizon = progress.work + train_seconds / per_work
        return progress.horizon


class EvalSchedule:
    """Periodic evaluations: every ``train.eval_every`` steps and, with ``train.evals_per_budget`` = K, at K
    evenly spaced marks of the budget (the time limit's work, or ``train.steps``) and at steps 25, 50, 100, 200, ...
    before the first of them (a small table overfits within a few hundred steps, before the first 1/K).

    The early steps are fixed numbers, and a mark is a share of the larger of ``step / train.steps`` and
    the planned work done (``Progress.budget_fraction``): no clock, and the same on every process."""

    EARLY = 25

    def __init__(self, tc: TrainConfig, progress: Progress):
        self.tc, self.progress = tc, progress
        self.last_eval_step = -1
        self.evals_by_mark = 0  # marks already evaluated at
        k = tc.evals_per_budget  # of the time budget, or of train.steps without one
        self._marks = [i / k for i in range(1, k + 1)]  # asked every step: made once

    def marks(self) -> list[float]:
        """Shares of the budget at which to evaluate: K evenly spaced."""
        return self._marks

    def fraction(self) -> float:
        return max(self.progress.step / self.tc.steps if self.tc.steps else 0.0, self.progress.budget_fraction())

    def marks_passed(self) -> int:
        fraction = self.fraction()
        return sum(m <= fraction for m in self.marks())

    def early(self, step: int) -> bool:
        """Step 25 · 2^j, before the first mark."""
        if not self.marks() or step % self.EARLY or self.marks_passed():
            return False
        multiple = step // self.EARLY
        return multiple & (multiple - 1) == 0

    def evals_left(self) -> int:
        """The evaluations still due by marks (and a few early ones)."""
        return len(self.marks()) - self.marks_passed() + (4 if self.marks() and not self.marks_passed() else 0)

    def resume(self) -> None:
        """Continue the marks where a checkpoint stopped."""
        self.evals_by_mark = self.marks_passed()

    def due(self, step: int) -> bool:
        if self.tc.eval_every and step % self.tc.eval_every == 0:
            return True
        return self.early(step) or self.marks_passed() > self.evals_by_mark

    def done(self, step: int) -> None:
        """A periodic evaluation ran at ``step``."""
        self.last_eval_step = step
        self.evals_by_mark = self.marks_passed()


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
