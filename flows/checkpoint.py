"""The slim inference file: safetensors weights (EMA and raw) + preprocessing + the config.

Loading never unpickles: a pickle/zip file (``torch.save``) is refused before anything in it is
read, and a truncated or foreign file gives a clear error. Writes are atomic (temp + rename).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from flows.config import Config, from_dict, to_dict
from flows.data.preprocess import Preprocess
from flows.errors import CheckpointError, ConfigError
from flows.nn import build_field

__all__ = ["FORMAT", "MODEL_FILE", "export", "load", "Loaded", "resolve"]

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


@dataclass
class Loaded:
    field: nn.Module
    preprocess: Preprocess
    config: Config
    shape: tuple[int, ...]  # of one sample: (D,) or (C, H, W)
    step: int
    path: Path

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return next(self.field.parameters()).device

    def to(self, device: torch.device | str) -> Loaded:
        """Move the field and the preprocessing constants to ``device`` (in place); returns self."""
        self.field.to(device)
        self.preprocess = self.preprocess.to(device)
        return self


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


def load(path: str | Path, weights: str = "ema", map_location: str = "cpu") -> Loaded:
    """Rebuild the field from a run directory or inference file. weights: 'ema' or 'model'.

    Tensors are read onto ``map_location`` (the CPU); ``Loaded.to(device)`` moves the field and the
    preprocessing on."""
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
    return Loaded(field.eval().requires_grad_(False), pre, cfg, shape, step, path)
