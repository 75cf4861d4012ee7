"""Datasets as in-memory tensors: raw train / test splits plus the preprocessing to model space."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flows.config import TOY_DATASETS, DataConfig
from flows.data.preprocess import Preprocess, bits_per_dim
from flows.data.toy2d import sample_toy
from flows.errors import DataError

__all__ = ["VectorData", "build_data", "bits_per_dim", "Preprocess", "sample_toy"]


@dataclass
class VectorData:
    name: str
    train: Tensor  # raw values, (N, D)
    test: Tensor
    preprocess: Preprocess

    @property
    def dim(self) -> int:
        return self.train.shape[1]


def build_data(cfg: DataConfig) -> VectorData:
    if cfg.name in TOY_DATASETS:
        train = torch.from_numpy(sample_toy(cfg.name, cfg.train_size, cfg.seed))
        test = torch.from_numpy(sample_toy(cfg.name, cfg.test_size, cfg.test_seed))
        identity = Preprocess(torch.tensor(0.0), torch.tensor(1.0))
        return VectorData(cfg.name, train, test, identity)
    if cfg.name == "digits":
        from sklearn.datasets import load_digits

        values = torch.from_numpy(load_digits().data.astype(np.float32))  # (1797, 64), 0..16
        train, test = _split(values, cfg.test_fraction, cfg.seed)
        # dequantized values lie in [0, 1); one global shift/scale (some pixels are always 0)
        y = (train + 0.5) / 17
        pre = Preprocess(y.mean(), y.std(), levels=17)
        return VectorData("digits", train, test, pre)
    if cfg.name == "tabular":
        values = load_array(cfg.path)
        train, test = _split(values, cfg.test_fraction, cfg.seed)
        std = train.std(0)
        if (std == 0).any():
            col = int((std == 0).nonzero()[0])
            raise DataError(f"{cfg.path}: column {col} is constant in the training split; drop it.")
        return VectorData("tabular", train, test, Preprocess(train.mean(0), std))
    raise DataError(f"unknown dataset {cfg.name!r}")


def _split(values: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(len(values), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(len(values) * test_fraction))
    if len(values) - n_test < 1:
        raise DataError(f"only {len(values)} rows: too few to split into train and test.")
    return values[perm[n_test:]], values[perm[:n_test]]


def load_array(path: str | Path | None) -> Tensor:
    """Load an (N, D) float array from .npy or .npz (first array), refusing NaN/Inf rows."""
    if path is None:
        raise DataError("no data file given: set data.path=FILE.npy")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist.")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            if not loaded.files:
                raise DataError(f"data file '{path}' holds no arrays.")
            array = loaded[loaded.files[0]]
        else:
            array = loaded
    except (ValueError, OSError) as e:
        raise DataError(f"cannot read data file '{path}': {e}") from None
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"data file '{path}' must hold a non-empty 2D array (N, D), got {array.shape}.")
    if not np.issubdtype(array.dtype, np.number):
        raise DataError(f"data file '{path}' holds {array.dtype}, not numbers.")
    bad = ~np.isfinite(array).all(1)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(
            f"data file '{path}' has NaN or Inf values: first bad row {row}: {array[row].tolist()}"
            f" ({int(bad.sum())} bad rows in all). Clean or drop them first."
        )
    return torch.from_numpy(array.astype(np.float32))
