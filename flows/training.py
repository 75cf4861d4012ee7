"""The Accelerate training loop: one process, several CPU processes, or many GPUs, unchanged.

Objective modules (``forward(x) -> (loss, stats)``) go through ``accelerator.prepare``; the EMA
copy of the field stays outside DDP. How a run is saved (``run_dir/checkpoints/step_N`` and
``run_dir/model.safetensors``) lives in ``flows.checkpoint``; how a likelihood is computed and
gathered over processes in ``flows.evaluation``.

Devices: the field, its EMA copy, the preprocessing constants and (when it fits) the training data
live on ``accelerator.device`` from the start. Between logging steps a step makes no host
synchronization of its own: a non-finite gradient is caught on the device (the fused optimizer's
``found_inf`` skips the update, the EMA update is weighted by zero) and the skips are counted at the
next logging step, where a step is checked at once, as every step is on the CPU with ``log_every=1``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, set_seed
from torch import Tensor
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from flows import checkpoint
from flows.config import Config, to_dict
from flows.data import build_data
from flows.data.batches import Batches
from flows.errors import CheckpointError, SolverError, TrainingAborted
from flows.evaluation import gathered_log_prob, summarize
from flows.model import Flow
from flows.nn import build_field
from flows.objectives import build_objective
from flows.tracking import check_installed, hyperparameters, log_images, scalars, tracker_names

__all__ = ["train", "Trainer", "lr_lambda"]


def ema_weight(decay: float, n: int) -> float:
    """The EMA's step towards the current weights after ``n`` updates: 1 − min(decay, (1 + n) / (10 + n))."""
    return 1 - min(decay, (1 + n) / (10 + n))


def lr_lambda(cfg: Config, time_fraction=lambda: 0.0):
    """Linear warm-up, then constant or a cosine decay to zero at the end of the budget: ``train.steps``,
    or ``train.time_limit`` when that comes first (``time_fraction()``: the share of it used so far)."""
    warmup, total, cosine = max(cfg.train.warmup_steps, 1), cfg.train.steps, cfg.train.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        by_steps = (step - warmup) / (total - warmup) if total > warmup else 0.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, max(by_steps, time_fraction()))))

    return factor


@dataclass
class Progress:
    step: int = 0
    bad_steps: int = 0
    train_time: float = 0.0  # seconds of training and periodic evaluation (the time budget)
    best_nll: float | None = None  # model selection on the validation split
    best_step: int = 0
    stale_evals: int = 0  # validation evaluations since the best one


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False):
        self.cfg, self.run_dir = cfg, Path(cfg.run_dir)
        # Accelerate keeps one process-wide state: a second run in this process (flows.train in a notebook)
        # may ask for other settings (mixed precision, trackers); the process group itself is kept
        AcceleratorState._reset_state(reset_partial_state=False)
        trackers = tracker_names(cfg)
        check_installed(trackers)  # before anything is written
        self.accelerator = acc = Accelerator(
            step_scheduler_with_optimizer=False,
            mixed_precision=cfg.train.mixed_precision,
            log_with=trackers or None,
            gradient_accumulation_steps=cfg.train.grad_accum,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
        )
        parts = acc.num_processes * cfg.train.grad_accum
        if cfg.train.batch_size % parts:
            raise TrainingAborted(
                f"train.batch_size={cfg.train.batch_size} must be divisible by the number of processes "
                f"({acc.num_processes}) x train.grad_accum ({cfg.train.grad_accum})."
            )
        set_seed(cfg.train.seed)  # identical initial weights on every process
        self.data = build_data(cfg.data)
        self.data.preprocess = self.data.preprocess.to(acc.device)
        self.field = build_field(cfg.model, self.data.shape)
        if cfg.train.init_from and not resume:
            self._init_from(cfg.train.init_from)
        self.field.to(acc.device)  # before the EMA copy and the optimizer see it
        # AveragedModel holds the copy and its counter; Trainer._update_ema averages (with warm-up, on the device)
        self.ema = AveragedModel(self.field, acc.device, use_buffers=True)
        self._ema_count = 0  # host mirror of ema.n_averaged: reading the buffer would synchronize
        objective = build_objective(self.field, cfg.solver, cfg.objective, cfg.train.compile)
        self._draw = objective.draw  # the unwrapped module's (DDP does not forward attributes)
        # fused Adam: one kernel for all parameters, 3x faster than the default on CPU (0.10 vs 0.34 ms, MLP 3x64)
        opt = torch.optim.Adam(
            self.field.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True
        )
        self._time_fraction = 0.0  # share of train.time_limit used, the same on every process
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, lambda: self._time_fraction))
        self.batches = Batches(
            self.data.train, self._batch_size(), cfg.train.seed, acc.process_index, acc.num_processes, acc.device
        )
        self.objective, self.opt, self.sched = acc.prepare(objective, opt, sched)
        # per-step work on cached lists (module.parameters() walks the module tree every call)
        self._params = [p for p in self.objective.parameters() if p.requires_grad]
        pairs = zip(
            [*self.ema.module.parameters(), *self.ema.module.buffers()],
            [*self.field.parameters(), *self.field.buffers()],
            strict=True,
        )
        self._ema_pairs = tuple(map(list, zip(*[(a, c) for a, c in pairs if a.is_floating_point()], strict=True)))
        # Accelerate's optimizer wrapper probes for optional packages on every step (~0.25 ms); without a
        # gradient scaler it only forwards to the optimizer, so step that directly
        # (with train.grad_accum the step runs once per K micro-batches, after Accelerate has synchronized)
        self._plain = self.opt.scaler is None
        self._optimizer_step = self.opt.optimizer.step if self._plain else self.opt.step
        self._zero_grad = self.opt.optimizer.zero_grad if self._plain else self.opt.zero_grad
        # solver failures (maximum likelihood) must be agreed on by all processes before backward
        self._agree_every_step = cfg.objective.name == "mle" and acc.num_processes > 1
        # non-finite steps caught on the device since the last check
        self._skipped = torch.zeros((), dtype=torch.int32, device=acc.device)
        test, val = self.data.test, self.data.val
        self.selecting = val is not None  # keep the best EMA weights by validation NLL
        periodic = val if val is not None else test
        self.eval_points = {"periodic": periodic[: cfg.eval.periodic_size], "final": test}
        self._best: dict[str, Tensor] | None = None
        self._last_eval_step, self._evals_by_time = -1, 0
        self.progress = Progress()
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume:
            self._load(self._resume_dir())
            if cfg.train.time_limit:  # the budget continues where it stopped (the same on every process)
                self._time_fraction = self.progress.train_time / (60 * cfg.train.time_limit)
                self._evals_by_time = self._marks_passed()
        else:
            self._check_fresh()
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if trackers:  # TensorBoard: run_dir/logs/<run name>
            acc.init_trackers(self.run_dir.name, config=hyperparameters(cfg))

    def _batch_size(self) -> int:
        """train.batch_size, or the whole table (a multiple of the process count) when the table is smaller."""
        acc, asked, rows = self.accelerator, self.cfg.train.batch_size, len(self.data.train)
        if asked <= rows:
            return asked
        parts = acc.num_processes * self.cfg.train.grad_accum
        batch = rows - rows % parts
        if batch == 0:
            raise TrainingAborted(
                f"{rows} training rows cannot be split over {acc.num_processes} processes x "
                f"train.grad_accum={self.cfg.train.grad_accum}."
            )
        acc.print(f"train.batch_size={asked} is larger than the {rows} training rows: each batch is the whole table.")
        return batch

    # ----------------------------------------------------------------- checkpoints
    def _init_from(self, source: str) -> None:
        """Start from another run's EMA weights: the same network, possibly the other objective."""
        loaded = checkpoint.load(source)
        if loaded.shape != self.data.shape or to_dict(loaded.config.model) != to_dict(self.cfg.model):
            raise CheckpointError(
                f"train.init_from='{source}': that run's network ({loaded.config.model.name}, data shape "
                f"{loaded.shape}) differs from this config's ({self.cfg.model.name}, {self.data.shape}). "
                "Use the same model.* settings and data, or drop init_from."
            )
        self.field.load_state_dict(loaded.field.state_dict())
        self.accelerator.print(f"initialized from {loaded.path} (step {loaded.step}, {loaded.config.objective.name})")

    def _check_fresh(self) -> None:
        if checkpoint.latest_checkpoint(self.run_dir) or (self.run_dir / checkpoint.MODEL_FILE).exists():
            raise TrainingAborted(
                f"run directory '{self.run_dir}' already holds a run. Continue it with --resume "
                f"{self.run_dir}, or choose another directory with run_dir=... (nothing was changed)."
            )

    def _resume_dir(self) -> Path:
        ckpt = checkpoint.latest_checkpoint(self.run_dir)
        if ckpt is None:
            raise TrainingAborted(f"--resume: no checkpoint in '{self.run_dir}/checkpoints'.")
        return ckpt

    def _load(self, ckpt: Path) -> None:
        progress, self._best = checkpoint.load_training(self.accelerator, ckpt, self.ema)
        self._ema_count = int(self.ema.n_averaged)
        self.progress = Progress(**progress)
        if self.accelerator.is_main_process:
            checkpoint.trim_metrics(self.metrics_path, self.progress.step)
        self.accelerator.print(f"resumed from {ckpt} at step {self.progress.step}")

    def save(self) -> None:
        acc = self.accelerator
        checkpoint.save_training(
            acc,
            self.run_dir,
            self.progress.step,
            self.ema,
            vars(self.progress),
            self._best,
            self.cfg.train.keep_checkpoints,
        )
        if acc.is_main_process:
            self._export()
        acc.wait_for_everyone()

    def _export(self) -> None:
        """The slim inference file (main process): the raw and the EMA weights, preprocessing, config."""
        path, cfg, data = self.run_dir / checkpoint.MODEL_FILE, self.cfg, self.data
        checkpoint.export(path, self.field, self.ema, data.preprocess, cfg, data.shape, self.progress.step)

    # ----------------------------------------------------------------- logging
    def log(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl; its numbers also go to the trackers of ``train.log_with``."""
        if self.accelerator.is_main_process:
            with self.metrics_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            if self.accelerator.trackers:
                self.accelerator.log(scalars(record), step=record["step"])

    def evaluate(self, which: str, **extra: Any) -> dict[str, Any]:
        """Held-out NLL of the EMA weights (reporting space), split over processes: flows.evaluation's path."""
        cfg, data = self.cfg, self.data
        flow = Flow(self.ema.module, data.preprocess, cfg, data.shape, self.progress.step)
        points = self.eval_points[which]
        lp, var, info = gathered_log_prob(self.accelerator, flow, points, cfg.eval.batch_size, trace=cfg.eval.trace)
        result = summarize(lp, var, 1, data.dim, data.preprocess.levels)
        solver = cfg.eval.solver
        result |= {
            "nfe": info["nfe"],
            "trace": info["trace"],
            "solver": f"{solver.method} atol={solver.atol:g} rtol={solver.rtol:g}",
            "seconds": info["seconds"],
        }
        if which == "periodic":
            self._last_eval_step = self.progress.step
            self._evals_by_time = self._marks_passed()
        split = "validation" if which == "periodic" and self.selecting else "held-out"
        self.log({"step": self.progress.step, "eval": which, "split": split, **extra, **result})
        bpd = f", {result['bpd']:.3f} bits/dim" if "bpd" in result else ""
        self.accelerator.print(
            f"step {self.progress.step}: {split} NLL {result['nll']:.4f} ± {result['nll_se']:.4f} nats{bpd} "
            f"({result['n']} points, {result['trace']} trace, NFE {result['nfe']:.0f}, "
            f"{result['seconds']:.1f} s)"
        )
        return result

    # ----------------------------------------------------------------- selection and budget
    def _agreed_max(self, value: float) -> float:
        """The largest ``value`` over processes (a collective when there are several)."""
        if self.accelerator.num_processes == 1:
            return value
        t = torch.tensor([value], device=self.accelerator.device, dtype=torch.float64)
        return float(self.accelerator.reduce(t, "max").item())

    def _eval_marks(self) -> list[float]:
        """Shares of the time budget at which to evaluate: K evenly spaced, and doubling ones before the
        first of them (1/2K, 1/4K, ...: a small table can overfit within the first 1/K of the budget)."""
        k = self.cfg.train.evals_per_budget
        if not k:
            return []
        return sorted({*(i / k for i in range(1, k + 1)), *(2.0**-j / k for j in range(1, 9))})

    def _marks_passed(self) -> int:
        return sum(m <= self._time_fraction for m in self._eval_marks())

    def _periodic_due(self, step: int, log_now: bool) -> bool:
        """Every ``train.eval_every`` steps, and (with a time limit) at each mark of ``_eval_marks``."""
        tc = self.cfg.train
        if tc.eval_every and step % tc.eval_every == 0:
            return True
        if not (tc.evals_per_budget and tc.time_limit) or not (log_now or self.accelerator.num_processes == 1):
            return False
        return self._marks_passed() > self._evals_by_time

    def _select(self, result: dict[str, Any]) -> bool:
        """Keep the EMA weights if their validation NLL is the best so far; True when patience has run out."""
        progress, patience = self.progress, self.cfg.train.patience
        if not self.selecting or not math.isfinite(result["nll"]):
            return False
        if progress.best_nll is None or result["nll"] < progress.best_nll:
            progress.best_nll, progress.best_step, progress.stale_evals = result["nll"], progress.step, 0
            self._best = {k: v.detach().clone() for k, v in self.ema.state_dict().items()}
        else:
            progress.stale_evals += 1
        return patience > 0 and progress.stale_evals >= patience

    def _restore_best(self) -> None:
        if self._best is not None:
            self.ema.load_state_dict(self._best)
            self.accelerator.print(
                f"kept the EMA weights of step {self.progress.best_step} "
                f"(validation NLL {self.progress.best_nll:.4f} nats)"
            )

    # ----------------------------------------------------------------- the loop
    def _batches(self):
        return self.batches.from_step(self.progress.step)

    def _any(self, flag: bool) -> bool:
        """True when ``flag`` holds on any process (the same decision everywhere)."""
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, "sum").item() > 0)

    @torch.no_grad()
    def _update_ema(self, keep: Tensor | None = None) -> None:
        """AveragedModel.update_parameters on cached tensor lists (same rule: copy first, then average).

        ``keep``: a 0/1 device tensor; 0 leaves the average as it is (a step skipped on the device).
        """
        averaged, current = self._ema_pairs
        if self._ema_count == 0:
            torch._foreach_copy_(averaged, current)
        else:  # a += w (c - a); with a device tensor w (lerp would read it back to the host)
            weight: Tensor | float = ema_weight(self.cfg.train.ema_decay, self._ema_count)
            if keep is not None:
                weight = keep.to(averaged[0].dtype) * weight
            step = torch._foreach_sub(current, averaged)
            torch._foreach_mul_(step, weight)
            torch._foreach_add_(averaged, step)
        self.ema.n_averaged += 1
        self._ema_count += 1

    def _check_skipped(self) -> None:
        """Count the steps skipped on the device since the last check (one host synchronization)."""
        count = int(self._skipped.item())
        if count:
            self._skipped.zero_()
            self._bad_step(f"non-finite gradient in {count} step(s) since the last logging step", count)

    def step(self, raw: Tensor, full_record: bool = True) -> dict[str, Any] | None:
        """One optimizer step; None if skipped. The metrics record (a collective) only when ``full_record``.

        Without ``full_record`` (and without a gradient scaler) nothing here waits for the device: a
        non-finite gradient skips the update on the device and is counted at the next checked step.
        """
        acc, cfg = self.accelerator, self.cfg
        pre = self.data.preprocess
        check = full_record or not self._plain
        if check:
            self._check_skipped()
        x = pre(raw)
        result = self._forward_backward(x, check)
        if isinstance(result, str):
            return self._bad_step(result)
        loss, stats = result
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        if self._plain:  # no scaler to unscale with: torch's (foreach) clipping, without Accelerate's checks
            grad_norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm)
        else:
            grad_norm = acc.clip_grad_norm_(self._params, max_norm)
        keep = None
        if check:
            if not torch.isfinite(grad_norm):
                self.opt.zero_grad(set_to_none=True)
                return self._bad_step("non-finite gradient")
        else:  # gradients are all-reduced, so every process takes the same decision
            keep = torch.isfinite(grad_norm)
            self._skipped += ~keep
        if self._plain:  # the fused optimizer skips its update (step count included) where found_inf is 1
            self.opt.optimizer.found_inf = None if keep is None else (~keep).to(torch.float32)
        self._optimizer_step()
        self.sched.step()
        self._zero_grad(set_to_none=True)
        self._update_ema(keep)
        if not full_record:
            return {}
        nfe = stats.get("nfe")
        values = torch.tensor(
            [
                loss.item(),
                stats["nll"].item() - pre.log_det(x).mean().item() if "nll" in stats else torch.nan,
                stats.get("kinetic", torch.nan),
                stats.get("jacobian", torch.nan),
                stats.get("hjb", torch.nan),
                nfe.forward if nfe else torch.nan,
                nfe.backward if nfe else torch.nan,
            ],
            device=acc.device,
        )
        values = acc.reduce(values, "mean")
        names = ("loss", "nll", "kinetic", "jacobian", "hjb", "nfe_forward", "nfe_backward")
        record = {k: v for k, v in zip(names, values.tolist(), strict=True) if not math.isnan(v)}
        record |= {"grad_norm": float(grad_norm), "lr": self.sched.get_last_lr()[0]}
        return record

    def _forward_backward(self, x: Tensor, check: bool) -> tuple[Tensor, dict[str, Any]] | str:
        """Loss and gradients of the local batch, in ``train.grad_accum`` micro-batches through Accelerate's
        ``accumulate`` (gradients are synchronized over processes once, after the last one). The objective's
        random draws are made for the whole batch and sliced, so K micro-batches of B/K give the gradient of
        one batch of B. Returns (mean loss, stats of the first micro-batch), or the reason to skip the step.
        """
        acc, k = self.accelerator, self.cfg.train.grad_accum
        acc.step = 0  # Accelerate's micro-batch counter: a step always starts a cycle (after a skip, a resume)
        draws = self._draw(x)
        micro = zip(x.chunk(k), *(d.chunk(k) for d in draws.values()), strict=True) if k > 1 else [(x, *draws.values())]
        losses, first = [], {}
        for xm, *dm in micro:
            with acc.accumulate(self.objective) if k > 1 else nullcontext():
                try:
                    loss, stats = self.objective(xm, dict(zip(draws, dm, strict=True)))
                    failure = None if not check or torch.isfinite(loss) else "non-finite loss"
                except SolverError as e:
                    loss, stats, failure = None, {}, str(e)
                if (check or self._agree_every_step) and self._any(failure is not None):
                    return failure or "non-finite loss on another process"
                if failure is not None:  # one process, between checks: nothing to agree on
                    return failure
                acc.backward(loss)  # divided by k when accumulating
            losses.append(loss.detach())
            first = first or stats
        return (losses[0] if k == 1 else torch.stack(losses).mean()), first

    def _bad_step(self, reason: str, count: int = 1) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.progress.bad_steps += count
        self.accelerator.print(
            f"step {self.progress.step}: skipped ({reason}); "
            f"{self.progress.bad_steps}/{self.cfg.train.max_bad_steps} bad steps"
        )
        self.log({"step": self.progress.step, "skipped": reason[:500]})
        if self.progress.bad_steps >= self.cfg.train.max_bad_steps:
            self.save()
            raise TrainingAborted(
                f"stopped after {self.progress.bad_steps} bad steps (last: {reason}). A checkpoint of step "
                f"{self.progress.step} was saved in {self.run_dir}/checkpoints; fix the cause "
                f"(lower train.lr, add regularization, loosen tolerances) and continue with "
                f"--resume {self.run_dir} "
                f"(raise train.max_bad_steps to tolerate more)."
            )
        return None

    def run(self) -> dict[str, Any] | None:
        acc, cfg, tc = self.accelerator, self.cfg, self.cfg.train
        bar = tqdm(
            total=tc.steps,
            initial=self.progress.step,
            disable=not acc.is_main_process,
            dynamic_ncols=True,
            desc="train",
            mininterval=0.2 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s
        )
        batches, progress = self._batches(), self.progress
        budget = 60 * tc.time_limit if tc.time_limit is not None else None
        self.objective.train()
        while progress.step < tc.steps:
            log_now = (progress.step + 1) % tc.log_every == 0 or progress.step == 0
            # several processes agree on the time used on logging steps only (a collective)
            if budget is not None and (log_now or acc.num_processes == 1):
                self._time_fraction = self._agreed_max(progress.train_time) / budget
                if self._time_fraction >= 1:
                    acc.print(f"time limit of {tc.time_limit} min reached at step {progress.step}")
                    break
            raw = next(batches)
            t0 = time.perf_counter()
            record = self.step(raw, full_record=log_now)
            progress.train_time += time.perf_counter() - t0
            train_time = progress.train_time
            if record is None:
                continue
            self.progress.step += 1
            bar.update(1)
            step = self.progress.step
            if log_now:
                record |= {
                    "step": step,
                    "step_time": time.perf_counter() - t0,
                    "train_time": train_time,
                }
                self.log(record)
                if "nll" in record:
                    bar.set_postfix(
                        nll=f"{record['nll']:.3f}",
                        nfe=f"{record['nfe_forward']:.0f}/{record['nfe_backward']:.0f}",
                        refresh=False,
                    )
                else:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            if self._periodic_due(step, log_now) and step < tc.steps:
                t1 = time.perf_counter()
                result = self.evaluate("periodic", train_time=train_time)
                progress.train_time += time.perf_counter() - t1  # the budget is wall time: evaluations count
                if self._select(result):
                    acc.print(
                        f"early stopping at step {step}: no better validation NLL in {tc.patience} evaluations "
                        f"(best {progress.best_nll:.4f} at step {progress.best_step})"
                    )
                    break
            if step % tc.save_every == 0:
                self.save()
        bar.close()
        self._check_skipped()
        if self.selecting and self._last_eval_step != progress.step:
            self._select(self.evaluate("periodic", train_time=progress.train_time))
        self.save()  # the checkpoint keeps the running EMA (to train on) and the best one
        if self.selecting:
            self._restore_best()  # the inference file and the final evaluation use the best
            if acc.is_main_process:
                self._export()
            acc.wait_for_everyone()
        result = self.evaluate("final", train_time=progress.train_time)
        if self.selecting:
            result |= {"best_step": progress.best_step, "val_nll": progress.best_nll}
        if acc.is_main_process:
            (self.run_dir / "eval.json").write_text(json.dumps({"step": self.progress.step, **result}, indent=2))
            picture = None
            if cfg.eval.plot and self.data.dim == 2:
                from flows.report import plot_run

                picture = plot_run(self.run_dir, device=acc.device)
            elif cfg.eval.plot and len(self.data.shape) == 3:
                from flows.report import image_grid

                picture = image_grid(self.run_dir, device=acc.device)
            if picture is not None:
                log_images(acc, {"samples": picture}, self.progress.step)
        acc.wait_for_everyone()
        return result


def train(cfg: Config, resume: bool = False) -> dict[str, Any] | None:
    """Train ``cfg`` (or continue it with ``resume``); returns the final held-out evaluation."""
    trainer = Trainer(cfg, resume)
    try:
        return trainer.run()
    finally:
        trainer.accelerator.end_training()
