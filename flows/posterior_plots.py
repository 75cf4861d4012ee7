"""Pictures of a posterior: a pair plot of samples (corner plot) and the calibration checks.

Drawn with ``matplotlib.figure.Figure`` (no pyplot), like :mod:`flows.plotting`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from flows.files import atomic_write

__all__ = ["plot_corner", "plot_calibration", "save_calibration"]

MAX_PARAMETERS = 10  # a pair plot draws the first ten parameters


def plot_corner(
    path: str | Path, samples: np.ndarray, truth: np.ndarray | None = None, title: str = "", bins: int = 50
) -> Path:
    """Pairs of parameters of ``samples`` (N, D): histograms of each on the diagonal, 2-D histograms below it;
    ``truth`` (D,) marked where given."""
    samples = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)[:, :MAX_PARAMETERS]
    d = samples.shape[1]
    lo, hi = np.quantile(samples, 0.002, axis=0), np.quantile(samples, 0.998, axis=0)
    hi = np.where(hi > lo, hi, lo + 1)
    fig = Figure(figsize=(1.9 * d + 1, 1.9 * d + 1))
    axes = fig.subplots(d, d, squeeze=False)
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            if j > i:
                ax.set_axis_off()
                continue
            if i == j:
                ax.hist(samples[:, i], bins=bins, range=(lo[i], hi[i]), color="tab:blue", histtype="stepfilled")
                ax.set_yticks([])
            else:
                ax.hist2d(samples[:, j], samples[:, i], bins=bins, range=[[lo[j], hi[j]], [lo[i], hi[i]]], cmap="Blues")
                if truth is not None:
                    ax.plot(truth[j], truth[i], "x", color="tab:red", ms=8)
            if truth is not None and i == j:
                ax.axvline(truth[i], color="tab:red", lw=1)
            if i == d - 1:
                ax.set_xlabel(f"θ{j}")
            else:
                ax.set_xticklabels([])
            if j == 0 and i > 0:
                ax.set_ylabel(f"θ{i}")
            elif j > 0:
                ax.set_yticklabels([])
    fig.suptitle(title or f"posterior: {len(samples):,} samples")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return Path(path)


def plot_calibration(path: str | Path, calibration: Any) -> Path:
    """Expected coverage of HPD regions against the level, with the 95% band of N calibrated pairs (pointwise,
    binomial; dashed: simultaneous, DKW), beside the SBC rank histogram of each parameter."""
    levels, coverage = calibration.coverage()
    n, d = calibration.n, calibration.sbc.shape[1]
    shown = min(d, MAX_PARAMETERS)
    cols = min(shown, 5)
    rows = math.ceil(shown / cols)
    fig = Figure(figsize=(4.5 + 2.2 * cols, max(4.2, 2.2 * rows)))
    grid = fig.add_gridspec(rows, cols + 2)
    ax = fig.add_subplot(grid[:, :2])
    band = 1.96 * np.sqrt(levels * (1 - levels) / n)
    ax.fill_between(levels, levels - band, levels + band, color="0.85", label="95% band (calibrated)")
    ax.plot(levels, levels + calibration.band, "k--", lw=0.7)
    ax.plot(levels, levels - calibration.band, "k--", lw=0.7)
    ax.plot(levels, coverage, color="tab:blue", lw=2, label="empirical coverage")
    ax.plot([0, 1], [0, 1], "k", lw=0.8)
    summary = calibration.summary()
    ax.set_title(f"{summary['verdict']}: largest error {summary['coverage_error_max']:.3f} ({n:,} pairs)")
    ax.set_xlabel("credibility level of the HPD region")
    ax.set_ylabel("share of true parameters inside")
    ax.legend(loc="upper left", fontsize=8)
    bins = 20
    expected = n / bins
    for k in range(shown):
        axk = fig.add_subplot(grid[k // cols, 2 + k % cols])
        axk.hist(calibration.sbc[:, k], bins=bins, range=(0, 1), color="tab:blue", edgecolor="white", zorder=2)
        sd = math.sqrt(expected * (1 - 1 / bins))
        axk.axhspan(expected - 1.96 * sd, expected + 1.96 * sd, color="0.85", zorder=1)
        axk.set_title(f"SBC θ{k} (p={summary['sbc_p_values'][k]:.2f})", fontsize=9)
        axk.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return Path(path)


def save_calibration(path: str | Path, calibration: Any, **extra: Any) -> dict[str, Any]:
    """The checks' summary (with ``extra`` entries) as JSON at ``path``, and their picture beside it (``.png``)."""
    path = Path(path)
    summary = calibration.summary() | extra
    atomic_write(path, json.dumps(summary, indent=2))
    plot_calibration(path.with_suffix(".png"), calibration)
    return summary
