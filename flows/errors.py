"""Exceptions that carry a user-facing message. The CLIs print them and exit non-zero."""

import difflib
from collections.abc import Iterable
from typing import NoReturn

__all__ = [
    "FlowsError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "SolverError",
    "TrainingAborted",
    "SimulationError",
    "unknown_value",
]


class FlowsError(Exception):
    """Base class: ``str(error)`` is a complete message for the user."""


class ConfigError(FlowsError):
    """A config file or override is malformed, names an unknown key, or has a bad value."""


class DataError(FlowsError):
    """Data is missing, unreadable, empty, or contains non-finite values."""


class CheckpointError(FlowsError):
    """A checkpoint is missing, truncated, untrusted (pickle), or of another model."""


class SolverError(FlowsError):
    """The ODE solver failed (step-size underflow or too many steps)."""


class TrainingAborted(FlowsError):
    """Training stopped on purpose (e.g. too many non-finite steps); a checkpoint was saved."""


class SimulationError(FlowsError):
    """A simulator raised or returned something unusable; the pairs simulated before it are kept."""


def unknown_value(key: str, value: str, valid: Iterable[str]) -> NoReturn:
    """Raise a ConfigError for a value outside ``valid``, naming the nearest valid one."""
    valid = list(valid)
    near = difflib.get_close_matches(value, valid, n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    raise ConfigError(f"{key}: unknown value '{value}'.{hint} Valid: {', '.join(valid)}.")
