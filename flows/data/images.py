"""Image datasets as uint8 tensors (N, C, H, W): torchvision's MNIST and CIFAR-10, and IDX files.

MNIST and CIFAR-10 go through torchvision (its real download code, off by default: our machines
have no internet); an IDX folder (e.g. the MNIST test split, as torchvision's ``raw/`` folder holds it) is read
directly, gzip or not. With ``data.labels`` the class labels come along (an IDX folder: the
``*labels-idx1-ubyte[.gz]`` file beside each images file).
"""

from __future__ import annotations

import gzip
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flows.data.registry import Data, DataConfig, register_dataset
from flows.errors import DataError
from flows.preprocess import Preprocess

__all__ = ["load_torchvision", "read_idx_images", "read_idx_labels", "load_idx_folder", "image_preprocess"]


def load_torchvision(name: str, root: str, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train, test, train labels, test labels): uint8 tensors (N, C, H, W) of torchvision's MNIST or CIFAR-10
    under ``root``, and int64 labels (N,)."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[name]
    splits, labels = [], []
    for train in (True, False):
        try:
            ds = cls(root, train=train, download=download)
        except (RuntimeError, OSError) as e:
            hint = (
                "set data.download=true to fetch it (needs internet)"
                if not download
                else "check the internet connection and the folder's permissions"
            )
            raise DataError(
                f"cannot load {name} ({'train' if train else 'test'} split) from '{root}': {e} "
                f"Put torchvision's files under data.root, or {hint}. Offline alternatives: "
                "data.name=idx data.path=FOLDER (IDX files), or data.name=digits data.image=true."
            ) from None
        images = torch.as_tensor(np.asarray(ds.data), device="cpu")
        images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)  # MNIST (N,H,W); CIFAR NHWC
        splits.append(images.contiguous())
        labels.append(torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64, device="cpu"))
    return splits[0], splits[1], labels[0], labels[1]


def _read_idx(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read IDX file '{path}': {e}") from None


def read_idx_labels(path: str | Path) -> Tensor:
    """An IDX label file (magic 2049, optionally gzip-compressed) → int64 tensor (N,)."""
    path = Path(path)
    raw = _read_idx(path)
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != 2049:
        raise DataError(f"'{path}' is not an IDX label file (magic number 2049 expected).")
    n = int.from_bytes(raw[4:8], "big")
    if len(raw) != 8 + n:
        raise DataError(f"IDX label file '{path}' is truncated: header says {n} labels, {len(raw) - 8} bytes.")
    return torch.from_numpy(np.frombuffer(raw, np.uint8, offset=8).astype(np.int64))


def read_idx_images(path: str | Path) -> Tensor:
    """An IDX image file (magic 2051, optionally gzip-compressed) → uint8 tensor (N, 1, H, W)."""
    path = Path(path)
    raw = _read_idx(path)
    if len(raw) < 16 or int.from_bytes(raw[:4], "big") != 2051:
        raise DataError(f"'{path}' is not an IDX image file (magic number 2051 expected).")
    n, h, w = (int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in (1, 2, 3))
    if len(raw) != 16 + n * h * w or n == 0:
        raise DataError(f"IDX file '{path}' is truncated: header says {n}x{h}x{w}, {len(raw) - 16} bytes of pixels.")
    return torch.from_numpy(np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, h, w).copy())


def load_idx_folder(folder: str | Path, labels: bool = False) -> tuple[Tensor, Tensor | None]:
    """All ``*images-idx3-ubyte[.gz]`` files of a folder, concatenated in name order; with ``labels``, the
    ``*labels-idx1-ubyte[.gz]`` file of each (the same name with ``labels-idx1`` for ``images-idx3``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data.path '{folder}' is not a folder (expected one holding *-images-idx3-ubyte[.gz]).")
    files = sorted(p for p in folder.iterdir() if p.name.endswith(("images-idx3-ubyte", "images-idx3-ubyte.gz")))
    if not files:
        raise DataError(f"no *-images-idx3-ubyte[.gz] file in '{folder}'.")
    parts = [read_idx_images(p) for p in files]
    if len({p.shape[1:] for p in parts}) > 1:
        raise DataError(f"the IDX files in '{folder}' hold images of different sizes.")
    if not labels:
        return torch.cat(parts), None
    ys = []
    for p, images in zip(files, parts, strict=True):
        name = p.name.replace("images-idx3-ubyte", "labels-idx1-ubyte")
        found = [q for q in (folder / name, folder / name.removesuffix(".gz"), folder / f"{name}.gz") if q.is_file()]
        if not found:
            raise DataError(f"data.labels: no label file '{name}' beside '{p.name}' in '{folder}'.")
        y = read_idx_labels(found[0])
        if len(y) != len(images):
            raise DataError(f"'{found[0].name}' holds {len(y)} labels for the {len(images)} images of '{p.name}'.")
        ys.append(y)
    return torch.cat(parts), torch.cat(ys)


def image_preprocess(levels: int, logit_alpha: float) -> Preprocess:
    """Dequantize to [0, 1); then logit(alpha + (1 - 2 alpha) y) if alpha > 0, else scale to [-1, 1)."""
    if logit_alpha > 0:
        return Preprocess(torch.tensor(0.0, device="cpu"), torch.tensor(1.0, device="cpu"), levels, logit_alpha)
    return Preprocess(torch.tensor(0.5, device="cpu"), torch.tensor(0.5, device="cpu"), levels)


def build_torchvision(name: str, cfg: DataConfig) -> Data:
    train, test, train_y, test_y = load_torchvision(name, cfg.root, cfg.download)
    pre = image_preprocess(256, cfg.logit_alpha)
    if not cfg.labels:
        return Data(name, train, test, pre)
    return Data(name, train, test, pre, None, train_y, None, test_y, classes=_classes(train_y, test_y))


def _classes(*labels: Tensor) -> int:
    """The number of classes: the largest label + 1."""
    return int(max(int(y.max()) for y in labels)) + 1


def build_idx(cfg: DataConfig) -> Data:
    """The images of an IDX folder; the last ``data.test_fraction`` of them held out."""
    images, labels = load_idx_folder(cfg.path, cfg.labels)
    n_test = max(1, round(len(images) * cfg.test_fraction))
    if len(images) - n_test < 1:
        raise DataError(f"'{cfg.path}' holds {len(images)} images: too few to split into train and test.")
    pre = image_preprocess(256, cfg.logit_alpha)
    if labels is None:
        return Data("idx", images[:-n_test], images[-n_test:], pre)
    train_y, test_y = labels[:-n_test], labels[-n_test:]
    return Data("idx", images[:-n_test], images[-n_test:], pre, None, train_y, None, test_y, classes=_classes(labels))


register_dataset("mnist", partial(build_torchvision, "mnist"), context="labels")
register_dataset("cifar10", partial(build_torchvision, "cifar10"), context="labels")
register_dataset("idx", build_idx, needs_path="FOLDER holding *-images-idx3-ubyte[.gz] files", context="labels")
