"""The 2D toy densities of FFJORD's suite, generated from a seed (numpy ``default_rng``)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from sklearn.datasets import make_circles, make_moons, make_swiss_roll

from flows.data.registry import Data, DataConfig, register_dataset
from flows.errors import unknown_value
from flows.preprocess import Preprocess

__all__ = ["TOY_DENSITIES", "sample_toy", "build_toy"]


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    x1 = rng.random(n) * 4 - 2
    x2 = rng.random(n) - rng.integers(0, 2, n) * 2 + np.floor(x1) % 2
    return np.stack([x1, x2], 1) * 2


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    angles = np.arange(8) * np.pi / 4
    centers = 4 * np.stack([np.cos(angles), np.sin(angles)], 1)
    idx = rng.integers(0, 8, n)
    return (centers[idx] + 0.5 * rng.standard_normal((n, 2))) / 1.414


def _pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    classes, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    labels = rng.integers(0, classes, n)
    feats = rng.standard_normal((n, 2)) * [radial_std, tangential_std]
    feats[:, 0] += 1.0
    angles = np.linspace(0, 2 * np.pi, classes, endpoint=False)[labels] + rate * np.exp(feats[:, 0])
    c, s = np.cos(angles), np.sin(angles)
    rot = np.stack([np.stack([c, -s], 1), np.stack([s, c], 1)], 1)  # (n, 2, 2)
    return 2 * np.einsum("ni,nij->nj", feats, rot)


def _two_spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    r = np.sqrt(rng.random(n)) * 540 * (2 * np.pi) / 360
    sign = np.where(rng.random(n) < 0.5, 1.0, -1.0)[:, None]
    x = np.stack([-np.cos(r) * r + rng.random(n) * 0.5, np.sin(r) * r + rng.random(n) * 0.5], 1)
    return sign * x / 3 + 0.1 * rng.standard_normal((n, 2))


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    x = make_moons(n, noise=0.1, random_state=_seed(rng))[0]
    return (x * 2 + np.array([-1.0, -0.2]))[rng.permutation(n)]


def _circles(n: int, rng: np.random.Generator) -> np.ndarray:
    x = make_circles(n, factor=0.5, noise=0.08, random_state=_seed(rng))[0]
    return x * 3


def _swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
    x = make_swiss_roll(n, noise=1.0, random_state=_seed(rng))[0]
    return x[:, [0, 2]] / 5


def _rings(n: int, rng: np.random.Generator) -> np.ndarray:
    radius = rng.integers(1, 5, n) * 0.75  # four rings, radii 0.75 .. 3
    angle = rng.random(n) * 2 * np.pi
    x = np.stack([np.cos(angle), np.sin(angle)], 1) * radius[:, None]
    return x + 0.08 * rng.standard_normal((n, 2))


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


TOY_DENSITIES: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "checkerboard": _checkerboard,
    "8gaussians": _eight_gaussians,
    "pinwheel": _pinwheel,
    "2spirals": _two_spirals,
    "moons": _moons,
    "circles": _circles,
    "swissroll": _swissroll,
    "rings": _rings,
}


def sample_toy(name: str, n: int, seed: int) -> np.ndarray:
    """``n`` points of toy density ``name`` as a float32 array of shape (n, 2)."""
    if name not in TOY_DENSITIES:
        unknown_value("toy density", str(name), list(TOY_DENSITIES))
    return TOY_DENSITIES[name](n, np.random.default_rng(seed)).astype(np.float32)


def build_toy(name: str, cfg: DataConfig) -> Data:
    """``data.train_size`` points from ``data.seed`` and ``data.test_size`` from ``data.test_seed``, as they are."""
    train = torch.from_numpy(sample_toy(name, cfg.train_size, cfg.seed))
    test = torch.from_numpy(sample_toy(name, cfg.test_size, cfg.test_seed))
    identity = Preprocess(torch.tensor(0.0, device="cpu"), torch.tensor(1.0, device="cpu"))
    return Data(name, train, test, identity)


for _name in TOY_DENSITIES:
    register_dataset(_name, partial(build_toy, _name))
