"""Vector-field backbones: ``forward(x, t)``, t of shape (B,) or () (one time for the batch), output like x.

Each kind registers itself (:mod:`flows.nn.registry`): ``build_field(settings, shape)`` builds one.
"""

from flows.nn.embedding import TimeFeatures
from flows.nn.mlp import MLPSettings, TimeMLP
from flows.nn.potential import Potential, PotentialSettings
from flows.nn.registry import FIELDS, FieldKind, build_field, field_kind, register_field, settings_from
from flows.nn.unet import TimeUNet, UNetSettings

__all__ = [
    "TimeMLP",
    "TimeUNet",
    "Potential",
    "TimeFeatures",
    "MLPSettings",
    "PotentialSettings",
    "UNetSettings",
    "FIELDS",
    "FieldKind",
    "register_field",
    "field_kind",
    "build_field",
    "settings_from",
]
