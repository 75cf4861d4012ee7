"""The slim inference file ``model.safetensors``: weights (raw and EMA), preprocessing, and metadata.

``write`` and ``read`` are all of it. Reading never unpickles: a pickle/zip file (``torch.save``) is
refused before anything in it is read, and a truncated or foreign file gives a clear error. The
metadata holds the field's settings and the default solver (``field``, ``solver``; files written
before those keys existed are read from their ``config``), the data shape, levels and step, and the
run's whole configuration as JSON, which the application parses (``flows.load``).

A mixture (``train.members``) is one file: its first member is stored as a single flow is (so
``read_weights`` and ``train.init_from`` see that member), the others under ``members.{k}.``, and the
metadata key ``mixture`` holds the weights; ``read`` then returns a :class:`flows.mixture.Mixture`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flows.context import Context
from flows.errors import CheckpointError, ConfigError, FlowsError
from flows.files import atomic_path
from flows.flow import Flow
from flows.mixture import Mixture
from flows.nn import build_field, settings_from
from flows.ode import DEFAULTS
from flows.preprocess import Preprocess

__all__ = ["FORMAT", "MODEL_FILE", "write", "read", "read_weights", "resolve"]

FORMAT = "flows/1"
MODEL_FILE = "model.safetensors"


def write(
    path: str | Path,
    *,
    model_state: Mapping[str, torch.Tensor],
    ema_state: Mapping[str, torch.Tensor],
    preprocess: Preprocess,
    field: Mapping[str, Any],
    solver: Mapping[str, Any],
    shape: tuple[int, ...],
    step: int,
    config: Mapping[str, Any] | None = None,
    members: Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]] = (),
    weights: Sequence[float] | None = None,
    context: Context | None = None,
) -> Path:
    """Write the inference file atomically (temp + rename: a kill mid-write leaves the old file intact).

    ``model_state``: the raw weights; ``ema_state``: an ``AveragedModel``'s state dict (``module.*``,
    ``n_averaged``); ``field``: the field's settings with ``name``; ``solver``: the default solver options;
    ``config``: the run's configuration as plain data; ``context``: a conditional flow's. ``members``: the (model,
    EMA) states of a mixture's other members, and ``weights``: the mixture's weights (the first member's first).
    """
    path = Path(path)

    def copies(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        # copies: the two states may share tensors (safetensors refuses shared memory)
        return {f"{prefix}{k}": v.detach().cpu().clone().contiguous() for k, v in state.items()}

    tensors = copies(model_state, "model.") | copies(ema_state, "ema.")
    for i, (model_k, ema_k) in enumerate(members, start=1):
        tensors |= copies(model_k, f"members.{i}.model.") | copies(ema_k, f"members.{i}.ema.")
    tensors |= {k: v.detach().cpu().float() for k, v in preprocess.tensors().items()}
    if context is not None:
        tensors |= {k: v.detach().cpu().contiguous() for k, v in context.tensors().items()}
    metadata = {
        "format": FORMAT,
        "config": json.dumps(dict(config or {})),
        "field": json.dumps(dict(field)),
        "solver": json.dumps(dict(solver)),
        "dim": str(math.prod(shape)),
        "shape": json.dumps(list(shape)),
        "levels": str(preprocess.levels or 0),
        "logit_alpha": repr(preprocess.logit_alpha),
        "step": str(step),
    }
    if context is not None:
        metadata["context"] = context.metadata()
    if members or weights is not None:
        weights = list(weights) if weights is not None else [1.0 / (len(members) + 1)] * (len(members) + 1)
        if len(weights) != len(members) + 1:
            raise CheckpointError(f"{len(weights)} mixture weights for {len(members) + 1} members")
        metadata["mixture"] = json.dumps([float(w) for w in weights])
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
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


def read_weights(
    path: str | Path, weights: str = "ema", map_location: str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """(the field's state dict, the parsed metadata, the file): what ``read`` builds a flow from, without
    building one (``train.init_from`` copies the weights into a field it has). weights: 'ema' or 'model'."""
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
        config = json.loads(meta["config"])
        field = json.loads(meta["field"]) if "field" in meta else config["model"]
        solver = json.loads(meta["solver"]) if "solver" in meta else config["eval"]["solver"]
        parsed = {
            "config": config,
            "field": field,
            "solver": {k: v for k, v in solver.items() if k in DEFAULTS},
            "shape": tuple(json.loads(meta["shape"])) if "shape" in meta else (int(meta["dim"]),),
            "levels": int(meta["levels"]) or None,
            "step": int(meta["step"]),
            "logit_alpha": float(meta.get("logit_alpha", 0.0)),
            "preprocess": (tensors["preprocess.shift"], tensors["preprocess.scale"]),
            "bounds": (tensors["preprocess.low"], tensors["preprocess.high"]) if "preprocess.low" in tensors else None,
            "context": Context.from_file(meta["context"], tensors) if "context" in meta else None,
            "mixture": json.loads(meta["mixture"]) if "mixture" in meta else None,
        }
    except (KeyError, ValueError, TypeError, AttributeError, FlowsError) as e:
        raise CheckpointError(f"checkpoint '{path}' has unreadable metadata: {e}") from None
    prefix = {"ema": "ema.module.", "model": "model."}[weights]
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if parsed["mixture"] is not None:  # the other members' states, for read
        parsed["members"] = [
            {k[len(f"members.{i}.{prefix}") :]: v for k, v in tensors.items() if k.startswith(f"members.{i}.{prefix}")}
            for i in range(1, len(parsed["mixture"]))
        ]
    return state, parsed, path


def read(path: str | Path, weights: str = "ema", map_location: str = "cpu") -> Flow:
    """Rebuild the flow from a run directory or inference file. weights: 'ema' or 'model'.

    Tensors are read onto ``map_location`` (the CPU); ``Flow.to(device)`` moves the field and the
    preprocessing on. ``Flow.config`` is the run's configuration as plain data (``flows.load`` parses it).
    """
    state, meta, path = read_weights(path, weights, map_location)
    shift, scale = meta["preprocess"]
    pre = Preprocess(shift, scale, meta["levels"], meta["logit_alpha"], *(meta["bounds"] or (None, None)))
    context = meta["context"]
    flows = []
    for member in [state, *meta.get("members", [])]:
        try:
            field = build_field(settings_from(meta["field"]), meta["shape"], context)
            field.load_state_dict(member)
        except (RuntimeError, ConfigError, TypeError) as e:
            raise CheckpointError(f"checkpoint '{path}' does not match its model config: {e}") from None
        solver = {**DEFAULTS, **meta["solver"]}
        flows.append(
            Flow(
                field.eval().requires_grad_(False),
                pre,
                meta["shape"],
                solver,
                meta["config"],
                meta["step"],
                path,
                context,
            )
        )
    if meta["mixture"] is None:
        return flows[0]
    return Mixture(flows, meta["mixture"], path)
