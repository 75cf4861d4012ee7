"""Experiment trackers through Accelerate (``train.log_with``): TensorBoard, W&B, MLflow, Aim, ...

``metrics.jsonl`` is always written; a tracker gets the same scalars (``train/loss``, ``val/nll``,
``test/nll``, ...), the config as hyperparameters, and the run's pictures where it takes images.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

from flows.config import TRACKERS, Config, to_dict
from flows.errors import ConfigError

__all__ = ["tracker_names", "check_installed", "hyperparameters", "scalars", "log_images"]


def tracker_names(cfg: Config) -> list[str]:
    """``train.log_with`` as a list: a name, a comma-separated string or a list; "all" is what is installed."""
    names = cfg.train.trackers()
    if "all" in names:
        return [n for n in TRACKERS if n != "all" and _installed(n)]
    return names


def _installed(name: str) -> bool:
    """Every tracker's module, and its pip package, carry the tracker's own name."""
    return importlib.util.find_spec(name) is not None


def check_installed(names: list[str]) -> None:
    """A missing package is an error that names the pip install (Accelerate would silently drop it)."""
    missing = [n for n in names if not _installed(n)]
    if missing:
        pips = " ".join(missing)
        raise ConfigError(
            f"train.log_with={','.join(names)}: the package for {', '.join(missing)} is not installed. "
            f"Install it with: pip install {pips}   (or drop train.log_with; metrics.jsonl is always written)."
        )


def hyperparameters(cfg: Config) -> dict[str, Any]:
    """The config flattened to ``section.key`` → bool / int / float / str (what every tracker accepts)."""
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, bool | int | float | str):
                flat[prefix + key] = value
            else:  # lists and None
                flat[prefix + key] = str(value)

    walk(to_dict(cfg), "")
    return flat


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl record, named by what they measure: ``train/loss``, ``val/nll``, ..."""
    if "eval" in record:
        group = {"validation": "val", "held-out": "test"}.get(record.get("split", ""), "eval")
    else:
        group = "train"
    return {
        f"{group}/{k}": float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


def log_images(acc: Accelerator, pictures: dict[str, Path], step: int) -> None:
    """Send PNG pictures to the trackers that take images (TensorBoard, W&B, Aim, ClearML, SwanLab)."""
    if not acc.trackers or not acc.is_main_process:
        return
    import matplotlib.image

    arrays = {}
    for name, path in pictures.items():
        image = matplotlib.image.imread(str(path))[..., :3]  # (H, W, 3); PNGs read as floats in [0, 1]
        arrays[name] = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({k: v[None] for k, v in arrays.items()}, step=step, dataformats="NHWC")
        elif tracker.name in ("wandb", "swanlab"):
            tracker.log_images({k: [v] for k, v in arrays.items()}, step=step)
        elif tracker.name in ("aim", "clearml"):
            tracker.log_images(arrays, step=step)
