"""A mixture of flows trained one after another within one budget (``train.members`` > 1).

Member k is an ordinary run in ``run_dir/members/k`` (seed ``train.seed + k``), with what is left of the
time budget as its own: validation stops a member early on a small table, and the rest of the budget
goes to the next one. A member starts only while a fifth of the budget is left (``MIN_SHARE``), so on a
large table, where the first member uses the whole budget, the model stays a single flow. The mixture is
every member except those clearly worse on the validation rows (``choose``), with equal weights. Its inference file is
``run_dir/model.safetensors``, a :class:`flows.mixture.Mixture` to ``flows.load``; ``eval.json`` holds the
held-out NLL of the mixture and what each member scored.

Resume: finished members (their ``eval.json``) are kept, the member in progress resumes from its
checkpoint, and the budget counts every member's training time.
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
from safetensors.torch import load_file

from flows import checkpoint
from flows.build import make_data
from flows.config import Config, load_config, to_dict
from flows.errors import TrainingAborted
from flows.evaluation import describe, evaluate, gathered_log_prob
from flows.files import atomic_write
from flows.flowfile import MODEL_FILE, read, write
from flows.mixture import Mixture
from flows.report import final_pictures
from flows.training.accelerator import end, new_accelerator
from flows.training.trainer import Trainer

__all__ = ["train_members", "train_split", "choose", "mix", "MIN_SHARE"]

MIN_SHARE = 0.2  # a member starts only while this share of the time budget is left
MEMBER_FILE = "member.json"  # in a member's folder once it is finished: the budget it used


def _member_config(cfg: Config, k: int, left: float | None) -> Config:
    tc = dataclasses.replace(
        cfg.train, seed=cfg.train.seed + k, members=1, time_limit=None if left is None else left / 60
    )
    return dataclasses.replace(
        cfg,
        run_dir=str(Path(cfg.run_dir) / "members" / str(k)),
        train=tc,
        eval=dataclasses.replace(cfg.eval, plot=False),
    )


def _train_one(cfg: Config, resume: bool) -> dict[str, Any]:
    return Trainer(cfg, resume).run_and_end()


def choose(val_lp: torch.Tensor, tolerance: float = 3.0) -> list[int]:
    """The members of the mixture, from their validation log-densities ``(M, N)``: every member except those
    clearly worse than the best one (mean log-density lower by more than ``tolerance`` standard errors of
    the paired difference), best first. An equal-weight mixture is never worse than its average member
    (Jensen), while choosing among members on a few dozen validation rows mostly fits their noise."""
    means = val_lp.mean(1)
    best = int(torch.argmax(means))
    diff = val_lp[best] - val_lp  # (M, N): how much better the best member is, row by row
    n = val_lp.shape[1]
    se = diff.std(1) / math.sqrt(n) if n > 1 else torch.zeros(len(val_lp), dtype=val_lp.dtype, device=val_lp.device)
    keep = [m for m in range(len(val_lp)) if m == best or float(diff[m].mean()) <= tolerance * float(se[m])]
    return sorted(keep, key=lambda m: -float(means[m]))


def _share(left: float | None, first: float | None, slots: int) -> float | None:
    """The budget of the next member: all that is left for the first; then what is left split over the
    member slots still open, or, when the first member's time says fewer fit, over as many as fit."""
    if left is None or first is None:  # no limit, or the first member: all of it
        return left
    return left / max(1, min(slots, math.floor(left / first)))


def train_split(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """A run with one validation split: a mixture trained member by member (``train.members`` > 1), or one flow."""
    if cfg.train.members > 1:
        return train_members(cfg, resume)
    return Trainer(cfg, resume).run_and_end()


def train_members(cfg: Config, resume: bool = False) -> dict[str, Any]:
    root, tc = Path(cfg.run_dir), cfg.train
    acc = new_accelerator(cfg)
    if not resume and ((root / MODEL_FILE).exists() or (root / "members").exists()):
        raise TrainingAborted(
            f"run directory '{root}' already holds a run. Continue it with --resume {root}, or choose another "
            "directory with run_dir=... (nothing was changed)."
        )
    if acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write(root / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    acc.wait_for_everyone()
    budget = 60 * tc.time_limit if tc.time_limit is not None else None
    used, first, trained = 0.0, None, []  # seconds of the budget used (each member's wall time), member 0's
    for k in range(tc.members):
        folder = root / "members" / str(k)
        if (folder / MEMBER_FILE).exists():  # finished before a resume
            seconds = json.loads((folder / MEMBER_FILE).read_text())["budget_seconds"]
        else:
            started = checkpoint.latest_checkpoint(folder) is not None
            left = None if budget is None else budget - used
            if not started:
                if k > 0 and left is not None and left < MIN_SHARE * budget:
                    break
                if acc.is_main_process and folder.exists():  # killed before its first checkpoint: start again
                    shutil.rmtree(folder)
                acc.wait_for_everyone()
            member = (
                load_config(folder / "config.yaml")
                if started
                else _member_config(cfg, k, _share(left, first, tc.members - k))
            )
            acc.print(f"member {k}: {'resuming' if started else 'training'} in {folder}")
            t0 = time.perf_counter()
            result = _train_one(member, started)
            # the budget counts the member's wall time (its start, final evaluation and files too), at least its
            # training time (all of it, when it was resumed)
            seconds = max(result["train_time"], time.perf_counter() - t0)
            if acc.is_main_process:
                atomic_write(folder / MEMBER_FILE, json.dumps({**result, "budget_seconds": seconds}, indent=2))
            acc.wait_for_everyone()
        used += seconds
        first = seconds if first is None else first
        trained.append(folder)
    return mix(cfg, trained, used)


def mix(cfg: Config, trained: list[Path], used: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Choose the mixture on the validation rows (every member without them), write its inference file, evaluate
    it on the test rows; ``eval.json`` has the result and ``extra`` (what a caller chose)."""
    root = Path(cfg.run_dir)
    acc = new_accelerator(cfg)
    data = make_data(cfg)
    members = [read(folder).to(acc.device) for folder in trained]
    opts = {"trace": cfg.eval.trace, "augment_samples": cfg.eval.augment_samples}
    if data.val is not None:
        val = data.val[: cfg.eval.periodic_size]
        val_c = data.val_context[: cfg.eval.periodic_size] if data.val_context is not None else None
        val_lp = torch.stack(
            [gathered_log_prob(acc, m, val, cfg.eval.batch_size, context=val_c, **opts)[0].cpu() for m in members]
        )
        chosen = choose(val_lp)
    else:  # nothing to choose on: every member, equally
        val_lp, chosen = None, list(range(len(members)))
    states = [load_file(str(trained[i] / MODEL_FILE)) for i in chosen]

    def part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    first = members[chosen[0]]
    if acc.is_main_process:
        write(
            root / MODEL_FILE,
            model_state=part(states[0], "model."),
            ema_state=part(states[0], "ema."),
            preprocess=first.preprocess.to("cpu"),
            field=to_dict(cfg.model),
            solver=cfg.eval.solver.options(),
            shape=first.shape,
            step=first.step,
            config=to_dict(cfg),
            members=[(part(s, "model."), part(s, "ema.")) for s in states[1:]],
            weights=[1 / len(chosen)] * len(chosen) if len(chosen) > 1 else None,
            context=first.context.to("cpu") if first.context is not None else None,
        )
    acc.wait_for_everyone()
    model = Mixture([members[i] for i in chosen], path=root / MODEL_FILE) if len(chosen) > 1 else members[chosen[0]]
    result, _, info = evaluate(
        acc, model, data.test, cfg.eval.batch_size, context=data.test_context, gap_points=cfg.eval.periodic_size, **opts
    )
    result |= {"nfe": info["nfe"], "trace": info["trace"], "seconds": info["seconds"], "train_time": used}
    result |= {"members": len(members), "chosen": chosen, **(extra or {})}
    if val_lp is not None:
        mixed = torch.logsumexp(val_lp[chosen], 0) - math.log(len(chosen))
        result |= {"val_nll": float(-mixed.mean()), "member_val_nll": [float(-v) for v in val_lp.mean(1)]}
    acc.print(f"mixture of members {chosen} (of {len(members)}): held-out {describe(result)}")
    if acc.is_main_process:
        atomic_write(root / "eval.json", json.dumps({"step": model.step, **result}, indent=2))
        with (root / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps({"step": model.step, "eval": "final", "split": "held-out", **result}) + "\n")
        if cfg.eval.plot:
            final_pictures(model, data.test, root, data.name)
    acc.wait_for_everyone()
    end(acc)
    return result
