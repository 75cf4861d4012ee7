"""The built-in recipes of the Python API, equal to the repository's YAML files (tests keep them equal), so that a
user's clone needs no ``configs/`` folder: ``TABULAR`` is ``configs/tabular.yaml`` (``flows.fit`` of a table) and
``POSTERIOR`` ``configs/posterior.yaml`` (``flows.fit`` with a context, ``flows.infer``), less ``data.path``."""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["TABULAR", "POSTERIOR", "recipe"]

_TRAIN: dict[str, Any] = {
    "steps": 1_000_000,
    "time_limit": 4,
    "batch_size": 256,
    "lr": 3.0e-3,
    "warmup_steps": 10,
    "schedule": "cosine",
    "grad_clip": 0,
    "eval_every": 0,
    "evals_per_budget": 20,
    "patience": 10,
    "members": 8,
    "log_every": 50,
    "save_every": 5000,
}
_MODEL: dict[str, Any] = {"hidden": [128, 128, 128], "activation": "tanh", "time_features": 16}

TABULAR: dict[str, Any] = {
    "run_dir": "runs/tabular",
    "data": {"name": "tabular", "test_fraction": 0.2, "val_fraction": 0.1},
    "model": _MODEL,
    "objective": {"name": "fm", "path": "condot"},
    "train": _TRAIN,
    "eval": {"trace": "exact", "periodic_size": 5000},
}

POSTERIOR: dict[str, Any] = {
    "run_dir": "runs/posterior",
    "data": {"name": "tabular", "test_fraction": 0.1, "val_fraction": 0.1},
    "model": _MODEL,
    "objective": {"name": "fm", "path": "condot", "coupling": "independent"},
    "train": {**_TRAIN, "patience": 5},
    "eval": {"trace": "exact", "periodic_size": 5000},
}


def recipe(name: str) -> dict[str, Any]:
    """A fresh copy of a built-in recipe ("tabular" or "posterior")."""
    return copy.deepcopy({"tabular": TABULAR, "posterior": POSTERIOR}[name])
