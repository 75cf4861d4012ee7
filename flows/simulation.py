"""Simulations kept in a run directory: the simulator called in batches, each batch's pairs written at once.

``folder/round_R/batch_KKKKK.npz`` holds one batch: ``theta`` and ``x`` of the simulations that returned finite
values, and ``dropped``, how many returned NaN or Inf (dropped and counted, as sbi does). A batch's parameters
and the simulator's random state are seeded by (seed, round, batch), so a killed run that resumes reads the
batches on disk and simulates only the missing ones: it ends with the same pairs as a run never killed.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flows.errors import ConfigError, SimulationError
from flows.files import atomic_path

__all__ = ["resolve", "batch_seed", "simulate", "SimulationStore"]


def resolve(spec: str, what: str) -> Any:
    """The object ``module:name`` (dots in the name reach attributes), imported; a clear error otherwise."""
    module, _, name = spec.partition(":")
    if module == "python":
        raise ConfigError(
            f"{what}='{spec}' was given as a Python object to flows.infer: resume it with flows.infer(..., "
            "resume=True) and the same objects, or name an importable one (module:function)."
        )
    try:
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{what}='{spec}': cannot import it ({e}); is the module on PYTHONPATH?") from None
    return obj


def batch_seed(seed: int, round_: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, round_, batch]).generate_state(1)[0])


def simulate(simulator: Callable[[Tensor], Any], theta: Tensor, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(x of the finite simulations, a mask of them) for parameters ``theta`` (n, D); torch's and numpy's global
    random states are seeded by ``seed`` for the call and restored after it."""
    state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # the caller's states come back
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            x = simulator(theta)
    except Exception as e:  # the user's code: any failure stops the run with what was simulated kept
        raise SimulationError(f"the simulator raised {type(e).__name__}: {e}") from e
    finally:
        np.random.set_state(state)
    x = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if x.ndim == 1:  # one number per simulation
        x = x[:, None]
    if x.ndim == 0 or len(x) != len(theta):
        raise SimulationError(
            f"the simulator returned x of shape {tuple(x.shape)} for {len(theta)} parameters: it must return one "
            f"row per parameter, (n, ...) for theta of shape (n, D)"
        )
    if not np.issubdtype(x.dtype, np.number):
        raise SimulationError(f"the simulator returned {x.dtype} values, not numbers")
    x = x.astype(np.float32)
    finite = np.isfinite(x.reshape(len(x), -1)).all(1)
    return x, finite


class SimulationStore:
    """The batches of simulations of one run, under ``folder``."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, round_: int, batch: int) -> Path:
        return self.folder / f"round_{round_}" / f"batch_{batch:05d}.npz"

    def run(
        self,
        round_: int,
        n: int,
        propose: Callable[[int, int], Tensor],
        simulator: Callable[[Tensor], Any],
        batch: int,
        seed: int,
    ) -> dict[str, int]:
        """Simulate ``n`` parameters of round ``round_`` (``propose(m, seed)`` draws m of them) in batches of
        ``batch``, skipping the batches on disk; returns the round's counts (simulated, kept, dropped)."""
        for k in range(-(-n // batch)):
            path = self.path(round_, k)
            if path.exists():
                continue
            m = min(batch, n - k * batch)
            theta = propose(m, batch_seed(seed, round_, 2 * k))
            try:
                x, finite = simulate(simulator, theta, batch_seed(seed, round_, 2 * k + 1))
            except SimulationError as e:
                kept = self.counts(round_)
                raise SimulationError(
                    f"{e} (round {round_}, batch {k}). The {kept['kept']:,} pairs simulated before it are kept in "
                    f"{self.folder}; fix the simulator and resume the run to continue from there."
                ) from e.__cause__
            self._write(path, theta.numpy(), x, finite)
        return self.counts(round_)

    def _write(self, path: Path, theta: np.ndarray, x: np.ndarray, finite: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, tmp.open("wb") as f:  # a kill leaves a whole batch or none
            np.savez(f, theta=theta[finite].astype(np.float32), x=x[finite], dropped=np.int64((~finite).sum()))

    def batches(self, round_: int) -> list[Path]:
        return sorted((self.folder / f"round_{round_}").glob("batch_*[0-9].npz"))

    def counts(self, round_: int) -> dict[str, int]:
        kept = dropped = 0
        for path in self.batches(round_):
            with np.load(path, allow_pickle=False) as f:
                kept, dropped = kept + len(f["theta"]), dropped + int(f["dropped"])
        return {"simulated": kept + dropped, "kept": kept, "dropped": dropped}

    def pairs(self, rounds: range) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(theta, x, the round of each pair) of the kept simulations of ``rounds``, in order."""
        thetas, xs, which = [], [], []
        for r in rounds:
            for path in self.batches(r):
                with np.load(path, allow_pickle=False) as f:
                    thetas.append(f["theta"])
                    xs.append(f["x"])
                    which.append(np.full(len(f["theta"]), r, dtype=np.int64))
        if not thetas:
            raise SimulationError(f"no simulations in {self.folder}")
        shapes = {x.shape[1:] for x in xs}
        if len(shapes) > 1:
            raise SimulationError(f"the simulator returned x of different shapes across batches: {sorted(shapes)}")
        return np.concatenate(thetas), np.concatenate(xs), np.concatenate(which)

    def write_pairs(self, path: Path, rounds: range) -> tuple[int, tuple[int, ...]]:
        """Every kept pair of ``rounds`` in one ``.npz`` (``theta``, ``x``, ``round``): a ``configs/posterior.yaml``
        file (``data.key=theta data.context_key=x``); returns how many, and the shape of one x."""
        theta, x, which = self.pairs(rounds)
        if not len(theta):
            raise SimulationError(
                f"every simulation of rounds {list(rounds)} returned NaN or Inf: nothing to train on ({self.folder})"
            )
        with atomic_path(path) as tmp, tmp.open("wb") as f:
            np.savez(f, theta=theta, x=x, round=which)
        return len(theta), tuple(x.shape[1:])
