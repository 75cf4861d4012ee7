"""The kinds of vector field: each registers its name, its settings (the ``model.*`` keys of that kind),
how to build it for a data shape, and its capabilities, in the module that implements it.

No other module tests a field's name: the ODE layer asks the field for ``analytic_divergence``, the
application asks a kind for ``data`` and ``analytic_divergence``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from flows.augment import augmented_shape
from flows.errors import ConfigError, unknown_value

__all__ = ["FieldKind", "FIELDS", "register_field", "field_kind", "build_field", "settings_from", "check_augment"]


@dataclass(frozen=True)
class FieldKind:
    name: str
    settings: type  # a dataclass: this kind's keys with their defaults, and a ``check(prefix)`` method
    build: Callable[..., nn.Module]  # (settings, per-sample shape, context: flows.context.Context | None) -> field
    data: str  # "vectors" (D,) or "images" (C, H, W)
    analytic_divergence: bool = False  # supplies its exact divergence itself (no probe, no VJPs)
    context: str = ""  # what it can be conditioned on: "vector" (a context vector), "labels", or "" (nothing)


FIELDS: dict[str, FieldKind] = {}


def register_field(kind: FieldKind) -> FieldKind:
    FIELDS[kind.name] = kind
    return kind


def field_kind(name: str) -> FieldKind:
    if name not in FIELDS:
        unknown_value("model.name", name, list(FIELDS))
    return FIELDS[name]


def check_augment(augment: int, prefix: str = "model.") -> None:
    """``model.augment``: a count of extra dimensions, 0 (a plain flow) or more."""
    if augment < 0:
        raise ConfigError(
            f"invalid config value: {prefix}augment={augment}: the number of extra dimensions (vectors) or channels "
            "(images) the field solves in must be >= 0 (0: a plain flow)."
        )


def settings_from(values: Mapping[str, Any]) -> Any:
    """A kind's settings from a mapping with ``name`` (e.g. a saved config's ``model`` section); keys of
    other kinds (older files wrote every kind's keys) are left out."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"model settings must be a mapping with a name, got {values!r}.")
    kind = field_kind(str(values.get("name")))
    names = {f.name for f in dataclasses.fields(kind.settings)}
    return kind.settings(**{k: v for k, v in values.items() if k in names})


_SHAPES = {"vectors": "vectors (D,)", "images": "images (C, H, W)"}
_OTHER = {
    "vectors": "model.name=unet (or, for digits, data.image=false)",
    "images": "model.name=mlp (or, for digits, data.image=true)",
}


_CONTEXTS = {"vector": "a context vector", "labels": "class labels"}


def build_field(settings: Any, shape: int | tuple[int, ...] | list[int], context: Any = None) -> nn.Module:
    """The field for data of per-sample ``shape``, from a kind's settings (or a mapping with ``name``);
    conditioned on ``context`` (a :class:`flows.context.Context`) if given. With ``augment`` = A > 0 in the
    settings the field solves in D + A dimensions (C + A channels) and carries ``augment`` (:mod:`flows.augment`)."""
    if isinstance(settings, Mapping):
        settings = settings_from(settings)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    kind = field_kind(settings.name)
    if (len(shape) == 1) != (kind.data == "vectors") or len(shape) not in (1, 3):
        raise ConfigError(
            f"model.name={kind.name} takes {_SHAPES[kind.data]}, but the data are {shape}: use {_OTHER[kind.data]}."
        )
    if context is not None and context.kind != kind.context:
        takes = f"takes {_CONTEXTS[kind.context]}" if kind.context else "takes no context"
        raise ConfigError(
            f"model.name={kind.name} {takes}, but the data come with {_CONTEXTS[context.kind]}"
            + (": for class labels use images and model.name=unet" if context.kind == "labels" else "")
            + (": for a context vector use model.name=mlp" if context.kind == "vector" else "")
            + "."
        )
    augment = getattr(settings, "augment", 0)
    if not augment:
        return kind.build(settings, shape, context)
    check_augment(augment)
    field = kind.build(settings, augmented_shape(shape, augment), context)
    field.augment = augment  # the flow and the objectives read it (flows.augment.augment_of)
    return field
