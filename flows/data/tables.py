"""Tables and small offline sets: your own ``.npy``/``.npz`` table (``data.name=tabular``) and the 8x8
digits of scikit-learn (``data.name=digits``), with seeded test / validation splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flows.data.images import image_preprocess
from flows.data.registry import Data, DataConfig, register_dataset
from flows.errors import DataError
from flows.preprocess import Preprocess

__all__ = ["build_digits", "build_tabular", "load_array"]


def build_digits(cfg: DataConfig) -> Data:
    """scikit-learn's 1,797 8x8 digits (levels 0..16, offline): 64-D vectors, or (1, 8, 8) images with
    ``data.image``; a seeded ``data.test_fraction`` held out (and ``data.val_fraction`` of the rest)."""
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


register_dataset("digits", build_digits, image_shape=(1, 8, 8))  # 64-D vectors drawn as 8x8 images
register_dataset("tabular", build_tabular, needs_path="FILE.npy (or .npz)")
