"""Pictures of 2D models: data, samples and the learned density side by side.

Figures are drawn with ``matplotlib.figure.Figure`` (no pyplot): nothing here touches the process's
matplotlib backend, so a notebook keeps its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

__all__ = ["plot_2d", "plot_paths", "grid"]


def grid(data: np.ndarray, size: int = 150, margin: float = 0.05) -> tuple[np.ndarray, list[float]]:
    """Points of a size×size grid over the data's range; returns (points (size², 2), extent)."""
    lo, hi = np.quantile(data, 0.001, axis=0), np.quantile(data, 0.999, axis=0)
    pad = (hi - lo) * margin
    lo, hi = lo - pad, hi + pad
    xs, ys = np.linspace(lo[0], hi[0], size), np.linspace(lo[1], hi[1], size)
    xx, yy = np.meshgrid(xs, ys)
    return np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float32), [lo[0], hi[0], lo[1], hi[1]]


def plot_2d(
    path: str | Path,
    data: np.ndarray,
    samples: np.ndarray | None = None,
    log_density: np.ndarray | None = None,
    extent: list[float] | None = None,
    title: str = "",
) -> Path:
    """Data beside model samples and/or the model density (``log_density`` on ``grid``)."""
    panels = [("data", data)]
    if samples is not None:
        panels.append(("samples", samples))
    n = len(panels) + int(log_density is not None)
    fig = Figure(figsize=(4 * n, 4.2))
    axes = fig.subplots(1, n, squeeze=False)[0]
    limits = extent or [*np.quantile(data[:, 0], [0.001, 0.999]), *np.quantile(data[:, 1], [0.001, 0.999])]
    for ax, (name, pts) in zip(axes, panels, strict=False):
        ax.hist2d(pts[:, 0], pts[:, 1], bins=150, range=[limits[:2], limits[2:]], cmap="magma")
        ax.set_title(f"{name} ({len(pts):,} points)")
    if log_density is not None:
        size = int(round(np.sqrt(log_density.size)))
        axes[-1].imshow(
            np.exp(log_density.reshape(size, size)),
            origin="lower",
            extent=limits,
            cmap="magma",
            aspect="auto",
        )
        axes[-1].set_title("model density")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_paths(path: str | Path, paths: np.ndarray, log_density: np.ndarray, extent: list[float]) -> Path:
    """Sample paths (T, K, 2) from noise (dots) to data (crosses) over the model density."""
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    size = int(round(np.sqrt(log_density.size)))
    ax.imshow(np.exp(log_density.reshape(size, size)), origin="lower", extent=extent, cmap="Greys", aspect="auto")
    for k in range(paths.shape[1]):
        ax.plot(paths[:, k, 0], paths[:, k, 1], lw=0.8, alpha=0.8)
    ax.scatter(paths[0, :, 0], paths[0, :, 1], s=8, c="tab:blue", label="t=0 (noise)")
    ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=12, c="tab:red", marker="x", label="t=1 (data)")
    ax.set_xlim(extent[:2])
    ax.set_ylim(extent[2:])
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{paths.shape[1]} sample paths")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)
