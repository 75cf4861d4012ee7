"""What a run writes to its directory: ``config.yaml``, ``metrics.jsonl`` (and the trackers), the inference
file ``model.safetensors``, training checkpoints, ``eval.json``. Only the main process writes files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator
from torch import Tensor, nn

from flows import checkpoint
from flows.build import export
from flows.config import Config, to_dict
from flows.context import Context
from flows.errors import TrainingAborted
from flows.files import atomic_write
from flows.flowfile import MODEL_FILE
from flows.preprocess import Preprocess
from flows.tracking import scalars

__all__ = ["RunWriter"]


class RunWriter:
    def __init__(self, acc: Accelerator, cfg: Config):
        self.acc, self.cfg, self.run_dir = acc, cfg, Path(cfg.run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # ------------------------------------------------------------------ start
    def check_fresh(self) -> None:
        if checkpoint.latest_checkpoint(self.run_dir) or (self.run_dir / MODEL_FILE).exists():
            raise TrainingAborted(
                f"run directory '{self.run_dir}' already holds a run. Continue it with --resume "
                f"{self.run_dir}, or choose another directory with run_dir=... (nothing was changed)."
            )

    def resume(self, ema: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
        """Restore the latest checkpoint (Accelerate's state and ``ema``); returns (progress, best weights).
        Log lines written after it are dropped (a killed run repeats those steps)."""
        ckpt = checkpoint.latest_checkpoint(self.run_dir)
        if ckpt is None:
            raise TrainingAborted(f"--resume: no checkpoint in '{self.run_dir}/checkpoints'.")
        progress, best = checkpoint.load_training(self.acc, ckpt, ema)
        if self.acc.is_main_process:
            checkpoint.trim_metrics(self.metrics_path, progress["step"])
        self.acc.print(f"resumed from {ckpt} at step {progress['step']}")
        return progress, best

    def write_config(self) -> None:
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False))

    # ------------------------------------------------------------------ during the run
    def log(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl; its numbers also go to the trackers of ``train.log_with``."""
        if self.acc.is_main_process:
            with self.metrics_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            if self.acc.trackers:
                self.acc.log(scalars(record), step=record["step"])

    def save(
        self,
        step: int,
        ema: nn.Module,
        progress: dict[str, Any],
        best: dict[str, Tensor] | None,
        field: nn.Module,
        preprocess: Preprocess,
        shape: tuple[int, ...],
        context: Context | None = None,
    ) -> None:
        """A training checkpoint (a collective) and the inference file."""
        checkpoint.save_training(self.acc, self.run_dir, step, ema, progress, best, self.cfg.train.keep_checkpoints)
        self.export(field, ema, preprocess, shape, step, context)

    def export(
        self,
        field: nn.Module,
        ema: nn.Module,
        preprocess: Preprocess,
        shape: tuple[int, ...],
        step: int,
        context: Context | None = None,
    ) -> None:
        """The slim inference file (main process; every process waits for it)."""
        if self.acc.is_main_process:
            export(self.run_dir / MODEL_FILE, self.cfg, field, ema, preprocess, shape, step, context)
        self.acc.wait_for_everyone()

    # ------------------------------------------------------------------ end
    def write_result(self, step: int, result: dict[str, Any]) -> None:
        if self.acc.is_main_process:
            atomic_write(self.run_dir / "eval.json", json.dumps({"step": step, **result}, indent=2))
