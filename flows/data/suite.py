"""The standard tabular suite of MAF, FFJORD and OT-Flow: POWER, GAS, HEPMASS, MINIBOONE, BSDS300.

Files: the preprocessed archive of Papamakarios et al. (MAF), https://zenodo.org/record/1161203
(``data.tar.gz``), unpacked so that ``data.root`` holds ``power/data.npy``, ``gas/ethylene_CO.pickle``,
``hepmass/1000_{train,test}.csv``, ``miniboone/data.npy`` and ``BSDS300/BSDS300.hdf5``. Each loader
applies that paper's cleaning, splits and normalization, so test NLLs compare with the published
ones (nats, in these normalized units). Returns float32 (train, validation, test) arrays.

GAS is a pandas pickle: reading it runs code from the file, so it needs ``data.allow_pickle=true``
(and pandas); BSDS300 needs h5py.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import torch

from flows.data.registry import Data, DataConfig, register_dataset
from flows.errors import DataError
from flows.preprocess import Preprocess

__all__ = ["SUITE", "SUITE_FILES", "load_suite", "build_suite"]

SUITE_FILES = {
    "power": ("power/data.npy",),
    "gas": ("gas/ethylene_CO.pickle",),
    "hepmass": ("hepmass/1000_train.csv", "hepmass/1000_test.csv"),
    "miniboone": ("miniboone/data.npy",),
    "bsds300": ("BSDS300/BSDS300.hdf5",),
}
SUITE = tuple(SUITE_FILES)
Splits = tuple[np.ndarray, np.ndarray, np.ndarray]


def _tail_splits(data: np.ndarray) -> Splits:
    """The last 10% is the test split, the last 10% of the rest the validation split (MAF)."""
    n_test = int(0.1 * len(data))
    test, rest = data[-n_test:], data[:-n_test]
    n_val = int(0.1 * len(rest))
    return rest[:-n_val], rest[-n_val:], test


def _normalize(train: np.ndarray, val: np.ndarray, test: np.ndarray, ddof: int = 0) -> Splits:
    both = np.vstack((train, val))
    mu, s = both.mean(0), both.std(0, ddof=ddof)
    return (train - mu) / s, (val - mu) / s, (test - mu) / s


def _power(root: Path) -> Splits:
    rng = np.random.RandomState(42)
    data = np.load(root / "power/data.npy")
    rng.shuffle(data)
    n = len(data)
    data = np.delete(np.delete(data, 3, axis=1), 1, axis=1)  # drop the two discrete-valued columns
    noise = np.hstack(  # uniform dequantization of the recorded precision of each column
        (0.001 * rng.rand(n, 1), 0.01 * rng.rand(n, 1), rng.rand(n, 3), np.zeros((n, 1)))
    )
    return _normalize(*_tail_splits(data + noise))


def _gas(root: Path, allow_pickle: bool) -> Splits:
    if not allow_pickle:
        raise DataError(
            "GAS is published as a pandas pickle (gas/ethylene_CO.pickle), and unpickling runs code from the "
            "file. If you trust your copy (e.g. the MAF archive from zenodo.org/record/1161203), set "
            "data.allow_pickle=true."
        )
    try:
        import pandas as pd
    except ImportError:
        raise DataError("reading GAS needs pandas: pip install pandas") from None
    data = pd.read_pickle(root / "gas/ethylene_CO.pickle").drop(columns=["Meth", "Eth", "Time"])
    while True:  # drop columns correlated above 0.98 with another one, first ones first
        counts = (data.corr() > 0.98).to_numpy().sum(1)
        if not (counts > 1).any():
            break
        data = data.drop(columns=data.columns[int(np.argmax(counts > 1))])
    data = ((data - data.mean()) / data.std()).to_numpy()  # pandas: sample std
    return _tail_splits(data)


def _hepmass(root: Path) -> Splits:
    def read(name: str) -> np.ndarray:
        rows = np.loadtxt(root / "hepmass" / name, delimiter=",", skiprows=1, ndmin=2)
        return rows[rows[:, 0] == 1][:, 1:]  # signal events only, without the label

    train, test = read("1000_train.csv"), read("1000_test.csv")[:, :-1]  # the test file has one extra column
    mu, s = train.mean(0), train.std(0, ddof=1)
    train, test = (train - mu) / s, (test - mu) / s
    # drop features with too many repeated values (as published: the count of the smallest value > 5)
    keep = [i for i, col in enumerate(train.T) if Counter(col)[col.min()] <= 5]
    train, test = train[:, keep], test[:, keep]
    n_val = int(0.1 * len(train))
    return train[:-n_val], train[-n_val:], test


def _miniboone(root: Path) -> Splits:
    return _normalize(*_tail_splits(np.load(root / "miniboone/data.npy")))


def _bsds300(root: Path) -> Splits:
    try:
        import h5py
    except ImportError:
        raise DataError("reading BSDS300 needs h5py: pip install h5py") from None
    with h5py.File(root / "BSDS300/BSDS300.hdf5", "r") as f:
        return f["train"][()], f["validation"][()], f["test"][()]


def load_suite(name: str, root: str | Path, allow_pickle: bool = False) -> Splits:
    """(train, validation, test) float32 arrays of a suite dataset under ``root``."""
    root = Path(root)
    missing = [f for f in SUITE_FILES[name] if not (root / f).is_file()]
    if missing:
        raise DataError(
            f"data.name={name}: {', '.join(str(root / f) for f in missing)} not found. The standard suite comes "
            "from the preprocessed archive of the MAF paper (Papamakarios et al. 2017), "
            "https://zenodo.org/record/1161203 (data.tar.gz); unpack it and set data.root to the folder that "
            f"holds {', '.join(SUITE_FILES[name])}."
        )
    loader = {"power": _power, "hepmass": _hepmass, "miniboone": _miniboone, "bsds300": _bsds300}.get(name)
    try:
        splits = _gas(root, allow_pickle) if name == "gas" else loader(root)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed file, whatever the parser raises
        raise DataError(f"data.name={name}: cannot read the files under '{root}': {type(e).__name__}: {e}") from None
    return tuple(np.ascontiguousarray(s, dtype=np.float32) for s in splits)


def build_suite(name: str, cfg: DataConfig) -> Data:
    """The published train / validation / test splits under ``data.root``, standardized on the training rows."""
    train, val, test = (torch.from_numpy(a) for a in load_suite(name, cfg.root, cfg.allow_pickle))
    return Data(name, train, test, Preprocess(train.mean(0), train.std(0)), val)


for _name in SUITE_FILES:
    register_dataset(_name, partial(build_suite, _name))
