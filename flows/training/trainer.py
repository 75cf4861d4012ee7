"""The Accelerate training loop: one process, several CPU processes, or many GPUs, unchanged.

``Trainer.run`` is the loop; its parts each do one job: ``EMA`` (the averaged weights), ``StepGuard``
(non-finite steps and solver failures), ``EvalSchedule`` and ``Selection`` (when to evaluate, which
weights to keep, when to stop), ``RunWriter`` (metrics, inference file, checkpoints). The objective
module (``forward(x, draws) -> (loss, stats)``) goes through ``accelerator.prepare``; the EMA copy of
the field stays outside DDP.

Devices: the field, its EMA copy, the preprocessing constants and (when it fits) the training data
live on ``accelerator.device`` from the start. Between logging steps a step makes no host
synchronization of its own (see ``flows.training.guard``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import Tensor
from tqdm.auto import tqdm

from flows import evaluation
from flows.build import init_from, make_context, make_data, make_field, make_flow, make_objective
from flows.config import Config
from flows.data import Data
from flows.data.batches import Batches
from flows.errors import TrainingAborted
from flows.objectives import objective_kind
from flows.report import final_pictures
from flows.tracking import hyperparameters, log_images, tracker_names
from flows.training.accelerator import end, new_accelerator
from flows.training.ema import EMA
from flows.training.guard import StepGuard
from flows.training.schedule import EvalSchedule, Plan, Progress, Selection, lr_lambda
from flows.training.step import OptimizerStep
from flows.training.writer import RunWriter

__all__ = ["Trainer"]


class Trainer:
    """One run of ``cfg``. ``data``: these splits instead of ``cfg.data``'s (a fold of the cross-validation);
    ``stop_at``: end at this step, the learning-rate schedule still spanning ``train.steps`` (a refit)."""

    def __init__(self, cfg: Config, resume: bool = False, data: Data | None = None, stop_at: int | None = None):
        self.cfg, tc = cfg, cfg.train
        self.stop_at = stop_at
        self.accelerator = acc = new_accelerator(cfg)
        if tc.batch_size % (acc.num_processes * tc.grad_accum):
            raise TrainingAborted(
                f"train.batch_size={tc.batch_size} must be divisible by the number of processes "
                f"({acc.num_processes}) x train.grad_accum ({tc.grad_accum})."
            )
        set_seed(tc.seed)  # identical initial weights on every process
        self.data = make_data(cfg) if data is None else data
        self.data.preprocess = self.data.preprocess.to(acc.device)
        self.context = make_context(cfg, self.data)  # None: unconditional
        if self.context is not None:
            self.context = self.context.to(acc.device)
        self.field = make_field(cfg, self.data.shape, self.context)
        if tc.init_from and not resume:
            acc.print(init_from(cfg, self.field, self.data.shape))
        self.field.to(acc.device)  # before the EMA copy and the optimizer see it
        self.ema = EMA(self.field, acc.device, tc.ema_decay)
        objective = make_objective(cfg, self.field, self.context)
        # fused Adam: one kernel for all parameters, 3x faster than the default on CPU (0.10 vs 0.34 ms, MLP 3x64)
        opt = torch.optim.Adam(self.field.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
        self._split = Batches(
            self.data.train,
            self._batch_size(),
            tc.seed,
            acc.process_index,
            acc.num_processes,
            acc.device,
            context=self.data.train_context,
        )
        self.progress = Progress()
        self.schedule = EvalSchedule(tc, self.progress)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, self.progress))
        self.objective, self.opt, self.sched = acc.prepare(objective, opt, sched)
        self.writer = RunWriter(acc, cfg)
        zero_grad = partial(self.opt.zero_grad, set_to_none=True)
        self.guard = StepGuard(
            acc, self.progress, tc.max_bad_steps, self.writer.run_dir, self.writer.log, self.save, zero_grad
        )
        # solver failures (an ODE in the loss) must be agreed on by all processes before backward
        solves_ode = objective_kind(cfg.objective.name).solves_ode
        self.work_unit = "function evaluations" if solves_ode else "steps"  # what Progress.work counts
        agree = solves_ode and acc.num_processes > 1
        parts = (self.objective, self.opt, self.sched, self.ema, self.guard, self.data.preprocess)
        self.stepper = OptimizerStep(acc, *parts, tc.grad_clip, tc.grad_accum, agree, self.context)
        self.selection = Selection(self.data.val is not None, tc.patience, self.progress)
        data, size = self.data, cfg.eval.periodic_size
        periodic, periodic_c = (data.val, data.val_context) if data.val is not None else (data.test, data.test_context)
        self.eval_points = {
            "periodic": (periodic[:size], periodic_c[:size] if periodic_c is not None else None),
            "final": (data.test, data.test_context),
        }
        # the flow of the EMA weights: what every evaluation and picture uses
        self.flow = make_flow(cfg, self.ema.module, data.preprocess, data.shape, context=self.context)
        if resume:
            progress, self.selection.best = self.writer.resume(self.ema)
            self.ema.sync_count()
            vars(self.progress).update(progress)
            self.guard.skipped.fill_(self.progress.pending_skips)
            self.schedule.resume()
        else:
            self.writer.check_fresh()
        self.plan = Plan(tc, self.progress)
        self.writer.write_config()
        if tracker_names(cfg):  # TensorBoard: run_dir/logs/<run name>
            acc.init_trackers(self.writer.run_dir.name, config=hyperparameters(cfg))

    def _batch_size(self) -> int:
        """train.batch_size, or the whole table (a multiple of the process count) when the table is smaller."""
        acc, tc, rows = self.accelerator, self.cfg.train, len(self.data.train)
        if tc.batch_size <= rows:
            return tc.batch_size
        parts = acc.num_processes * tc.grad_accum
        batch = rows - rows % parts
        if batch == 0:
            raise TrainingAborted(
                f"{rows} training rows cannot be split over {acc.num_processes} processes x "
                f"train.grad_accum={tc.grad_accum}."
            )
        acc.print(
            f"train.batch_size={tc.batch_size} is larger than the {rows} training rows: each batch is the whole table."
        )
        return batch

    def batches(self) -> Iterator[Tensor]:
        """This process's training batches from the current step on (a pure function of the step)."""
        return self._split.from_step(self.progress.step)

    def save(self) -> None:
        """A training checkpoint (the running EMA and the best weights) and the inference file."""
        # steps skipped on the device since the last check travel with the checkpoint (one sync per save), so a
        # resumed run counts them at the same step as an uninterrupted one
        self.progress.pending_skips = int(self.guard.skipped.item())
        data = self.data
        self.writer.save(
            self.progress.step,
            self.ema,
            vars(self.progress),
            self.selection.best,
            self.field,
            data.preprocess,
            data.shape,
            self.context,
        )

    def step(self, batch: Tensor | tuple[Tensor, Tensor], full_record: bool = True) -> dict[str, Any] | None:
        """One optimizer step on a raw batch (with its contexts: a pair); None if skipped. The metrics record only
        when ``full_record``."""
        raw, context = batch if isinstance(batch, tuple) else (batch, None)
        return self.stepper(raw, full_record, context)

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, which: str, **extra: Any) -> dict[str, Any]:
        """Held-out NLL of the EMA weights (data units), split over processes: ``Flow.log_prob``'s path. Hutchinson
        probes and dequantization noise are seeded (``train.seed``, the process), the same at every evaluation."""
        cfg, flow = self.cfg, self.flow
        flow.step = self.progress.step
        points, context = self.eval_points[which]
        # the same probes and dequantization noise at every evaluation: the weights are compared on equal terms
        acc = self.accelerator
        generator = torch.Generator(acc.device).manual_seed(cfg.train.seed + 1_000_003 * acc.process_index)
        # an augmented flow's periodic evaluations compare weights on the ELBO (K = 1, a bound too), at a plain
        # flow's cost: K draws would cost the training budget K times the evaluation time
        k = cfg.eval.augment_samples if which == "final" else 1
        limit = cfg.eval.periodic_size if which == "final" else 0  # the final evaluation: how tight a bound is
        opts = {"trace": cfg.eval.trace, "augment_samples": k}
        result, _, info = evaluation.evaluate(
            acc, flow, points, cfg.eval.batch_size, generator=generator, context=context, gap_points=limit, **opts
        )
        solver = info["solver"]
        result |= {
            "nfe": info["nfe"],
            "trace": info["trace"],
            "solver": f"{solver['method']} atol={solver['atol']:g} rtol={solver['rtol']:g}",
            "seconds": info["seconds"],
        }
        split = "validation" if which == "periodic" and self.selection.active else "held-out"
        self.writer.log({"step": self.progress.step, "eval": which, "split": split, **extra, **result})
        self.accelerator.print(f"step {self.progress.step}: {split} {evaluation.describe(result)}")
        return result

    def _periodic(self, budgeted: bool = True) -> bool:
        """A periodic evaluation (its time counts against the budget during training, not after it); True when
        selection says stop."""
        progress, t0 = self.progress, time.perf_counter()
        result = self.evaluate("periodic", train_time=progress.train_time)
        if budgeted:
            progress.train_time += time.perf_counter() - t0
        self.schedule.done(progress.step)
        return self.selection.offer(result["nll"], self.ema)

    def _agreed(self, value: float, how: str = "max") -> float:
        """``value`` agreed over processes, the largest (or ``how``) of them (a collective when there are several)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return value
        return float(acc.reduce(torch.tensor([value], device=acc.device, dtype=torch.float64), how).item())

    def _plan_due(self, log_now: bool) -> bool:
        """Time to fix the plan (``Plan.ready``); several processes decide together, at logging steps."""
        if not self.plan.pending:
            return False
        if self.accelerator.num_processes == 1:
            return self.plan.ready()
        return log_now and self._agreed(float(self.plan.ready())) > 0

    def _fix_plan(self) -> bool:
        """Turn what is left of the time budget into work (``Plan``), after one timed periodic evaluation
        when the run evaluates periodically; True when that evaluation says stop."""
        tc, progress, stop, seconds = self.cfg.train, self.progress, False, 0.0
        evaluate = bool(tc.eval_every or self.schedule.marks())
        if evaluate:
            t0 = time.perf_counter()
            stop = self._periodic()
            seconds = self._agreed(time.perf_counter() - t0)
        horizon = self.plan.fix(self._agreed(progress.train_time), seconds, self.schedule.evals_left())
        progress.horizon = self._agreed(horizon, "min")  # identical on every process
        if evaluate:  # the marks passed by now count as evaluated
            self.schedule.done(progress.step)
        self.writer.log({"step": progress.step, "planned_work": progress.horizon, "work": progress.work})
        self.accelerator.print(
            f"step {progress.step}: the time budget fits {progress.horizon:.0f} {self.work_unit} in all; "
            "the learning-rate schedule and the evaluation marks span them"
        )
        return stop

    # ----------------------------------------------------------------- the loop
    def run_and_end(self) -> dict[str, Any]:
        """:meth:`run`, then end the processes together (``flows.training.accelerator.end``); on a failure at once,
        without waiting for processes that may not come."""
        try:
            result = self.run()
        except BaseException:
            self.accelerator.end_training()
            raise
        end(self.accelerator)
        return result

    def run(self) -> dict[str, Any]:
        acc, tc, progress = self.accelerator, self.cfg.train, self.progress
        bar = tqdm(
            total=tc.steps,
            initial=progress.step,
            disable=not acc.is_main_process,
            dynamic_ncols=True,
            desc="train",
            mininterval=0.2 if sys.stderr.isatty() else 30,
        )  # a log file: a line every 30 s
        batches, budget = self.batches(), 60 * tc.time_limit if tc.time_limit is not None else None
        self.objective.train()
        last = tc.steps if self.stop_at is None else min(tc.steps, self.stop_at)
        self._bar_total(bar, last)
        while progress.step < last:
            if progress.horizon is not None and progress.work >= progress.horizon:
                acc.print(f"the planned work of the time budget is done at step {progress.step}")
                break
            log_now = (progress.step + 1) % tc.log_every == 0 or progress.step == 0
            # the clock is a safety stop (the plan normally ends first); processes agree on logging steps
            if (
                budget is not None
                and (log_now or acc.num_processes == 1)
                and self._agreed(progress.train_time) >= budget
            ):
                acc.print(f"time limit of {tc.time_limit} min reached at step {progress.step}")
                break
            raw, t0 = next(batches), time.perf_counter()
            record = self.step(raw, full_record=log_now)
            seconds = time.perf_counter() - t0
            progress.train_time += seconds
            if record is None:
                continue
            progress.step += 1
            progress.work += self.stepper.work
            self.plan.observe(seconds)
            bar.update(1)
            if log_now:
                self._log_step(record, t0, bar)
                self._bar_total(bar, last)  # the work per step drifts (the NFE of maximum likelihood)
            if self._plan_due(log_now):
                stop = self._fix_plan()
                self._bar_total(bar, last)
            else:
                stop = False
            if not stop and self.schedule.due(progress.step) and progress.step < last:
                stop = self._periodic()
            if stop:
                acc.print(
                    f"early stopping at step {progress.step}: no better validation NLL in {tc.patience} "
                    f"evaluations (best {progress.best_nll:.4f} at step {progress.best_step})"
                )
                break
            if progress.step % tc.save_every == 0:
                self.save()
        bar.close()
        return self.finish()

    def _bar_total(self, bar: tqdm, last: int) -> None:
        """The bar's total: the steps the time budget's plan fits (its ETA then ends inside the budget), else
        ``last``."""
        progress = self.progress
        total = last
        if progress.horizon is not None and progress.step > 0 and progress.work > 0:
            per_step = progress.work / progress.step  # the work of a step so far (maximum likelihood: its NFE)
            total = min(last, progress.step + math.ceil(max(progress.horizon - progress.work, 0) / per_step))
        if bar.total != total:
            bar.total = total
            bar.refresh()

    def _log_step(self, record: dict[str, Any], t0: float, bar: tqdm) -> None:
        progress = self.progress
        record |= {"step": progress.step, "step_time": time.perf_counter() - t0, "train_time": progress.train_time}
        self.writer.log(record)
        if "nll" in record:
            nfe = f"{record['nfe_forward']:.0f}/{record['nfe_backward']:.0f}"
            bar.set_postfix(nll=f"{record['nll']:.3f}", nfe=nfe, refresh=False)
        else:
            bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)

    def finish(self) -> dict[str, Any]:
        """The last checkpoint; with selection, the best weights into the inference file; the final held-out
        evaluation, ``eval.json`` and the pictures, all from the objects in memory."""
        acc, progress, selection = self.accelerator, self.progress, self.selection
        self.guard.check_skipped()
        if selection.active and self.schedule.last_eval_step != progress.step:
            self._periodic(budgeted=False)
        self.save()  # the checkpoint keeps the running EMA (to train on) and the best one
        if selection.restore(self.ema):  # the inference file and the final evaluation use the best
            acc.print(
                f"kept the EMA weights of step {progress.best_step} (validation NLL {progress.best_nll:.4f} nats)"
            )
            self.writer.export(self.field, self.ema, self.data.preprocess, self.data.shape, progress.step, self.context)
        result = self.evaluate("final", train_time=progress.train_time) | {"train_time": progress.train_time}
        if selection.active:
            result |= {"best_step": progress.best_step, "val_nll": progress.best_nll}
        self.writer.write_result(progress.step, result)
        if acc.is_main_process and self.cfg.eval.plot:
            pictures = final_pictures(self.flow, self.data.test, self.writer.run_dir, self.data.name)
            if pictures:
                log_images(acc, pictures, progress.step)
        acc.wait_for_everyone()
        return result
