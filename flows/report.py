"""Pictures of a finished run: data, samples and density side by side (2D); a sample grid (images)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from flows import checkpoint
from flows.data import build_data
from flows.model import Flow
from flows.plotting import grid, plot_2d

__all__ = ["plot_run", "image_grid", "save_grid", "grid_log_density"]


def save_grid(images: torch.Tensor, out: Path) -> Path:
    """Save images (N, C, H, W) in [0, 1] as one square-ish grid."""
    from torchvision.utils import save_image

    save_image(images.clamp(0, 1), out, nrow=max(1, round(len(images) ** 0.5)), padding=1)
    return out


def grid_log_density(model: Flow, reference: np.ndarray, chunk: int, size: int = 120, **solver: Any):
    """log p (data space, float64) of a 2D model on a size x size grid around ``reference``; (lp, extent).

    ``solver``: ``method``, ``atol``, ``rtol``, ``steps`` for ``Flow.log_prob`` (default: the run's)."""
    points, extent = grid(reference, size)
    lp = model.log_prob(torch.from_numpy(points), trace="exact", batch_size=chunk, **solver)
    return lp.cpu().numpy(), extent


def image_grid(run: str | Path, n: int = 64, seed: int = 0, device: torch.device | str = "cpu") -> Path:
    """Write ``run/samples_grid.png``: ``n`` samples of an image model (EMA weights)."""
    model = checkpoint.load(run).to(device)
    images = model.sample(n, generator=torch.Generator(model.device).manual_seed(seed))
    return save_grid(images.cpu() / (model.levels - 1), Path(model.path).parent / "samples_grid.png")


def plot_run(
    run: str | Path, n_samples: int = 20_000, grid_size: int = 120, seed: int = 0, device: torch.device | str = "cpu"
) -> Path:
    """Write ``run/samples.png`` (data | samples | density) for a 2D model; returns its path."""
    model = checkpoint.load(run).to(device)
    cfg = model.config
    data = build_data(cfg.data).test.numpy()
    gen = torch.Generator(model.device).manual_seed(seed)
    x, info = model.sample(n_samples, generator=gen, return_info=True)
    lp, extent = grid_log_density(model, data, 10_000, grid_size)
    out = Path(model.path).parent / "samples.png"
    title = f"{cfg.data.name}, step {model.step} (EMA), sampling NFE {info['nfe']}"
    return plot_2d(out, data, x.cpu().numpy(), lp, extent, title)
