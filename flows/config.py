"""Typed configuration: dataclasses, YAML files and dotted ``key=value`` overrides.

Every key is checked: an unknown key names the nearest valid one, a value of the wrong type
names the expected type. ``model`` and ``objective`` are typed variants: ``model.name`` picks the
settings class its kind registered (``flows.nn``), ``objective.name`` likewise (``flows.objectives``),
and each section checks its own values. A key of another kind (``model.channels`` with
``model.name=mlp``) is ignored with a one-line notice unless it holds that kind's default.
``load_config(path, overrides)`` is the one entry point; ``flows.build`` turns a config into objects.

A ``devices`` section maps a device type to dotted settings for runs on it (``devices: {cuda: {train.batch_size:
1024}}``): a run applies the one of its device above the file and below every override, and keeps the result.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from flows.data.registry import DATASETS, DataConfig
from flows.errors import ConfigError, unknown_value
from flows.nn import FIELDS, MLPSettings, field_kind
from flows.objectives import OBJECTIVES, MLESettings, objective_kind
from flows.ode import SOLVER_METHODS, SolverOptions, check_method, solver_options

__all__ = [
    "DATASETS",
    "DEVICE_TYPES",
    "SOLVER_METHODS",
    "TRACKERS",
    "check_method",
    "Config",
    "DataConfig",
    "SolverConfig",
    "TrainConfig",
    "EvalConfig",
    "SimulationConfig",
    "load_config",
    "device_notice",
    "from_dict",
    "to_dict",
]

# Accelerate's trackers (tests/test_tracking.py checks this list against accelerate.utils.LoggerType)
# the device types a ``devices`` section may name: what accelerate.PartialState().device.type gives a run
DEVICE_TYPES = ("cuda", "cpu", "mps", "xpu")
TRACKERS = ("all", "tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio")


@dataclass
class SolverConfig:
    method: str = "dopri5"  # a torchdiffeq method: adaptive (dopri5, ...) or fixed-step (rk4, euler, ...)
    atol: float = 1e-5
    rtol: float = 1e-5
    step_size: float | None = None  # fixed-step methods (euler, rk4, midpoint)
    adjoint: bool = True  # adjoint gradients (O(1) memory) or direct backprop
    max_steps: int = 10_000  # adaptive solvers give up (with a clear error) past this
    # euler, midpoint or rk4 without the adjoint: torch.compile the whole fixed-step solve (true, or a
    # torch.compile mode such as reduce-overhead)
    compile: bool | str = False
    # euler, midpoint or rk4 without the adjoint: keep one step's graph, recompute it in the backward (memory of
    # one step for one more forward per step)
    checkpoint: bool = False
    # dopri5 without the adjoint: flows' own loop reads the step control back every this many steps (1:
    # torchdiffeq's loop, every step); null: 1 on a CPU (as before), 8 on a GPU
    sync_every: int | None = None

    def options(self) -> SolverOptions:
        """The plain keywords every solve of ``flows.ode`` takes."""
        return SolverOptions(**dataclasses.asdict(self))

    def check(self, prefix: str = "solver.") -> None:
        solver_options(prefix, **self.options())  # the core's own check, naming the config keys


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 512  # global batch, split over processes
    grad_accum: int = 1  # micro-batches per step (each process: batch_size / processes / grad_accum rows at once)
    lr: float = 1e-3
    warmup_steps: int = 100
    schedule: Literal["constant", "cosine"] = "constant"  # after warm-up; cosine decays to 0 at steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 10
    eval_every: int = 500  # held-out NLL on eval.periodic_size points (validation split if any); 0 disables
    evals_per_budget: int = 0  # also evaluate each time another 1/K of the budget has passed (time_limit, or steps)
    patience: int = 0  # stop after this many validation evaluations without a new best (0: never)
    save_every: int = 500
    keep_checkpoints: int = 2
    max_bad_steps: int = 10  # non-finite loss/gradient or solver failure: stop after this many
    time_limit: float | None = None  # minutes of training and periodic evaluation; the lr schedule spans it
    members: int = 1  # > 1: train flows one after another (seeds seed, seed+1, ...) and mix them (flows.mixture);
    # with time_limit, a new member starts only while a fifth of the budget is left
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # flow matching only; never inside ODE solves
    compile: bool = False  # flow matching only: torch.compile the field for the regression (first steps compile)
    init_from: str | None = None  # a run (or model.safetensors) whose EMA weights start this one
    log_with: str | list[str] | None = None  # trackers through Accelerate: tensorboard, wandb, mlflow, ... or "all"

    def check(self, prefix: str = "train.") -> None:
        p = prefix
        _raise_first(
            [
                (self.steps >= 0, f"{p}steps must be >= 0"),
                (self.batch_size > 0, f"{p}batch_size must be > 0"),
                (self.grad_accum > 0, f"{p}grad_accum must be > 0"),
                (self.lr > 0, f"{p}lr must be > 0"),
                (0 <= self.ema_decay < 1, f"{p}ema_decay must be in [0, 1)"),
                (self.log_every > 0, f"{p}log_every must be > 0"),
                (self.save_every > 0, f"{p}save_every must be > 0"),
                (self.keep_checkpoints > 0, f"{p}keep_checkpoints must be > 0"),
                (self.max_bad_steps > 0, f"{p}max_bad_steps must be > 0"),
                (self.patience >= 0, f"{p}patience must be >= 0"),
                (self.evals_per_budget >= 0, f"{p}evals_per_budget must be >= 0"),
                (self.time_limit is None or self.time_limit > 0, f"{p}time_limit must be > 0"),
                (self.members >= 1, f"{p}members must be >= 1"),
            ]
        )
        for name in self.trackers():
            if name not in TRACKERS:
                unknown_value(f"{p}log_with", name, TRACKERS)

    def trackers(self) -> list[str]:
        """``log_with`` as a list of names (a name, a comma-separated string or a list; "none" and blanks dropped)."""
        value = self.log_with
        names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value or [])
        return list(dict.fromkeys(n for n in names if n and n != "none"))


@dataclass
class EvalConfig:
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(adjoint=False))
    trace: Literal["auto", "exact", "hutchinson"] = "auto"  # auto: exact for a vector field with dim <= 64
    batch_size: int | None = None  # points per solve; None: chosen by the evaluator from the device's memory
    periodic_size: int = 2000  # held-out points used by the periodic evaluations
    # model.augment > 0: augmentations per point of the final evaluation's likelihood bound (K; flows.augment); null:
    # 8 with the exact trace, 1 (the ELBO) with Hutchinson's. Periodic evaluations use the ELBO (K = 1).
    augment_samples: int | None = None
    plot: bool = True  # 2D data: samples and density pictures at the end

    def check(self, prefix: str = "eval.") -> None:
        self.solver.check(f"{prefix}solver.")
        _raise_first(
            [
                (self.batch_size is None or self.batch_size > 0, f"{prefix}batch_size must be > 0"),
                (self.augment_samples is None or self.augment_samples > 0, f"{prefix}augment_samples must be > 0"),
            ]
        )


# the typed variants: section -> its registry of kinds (each kind's ``settings`` class)
VARIANTS: dict[str, dict[str, Any]] = {"model": FIELDS, "objective": OBJECTIVES}


# data.* keys of the simulation loop before it had its own section (older config.yaml files): where each lives now
LEGACY_SIMULATION_KEYS = {
    "simulator": "simulator",
    "prior": "prior",
    "prior_loc": "prior_loc",
    "prior_scale": "prior_scale",
    "simulations": "simulations",
    "rounds": "rounds",
    "x_obs": "x_obs",
    "simulation_batch": "batch",
    "calibration": "calibration",
}


@dataclass
class SimulationConfig:
    """A simulator in the loop (``flows.infer``; ``train.py simulation.simulator=...``) instead of ``data.path``."""

    simulator: str | None = None  # "module:function", a batched callable theta (n, D) -> x (n, ...)
    prior: str | None = None  # "uniform" (on data.bounds), "normal" (simulation.prior_loc/scale) or "module:object"
    prior_loc: list[float] | None = None  # prior=normal: the mean of each parameter
    prior_scale: list[float] | None = None  # prior=normal: the standard deviation of each (one value: all)
    simulations: int = 10_000  # the simulations of all rounds together
    rounds: int = 1  # > 1: rounds focused on simulation.x_obs
    x_obs: str | None = None  # .npy/.npz of the observation the rounds focus on (the shape of one x)
    batch: int = 1000  # parameters per simulator call: one task for a worker, its pairs written at once
    workers: int = 1  # simulator calls in this many worker processes (1: in the training process)
    scheduler: str | None = None  # a Dask scheduler's address (tcp://host:8786): the batches run on its cluster
    timeout: float | None = None  # seconds a batch may take before the run stops with an error (None: no limit)
    calibration: int = 500  # amortized runs: held-out pairs the calibration check uses at the end (0: none)

    def check(self, data: DataConfig) -> None:
        p = "simulation."
        given = {"prior": self.prior, "x_obs": self.x_obs, "prior_loc": self.prior_loc}
        if not self.simulator:
            given |= {"rounds": self.rounds != 1, "workers": self.workers != 1, "scheduler": self.scheduler}
            named = [k for k, v in given.items() if v]
            if named:
                raise ConfigError(f"invalid config value: {p}{named[0]} goes with {p}simulator=module:function.")
            return
        if ":" not in self.simulator:
            raise ConfigError(f"invalid config value: {p}simulator must be 'module:function', got {self.simulator!r}.")
        checks = [
            (DATASETS[data.name].context == "vector", f"{p}simulator trains on a table: data.name=tabular"),
            (not data.path, f"give {p}simulator or data.path (simulated pairs in a file), not both"),
            (bool(self.prior), f"{p}simulator needs {p}prior=uniform|normal|module:object"),
            (self.simulations > 0 and self.batch > 0, f"{p}simulations and {p}batch must be > 0"),
            (self.workers >= 1, f"{p}workers must be >= 1"),
            (not (self.scheduler and self.workers > 1), f"give {p}workers or {p}scheduler (a Dask cluster), not both"),
            (self.timeout is None or self.timeout > 0, f"{p}timeout must be > 0 seconds (or null: no limit)"),
            (self.calibration >= 0, f"{p}calibration must be >= 0"),
            (self.rounds >= 1, f"{p}rounds must be >= 1"),
            (self.rounds == 1 or bool(self.x_obs), f"{p}rounds={self.rounds} focuses on one observation: set {p}x_obs"),
            (
                self.simulations >= 2 * self.rounds,
                f"{p}simulations={self.simulations} is too few for {self.rounds} rounds",
            ),
            (
                not data.context_key and not data.context_columns and not data.key,
                f"data.key / context_key / context_columns name arrays of a file: not with {p}simulator",
            ),
        ]
        if self.prior == "uniform":
            bounded = bool(data.bounds) and all(b is not None for b in data.bounds or [])
            checks.append((bounded, f"{p}prior=uniform needs data.bounds=[[lo, hi], ...], finite for every parameter"))
        elif self.prior == "normal":
            ok = bool(self.prior_loc) and (not self.prior_scale or len(self.prior_scale) in (1, len(self.prior_loc)))
            checks.append(
                (
                    ok,
                    f"{p}prior=normal needs {p}prior_loc=[...] (one mean per parameter) and {p}prior_scale=[...] (one "
                    "per parameter, or one for all; default 1)",
                )
            )
        elif ":" not in str(self.prior):
            checks.append((False, f"{p}prior must be uniform, normal or 'module:object', got {self.prior!r}"))
        _raise_first(checks)


def _legacy_simulation(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict whose ``data`` section holds the simulation loop's keys (written before ``simulation:``
    existed) with them moved to ``simulation``; a key given in both places is refused."""
    old = data.get("data")
    if not isinstance(old, dict) or not any(k in old for k in LEGACY_SIMULATION_KEYS):
        return data
    out, section = dict(data), dict(old)
    sim = dict(out.get("simulation") or {})
    for key, new in LEGACY_SIMULATION_KEYS.items():
        if key in section:
            if new in sim:
                raise ConfigError(f"config key 'data.{key}' is now 'simulation.{new}': give it once, there.")
            sim[new] = section.pop(key)
    out["data"], out["simulation"] = section, sim
    return out


@dataclass
class Config:
    run_dir: str = "runs/toy2d_mle"
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = field(default_factory=MLPSettings)  # a field kind's settings (flows.nn), picked by model.name
    objective: Any = field(default_factory=MLESettings)  # an objective kind's settings, picked by objective.name
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    # device type -> {dotted key: value} for runs on it; a run applies its own and keeps this empty
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> Config:
        """Each section checks itself; then what spans sections, by the kinds' capabilities."""
        self.data.check(simulated=bool(self.simulation.simulator))
        self.simulation.check(self.data)
        self.model.check()
        self.solver.check()
        self.train.check()
        self.eval.check()
        self.objective.check(field_kind(self.model.name))
        objective = objective_kind(self.objective.name)
        self._check_context()
        if objective.solves_ode and self.train.mixed_precision != "no":
            raise ConfigError(
                f"invalid config value: train.mixed_precision is for flow matching (objective.name=fm): "
                f"{objective.title} solves ODEs in the loss, which must stay in float32."
            )
        if objective.solves_ode and self.train.compile:
            raise ConfigError(
                f"invalid config value: train.compile is for flow matching (objective.name=fm): {objective.title} "
                "differentiates the divergence (a double backward), which torch.compile's autograd does not support; "
                "for maximum likelihood, compile the fixed-step solve instead: solver.method=rk4 solver.step_size=0.05 "
                "solver.adjoint=false solver.compile=true."
            )
        return self

    def _check_context(self) -> None:
        """What spans data, model and objective for a conditional run."""
        d, o = self.data, self.objective
        vector_context = bool(d.context_key or d.context_columns)
        if o.label_dropout and not d.labels:
            raise ConfigError(
                "invalid config value: objective.label_dropout drops class labels: it needs data.labels=true "
                "(classifier-free guidance is for label-conditional image runs)."
            )
        if vector_context and getattr(o, "coupling", "independent") == "ot":
            raise ConfigError(
                "invalid config value: objective.coupling=ot with a context vector: minibatch OT pairs noise with "
                "data across the batch, so the noise paired with a row would depend on the other rows' contexts and "
                "the flow given c would no longer start from N(0, I). No pairing within equal contexts exists for "
                "continuous contexts: use objective.coupling=independent (with labels, ot pairs within each class)."
            )
        wanted = "vector" if vector_context else "labels" if d.labels else ""
        field = field_kind(self.model.name)
        if wanted and field.context != wanted:
            what = "context vector" if wanted == "vector" else "class labels"
            use = "model.name=mlp" if wanted == "vector" else "model.name=unet (data.image=true for digits)"
            raise ConfigError(f"invalid config value: model.name={self.model.name} takes no {what}: use {use}.")


def _raise_first(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"invalid config value: {message}.")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "") if not isinstance(tp, type) else tp.__name__


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}.")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}.")
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads an unquoted `no` as false
            value = "no"
        if value not in args:
            unknown_value(key, str(value), [str(a) for a in args])
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}.")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    if not ok:
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__}).")
    return float(value) if tp is float else value


def _variant(section: str, value: Any, default: Any, lenient: bool) -> Any:
    """The settings of the kind ``value["name"]`` names (default: ``default``'s kind). Keys of another kind
    that hold that kind's default are dropped (older files wrote every kind's keys); others get a notice."""
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{section}' must be a mapping, got {value!r}.")
    kinds = VARIANTS[section]
    name = value.get("name", default.name)
    if not isinstance(name, str) or name not in kinds:
        unknown_value(f"{section}.name", str(name), list(kinds))
    cls = kinds[name].settings
    own = {f.name for f in dataclasses.fields(cls)}
    kept = {}
    for key, v in value.items():
        if key in own:
            kept[key] = v
            continue
        owners = [k for k, kind in kinds.items() if key in {f.name for f in dataclasses.fields(kind.settings)}]
        if not owners:  # not a key of any kind: a typo, named
            valid = sorted({f.name for kind in kinds.values() for f in dataclasses.fields(kind.settings)})
            _unknown_key(key, valid, f"{section}.", [f"{section}.{n}" for n in sorted(own)])
        defaults = [getattr(kinds[k].settings(), key) for k in owners]
        if v not in defaults and not lenient:
            print(
                f"notice: {section}.{key} is a setting of {section}.name={'/'.join(owners)}; "
                f"ignored with {section}.name={name}.",
                file=sys.stderr,
            )
    return from_dict(cls, kept, prefix=f"{section}.")


def _unknown_key(key: str, names: list[str], prefix: str, shown: list[str]) -> typing.NoReturn:
    near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
    hint = f" Did you mean '{prefix}{near[0]}'?" if near else ""
    raise ConfigError(f"unknown config key '{prefix}{key}'.{hint} Valid keys here: {', '.join(shown)}.")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", lenient: bool = False) -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and bad types.

    ``lenient``: keys of another model / objective kind are dropped without a notice (saved configs)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            _unknown_key(key, names, prefix, [prefix + n for n in names])
        factory = fields[key].default_factory
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict) and factory is not dataclasses.MISSING:
            value = {**to_dict(factory()), **value}  # a partial section keeps its field's defaults (eval.solver's)
        if cls is Config and key in VARIANTS:
            kwargs[key] = _variant(key, value, getattr(Config(), key), lenient)
        elif cls is Config and key == "devices":
            kwargs[key] = _device_sections(value, data)
        else:
            kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.lr=1e-3).")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': cannot parse the value: {e}") from None
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    return key.strip().split("."), value


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(data).__name__}.")
    return data


def _merge(base: dict[str, Any], updates: typing.Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``updates`` merged in, section by section (a nested mapping updates a section)."""
    out = dict(base)
    for key, value in updates.items():
        if isinstance(value, typing.Mapping) and isinstance(out.get(key), dict | type(None)):
            out[key] = _merge(out.get(key) or {}, value)
        else:
            out[key] = value
    return out


def _set(node: dict[str, Any], keys: list[str], value: Any, origin: str) -> None:
    """``node[k0][k1]... = value``, making the sections on the way."""
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: '{k}' is not a section.")
        node = child
    node[keys[-1]] = value


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys (``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``); a later key wins."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _device_sections(value: Any, data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``devices`` section checked: device type -> {dotted key: value} (nested mappings flattened). Each key is
    checked as an override is (against ``data``'s model and objective kinds), whichever device this is;
    ``notice`` is a line printed with the section."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"config key 'devices' must map device types ({', '.join(DEVICE_TYPES)}) to settings.")
    sections = {}
    for device, section in value.items():
        if device not in DEVICE_TYPES:
            raise ConfigError(f"devices: unknown device type '{device}'. Valid: {', '.join(DEVICE_TYPES)}.")
        if not isinstance(section, Mapping | None):
            raise ConfigError(
                f"config key 'devices.{device}' must map dotted keys to values (train.batch_size: 1024), "
                f"got {section!r}."
            )
        flat = _flatten(section or {})
        for key, v in flat.items():
            _check_setting(device, key, v, data, flat)
        sections[device] = flat
    return sections


def _check_setting(device: str, key: str, value: Any, data: Mapping[str, Any], section: Mapping[str, Any]) -> None:
    """One dotted setting of ``devices.<device>``, checked alone as an override is; a model or objective key
    against the kind the section itself names (``model.name``), else the kind of ``data``."""
    where = f"devices.{device}.{key}"
    if key == "notice":
        if not isinstance(value, str):
            raise ConfigError(
                f"config key '{where}' expects a string (a line printed with the section), got {value!r}."
            )
        return
    keys = key.split(".")
    if keys[0] == "devices":
        raise ConfigError(f"config key '{where}': a devices section holds no devices section.")
    probe: dict[str, Any] = {}
    if keys[0] in VARIANTS and len(keys) > 1:
        kind = data.get(keys[0])
        name = section.get(f"{keys[0]}.name", kind.get("name") if isinstance(kind, Mapping) else None)
        if name is not None:
            probe[keys[0]] = {"name": name}
    try:
        _set(probe, keys, value, where)
        from_dict(Config, probe, lenient=True)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _show(value: Any) -> str:
    """A value as it is written on the command line."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def _lookup(values: Mapping[str, Any], key: str, default: Any) -> Any:
    for k in key.split("."):
        if not isinstance(values, Mapping) or k not in values:
            return default
        values = values[k]
    return values


def device_notice(device: str, applied: Mapping[str, Any], note: str | None = None) -> str | None:
    """The one line a run prints for the ``devices`` section of its device: the settings that took effect
    (``applied``: dotted key -> value) and the section's ``notice``; None when there is nothing to say."""
    if not applied:
        return f"notice: devices.{device}: {note}" if note else None
    keys = " ".join(f"{k}={_show(v)}" for k, v in applied.items())
    line = f"notice: devices.{device} applied: {keys} (give a key on the command line to change it)"
    return f"{line}. {note}" if note else line


def _solver_chosen(key: str, user: list[str]) -> bool:
    """Whether a devices-section ``key`` of a solver (``solver.*``, ``eval.solver.*``) gives way because the user
    chose that solver's method or adjoint: the section's solver is one package (method, step, compile), so
    ``solver.method=dopri5`` on the command line also drops the section's ``solver.compile``."""
    for solver in ("solver", "eval.solver"):
        if key.startswith(solver + ".") and any(u in (solver, f"{solver}.method", f"{solver}.adjoint") for u in user):
            return True
    return False


def load_config(
    path: str | Path | dict[str, Any] | Config | None = None,
    overrides: typing.Sequence[str] = (),
    updates: typing.Mapping[str, Any] | None = None,
    lenient: bool = False,
    device: str | None = None,
    notice: bool = False,
) -> Config:
    """Defaults ← YAML file (or a dict of it, or a Config) ← its ``devices`` section for ``device`` ←
    ``key.sub=value`` overrides ← ``updates`` (a nested mapping), validated. The caller's dict or Config is never
    changed. ``lenient``: for saved configs (keys of another model / objective kind dropped without a notice).

    ``device``: the device type the run runs on (``flows.training.accelerator.run_device``): ``devices[device]``
    applies and the config returned has no ``devices`` (it holds the values the run uses). None: no section applies
    and ``devices`` is kept. ``notice``: print :func:`device_notice`'s line for the section applied (stderr)."""
    if isinstance(path, Config):
        data = to_dict(path)
    elif isinstance(path, dict):
        data = copy.deepcopy(path)
    else:
        data = _read_yaml(path) if path is not None else {}
    parsed = [(text, *_parse_override(text)) for text in overrides]
    updates = dict(updates or {})
    section: dict[str, Any] = {}
    user: list[str] = []  # the dotted keys the caller sets: a devices section never overrides them
    if device is not None:  # the caller's own changes to the sections first, then the section, under the rest
        for text, keys, value in parsed:
            if keys[0] == "devices":
                _set(data, keys, value, f"override '{text}'")
        if "devices" in updates:
            data = _merge(data, {"devices": updates.pop("devices")})
        parsed = [p for p in parsed if p[1][0] != "devices"]
        section = dict(_device_sections(data.pop("devices", None), data).get(device, {}))
        user = [".".join(keys) for _, keys, _ in parsed] + list(_flatten(updates))
        section = {k: v for k, v in section.items() if not _solver_chosen(k, user)}
        for key, value in section.items():
            if key != "notice":
                _set(data, key.split("."), value, f"devices.{device}.{key}")
    for text, keys, value in parsed:
        _set(data, keys, value, f"override '{text}'")
    note = section.pop("notice", None)
    try:
        cfg = from_dict(Config, _legacy_simulation(_merge(data, updates)), lenient=lenient).validate()
    except ConfigError as e:
        if any(key in str(e) for key in section):
            raise ConfigError(
                f"{e} (devices.{device} set {' '.join(f'{k}={_show(v)}' for k, v in section.items())}.)"
            ) from None
        raise
    if notice and device is not None:
        values = to_dict(cfg)
        applied = {
            k: _lookup(values, k, v)
            for k, v in section.items()
            if not any(k == u or k.startswith(u + ".") for u in user)
        }
        line = device_notice(device, applied, note)
        if line:
            print(line, file=sys.stderr)
    return cfg
