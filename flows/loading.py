"""``flows.load``: the one way to open a trained flow (a run directory, a run, or a ``model.safetensors`` file)."""

from __future__ import annotations

import os

import torch

from flows.config import load_config
from flows.errors import CheckpointError, ConfigError
from flows.flow import Flow
from flows.flowfile import read
from flows.mixture import Mixture

__all__ = ["load"]


def load(run: str | os.PathLike, weights: str = "ema", device: torch.device | str | None = None) -> Flow:
    """Open a trained flow.

    Args:
        run: a run directory, a :class:`Run`, or a ``model.safetensors`` file.
        weights: ``"ema"`` (the averaged weights the run evaluated; the best ones on validation when the
            run selected) or ``"model"`` (the raw weights of the last step).
        device: where to put it (default: the CPU; ``Flow.to`` moves it later).

    Returns:
        A :class:`flows.Flow` whose ``config`` is the run's :class:`flows.Config`. Safe on untrusted files:
        nothing is unpickled.
    """
    flow = read(os.fspath(run), weights)
    try:  # a file written without a run config (flows.flowfile.write(config=None)) keeps None
        flow.config = load_config(flow.config, lenient=True) if flow.config else None
        if isinstance(flow, Mixture):  # its members share the run's config
            for member in flow.members:
                member.config = flow.config
    except ConfigError as e:
        raise CheckpointError(f"checkpoint '{flow.path}' has unreadable metadata: {e}") from None
    return flow.to(device) if device is not None else flow
