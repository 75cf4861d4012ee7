"""Exceptions that carry a user-facing message. The CLIs print them and exit non-zero."""

__all__ = ["FlowsError", "ConfigError", "DataError", "CheckpointError", "SolverError", "TrainingAborted"]


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
