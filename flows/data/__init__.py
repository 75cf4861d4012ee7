"""Datasets as in-memory tensors: raw train / test splits (N, *shape) plus the preprocessing to model space.

Every kind registers itself (``flows.data.registry``) in the module that reads it: the 2D toys
(``toy2d``), images (``images``: MNIST, CIFAR-10, IDX folders), tables and digits (``tables``) and the
MAF / FFJORD suite (``suite``).
"""

from __future__ import annotations

from torch import Tensor

from flows.data import images, suite, tables, toy2d  # noqa: F401 (each registers its datasets)
from flows.data.images import image_preprocess
from flows.data.registry import DATASETS, Data, DataConfig, build_data
from flows.data.tables import load_array
from flows.data.toy2d import sample_toy
from flows.errors import DataError
from flows.preprocess import Preprocess, bits_per_dim

__all__ = [
    "Data",
    "DataConfig",
    "DATASETS",
    "build_data",
    "check_shape",
    "load_array",
    "bits_per_dim",
    "Preprocess",
    "sample_toy",
    "image_preprocess",
]


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
