"""flows: continuous normalizing flows trained by maximum likelihood (FFJORD) or flow matching.

>>> import flows
>>> model = flows.load("runs/toy2d_mle")   # a run directory or model.safetensors
>>> x = model.sample(10_000)               # data units
>>> lp = model.log_prob(x)                 # exact log-density, (N,) float64

Two layers. The core (``flows.nn``, ``flows.ode``, ``flows.likelihood``, ``flows.sampling``,
``flows.flow``, ...) takes plain keywords and imports neither Accelerate nor the config. The application
(``flows.train``, ``flows.load``, the config, the trainer, the CLIs) is imported on first use, so
``import flows.ode`` stays as light as the core.
"""

from importlib import import_module
from typing import Any

from flows.errors import CheckpointError, ConfigError, DataError, FlowsError, SolverError, TrainingAborted
from flows.flow import Flow
from flows.mixture import Mixture

__version__ = "0.1.0"

__all__ = [
    "Flow",
    "Mixture",
    "Run",
    "load",
    "train",
    "infer",
    "calibrate",
    "Config",
    "load_config",
    "FlowsError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "SolverError",
    "TrainingAborted",
]

# the application's names, imported on first use (PEP 562)
_APPLICATION = {
    "Run": "flows.api",
    "load": "flows.api",
    "train": "flows.api",
    "infer": "flows.inference",
    "calibrate": "flows.calibration",
    "Config": "flows.config",
    "load_config": "flows.config",
}


def __getattr__(name: str) -> Any:
    if name in _APPLICATION:
        return getattr(import_module(_APPLICATION[name]), name)
    try:  # a submodule: ``flows.config``, ``flows.evaluation``, ... after a bare ``import flows``
        return import_module(f"flows.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"flows.{name}":  # the submodule exists but needs a package that is missing
            raise
        raise AttributeError(f"module 'flows' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted([*globals(), *_APPLICATION])
