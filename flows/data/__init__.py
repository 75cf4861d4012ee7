"""Datasets as in-memory tensors: raw train / test splits (N, *shape) plus the preprocessing to model space."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flows.config import SUITE_DATASETS, TOY_DATASETS, DataConfig
from flows.data.images import load_idx_folder, load_torchvision
from flows.data.preprocess import Preprocess, bits_per_dim
from flows.data.suite import load_suite
from flows.data.toy2d import sample_toy
from flows.errors import DataError

__all__ = ["Data", "build_data", "check_shape", "bits_per_dim", "Preprocess", "sample_toy", "image_preprocess"]


@dataclass
class Data:
    name: str
    train: Tensor  # raw values, (N, *shape): (N, D) vectors or (N, C, H, W) images
    test: Tensor
    preprocess: Preprocess
    val: Tensor | None = None  # validation rows (model selection, early stopping), never trained on

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def dim(self) -> int:
        return math.prod(self.shape)


def image_preprocess(levels: int, logit_alpha: float) -> Preprocess:
    """Dequantize to [0, 1); then logit(alpha + (1 - 2 alpha) y) if alpha > 0, else scale to [-1, 1)."""
    if logit_alpha > 0:
        return Preprocess(torch.tensor(0.0, device="cpu"), torch.tensor(1.0, device="cpu"), levels, logit_alpha)
    return Preprocess(torch.tensor(0.5, device="cpu"), torch.tensor(0.5, device="cpu"), levels)


def build_data(cfg: DataConfig) -> Data:
    if cfg.name in TOY_DATASETS:
        train = torch.from_numpy(sample_toy(cfg.name, cfg.train_size, cfg.seed))
        test = torch.from_numpy(sample_toy(cfg.name, cfg.test_size, cfg.test_seed))
        identity = Preprocess(torch.tensor(0.0, device="cpu"), torch.tensor(1.0, device="cpu"))
        return Data(cfg.name, train, test, identity)
    if cfg.name == "digits":
        from sklearn.datasets import load_digits

        values = torch.from_numpy(load_digits().data.astype(np.float32))  # (1797, 64), 0..16
        train, test = _split(values, cfg.test_fraction, cfg.seed)
        train, val = _hold_out(train, cfg.val_fraction, cfg.seed)
        if cfg.image:
            pre = image_preprocess(17, cfg.logit_alpha)
            image = (-1, 1, 8, 8)
            val = val.reshape(image) if val is not None else None
            return Data("digits", train.reshape(image), test.reshape(image), pre, val)
        # dequantized values lie in [0, 1); one global shift/scale (some pixels are always 0)
        y = (train + 0.5) / 17
        pre = Preprocess(y.mean(), y.std(), levels=17)
        return Data("digits", train, test, pre, val)
    if cfg.name == "tabular":
        return build_tabular(cfg)
    if cfg.name in SUITE_DATASETS:
        train, val, test = (torch.from_numpy(a) for a in load_suite(cfg.name, cfg.root, cfg.allow_pickle))
        return Data(cfg.name, train, test, Preprocess(train.mean(0), train.std(0)), val)
    if cfg.name in ("mnist", "cifar10"):
        train, test = load_torchvision(cfg.name, cfg.root, cfg.download)
        return Data(cfg.name, train, test, image_preprocess(256, cfg.logit_alpha))
    if cfg.name == "idx":
        images = load_idx_folder(cfg.path)
        n_test = max(1, round(len(images) * cfg.test_fraction))
        if len(images) - n_test < 1:
            raise DataError(f"'{cfg.path}' holds {len(images)} images: too few to split into train and test.")
        return Data("idx", images[:-n_test], images[-n_test:], image_preprocess(256, cfg.logit_alpha))
    raise DataError(f"unknown dataset {cfg.name!r}")


def build_tabular(cfg: DataConfig) -> Data:
    """An (N, D) table: the test rows from ``test_path`` or a seeded ``test_fraction``; validation rows from
    ``val_path`` or ``val_fraction`` of the training rows; standardized on the training rows."""
    values = load_array(cfg.path)
    if cfg.test_path:
        train, test = values, _same_columns(load_array(cfg.test_path), values, cfg.test_path, cfg.path)
    else:
        train, test = _split(values, cfg.test_fraction, cfg.seed)
    if cfg.val_path:
        val = _same_columns(load_array(cfg.val_path), values, cfg.val_path, cfg.path)
    else:
        train, val = _hold_out(train, cfg.val_fraction, cfg.seed + 1)
    if cfg.dequantize:
        train, val, test = _dequantize_integer_columns(train, val, test, cfg.seed)
    std = train.std(0) if len(train) > 1 else torch.zeros(train.shape[1], device="cpu")
    if (std == 0).any():
        cols = (std == 0).nonzero().flatten().tolist()
        raise DataError(
            f"{cfg.path}: column(s) {cols[:10]} are constant in the training rows ({len(train)} rows): a density "
            "cannot be fitted along a constant column. Drop them from the table."
        )
    return Data("tabular", train, test, Preprocess(train.mean(0), std), val)


def _dequantize_integer_columns(
    train: Tensor, val: Tensor | None, test: Tensor, seed: int
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Columns whose training values are all integers (counts, ratings, flags) get U[0, 1) noise, drawn once:
    a density of the result bounds the probability of the discrete values, P(k) ≥ p(k + u) on average."""
    columns = (train == train.round()).all(0)
    gen = torch.Generator("cpu").manual_seed(seed + 2)

    def noisy(x: Tensor | None) -> Tensor | None:
        if x is None:
            return None
        return x + torch.rand(x.shape, generator=gen, device="cpu") * columns

    return noisy(train), noisy(val), noisy(test)


def _same_columns(other: Tensor, reference: Tensor, path: str, reference_path: str | None) -> Tensor:
    if other.shape[1] != reference.shape[1]:
        raise DataError(
            f"'{path}' has {other.shape[1]} columns but the training table '{reference_path}' has "
            f"{reference.shape[1]}: the splits must have the same columns."
        )
    return other


def _hold_out(train: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor | None]:
    """(rows kept for training, validation rows) with a seeded permutation; no validation if fraction is 0."""
    if fraction <= 0:
        return train, None
    n_val = max(1, round(len(train) * fraction))
    if len(train) - n_val < 2:
        raise DataError(f"only {len(train)} training rows: too few to hold out data.val_fraction={fraction}.")
    perm = torch.randperm(len(train), generator=torch.Generator("cpu").manual_seed(seed), device="cpu")
    return train[perm[n_val:]], train[perm[:n_val]]


def _split(values: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(len(values), generator=torch.Generator("cpu").manual_seed(seed), device="cpu")
    n_test = max(1, round(len(values) * test_fraction))
    if len(values) - n_test < 1:
        raise DataError(f"only {len(values)} rows: too few to split into train and test.")
    return values[perm[n_test:]], values[perm[:n_test]]


def load_array(path: str | Path | None, ndim: int | None = 2) -> Tensor:
    """Load an (N, D) float array (or (N, ...) with ``ndim=None``) from .npy or .npz (first array),
    refusing NaN/Inf rows."""
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
    if (ndim is not None and array.ndim != ndim) or array.ndim < 2 or 0 in array.shape:
        want = "a non-empty 2D array (N, D)" if ndim == 2 else "a non-empty array (N, ...)"
        raise DataError(f"data file '{path}' must hold {want}, got {array.shape}.")
    if not np.issubdtype(array.dtype, np.number):
        raise DataError(f"data file '{path}' holds {array.dtype}, not numbers.")
    bad = ~np.isfinite(array).reshape(len(array), -1).all(1)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(
            f"data file '{path}' has NaN or Inf values: first bad row {row}: {array[row].ravel()[:16].tolist()}"
            f" ({int(bad.sum())} bad rows in all). Clean or drop them first."
        )
    return torch.from_numpy(array.astype(np.float32))


def check_shape(raw: Tensor, shape: tuple[int, ...], source: str) -> None:
    """Refuse data whose per-sample shape is not the model's (e.g. 3 channels for a 1-channel model)."""
    got = tuple(raw.shape[1:])
    if got != tuple(shape):
        what = "images" if len(shape) == 3 else "vectors"
        raise DataError(
            f"{source}: data has shape {got} per sample; the model was trained on {what} of shape {tuple(shape)}"
            + (f" (channels: got {got[0]}, expected {shape[0]})" if len(got) == len(shape) == 3 else "")
            + ". Pass data of the model's shape."
        )
