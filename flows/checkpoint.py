"""How a run is saved: the slim inference file and the training checkpoints.

``run_dir/model.safetensors`` (``export`` / ``load``): safetensors weights (EMA and raw) +
preprocessing + the config. Loading never unpickles: a pickle/zip file (``torch.save``) is refused
before anything in it is read, and a truncated or foreign file gives a clear error.

``run_dir/checkpoints/step_N`` (``save_training`` / ``load_training``): Accelerate's state (model,
optimizer, scheduler, RNG of every process) plus the EMA and the best weights in safetensors and the
step counters in JSON. Written to a temporary directory and renamed, so a kill mid-save keeps the
previous one. Every write here is atomic (temp + rename).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from flows.config import Config, from_dict, to_dict
from flows.data.preprocess import Preprocess
from flows.errors import CheckpointError, ConfigError
from flows.model import Flow
from flows.nn import build_field

__all__ = [
    "FORMAT",
    "MODEL_FILE",
    "export",
    "load",
    "resolve",
    "latest_checkpoint",
    "save_training",
    "load_training",
    "trim_metrics",
]

FORMAT = "flows/1"
MODEL_FILE = "model.safetensors"


def export(
    path: str | Path,
    field: nn.Module,
    ema: nn.Module,
    preprocess: Preprocess,
    cfg: Config,
    shape: tuple[int, ...],
    step: int,
) -> Path:
    """Write the inference file atomically; a kill mid-write leaves the old file intact."""
    path = Path(path)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in field.state_dict().items()}
    tensors |= {f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
    tensors |= {k: v.detach().cpu().float() for k, v in preprocess.tensors().items()}
    metadata = {
        "format": FORMAT,
        "config": json.dumps(to_dict(cfg)),
        "dim": str(math.prod(shape)),
        "shape": json.dumps(list(shape)),
        "levels": str(preprocess.levels or 0),
        "logit_alpha": repr(preprocess.logit_alpha),
        "step": str(step),
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def resolve(path: str | Path) -> Path:
    """A run directory or a file → the inference file's path."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at '{path}' (give a run directory or a {MODEL_FILE} file).")
    return path


def _check_header(path: Path) -> None:
    """A safetensors file is an 8-byte header length N, then N bytes of JSON: check that first."""
    size = os.path.getsize(path)
    with path.open("rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] + 8 <= size:
        return
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise CheckpointError(
            f"'{path}' is a pickle-based file (torch.save). flows never unpickles checkpoints, "
            "because unpickling can run arbitrary code. Load it yourself only if you trust it, "
            "and re-export its weights with safetensors."
        )
    raise CheckpointError(f"'{path}' is truncated or not a safetensors file ({size} bytes).")


def load(path: str | Path, weights: str = "ema", map_location: str = "cpu") -> Flow:
    """Rebuild the flow from a run directory or inference file. weights: 'ema' or 'model'.

    Tensors are read onto ``map_location`` (the CPU); ``Flow.to(device)`` moves the field and the
    preprocessing on."""
    if weights not in ("ema", "model"):
        raise CheckpointError(f"weights must be 'ema' or 'model' (got {weights!r})")
    path = resolve(path)
    _check_header(path)
    try:
        with safe_open(str(path), framework="pt", device=map_location) as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"'{path}' is not a flows checkpoint (format {meta.get('format')!r}).")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open API)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"cannot read checkpoint '{path}': {e}") from None
    try:
        cfg = from_dict(Config, json.loads(meta["config"]))
        shape = tuple(json.loads(meta["shape"])) if "shape" in meta else (int(meta["dim"]),)
        levels, step = int(meta["levels"]), int(meta["step"])
        alpha = float(meta.get("logit_alpha", 0.0))
    except (KeyError, ValueError, TypeError, ConfigError) as e:
        raise CheckpointError(f"checkpoint '{path}' has unreadable metadata: {e}") from None
    prefix = {"ema": "ema.module.", "model": "model."}[weights]
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        field = build_field(cfg.model, shape)
        field.load_state_dict(state)
    except (RuntimeError, ConfigError) as e:
        raise CheckpointError(f"checkpoint '{path}' does not match its model config: {e}") from None
    pre = Preprocess(tensors["preprocess.shift"], tensors["preprocess.scale"], levels or None, alpha)
    return Flow(field.eval().requires_grad_(False), pre, cfg, shape, step, path)


# ---------------------------------------------------------------------- training checkpoints
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
        for stale in [*final.parent.glob(".tmp_step_*"), *run_dir.glob(f".{MODEL_FILE}.tmp*")]:
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
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
