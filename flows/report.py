"""Pictures of a flow: data, samples and density side by side (2D); a sample grid (images).

Everything is drawn from objects in memory (a :class:`Flow` and the raw reference points): the
trainer's final pictures and ``sample.py`` call the same functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flows.flow import Flow
from flows.plotting import grid, plot_2d

__all__ = ["final_pictures", "plot_density", "image_grid", "class_grid", "save_grid", "grid_log_density"]


def save_grid(images: Tensor, out: Path, nrow: int | None = None) -> Path:
    """Save images (N, C, H, W) in [0, 1] as one grid of ``nrow`` images a row (default: square-ish)."""
    from torchvision.utils import save_image

    save_image(images.clamp(0, 1), out, nrow=nrow or max(1, round(len(images) ** 0.5)), padding=1)
    return out


def grid_log_density(flow: Flow, reference: np.ndarray, chunk: int | None, size: int = 120, **solver: Any):
    """log p (data space, float64) of a 2D flow on a size x size grid around ``reference``; (lp, extent).

    ``chunk``: points per solve (None: what fits in the device's memory, 10,000 on a CPU). ``solver``: ``method``,
    ``atol``, ``rtol``, ``steps`` for ``Flow.log_prob`` (default: the flow's)."""
    points, extent = grid(reference, size)
    chunk = chunk or flow._log_prob_batch_size(len(points), flow._log_prob_options("exact", **solver), default=10_000)
    gen = torch.Generator(flow.device).manual_seed(0)  # an augmented flow's draws: seeded, one picture per run
    lp = flow.log_prob(torch.from_numpy(points), trace="exact", batch_size=chunk, generator=gen, **solver)
    return lp.cpu().numpy(), extent


def image_grid(flow: Flow, out: Path, n: int = 64, seed: int = 0) -> Path:
    """Write ``n`` samples of an image flow as one grid picture."""
    images = flow.sample(n, generator=torch.Generator(flow.device).manual_seed(seed))
    return save_grid(images.cpu() / (flow.levels - 1), out)


def class_grid(flow: Flow, out: Path, per_class: int = 8, guidance: float = 0.0, seed: int = 0, **solver: Any) -> Path:
    """Write a label-conditional image flow's samples as a grid, one row per class (``per_class`` a row)."""
    labels = torch.arange(flow.context.classes, device=flow.device)
    gen = torch.Generator(flow.device).manual_seed(seed)
    images = flow.sample(per_class, context=labels, guidance=guidance, generator=gen, **solver)
    images = images.reshape(-1, *flow.shape)  # (classes * per_class, C, H, W), class by class
    return save_grid(images.cpu() / (flow.levels - 1), out, nrow=per_class)


def plot_density(
    flow: Flow, reference: Tensor, out: Path, title: str, n_samples: int = 20_000, grid_size: int = 120, seed: int = 0
) -> Path:
    """Write data | samples | density for a 2D flow; ``reference``: raw points to show as the data."""
    data = reference.cpu().numpy()
    gen = torch.Generator(flow.device).manual_seed(seed)
    x, info = flow.sample(n_samples, generator=gen, return_info=True)
    lp, extent = grid_log_density(flow, data, 10_000, grid_size)
    return plot_2d(out, data, x.cpu().numpy(), lp, extent, f"{title}, sampling NFE {info['nfe']}")


def final_pictures(flow: Flow, reference: Tensor, run_dir: Path, data_name: str) -> dict[str, Path]:
    """The pictures at the end of a run: ``samples.png`` (2D) or ``samples_grid.png`` (images), by name."""
    title = f"{data_name}, step {flow.step} (EMA)"
    if flow.context is not None:  # conditional: a grid per class; a context vector has no one picture
        if flow.context.kind == "labels" and len(flow.shape) == 3:
            return {"samples": class_grid(flow, run_dir / "samples_grid.png")}
        return {}
    if flow.dim == 2:
        return {"samples": plot_density(flow, reference, run_dir / "samples.png", title)}
    if len(flow.shape) == 3:
        return {"samples": image_grid(flow, run_dir / "samples_grid.png")}
    return {}
