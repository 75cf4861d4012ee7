"""flows: continuous normalizing flows trained by maximum likelihood (FFJORD) or flow matching.

>>> import flows
>>> model = flows.load("runs/toy2d_mle")   # a run directory or model.safetensors
>>> x = model.sample(10_000)               # data units
>>> lp = model.log_prob(x)                 # exact log-density, (N,) float64
"""

from flows.api import Run, load, train
from flows.config import Config, load_config
from flows.errors import CheckpointError, ConfigError, DataError, FlowsError, SolverError, TrainingAborted
from flows.flow import Flow

__version__ = "0.1.0"

__all__ = [
    "Flow",
    "Run",
    "load",
    "train",
    "Config",
    "load_config",
    "FlowsError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "SolverError",
    "TrainingAborted",
]
