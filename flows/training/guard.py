"""The step guard: a step with a non-finite loss or gradient, or a failed solve, is skipped, counted and,
past ``train.max_bad_steps``, stops the run with a checkpoint to resume from.

Between logging steps nothing here waits for the device: a non-finite gradient skips the update on the
device (``skipped`` counts it there) and is reported at the next checked step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from flows.errors import TrainingAborted
from flows.training.schedule import Progress

__all__ = ["StepGuard"]


class StepGuard:
    def __init__(
        self,
        acc: Accelerator,
        progress: Progress,
        max_bad_steps: int,
        run_dir: Path,
        log: Callable[[dict[str, Any]], None],
        save: Callable[[], None],
        zero_grad: Callable[[], None],
    ):
        self.acc, self.progress, self.max_bad_steps, self.run_dir = acc, progress, max_bad_steps, run_dir
        self.log, self.save, self.zero_grad = log, save, zero_grad
        self.skipped = torch.zeros((), dtype=torch.int32, device=acc.device)  # skips since the last check

    def any(self, flag: bool, value: float = 0.0) -> tuple[bool, float]:
        """(True when ``flag`` holds on any process, the mean of ``value`` over processes): the same on every
        process, from one collective (``value`` rides along: the step's function evaluations)."""
        if self.acc.num_processes == 1:
            return flag, value
        t = torch.tensor([float(flag), value], device=self.acc.device, dtype=torch.float64)
        flags, total = self.acc.reduce(t, "sum").tolist()
        return flags > 0, total / self.acc.num_processes

    def check_skipped(self) -> None:
        """Count the steps skipped on the device since the last check (one host synchronization)."""
        count = int(self.skipped.item())
        if count:
            self.skipped.zero_()
            self.bad(f"non-finite gradient in {count} step(s) since the last logging step", count)

    def bad(self, reason: str, count: int = 1) -> None:
        """Record ``count`` skipped steps; past the limit, save and stop."""
        self.zero_grad()
        progress = self.progress
        progress.bad_steps += count
        self.acc.print(f"step {progress.step}: skipped ({reason}); {progress.bad_steps}/{self.max_bad_steps} bad steps")
        self.log({"step": progress.step, "skipped": reason[:500]})
        if progress.bad_steps >= self.max_bad_steps:
            self.save()
            raise TrainingAborted(
                f"stopped after {progress.bad_steps} bad steps (last: {reason}). A checkpoint of step "
                f"{progress.step} was saved in {self.run_dir}/checkpoints; fix the cause "
                f"(lower train.lr, add regularization, loosen tolerances) and continue with "
                f"--resume {self.run_dir} "
                f"(raise train.max_bad_steps to tolerate more)."
            )
