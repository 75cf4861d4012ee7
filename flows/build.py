"""The edge where a config becomes objects, in one place: data, field, objective, flow, inference file.

Below this edge nothing knows the config module: the core (``flows.nn``, ``flows.ode``, ``flows.flow``,
...) takes plain keywords and its own settings objects; the objectives take their settings and solver
keywords; the data sources take ``data.*``.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from flows.config import Config, to_dict
from flows.context import Context
from flows.data import Data, build_data
from flows.errors import CheckpointError, ConfigError
from flows.flow import Flow
from flows.flowfile import read_weights, write
from flows.nn import build_field, settings_from
from flows.objectives import build_objective
from flows.preprocess import Preprocess

__all__ = ["make_data", "make_context", "make_field", "make_objective", "make_flow", "export", "init_from"]


def make_data(cfg: Config) -> Data:
    return build_data(cfg.data)


def make_context(cfg: Config, data: Data) -> Context | None:
    """What the run's flow is conditioned on (None: unconditional), from the training rows."""
    return data.conditioning(cfg.objective.label_dropout, cfg.data.context_regression)


def make_field(cfg: Config, shape: tuple[int, ...], context: Context | None = None) -> nn.Module:
    return build_field(cfg.model, shape, context)


def make_objective(cfg: Config, field: nn.Module, context: Context | None = None) -> nn.Module:
    """The training objective around ``field``, solving (maximum likelihood) with ``cfg.solver``."""
    return build_objective(field, cfg.objective, cfg.solver.options(), cfg.train.compile, context)


def make_flow(
    cfg: Config,
    field: nn.Module,
    preprocess: Preprocess,
    shape: tuple[int, ...],
    step: int = 0,
    context: Context | None = None,
) -> Flow:
    """A :class:`Flow` of ``field`` whose operations solve with ``cfg.eval.solver`` by default."""
    return Flow(field, preprocess, shape, dict(cfg.eval.solver.options()), cfg, step, context=context)


def export(
    path: str | Path,
    cfg: Config,
    field: nn.Module,
    ema: nn.Module,
    preprocess: Preprocess,
    shape: tuple[int, ...],
    step: int,
    context: Context | None = None,
) -> Path:
    """Write the inference file of a run: raw and EMA weights, preprocessing, field settings, eval solver, config,
    and a conditional run's context."""
    return write(
        path,
        model_state=field.state_dict(),
        ema_state=ema.state_dict(),
        preprocess=preprocess,
        field=to_dict(cfg.model),
        solver=cfg.eval.solver.options(),
        shape=shape,
        step=step,
        config=to_dict(cfg),
        context=context,
    )


def init_from(cfg: Config, field: nn.Module, shape: tuple[int, ...]) -> str:
    """Copy the EMA weights of the run ``cfg.train.init_from`` into ``field`` (the same network, possibly
    trained with the other objective); returns a line saying what was loaded."""
    source = cfg.train.init_from
    state, meta, path = read_weights(source)
    try:
        same = tuple(meta["shape"]) == tuple(shape) and settings_from(meta["field"]) == cfg.model
        if same:
            field.load_state_dict(state)
    except (ConfigError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"train.init_from='{source}': its weights do not fit this network: {e}") from None
    if not same:
        augment = f", model.augment={meta['field'].get('augment', 0)} against {getattr(cfg.model, 'augment', 0)}"
        raise CheckpointError(
            f"train.init_from='{source}': that run's network ({meta['field'].get('name')}, data shape "
            f"{meta['shape']}) differs from this config's ({cfg.model.name}, {shape}{augment}). Use the same "
            "model.* settings and data, or drop init_from."
        )
    objective = meta["config"].get("objective", {}).get("name")
    return f"initialized from {path} (step {meta['step']}, {objective})"
