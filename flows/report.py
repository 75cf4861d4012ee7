"""Pictures of a finished run: data, samples and density side by side (2D); a sample grid (images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flows import checkpoint
from flows.data import build_data
from flows.likelihood import log_prob_chunked
from flows.plotting import grid, plot_2d
from flows.sampling import sample

__all__ = ["plot_run", "image_grid", "save_grid", "grid_log_density"]


def save_grid(images: torch.Tensor, out: Path) -> Path:
    """Save images (N, C, H, W) in [0, 1] as one square-ish grid."""
    from torchvision.utils import save_image

    save_image(images.clamp(0, 1), out, nrow=max(1, round(len(images) ** 0.5)), padding=1)
    return out


def grid_log_density(loaded, reference: np.ndarray, solver, chunk: int, size: int = 120):
    """log p (data space, float64) of a 2D model on a size x size grid around ``reference``; (lp, extent)."""
    points, extent = grid(reference, size)
    x = loaded.preprocess(torch.from_numpy(points).to(loaded.device))
    lp, _ = log_prob_chunked(loaded.field, x, solver, "exact", chunk)
    return (lp.double() + loaded.preprocess.log_det(x)).cpu().numpy(), extent


def image_grid(run: str | Path, n: int = 64, seed: int = 0, device: torch.device | str = "cpu") -> Path:
    """Write ``run/samples_grid.png``: ``n`` samples of an image model (EMA weights)."""
    loaded = checkpoint.load(run).to(device)
    gen = torch.Generator(loaded.device).manual_seed(seed)
    res = sample(loaded.field, n, loaded.shape, loaded.config.eval.solver, generator=gen)
    return save_grid(loaded.preprocess.inverse(res.x).cpu(), Path(loaded.path).parent / "samples_grid.png")


def plot_run(
    run: str | Path, n_samples: int = 20_000, grid_size: int = 120, seed: int = 0, device: torch.device | str = "cpu"
) -> Path:
    """Write ``run/samples.png`` (data | samples | density) for a 2D model; returns its path."""
    loaded = checkpoint.load(run).to(device)
    cfg, pre = loaded.config, loaded.preprocess
    data = build_data(cfg.data).test.numpy()
    gen = torch.Generator(loaded.device).manual_seed(seed)
    res = sample(loaded.field, n_samples, loaded.shape, cfg.eval.solver, generator=gen)
    x, nfe = res.x, res.nfe
    lp, extent = grid_log_density(loaded, data, cfg.eval.solver, 10_000, grid_size)
    out = Path(loaded.path).parent / "samples.png"
    title = f"{cfg.data.name}, step {loaded.step} (EMA), sampling NFE {nfe}"
    return plot_2d(out, data, pre.inverse(x).cpu().numpy(), lp, extent, title)
