"""The ``data.*`` settings, the in-memory dataset type, and the registry of dataset kinds.

Each dataset module registers its names here with a builder ``DataConfig -> Data`` and what it
needs (``needs_path``); ``build_data`` looks the name up. No other module tests a dataset's name.
``DataConfig`` stays one section for every kind: its keys are shared (``path`` by tables and IDX
folders, ``root`` by torchvision sets and the MAF suite, the split fractions by digits, tables and
IDX folders), and each key's comment says which kinds read it. A kind declares what it can be conditioned
on (``context``): "labels" (image sets with ``data.labels``) or "vector" (tables: ``data.context_key`` or
``data.context_columns``, and ``data.key`` / ``data.bounds``); a key that the kind does not read is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flows.context import Context
from flows.errors import ConfigError, DataError, unknown_value
from flows.preprocess import Preprocess

__all__ = ["DataConfig", "Data", "DatasetKind", "DATASETS", "register_dataset", "build_data"]


@dataclass
class DataConfig:
    name: str = "checkerboard"  # a toy density, "digits", "tabular", a MAF suite table, "mnist", "cifar10" or "idx"
    path: str | None = None  # "tabular": .npy / .npz file; "idx": a folder of *-images-idx3-ubyte[.gz] files
    root: str = "data"  # "mnist" / "cifar10": torchvision's folder; power, gas, ...: the unpacked MAF archive
    allow_pickle: bool = False  # gas: its published file is a pandas pickle (unpickling runs code from it)
    download: bool = False  # "mnist" / "cifar10": let torchvision download into root (needs internet)
    image: bool = False  # "digits": (1, 8, 8) images instead of 64-D vectors (for the U-Net)
    logit_alpha: float = 0.0  # images: > 0 models logit(alpha + (1 - 2 alpha) y); 0: y scaled to [-1, 1]
    train_size: int = 1_000_000  # toy densities: points generated for training
    test_size: int = 10_000  # toy densities: held-out points (generated with test_seed)
    test_fraction: float = 0.2  # digits / tabular / idx: share held out (idx: the last rows, as in BENCHMARKS)
    test_path: str | None = None  # tabular: a predefined test split (.npy/.npz); then data.path is all training rows
    val_path: str | None = None  # tabular: a predefined validation split (model selection, early stopping)
    val_fraction: float = 0.0  # digits / tabular: share of the training rows held out for validation
    dequantize: bool = False  # tabular: add U[0, 1) noise once (seeded) to integer-valued columns, as MAF's POWER
    labels: bool = False  # digits / mnist / cifar10 / idx: train p(x | y) on the class labels (idx: *labels-idx1-ubyte)
    key: str | None = None  # tabular .npz: the array that is modelled (default: the first array)
    context_key: str | None = None  # tabular .npz: the array of contexts, one row per row of data.key: p(x | c)
    context_columns: list[int] = field(default_factory=list)  # tabular: these columns are the context, not modelled
    bounds: list[list[float] | None] | None = None  # tabular: [lo, hi] per modelled column (null: unbounded)
    context_regression: bool = True  # tabular with a context: model the residual of a linear regression on it
    # tabular with a context: [M, d] when each context is M exchangeable i.i.d. trials of d numbers (a
    # permutation-invariant embedding; the .npz array may be (N, M, d) or (N, M*d))
    context_shape: list[int] | None = None
    seed: int = 0
    test_seed: int = 1

    def check(self, prefix: str = "data.", simulated: bool = False) -> None:
        """Each key's value, and what the kind reads; ``simulated``: the rows come from a simulator in the loop
        (``simulation.simulator``), not from ``data.path``."""
        checks = [
            (0 < self.test_fraction < 1, "test_fraction must be in (0, 1)"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (self.train_size > 0 and self.test_size > 0, "sizes must be > 0"),
            (0 <= self.logit_alpha < 0.5, "logit_alpha must be in [0, 0.5)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"invalid config value: {prefix}{message}.")
        if self.name not in DATASETS:
            unknown_value(f"{prefix}name", self.name, list(DATASETS))
        kind = DATASETS[self.name]
        needs = kind.needs_path
        if needs and not self.path and not simulated:
            raise ConfigError(f"{prefix}name={self.name} needs {prefix}path={needs}.")
        if self.labels and kind.context != "labels":
            raise ConfigError(
                f"invalid config value: {prefix}labels: {prefix}name={self.name} has no class labels (labels: digits, "
                f"mnist, cifar10, idx; a table's context: {prefix}context_key or {prefix}context_columns)."
            )
        table_keys = {"key": self.key, "context_key": self.context_key, "context_columns": self.context_columns}
        table_keys |= {"bounds": self.bounds, "context_shape": self.context_shape}
        for key, value in table_keys.items():
            if value and kind.context != "vector":
                raise ConfigError(f"invalid config value: {prefix}{key} is read by tables ({prefix}name=tabular) only.")
        if self.context_key and self.context_columns:
            raise ConfigError(
                f"invalid config value: give {prefix}context_key (an array of the .npz) or {prefix}context_columns "
                "(columns of the table), not both."
            )
        if self.context_shape and not (self.context_key or simulated):
            raise ConfigError(
                f"invalid config value: {prefix}context_shape describes the context array ({prefix}context_key) or "
                "the simulator's x (simulation.simulator)."
            )
        if self.context_shape is not None and (len(self.context_shape) != 2 or min(self.context_shape) <= 0):
            raise ConfigError(
                f"invalid config value: {prefix}context_shape must be [M, d] (M trials of d numbers), got "
                f"{self.context_shape}."
            )
        for i, pair in enumerate(self.bounds or []):
            if pair is not None and (len(pair) != 2 or not pair[0] < pair[1]):
                raise ConfigError(
                    f"invalid config value: {prefix}bounds[{i}] must be [lo, hi] with lo < hi, got {pair}."
                )


@dataclass
class Data:
    name: str
    train: Tensor  # raw values, (N, *shape): (N, D) vectors or (N, C, H, W) images
    test: Tensor
    preprocess: Preprocess
    val: Tensor | None = None  # validation rows (model selection, early stopping), never trained on
    # conditional data: the context of each row of train / val / test (raw units), (N, C) floats or (N,) labels
    train_context: Tensor | None = None
    val_context: Tensor | None = None
    test_context: Tensor | None = None
    classes: int = 0  # labels: the number of classes
    context_shape: tuple[int, ...] = ()  # a context vector: the shape of one context ((M, d): i.i.d. trials)

    def conditioning(self, label_dropout: float = 0.0, regression: bool = True) -> Context | None:
        """What a flow of these data is conditioned on (None: nothing): labels with their frequencies, or a
        context vector standardized on the training rows (a constant column keeps scale 1), with the conditional
        standardization of the modelled columns fitted on the training rows when ``regression``."""
        c = self.train_context
        if c is None:
            return None
        if self.classes:
            prior = torch.bincount(c.long(), minlength=self.classes).double()
            return Context("labels", classes=self.classes, prior=prior, dropout=label_dropout)
        shape = self.context_shape or (c.shape[1],)
        pooled = c.reshape(-1, shape[-1])  # trials: each feature's statistics pooled over the trials
        std = pooled.std(0) if len(pooled) > 1 else torch.ones(shape[-1], device="cpu")
        scale = torch.where(std > 0, std, torch.ones_like(std)).repeat(c.shape[1] // shape[-1])
        shift = pooled.mean(0).repeat(c.shape[1] // shape[-1])
        context = Context("vector", dim=c.shape[1], shift=shift, scale=scale, shape=shape)
        if regression and len(c) > 1:
            context.fit_affine(self.preprocess(self.train), context.model(c))
        return context

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def dim(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class DatasetKind:
    name: str
    build: Callable[[DataConfig], Data]
    needs_path: str = ""  # what data.path must name, if the kind reads one
    image_shape: tuple[int, ...] | None = None  # vectors that are pictures (digits: (1, 8, 8)), for sample grids
    context: str = ""  # what it can be conditioned on: "labels", "vector" (a table's context), or ""


DATASETS: dict[str, DatasetKind] = {}


def register_dataset(
    name: str,
    build: Callable[[DataConfig], Data],
    needs_path: str = "",
    image_shape: tuple[int, ...] | None = None,
    context: str = "",
) -> None:
    DATASETS[name] = DatasetKind(name, build, needs_path, image_shape, context)


def build_data(cfg: DataConfig) -> Data:
    """The raw splits and preprocessing of ``cfg.name`` (every kind registered by ``flows.data``)."""
    if cfg.name not in DATASETS:
        raise DataError(f"unknown dataset {cfg.name!r}")
    return DATASETS[cfg.name].build(cfg)
