"""Simulators for tests/test_simulation_scale.py, importable in worker processes (spawn children and Dask workers
get the test process's sys.path, tests/ included).

``propose`` draws the parameters of round 0, seed 0, with column 0 set to the batch's index k: the simulators below
act on one chosen batch by reading it. Each is a picklable object (a class of this module) or a function here.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flows.simulation import batch_seed

SEED = 0
_BATCH_OF_SEED = {batch_seed(SEED, 0, 2 * k): k for k in range(1000)}


def propose(m: int, seed: int) -> torch.Tensor:
    """m parameters of round 0 for the batch whose parameter seed is ``seed``: column 0 is the batch's index."""
    theta = torch.randn(m, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    theta[:, 0] = _BATCH_OF_SEED[seed]
    return theta


def batch_of(theta: torch.Tensor) -> int:
    return int(theta[0, 0])


def in_worker() -> bool:
    return mp.parent_process() is not None


def noisy(theta: torch.Tensor) -> torch.Tensor:
    """theta plus torch noise, then a numpy noise column (both random states seeded per batch); NaN where
    theta[:, 1] > 1.5 (dropped)."""
    x = theta[:, 1:].float() + 0.1 * torch.randn(len(theta), 2)
    extra = torch.from_numpy(np.random.standard_normal((len(theta), 1))).float()
    x = torch.cat([x, extra], 1)
    x[theta[:, 1] > 1.5] = float("nan")
    return x


@dataclass
class FailAt:
    """``noisy``, raising in batch ``batch``."""

    batch: int

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        if batch_of(theta) == self.batch:
            raise RuntimeError("the solver of the simulator diverged")
        return noisy(theta)


@dataclass
class HangAt:
    """``noisy``, hanging (an hour) in batch ``batch``."""

    batch: int

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        if batch_of(theta) == self.batch:
            time.sleep(3600)
        return noisy(theta)


@dataclass
class DieAt:
    """``noisy``; in batch ``batch`` on a worker process, the process exits abruptly (``os._exit``): once if ``flag``
    is a file that does not exist yet (created first), every time if ``flag`` is None."""

    batch: int
    flag: str | None = None

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        if batch_of(theta) == self.batch and in_worker():
            if self.flag is None:
                os._exit(3)
            if not os.path.exists(self.flag):
                Path(self.flag).touch()
                os._exit(3)
        return noisy(theta)


@dataclass
class Recorded:
    """``noisy``, appending ``k pid`` to ``log`` for each batch after ``delay`` seconds. With ``handoff``, the
    calling process takes a second per batch until a worker process has recorded one, so that both take part (it
    cannot wait for one: it hands out the batches)."""

    log: str
    delay: float = 0.0
    handoff: bool = False

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        if self.handoff and not in_worker() and not self.worker_pids():
            time.sleep(1.0)
        time.sleep(self.delay)
        x = noisy(theta)
        with open(self.log, "a") as f:
            f.write(f"{batch_of(theta)} {os.getpid()}\n")
        return x

    def calls(self) -> list[tuple[int, int]]:
        path = Path(self.log)
        lines = path.read_text().split() if path.exists() else []
        return [(int(k), int(pid)) for k, pid in zip(lines[::2], lines[1::2], strict=True)]

    def worker_pids(self) -> set[int]:
        return {pid for _, pid in self.calls()} - {os.getpid()}
