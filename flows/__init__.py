"""flows: continuous normalizing flows trained by maximum likelihood (FFJORD) or flow matching.

>>> import flows
>>> flow = flows.fit(x)                    # an (N, D) array or tensor; or flows.load("runs/toy2d_mle")
>>> samples = flow.sample(10_000)          # data units
>>> lp = flow.log_prob(samples)            # exact log-density, (N,) float64

Two layers. The core (``flows.nn``, ``flows.ode``, ``flows.likelihood``, ``flows.sampling``,
``flows.flow``, ...) takes plain keywords and imports neither Accelerate nor the config. The application
(``flows.fit``, ``flows.train``, ``flows.load``, the config, the trainer, the CLIs) is imported on first use, so
``import flows.ode`` stays as light as the core. The public surface is ``__all__`` here and the core modules listed in
``docs/api.md``; everything else may change.
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
    "fit",
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
    "fit": "flows.api",
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
    raise AttributeError(
        f"module 'flows' has no attribute {name!r}: the public names are flows.__all__ (submodules are "
        "imported by name, e.g. import flows.ode)"
    )


def __dir__() -> list[str]:
    return sorted([*globals(), *_APPLICATION])
