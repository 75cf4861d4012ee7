"""Pictures of a finished 2D run: data, samples and the model density side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flows import checkpoint
from flows.data import build_data
from flows.likelihood import log_prob_chunked
from flows.plotting import grid, plot_2d
from flows.sampling import sample

__all__ = ["plot_run"]


def plot_run(run: str | Path, n_samples: int = 20_000, grid_size: int = 120, seed: int = 0) -> Path:
    """Write ``run/samples.png`` (data | samples | density) for a 2D model; returns its path."""
    loaded = checkpoint.load(run)
    cfg, pre = loaded.config, loaded.preprocess
    data = build_data(cfg.data).test.numpy()
    gen = torch.Generator().manual_seed(seed)
    res = sample(loaded.field, n_samples, (loaded.dim,), cfg.eval.solver, generator=gen)
    x, nfe = res.x, res.nfe
    points, extent = grid(data, grid_size)
    lp, _ = log_prob_chunked(loaded.field, pre(torch.from_numpy(points)), cfg.eval.solver, "exact", 10_000)
    lp = lp + pre.log_det(loaded.dim)
    out = Path(loaded.path).parent / "samples.png"
    title = f"{cfg.data.name}, step {loaded.step} (EMA), sampling NFE {nfe}"
    return plot_2d(out, data, pre.inverse(x).numpy(), lp.numpy().astype(np.float64), extent, title)
