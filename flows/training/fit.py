"""Train one run from a validated config: a single flow (:class:`flows.training.Trainer`) or a mixture of members
(:mod:`flows.training.members`). ``flows.train`` and the simulation loop (:mod:`flows.inference`) both call it."""

from __future__ import annotations

from typing import Any

from flows.config import Config
from flows.training.lock import run_lock

__all__ = ["fit"]


def fit(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` (resumed from its run directory's checkpoint with ``resume``); the final held-out evaluation.
    The run directory is locked meanwhile (:func:`flows.training.lock.run_lock`: one writer at a time)."""
    with run_lock(cfg.run_dir):
        from flows.training.crossval import small_data, train_crossval

        if small_data(cfg):  # few rows: k-fold cross-validation instead of one small validation split
            return train_crossval(cfg, resume)
        from flows.training.members import train_split

        return train_split(cfg, resume)
