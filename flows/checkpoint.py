"""How a training run is checkpointed: ``run_dir/checkpoints/step_N``.

``save_training`` / ``load_training``: Accelerate's state (model, optimizer, scheduler, RNG of every
process) plus the EMA and the best weights in safetensors and the step counters in JSON. Written to a
temporary directory and renamed, so a kill mid-save keeps the previous one. ``torch.load`` runs with
``weights_only=True`` (Accelerate's default), so a tampered file is refused without running code. The
slim inference file ``run_dir/model.safetensors`` is the core's (``flows.flowfile``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from flows.errors import CheckpointError
from flows.files import atomic_write, leftovers
from flows.flowfile import MODEL_FILE

__all__ = ["latest_checkpoint", "save_training", "load_training", "trim_metrics"]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step_*"))
    return ckpts[-1] if ckpts else None


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def save_training(
    acc: Accelerator,
    run_dir: Path,
    step: int,
    ema: nn.Module,
    progress: dict,
    best: dict[str, torch.Tensor] | None,
    keep: int,
) -> Path:
    """Write ``run_dir/checkpoints/step_N`` (a collective: every process calls it) and keep the last ``keep``."""
    final = run_dir / "checkpoints" / f"step_{step:08d}"
    tmp = final.with_name(f".tmp_{final.name}")
    acc.wait_for_everyone()
    if acc.is_main_process:  # leftovers of a save that was killed half-way
        written = [p for name in (MODEL_FILE, "metrics.jsonl", "eval.json") for p in leftovers(run_dir / name)]
        for stale in [*final.parent.glob(".tmp_step_*"), *written]:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    # save_state ends without a barrier: every rank must have written its files (RNG state) into tmp
    # before the main process renames it, or a rank writes into a directory that no longer exists
    acc.wait_for_everyone()
    if acc.is_main_process:
        _save_tensors(ema.state_dict(), tmp / "ema.safetensors")
        (tmp / "progress.json").write_text(json.dumps(progress))
        if best is not None:
            _save_tensors(best, tmp / "best.safetensors")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(final.parent.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_training(acc: Accelerator, ckpt: Path, ema: nn.Module) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Restore Accelerate's state and the EMA from ``ckpt``; returns (progress counters, best weights or None).

    torch.load runs with weights_only=True (Accelerate's default), so a tampered file is refused
    without running code; every failure is one CheckpointError that says what to do.
    """
    try:
        acc.load_state(str(ckpt))
        ema.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
        progress = json.loads((ckpt / "progress.json").read_text())
        best_file = ckpt / "best.safetensors"
        best = load_file(str(best_file), device=str(acc.device)) if best_file.exists() else None
    except Exception as e:  # noqa: BLE001 - every failure here means the same thing to the user
        kind = "refused: it holds pickled code or objects" if "weights_only" in str(e) else "unreadable"
        raise CheckpointError(
            f"cannot resume from '{ckpt}': the checkpoint is {kind}, or does not match the config "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300]}). Nothing was changed. If overrides changed "
            "the model, drop them; otherwise delete this checkpoint directory to fall back to the previous one."
        ) from None
    return progress, best


def trim_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint (a killed run repeats those steps), and a torn last line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    atomic_write(path, "".join(line + "\n" for line in kept))
