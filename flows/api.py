"""The two calls a Python user starts from: ``flows.load`` and ``flows.train``.

>>> import flows
>>> run = flows.train("configs/toy2d_fm.yaml", train={"steps": 500}, run_dir="runs/quick")
>>> model = flows.load(run)              # a run directory, a Run, or a model.safetensors file
>>> x = model.sample(10_000)             # data units, on model.device
>>> lp = model.log_prob(x)               # exact log-density, every preprocessing log-det counted
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flows.config import Config, load_config
from flows.errors import ConfigError
from flows.flow import Flow
from flows.loading import load

__all__ = ["load", "train", "Run"]


@dataclass
class Run:
    """A finished training run: ``flows.load(run)`` opens it."""

    path: Path  # the run directory
    config: Config
    result: dict[str, Any] = field(default_factory=dict)  # the final held-out evaluation (also eval.json)

    def __fspath__(self) -> str:
        return str(self.path)

    def load(self, weights: str = "ema", device: torch.device | str | None = None) -> Flow:
        return load(self, weights, device)

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """Every record of ``metrics.jsonl``: training steps, evaluations, skipped steps."""
        lines = (self.path / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def train(
    config: str | os.PathLike | Config | None = None,
    *,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overrides: Sequence[str] = (),
    **sections: Mapping[str, Any],
) -> Run:
    """Train a flow in this process (``accelerate launch`` a script that calls it to use several).

    Args:
        config: a YAML recipe (``configs/*.yaml``), a :class:`flows.config.Config`, or None for the
            built-in defaults. With ``resume=True`` and ``run_dir``: None (the run keeps its own
            ``config.yaml``); with ``resume=True`` and a config: the run of that config, with that config.
        run_dir: where the run is written (default: the config's ``run_dir``).
        resume: continue the latest checkpoint of ``run_dir``.
        overrides: ``"key.sub=value"`` strings, as on the command line.
        **sections: config sections as mappings, e.g. ``train={"steps": 500}, objective={"name": "fm"}``;
            every key is checked, as in a YAML file. Precedence: the config ← its ``devices`` section for the
            device this run uses (``devices.cuda``, ...) ← overrides ← sections ← run_dir.

    Returns:
        The :class:`Run`: its directory, config and final held-out evaluation.
    """
    if resume and run_dir is not None:
        if config is not None:
            raise ConfigError("flows.train(resume=True, run_dir=...) takes no config (the run keeps its own).")
        config = Path(run_dir) / "config.yaml"
    updates: dict[str, Any] = dict(sections)
    if run_dir is not None:
        updates["run_dir"] = os.fspath(run_dir)
    from flows.training.accelerator import run_device  # Accelerate loads only to train

    device, main = run_device()  # the recipe's devices section for it applies (a notice on the main process)
    cfg = load_config(config, overrides, updates, device=device, notice=main)
    if cfg.data.simulator:  # a simulator in the loop (flows.inference): simulate, then train on the pairs
        from flows.inference import prior_of, run_inference, simulator_of

        root = run_inference(cfg, simulator_of(cfg), prior_of(cfg), resume)
        return Run(root, cfg, json.loads((root / "eval.json").read_text()))
    from flows.training.fit import fit  # the trainer (Accelerate, the objectives) loads only to train

    return Run(Path(cfg.run_dir), cfg, fit(cfg, resume))
