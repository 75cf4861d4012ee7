"""Tables and small offline sets: your own ``.npy``/``.npz`` table (``data.name=tabular``) and the 8x8
digits of scikit-learn (``data.name=digits``), with seeded test / validation splits.

A table can carry a context (conditional density estimation, posterior estimation): an array of the same
``.npz`` (``data.key`` modelled, ``data.context_key`` the context, one row each; further dimensions are
flattened) or columns of the table (``data.context_columns``). The rows and their contexts are split
together. ``data.bounds`` declares the box of the modelled columns (a simulator's prior).
"""

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

    digits = load_digits()
    values = torch.from_numpy(digits.data.astype(np.float32))  # (1797, 64), 0..16
    labels = torch.from_numpy(digits.target.astype(np.float32))[:, None]
    rows = torch.cat([values, labels], 1)  # split together
    train, test = _split(rows, cfg.test_fraction, cfg.seed)
    train, val = _hold_out(train, cfg.val_fraction, cfg.seed)
    (train, train_y), (test, test_y) = _last_column(train), _last_column(test)
    val, val_y = _last_column(val) if val is not None else (None, None)
    if cfg.image:
        pre = image_preprocess(17, cfg.logit_alpha)
        image = (-1, 1, 8, 8)
        train, test, val = train.reshape(image), test.reshape(image), val.reshape(image) if val is not None else None
    else:  # dequantized values lie in [0, 1); one global shift/scale (some pixels are always 0)
        y = (train + 0.5) / 17
        pre = Preprocess(y.mean(), y.std(), levels=17)
    if not cfg.labels:
        return Data("digits", train, test, pre, val)
    return Data("digits", train, test, pre, val, train_y, val_y, test_y, classes=10)


def _last_column(rows: Tensor) -> tuple[Tensor, Tensor]:
    return rows[:, :-1], rows[:, -1].long()


def build_tabular(cfg: DataConfig) -> Data:
    """An (N, D) table: the test rows from ``test_path`` or a seeded ``test_fraction``; validation rows from
    ``val_path`` or ``val_fraction`` of the training rows; standardized on the training rows (after the
    bounds' logit, with ``data.bounds``). With a context, each row's context travels with it."""
    values, width = _rows(cfg.path, cfg)  # the modelled columns first, then the context's
    if cfg.test_path:
        train, test = values, _same_columns(_rows(cfg.test_path, cfg)[0], values, cfg.test_path, cfg.path)
    else:
        train, test = _split(values, cfg.test_fraction, cfg.seed)
    if cfg.val_path:
        val = _same_columns(_rows(cfg.val_path, cfg)[0], values, cfg.val_path, cfg.path)
    else:
        train, val = _hold_out(train, cfg.val_fraction, cfg.seed + 1)
    (train, train_c), (test, test_c) = (
        train.split([width, train.shape[1] - width], 1),
        test.split([width, test.shape[1] - width], 1),
    )
    val, val_c = val.split([width, val.shape[1] - width], 1) if val is not None else (None, None)
    if cfg.dequantize:
        train, val, test = _dequantize_integer_columns(train, val, test, cfg.seed)
    pre = _standardize(train, _bounds(cfg, train, val, test), cfg.path)
    if not train_c.shape[1]:
        return Data("tabular", train, test, pre, val)
    shape = tuple(cfg.context_shape or ())
    if shape and shape[0] * shape[1] != train_c.shape[1]:
        raise DataError(
            f"data.context_shape={list(shape)} holds {shape[0] * shape[1]} numbers, but each context of '{cfg.path}' "
            f"has {train_c.shape[1]}: give [M, d] with M trials of d numbers."
        )
    return Data("tabular", train, test, pre, val, train_c, val_c, test_c, context_shape=shape)


def _rows(path: str | None, cfg: DataConfig) -> tuple[Tensor, int]:
    """(the modelled columns then the context's, one row per data point; the number of modelled columns)."""
    values = load_array(path, key=cfg.key)
    if cfg.context_key:
        context = load_array(path, ndim=None, key=cfg.context_key).flatten(1)
        if len(context) != len(values):
            raise DataError(
                f"'{path}': {len(values)} rows in '{cfg.key or 'the first array'}' but {len(context)} in "
                f"data.context_key='{cfg.context_key}': one context per row is needed."
            )
        return torch.cat([values, context], 1), values.shape[1]
    if cfg.context_columns:
        d = values.shape[1]
        bad = [c for c in cfg.context_columns if not -d <= c < d]
        if bad or len({c % d for c in cfg.context_columns}) >= d:
            raise DataError(
                f"data.context_columns={cfg.context_columns}: '{path}' has {d} columns (0..{d - 1}); the context "
                "must name existing columns and leave at least one to model."
            )
        chosen = sorted({c % d for c in cfg.context_columns})
        kept = [c for c in range(d) if c not in chosen]
        return torch.cat([values[:, kept], values[:, chosen]], 1), len(kept)
    return values, values.shape[1]


def _bounds(cfg: DataConfig, *splits: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """``data.bounds`` as (low, high) per modelled column (±inf: unbounded); every row must lie strictly inside."""
    if cfg.bounds is None:
        return None
    d = splits[0].shape[1]
    pairs = cfg.bounds if len(cfg.bounds) != 1 or d == 1 else cfg.bounds * d  # one pair: every column
    if len(pairs) != d:
        raise DataError(
            f"data.bounds has {len(pairs)} pairs for {d} modelled columns: give one [lo, hi] (or null) each."
        )
    low = torch.tensor([p[0] if p else -float("inf") for p in pairs], device="cpu")
    high = torch.tensor([p[1] if p else float("inf") for p in pairs], device="cpu")
    for name, x in zip(("training", "validation", "test"), splits, strict=True):
        if x is None:
            continue
        outside = (x <= low) | (x >= high)
        if outside.any():
            row, col = (int(i) for i in outside.nonzero()[0])
            raise DataError(
                f"{name} row {row}, column {col}: value {float(x[row, col])} is not inside data.bounds "
                f"({float(low[col])}, {float(high[col])}); the bounds must contain every row strictly."
            )
    return low, high


def _standardize(train: Tensor, bounds: tuple[Tensor, Tensor] | None, path: str | None) -> Preprocess:
    """Standardization on the training rows (after the bounds' logit); a constant column is refused."""
    low, high = bounds if bounds is not None else (None, None)
    free = Preprocess(
        torch.zeros(train.shape[1], device="cpu"), torch.ones(train.shape[1], device="cpu"), None, 0.0, low, high
    )
    y = free(train)
    std = y.std(0) if len(y) > 1 else torch.zeros(y.shape[1], device="cpu")
    if (std == 0).any():
        cols = (std == 0).nonzero().flatten().tolist()
        raise DataError(
            f"{path}: column(s) {cols[:10]} are constant in the training rows ({len(train)} rows): a density "
            "cannot be fitted along a constant column. Drop them from the table."
        )
    return Preprocess(y.mean(0), std, None, 0.0, low, high)


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


def load_array(path: str | Path | None, ndim: int | None = 2, key: str | None = None) -> Tensor:
    """Load an (N, D) float array (or (N, ...) with ``ndim=None``) from .npy or .npz (the array ``key``, default
    the first), refusing NaN/Inf rows. A 1-D array (N,) is one column, (N, 1)."""
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
            if key is not None and key not in loaded.files:
                raise DataError(f"data file '{path}' has no array '{key}'; it holds: {', '.join(loaded.files)}.")
            array = loaded[key or loaded.files[0]]
        else:
            if key is not None:
                raise DataError(f"data file '{path}' is a .npy (one array): data.key and data.context_key need a .npz.")
            array = loaded
    except (ValueError, OSError) as e:
        raise DataError(f"cannot read data file '{path}': {e}") from None
    if array.ndim == 1 and ndim in (2, None):  # one column (a 1-D parameter or context): (N,) -> (N, 1)
        array = array[:, None]
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


register_dataset("digits", build_digits, image_shape=(1, 8, 8), context="labels")  # 64-D vectors drawn as 8x8 images
register_dataset("tabular", build_tabular, needs_path="FILE.npy (or .npz)", context="vector")
