"""The calls a Python user starts from: ``flows.fit`` (arrays in memory), ``flows.train`` (a recipe) and
``flows.load`` (a run).

>>> import flows
>>> flow = flows.fit(x, train={"time_limit": 1})   # an (N, D) array or tensor; nothing kept on disk
>>> run = flows.train("configs/toy2d_fm.yaml", train={"steps": 500}, run_dir="runs/quick")
>>> model = flows.load(run)              # a run directory, a Run, or a model.safetensors file
>>> x = model.sample(10_000)             # data units, on model.device
>>> lp = model.log_prob(x)               # exact log-density, every preprocessing log-det counted
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flows.config import Config, load_config
from flows.errors import ConfigError, DataError
from flows.flow import Flow
from flows.loading import load

__all__ = ["fit", "load", "train", "Run"]

DATA_FILE = "data.npz"  # flows.fit's arrays in its run directory: x, and context when given


@dataclass
class Run:
    """A finished training run: ``flows.load(run)`` opens it."""

    path: Path  # the run directory
    config: Config
    result: dict[str, Any] = field(default_factory=dict)  # the final held-out evaluation (also eval.json)

    def __fspath__(self) -> str:
        return str(self.path)

    def load(self, weights: str = "ema", device: torch.device | str | None = None) -> Flow:
        return load(self, weights, device)

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """Every record of ``metrics.jsonl``: training steps, evaluations, skipped steps."""
        lines = (self.path / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def train(
    config: str | os.PathLike | Config | None = None,
    *,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overrides: Sequence[str] = (),
    **sections: Mapping[str, Any],
) -> Run:
    """Train a flow in this process (``accelerate launch`` a script that calls it to use several).

    Args:
        config: a YAML recipe (``configs/*.yaml``), a :class:`flows.config.Config`, or None for the
            built-in defaults. With ``resume=True`` and ``run_dir``: None (the run keeps its own
            ``config.yaml``); with ``resume=True`` and a config: the run of that config, with that config.
        run_dir: where the run is written (default: the config's ``run_dir``).
        resume: continue the latest checkpoint of ``run_dir``.
        overrides: ``"key.sub=value"`` strings, as on the command line.
        **sections: config sections as mappings, e.g. ``train={"steps": 500}, objective={"name": "fm"}``;
            every key is checked, as in a YAML file. Precedence: the config ← its ``devices`` section for the
            device this run uses (``devices.cuda``, ...) ← overrides ← sections ← run_dir.

    Returns:
        The :class:`Run`: its directory, config and final held-out evaluation.
    """
    if resume and run_dir is not None:
        if config is not None:
            raise ConfigError("flows.train(resume=True, run_dir=...) takes no config (the run keeps its own).")
        config = Path(run_dir) / "config.yaml"
    updates: dict[str, Any] = dict(sections)
    if run_dir is not None:
        updates["run_dir"] = os.fspath(run_dir)
    from flows.training.accelerator import run_device  # Accelerate loads only to train

    device, main = run_device()  # the recipe's devices section for it applies (a notice on the main process)
    cfg = load_config(config, overrides, updates, device=device, notice=main)
    if cfg.simulation.simulator:  # a simulator in the loop (flows.inference): simulate, then train on the pairs
        from flows.inference import prior_of, run_inference, simulator_of

        root = run_inference(cfg, simulator_of(cfg), prior_of(cfg), resume)
        return Run(root, cfg, json.loads((root / "eval.json").read_text()))
    from flows.training.fit import fit  # the trainer (Accelerate, the objectives) loads only to train

    return Run(Path(cfg.run_dir), cfg, fit(cfg, resume))


def fit(
    x: Any,
    context: Any = None,
    *,
    config: str | os.PathLike | Config | None = None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overrides: Sequence[str] = (),
    **sections: Mapping[str, Any],
) -> Flow:
    """Fit a flow to the rows of ``x`` in memory: p(x), or p(x | c) with one ``context`` row per row of x.

    The same road as a file: ``x`` becomes a table (``data.name=tabular``) with the recipe's seeded test and
    validation splits, time budget, selection on validation, early stopping, mixtures of members and, under 1,000
    training rows, cross-validation (README: "Your own table"). Pre-simulated pairs for posterior estimation are
    ``flows.fit(theta, context=x)``.

    Args:
        x: an (N, D) array or tensor (a 1-D array is one column); finite values.
        context: None, or (N, ...) contexts, one per row of ``x`` (a simulator's outputs for its parameters ``x``);
            M i.i.d. trials of d numbers each: ``data={"context_shape": [M, d]}``.
        config: a recipe (a YAML file or a :class:`flows.Config`); default: ``configs/tabular.yaml``'s, built in
            (flow matching, a 4-minute budget), or ``configs/posterior.yaml``'s with a context.
        run_dir: where the run is kept (the arrays too, as ``RUN/data.npz``, so ``evaluate.py``, ``sample.py`` and
            a resume work on it as on any run). None: a temporary directory, removed before ``fit`` returns; the
            flow lives in memory (``flow.path`` is None) and nothing is kept on disk.
        resume: continue a killed run in ``run_dir`` (the same arrays are needed).
        overrides, **sections: as for :func:`train`, e.g. ``train={"time_limit": 1}`` (minutes),
            ``data={"bounds": [[0, 1], None]}``.

    Returns:
        The fitted :class:`flows.Flow` (a :class:`flows.Mixture` when the budget trained several members), on the
        CPU; ``flow.config`` is the run's config.
    """
    values = _rows(x, "x")
    arrays = {"x": values} | ({"context": _rows(context, "context", len(values))} if context is not None else {})
    from accelerate import PartialState

    state = PartialState()
    if run_dir is None and (resume or state.num_processes > 1):
        raise ConfigError(
            "flows.fit(run_dir=None) trains in a temporary directory of this process: give run_dir= to resume or to "
            "train with several processes"
        )
    root = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="flows-fit-"))
    try:
        _save_arrays(root / DATA_FILE, arrays, resume, state.is_main_process)
        state.wait_for_everyone()
        if resume:
            run = train(run_dir=root, resume=True)
        else:
            data = dict(sections.pop("data", {}) or {})
            taken = [k for k in ("name", "path", "key", "context_key", "context_columns") if k in data]
            if taken:
                raise ConfigError(f"flows.fit takes its data from x and context: data.{taken[0]} cannot be given")
            data |= {"name": "tabular", "path": os.fspath(root / DATA_FILE), "key": "x"}
            data |= {"context_key": "context"} if context is not None else {}
            if config is None:
                from flows.recipes import recipe

                config = recipe("posterior" if context is not None else "tabular")  # type: ignore[assignment]
            run = train(config, run_dir=root, overrides=overrides, data=data, **sections)
        flow = load(run)
    finally:
        if run_dir is None and state.is_main_process:
            shutil.rmtree(root, ignore_errors=True)
    if run_dir is None:
        for member in [flow, *getattr(flow, "members", [])]:
            member.path = None
    return flow


def _rows(values: Any, name: str, n: int | None = None) -> np.ndarray:
    """An array or tensor as float32 rows, (N, D) for x (a 1-D array: one column), (N, ...) for a context."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise DataError(f"flows.fit: {name} must be an array of numbers: {e}") from None
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim < 2 or 0 in array.shape or (n is None and array.ndim != 2):
        want = "(N, D) rows" if n is None else "(N, ...) rows, one per row of x"
        raise DataError(f"flows.fit: {name} must be {want}, got shape {array.shape}")
    if n is not None and len(array) != n:
        raise DataError(f"flows.fit: {len(array)} contexts for {n} rows of x: give one context per row")
    bad = ~np.isfinite(array).reshape(len(array), -1).all(1)
    if bad.any():
        raise DataError(
            f"flows.fit: {name} has NaN or Inf values in {int(bad.sum())} rows, the first row {int(np.argmax(bad))}; "
            "drop or fix them first"
        )
    return array


def _save_arrays(path: Path, arrays: dict[str, np.ndarray], resume: bool, main: bool) -> None:
    """The arrays of a fit in its run directory (the main process writes); a resume checks they are the run's."""
    if resume:
        if not path.is_file():
            raise ConfigError(f"flows.fit(resume=True): '{path}' is missing: '{path.parent}' is not a flows.fit run")
        with np.load(path) as saved:
            same = set(saved.files) == set(arrays) and all(np.array_equal(saved[k], v) for k, v in arrays.items())
        if not same:
            raise ConfigError(f"flows.fit(resume=True): the arrays given are not the ones '{path.parent}' was fit on")
        return
    if (path.parent / "model.safetensors").exists() or (path.parent / "checkpoints").exists():
        raise ConfigError(
            f"run directory '{path.parent}' holds a run already: give another run_dir=, or resume=True to continue it"
        )
    if main:
        from flows.files import atomic_path

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
