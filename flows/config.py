"""Typed configuration: dataclasses, YAML files and dotted ``key=value`` overrides.

Every key is checked: an unknown key names the nearest valid one, a value of the wrong type
names the expected type. ``load_config(path, overrides)`` is the only entry point the scripts use.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from flows.errors import ConfigError

__all__ = [
    "DATASETS",
    "SOLVER_METHODS",
    "TRACKERS",
    "check_method",
    "IMAGE_DATASETS",
    "Config",
    "DataConfig",
    "ModelConfig",
    "SolverConfig",
    "ObjectiveConfig",
    "TrainConfig",
    "EvalConfig",
    "load_config",
    "from_dict",
    "to_dict",
]

TOY_DATASETS = (
    "checkerboard",
    "8gaussians",
    "pinwheel",
    "2spirals",
    "moons",
    "circles",
    "swissroll",
    "rings",
)


IMAGE_DATASETS = ("mnist", "cifar10", "idx")
SUITE_DATASETS = ("power", "gas", "hepmass", "miniboone", "bsds300")  # MAF / FFJORD / OT-Flow tables
DATASETS = (*TOY_DATASETS, "digits", "tabular", *SUITE_DATASETS, *IMAGE_DATASETS)
# torchdiffeq's methods (tests/test_config_data.py checks this list against torchdiffeq's own);
# scipy_solver is left out: it needs options of its own that our solver settings do not carry
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_STEP_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams")
SOLVER_METHODS = (*ADAPTIVE_METHODS, *FIXED_STEP_METHODS)
# Accelerate's trackers (tests/test_tracking.py checks this list against accelerate.utils.LoggerType)
TRACKERS = ("all", "tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio")


@dataclass
class DataConfig:
    name: str = "checkerboard"  # a toy density, "digits", "tabular", "mnist", "cifar10" or "idx"
    path: str | None = None  # "tabular": .npy / .npz file; "idx": a folder of *-images-idx3-ubyte[.gz] files
    root: str = "data"  # "mnist" / "cifar10": torchvision's folder; power, gas, ...: the unpacked MAF archive
    allow_pickle: bool = False  # gas: its published file is a pandas pickle (unpickling runs code from it)
    download: bool = False  # "mnist" / "cifar10": let torchvision download into root (needs internet)
    image: bool = False  # "digits": (1, 8, 8) images instead of 64-D vectors (for the U-Net)
    logit_alpha: float = 0.0  # images: > 0 models logit(alpha + (1 - 2 alpha) y); 0: y scaled to [-1, 1]
    train_size: int = 1_000_000  # toy densities: points generated for training
    test_size: int = 10_000  # toy densities: held-out points (generated with test_seed)
    test_fraction: float = 0.2  # digits / tabular / idx: share held out (idx: the last rows, as in BENCHMARKS)
    test_path: str | None = None  # tabular: a predefined test split (.npy/.npz); then data.path is all training rows
    val_path: str | None = None  # tabular: a predefined validation split (model selection, early stopping)
    val_fraction: float = 0.0  # digits / tabular: share of the training rows held out for validation
    dequantize: bool = False  # tabular: add U[0, 1) noise once (seeded) to integer-valued columns, as MAF's POWER
    seed: int = 0
    test_seed: int = 1


@dataclass
class ModelConfig:
    name: Literal["mlp", "unet", "potential"] = "mlp"
    # mlp (vectors); potential (vectors): width hidden[0], one opening + len(hidden) - 1 residual layers
    hidden: list[int] = field(default_factory=lambda: [64, 64, 64])
    rank: int = 0  # potential: rank of its quadratic term (0: min(10, D + 1))
    activation: Literal["tanh", "softplus", "silu", "elu"] = "tanh"
    time_features: int = 0  # 0: the raw time; >0: that many sinusoidal features
    conditioning: Literal["concatsquash", "concat"] = "concatsquash"  # time gates every layer, or enters once
    # unet (images, (C, H, W); any H, W)
    channels: int = 32  # width at full resolution
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # one level per entry, halving H, W
    num_res_blocks: int = 1  # residual blocks per level
    attention_resolutions: list[int] = field(default_factory=list)  # spatial sizes (H) that get self-attention
    groups: int = 8  # GroupNorm groups (never BatchNorm: it couples samples)


@dataclass
class SolverConfig:
    method: str = "dopri5"  # a torchdiffeq method: adaptive (dopri5, ...) or fixed-step (rk4, euler, ...)
    atol: float = 1e-5
    rtol: float = 1e-5
    step_size: float | None = None  # fixed-step methods (euler, rk4, midpoint)
    adjoint: bool = True  # adjoint gradients (O(1) memory) or direct backprop
    max_steps: int = 10_000  # adaptive solvers give up (with a clear error) past this


@dataclass
class ObjectiveConfig:
    name: Literal["mle", "fm"] = "mle"  # maximum likelihood (FFJORD) or flow matching
    # fm
    path: Literal["condot", "cosine"] = "condot"  # linear (conditional OT) or variance-preserving cosine
    coupling: Literal["independent", "ot"] = "independent"  # ot: minibatch optimal transport
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    # mle
    trace: Literal["exact", "hutchinson"] = "exact"
    probe: Literal["rademacher", "gaussian"] = "rademacher"
    kinetic: float = 0.0  # weight of the kinetic energy  ∫‖v‖² dt  (RNODE)
    jacobian: float = 0.0  # weight of the Jacobian Frobenius norm  ∫‖∂v/∂x‖²_F dt  (RNODE)
    hjb: float = 0.0  # model.name=potential: weight of the HJB penalty ∫|∂ₜΦ − ½‖∇Φ‖²| dt (OT-Flow)


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
    evals_per_budget: int = 0  # with time_limit: also evaluate each time another 1/K of the time has passed
    patience: int = 0  # stop after this many validation evaluations without a new best (0: never)
    save_every: int = 500
    keep_checkpoints: int = 2
    max_bad_steps: int = 10  # non-finite loss/gradient or solver failure: stop after this many
    time_limit: float | None = None  # minutes of training and periodic evaluation; the lr schedule spans it
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # flow matching only; never inside ODE solves
    compile: bool = False  # flow matching only: torch.compile the field for the regression (first steps compile)
    init_from: str | None = None  # a run (or model.safetensors) whose EMA weights start this one
    log_with: str | list[str] | None = None  # trackers through Accelerate: tensorboard, wandb, mlflow, ... or "all"


@dataclass
class EvalConfig:
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(adjoint=False))
    trace: Literal["auto", "exact", "hutchinson"] = "auto"  # auto: exact for an MLP with dim <= 64, else hutchinson
    batch_size: int = 2000
    periodic_size: int = 2000  # held-out points used by the periodic evaluations
    plot: bool = True  # 2D data: samples and density pictures at the end


@dataclass
class Config:
    run_dir: str = "runs/toy2d_mle"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> Config:
        checks = [
            (self.train.steps >= 0, "train.steps must be >= 0"),
            (self.train.batch_size > 0, "train.batch_size must be > 0"),
            (self.train.grad_accum > 0, "train.grad_accum must be > 0"),
            (self.train.lr > 0, "train.lr must be > 0"),
            (0 <= self.train.ema_decay < 1, "train.ema_decay must be in [0, 1)"),
            (self.train.log_every > 0, "train.log_every must be > 0"),
            (self.train.save_every > 0, "train.save_every must be > 0"),
            (self.train.keep_checkpoints > 0, "train.keep_checkpoints must be > 0"),
            (self.train.max_bad_steps > 0, "train.max_bad_steps must be > 0"),
            (self.eval.batch_size > 0, "eval.batch_size must be > 0"),
            (0 < self.data.test_fraction < 1, "data.test_fraction must be in (0, 1)"),
            (0 <= self.data.val_fraction < 1, "data.val_fraction must be in [0, 1)"),
            (self.train.patience >= 0, "train.patience must be >= 0"),
            (self.train.evals_per_budget >= 0, "train.evals_per_budget must be >= 0"),
            (self.train.time_limit is None or self.train.time_limit > 0, "train.time_limit must be > 0"),
            (self.data.train_size > 0 and self.data.test_size > 0, "data sizes must be > 0"),
            (bool(self.model.hidden) and min(self.model.hidden) > 0, "model.hidden: widths > 0"),
            (self.objective.kinetic >= 0, "objective.kinetic must be >= 0"),
            (self.objective.jacobian >= 0, "objective.jacobian must be >= 0"),
            (self.objective.hjb >= 0, "objective.hjb must be >= 0"),
            (
                self.objective.hjb == 0 or self.model.name == "potential",
                "objective.hjb is the HJB penalty of a potential field: set model.name=potential or objective.hjb=0",
            ),
            (
                self.objective.jacobian == 0 or self.model.name != "potential",
                "objective.jacobian needs vector-Jacobian products, which a potential field does not use: "
                "regularize it with objective.hjb (and objective.kinetic) instead",
            ),
            (
                self.model.name != "potential" or (len(set(self.model.hidden)) == 1 and len(self.model.hidden) >= 2),
                "model.name=potential takes equal widths and at least two layers in model.hidden, e.g. [64, 64, 64]",
            ),
            (self.model.rank >= 0, "model.rank must be >= 0"),
            (self.objective.logit_normal_std > 0, "objective.logit_normal_std must be > 0"),
            (0 <= self.data.logit_alpha < 0.5, "data.logit_alpha must be in [0, 0.5)"),
            (self.model.channels > 0 and self.model.num_res_blocks >= 0, "model.channels must be > 0"),
            (bool(self.model.channel_mult) and min(self.model.channel_mult) > 0, "model.channel_mult: values > 0"),
            (self.model.groups > 0, "model.groups must be > 0"),
            (
                self.train.mixed_precision == "no" or self.objective.name == "fm",
                "train.mixed_precision is for flow matching (objective.name=fm): maximum likelihood "
                "solves ODEs in the loss, which must stay in float32",
            ),
            (
                not self.train.compile or self.objective.name == "fm",
                "train.compile is for flow matching (objective.name=fm): maximum likelihood differentiates the "
                "divergence (a double backward), which torch.compile's autograd does not support",
            ),
        ]
        for prefix, s in (("solver", self.solver), ("eval.solver", self.eval.solver)):
            check_method(s.method, f"{prefix}.method")
            checks += [
                (s.atol > 0 and s.rtol > 0, f"{prefix}.atol and {prefix}.rtol must be > 0"),
                (s.step_size is None or s.step_size > 0, f"{prefix}.step_size must be > 0"),
                (s.max_steps > 0, f"{prefix}.max_steps must be > 0"),
            ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"invalid config value: {message}.")
        log_with = self.train.log_with
        for name in log_with.split(",") if isinstance(log_with, str) else log_with or []:
            if name.strip() not in (*TRACKERS, "none", ""):
                _unknown("train.log_with", name.strip(), TRACKERS)
        if self.data.name not in DATASETS:
            _unknown("data.name", self.data.name, DATASETS)
        for width in (self.model.channels * m for m in self.model.channel_mult):
            if self.model.name == "unet" and width % self.model.groups:
                raise ConfigError(
                    f"invalid config value: model.groups={self.model.groups} must divide every U-Net width "
                    f"(model.channels x model.channel_mult = {width})."
                )
        if self.data.name == "idx" and not self.data.path:
            raise ConfigError("data.name=idx needs data.path=FOLDER holding *-images-idx3-ubyte[.gz] files.")
        if self.data.name == "tabular" and not self.data.path:
            raise ConfigError("data.name=tabular needs data.path=FILE.npy (or .npz).")
        return self


def check_method(method: str, key: str = "solver.method") -> str:
    """``method`` if torchdiffeq has it, else a ConfigError naming the valid methods."""
    if method not in SOLVER_METHODS:
        _unknown(key, method, SOLVER_METHODS)
    return method


def _unknown(key: str, value: str, valid: typing.Iterable[str]) -> typing.NoReturn:
    valid = list(valid)
    near = difflib.get_close_matches(value, valid, n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    raise ConfigError(f"{key}: unknown value '{value}'.{hint} Valid: {', '.join(valid)}.")


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
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}.")
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads an unquoted `no` as false
            value = "no"
        if value not in args:
            _unknown(key, str(value), [str(a) for a in args])
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


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and bad types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" Did you mean '{prefix}{near[0]}'?" if near else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'.{hint} Valid keys here: {', '.join(prefix + n for n in names)}."
            )
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


def load_config(
    path: str | Path | dict[str, Any] | None = None,
    overrides: typing.Sequence[str] = (),
    updates: typing.Mapping[str, Any] | None = None,
) -> Config:
    """Defaults ← YAML file (or a dict of it) ← ``key.sub=value`` overrides ← ``updates`` (a nested
    mapping), validated."""
    data: dict[str, Any] = dict(path) if isinstance(path, dict) else _read_yaml(path) if path is not None else {}
    for text in overrides:
        keys, value = _parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{k}' is not a section.")
            node = child
        node[keys[-1]] = value
    return from_dict(Config, _merge(data, updates or {})).validate()
