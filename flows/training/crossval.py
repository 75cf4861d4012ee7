"""Small data: k-fold cross-validation chooses when to stop, then every training row is trained on.

With a time limit, evaluation marks (``train.evals_per_budget``) and a validation fraction, a table (or a set
of simulated pairs) of fewer than ``THRESHOLD`` training rows does not hold out one small validation split.
Instead:

1. **Timing.** A few steps of a throwaway run on the first fold measure the seconds per step and per
   evaluation; they fix the fold horizon ``H`` (in steps) so that the ``FOLDS`` fold runs share
   ``CV_SHARE`` of the budget (``train.steps`` stays a cap).
2. **Folds.** Fold j trains on every training row but those of fold j, for the fixed horizon ``H`` (cosine
   schedule over it), and is evaluated on fold j at the same steps as every other fold (steps 25, 50, 100,
   ... and ``train.evals_per_budget`` marks of ``H``), to the end (no patience: every fold has the whole
   curve). The validation NLL of every row (all rows are validation rows once) is pooled at each step, and
   the stopping step ``s*`` is where it is lowest.
3. **Refit.** Members (seeds ``seed``, ``seed + 1``, ...) train on all training rows with the same schedule
   and stop at ``s*``: as many as the rest of the budget fits by the timing's figures (at most
   ``train.members``, at least one). When the pooled curve still falls at the end of ``H``, one member trains
   on all rows for the rest of the budget instead. The model is their equal-weight mixture (one member: a
   plain flow). "Still falls": the chosen step lies in the last tenth of ``H`` and beats the middle of the curve
   by more than two standard errors of the per-fold gains (a flat, noisy end does not count).

When the budget fits fold runs of fewer than ``MIN_FOLD_STEPS`` steps (a short budget, slow steps or slow
evaluations), the folds would end while the curve still falls: the run then keeps one validation split and
the members, as above the threshold, and ``eval.json`` says ``"selection": "validation split"``.

Every fold and refit is a fixed-step run (no clock), so a run killed at any point resumes to the same
result: ``cv.json`` keeps the horizon (and, once chosen, ``s*`` and the number of members), finished folds and
members keep their results, and one in progress starts again. ``eval.json`` says what was chosen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from flows import checkpoint
from flows.build import make_data
from flows.config import Config, to_dict
from flows.data import DATASETS, Data
from flows.errors import TrainingAborted
from flows.files import atomic_write
from flows.flowfile import MODEL_FILE
from flows.training.accelerator import new_accelerator
from flows.training.schedule import EvalSchedule, Progress

__all__ = ["THRESHOLD", "FOLDS", "small_data", "train_crossval", "fold_indices", "stopping_step", "still_falling"]

THRESHOLD = 1000  # training rows (before the validation split) below which cross-validation replaces it
FOLDS = 5
CV_SHARE = 0.5  # of the time budget: the fold runs together
STILL_FALLING = 0.9  # s* at or past this share of H: the curve had not turned; one long refit instead
MIN_FOLD_STEPS = 1000  # a budget that fits shorter fold runs keeps the validation split (measured: see the guide)
STATE = "cv.json"
DONE = "done.json"  # in a fold's or member's folder once it is finished


def _pool_config(cfg: Config) -> Config:
    """The config whose training rows are all the rows a validation split would be cut from."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_fraction=0.0))


def small_data(cfg: Config) -> bool:
    """Whether ``cfg``'s run takes the cross-validation path: a table (or simulated pairs) with a time limit, a
    validation fraction and no predefined validation file, of fewer than ``THRESHOLD`` training rows. A run
    already started keeps the path it started on."""
    d, tc, root = cfg.data, cfg.train, Path(cfg.run_dir)
    if (root / STATE).exists():
        return True
    if (root / "members").exists() or (root / "checkpoints").exists():
        return False
    user_rows = DATASETS[d.name].context == "vector"  # your own table or simulated pairs (not a built-in set)
    if not user_rows or d.val_path or d.val_fraction <= 0 or tc.time_limit is None:
        return False
    if not tc.evals_per_budget:  # no evaluation marks: no curve to cross-validate
        return False
    return len(make_data(_pool_config(cfg)).train) < THRESHOLD


def fold_indices(rows: int, folds: int, seed: int) -> list[torch.Tensor]:
    """A seeded partition of ``range(rows)`` into ``folds`` parts of near-equal size."""
    perm = torch.randperm(rows, generator=torch.Generator("cpu").manual_seed(seed), device="cpu")
    return list(perm.tensor_split(folds))


def _fold_data(pool: Data, held: torch.Tensor) -> Data:
    keep = torch.ones(len(pool.train), dtype=torch.bool, device="cpu")
    keep[held] = False

    def part(x: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
        return None if x is None else x[rows]

    return dataclasses.replace(
        pool,
        train=pool.train[keep],
        val=pool.train[held],
        train_context=part(pool.train_context, keep),
        val_context=part(pool.train_context, held),
        test=pool.train[held],  # a fold's final evaluation: its own rows
        test_context=part(pool.train_context, held),
    )


def stopping_step(curves: list[dict[int, float]], sizes: list[int]) -> tuple[int, dict[int, float]]:
    """The step with the lowest pooled validation NLL (each fold's mean weighted by its rows) among the steps every
    fold evaluated; (that step, the pooled curve)."""
    common = sorted(set.intersection(*(set(c) for c in curves)))
    if not common:
        raise TrainingAborted("cross-validation: the folds share no evaluated step.")
    total = sum(sizes)

    def pooled(step: int) -> float:
        values = [c[step] for c in curves]
        if not all(math.isfinite(v) for v in values):
            return math.inf
        return sum(n * v for n, v in zip(sizes, values, strict=True)) / total

    curve = {s: pooled(s) for s in common}
    best = min(common, key=lambda s: (curve[s], s))
    if not math.isfinite(curve[best]):
        raise TrainingAborted("cross-validation: no step has a finite validation NLL on every fold.")
    return best, curve


def still_falling(curves: list[dict[int, float]], chosen: int, horizon: int) -> bool:
    """Whether the folds' validation NLL was still clearly falling when their horizon ended: the chosen step lies
    in its last tenth and beats the middle of the curve by more than 2 standard errors of the per-fold gains."""
    if chosen < STILL_FALLING * horizon:
        return False
    common = sorted(set.intersection(*(set(c) for c in curves)))
    middle = min(common, key=lambda step: abs(step - horizon / 2))
    gains = torch.tensor([c[middle] - c[chosen] for c in curves], dtype=torch.float64, device="cpu")
    if not torch.isfinite(gains).all():
        return False
    se = float(gains.std() / math.sqrt(len(gains))) if len(gains) > 1 else 0.0
    return float(gains.mean()) > 2 * se


def _curve(folder: Path) -> dict[int, float]:
    """A fold's validation NLL by step, from its metrics.jsonl."""
    curve = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("eval") == "periodic" and record.get("split") == "validation":
            curve[int(record["step"])] = float(record["nll"])
    return curve


class CrossValidation:
    """The three phases (timing, folds, refit) of one run directory, resumable."""

    def __init__(self, cfg: Config, resume: bool):
        self.cfg, self.root = cfg, Path(cfg.run_dir)
        self.acc = new_accelerator(cfg)
        state_file = self.root / STATE
        if not resume and (state_file.exists() or (self.root / MODEL_FILE).exists()):
            raise TrainingAborted(
                f"run directory '{self.root}' already holds a run. Continue it with --resume {self.root}, or choose "
                "another directory with run_dir=... (nothing was changed)."
            )
        self.pool = make_data(_pool_config(cfg))
        self.folds = fold_indices(len(self.pool.train), FOLDS, cfg.train.seed + 7)
        self.state: dict[str, Any] = json.loads(state_file.read_text()) if state_file.exists() else {}
        self.budget = 60 * float(cfg.train.time_limit or 0)

    # ------------------------------------------------------------------ bookkeeping
    def _save(self) -> None:
        if self.acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write(self.root / STATE, json.dumps(self.state, indent=2))
        self.acc.wait_for_everyone()
        self.state = json.loads((self.root / STATE).read_text())  # every process: the main one's figures

    def _used(self) -> float:
        """Seconds of the budget used: the timing and every finished fold and member."""
        done = [
            json.loads(p.read_text()) for kind in ("folds", "members") for p in (self.root / kind).glob(f"*/{DONE}")
        ]
        return self.state.get("timing_seconds", 0.0) + sum(r["budget_seconds"] for r in done)

    def _run(self, kind: str, k: int, cfg: Config, data: Data | None, stop_at: int | None = None) -> dict[str, Any]:
        """Train one fold or member (again from its start if it was killed: a fixed-step run repeats exactly)."""
        from flows.training.trainer import Trainer

        folder = self.root / kind / str(k)
        if (folder / DONE).exists():
            return json.loads((folder / DONE).read_text())
        if self.acc.is_main_process and folder.exists():
            shutil.rmtree(folder)
        self.acc.wait_for_everyone()
        t0 = time.perf_counter()
        result = Trainer(dataclasses.replace(cfg, run_dir=str(folder)), False, data, stop_at).run_and_end()
        result["budget_seconds"] = max(result["train_time"], time.perf_counter() - t0)
        if self.acc.is_main_process:
            atomic_write(folder / DONE, json.dumps(result, indent=2))
        self.acc.wait_for_everyone()
        return result

    def _config(self, steps: int, seed: int, select: bool) -> Config:
        tc = dataclasses.replace(
            self.cfg.train,
            steps=steps,
            time_limit=None,
            members=1,
            seed=seed,
            evals_per_budget=self.cfg.train.evals_per_budget if select else 0,
            patience=0,  # a fold's whole curve: the pooled one decides
            eval_every=0,
            save_every=max(self.cfg.train.save_every, steps + 1),  # a killed fold starts again: no checkpoints
        )
        return dataclasses.replace(self.cfg, train=tc, eval=dataclasses.replace(self.cfg.eval, plot=False))

    # ------------------------------------------------------------------ the phases
    def _timing(self) -> None:
        """Seconds per training step and per validation evaluation of a fold run: the fold horizon H."""
        if "horizon" in self.state:
            return
        from flows.training.trainer import Trainer

        t0, folder = time.perf_counter(), self.root / "timing"
        if self.acc.is_main_process and folder.exists():
            shutil.rmtree(folder)
        self.acc.wait_for_everyone()
        cfg = dataclasses.replace(self._config(10**6, self.cfg.train.seed, True), run_dir=str(folder))
        trainer = Trainer(cfg, False, _fold_data(self.pool, self.folds[0]))
        batches, times = trainer.batches(), []
        for _ in range(35):
            start = time.perf_counter()
            trainer.step(next(batches), full_record=False)
            times.append(time.perf_counter() - start)
        step_s = sorted(times[5:])[len(times[5:]) // 2]  # the median: robust to one slow step
        start = time.perf_counter()
        trainer.evaluate("periodic")
        eval_s = time.perf_counter() - start
        if self.acc.num_processes > 1:  # one plan for all processes: the slowest one's figures
            figures = torch.tensor([step_s, eval_s], device=self.acc.device, dtype=torch.float64)
            slowest = self.acc.reduce(figures, "max")
            step_s, eval_s = (float(v) for v in slowest.cpu())
        trainer.accelerator.end_training()
        del trainer
        if self.acc.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
        share = CV_SHARE * self.budget / FOLDS
        evals = EvalSchedule(cfg.train, Progress()).evals_left()  # those of a fold run, as its plan would count
        horizon = max(1, min(self.cfg.train.steps, int((share - 1.25 * evals * eval_s) / step_s)))
        selection = "cross-validation" if horizon >= MIN_FOLD_STEPS else "validation split"
        self.state |= {
            "selection": selection,
            "folds": FOLDS,
            "rows": len(self.pool.train),
            "threshold": THRESHOLD,
            "step_seconds": step_s,
            "eval_seconds": eval_s,
            "horizon": horizon,
            "timing_seconds": time.perf_counter() - t0,
        }
        self._save()
        if selection == "cross-validation":
            self.acc.print(
                f"small data ({len(self.pool.train)} training rows < {THRESHOLD}): {FOLDS}-fold cross-validation, "
                f"folds of {horizon} steps"
            )
        else:
            self.acc.print(
                f"small data ({len(self.pool.train)} training rows), but the budget fits folds of only {horizon} "
                f"steps (< {MIN_FOLD_STEPS}): one validation split, as for larger tables"
            )

    def _cross_validate(self) -> None:
        if "stop_step" in self.state:
            return
        horizon, curves, best = self.state["horizon"], [], []
        for j, held in enumerate(self.folds):
            self.acc.print(f"fold {j + 1}/{FOLDS}: validation on {len(held)} rows")
            cfg = self._config(horizon, self.cfg.train.seed, True)
            result = self._run("folds", j, cfg, _fold_data(self.pool, held))
            curves.append(_curve(self.root / "folds" / str(j)))
            best.append(result.get("best_step"))
        chosen, curve = stopping_step(curves, [len(h) for h in self.folds])
        # the refit's plan, from the timing alone (not the clock since), so a resumed run decides the same
        s, rows, batch = self.state, len(self.pool.train), self.cfg.train.batch_size
        left = (1 - CV_SHARE) * self.budget - s["timing_seconds"]
        per_step = s["step_seconds"] * min(rows, batch) / min(rows - len(self.folds[0]), batch)
        overhead = s["timing_seconds"]  # a run's start and final evaluation, about what the timing run took
        stop, steps, long = chosen, horizon, still_falling(curves, chosen, horizon)
        fits = math.floor(left / (per_step * stop + overhead))
        members = 1 if long else max(1, min(self.cfg.train.members, fits))
        if long:  # the curve still fell at the end of H: one member on all rows for the rest of the budget
            steps = stop = min(self.cfg.train.steps, max(horizon, int(0.9 * left / per_step)))
        self.state |= {
            "stop_step": stop,
            "refit_steps": steps,
            "refit_members": members,
            "still_falling": long,
            "cv_step": chosen,
            "cv_nll": curve[chosen],
            "cv_curve": {str(s): v for s, v in curve.items()},
            "fold_best_steps": best,
        }
        self._save()
        self.acc.print(
            f"cross-validation: stop at step {stop} (pooled validation NLL {self.state['cv_nll']:.4f} on "
            f"{len(self.pool.train)} rows); refit {members} member(s) on every training row"
        )

    def _refit(self) -> list[Path]:
        s, trained = self.state, []
        for m in range(s["refit_members"]):
            self.acc.print(f"refit {m + 1}/{s['refit_members']} on all {len(self.pool.train)} training rows")
            cfg = self._config(s["refit_steps"], self.cfg.train.seed + m, False)
            self._run("members", m, cfg, dataclasses.replace(self.pool, val=None, val_context=None), s["stop_step"])
            trained.append(self.root / "members" / str(m))
        return trained

    def run(self) -> dict[str, Any]:
        from flows.training.members import mix

        if self.acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            if not (self.root / "config.yaml").exists():  # what --resume reads
                atomic_write(self.root / "config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        self.acc.wait_for_everyone()
        self._timing()
        if self.state["selection"] != "cross-validation":
            return self._split()
        self._cross_validate()
        trained = self._refit()
        s = self.state
        chosen = {
            "selection": "cross-validation",
            **{
                k: s[k]
                for k in ("folds", "rows", "threshold", "horizon", "cv_step", "cv_nll", "stop_step", "still_falling")
            },
            "val_nll": s["cv_nll"],  # the cross-validated NLL at the chosen step (every training row once)
            "refit_members": s["refit_members"],
            "fold_best_steps": s["fold_best_steps"],
        }
        return mix(_pool_config(self.cfg), trained, self._used(), chosen)

    def _split(self) -> dict[str, Any]:
        """Today's path (one validation split, members), when the budget is too short for useful fold runs."""
        from flows.training.members import train_split

        started = (self.root / "members").exists() or checkpoint.latest_checkpoint(self.root) is not None
        result = train_split(self.cfg, started)
        s = self.state
        chosen = {k: s[k] for k in ("selection", "rows", "threshold", "horizon")}
        if self.acc.is_main_process:
            written = json.loads((self.root / "eval.json").read_text())
            atomic_write(self.root / "eval.json", json.dumps(written | chosen, indent=2))
        self.acc.wait_for_everyone()
        return result | chosen


def train_crossval(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` the small-data way (see the module); the final held-out evaluation with what was chosen."""
    return CrossValidation(cfg, resume).run()
