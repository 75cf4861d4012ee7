"""Training objectives: modules whose ``forward(x, draws)`` returns ``(loss, stats)``.

A conditional run trains p(x | c): the context (model units: standardized vectors or labels) travels in
``draws["context"]``, one row per sample, so micro-batches slice it with the rest. ``label_dropout``
replaces a share of the labels by the null label when the draws are made (classifier-free guidance).

Each kind registers its name, its settings (the ``objective.*`` keys of that kind) and its
capabilities here. Accelerate wraps the objective (not the field) for DDP; the field inside stays
unwrapped so the adjoint sees the real parameters. Objectives know nothing of Accelerate or of the
config module: solver settings arrive as plain keywords.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from flows import augment as aug
from flows.compiling import EagerFallback
from flows.context import Context
from flows.coupling import COUPLINGS
from flows.errors import ConfigError, unknown_value
from flows.likelihood import log_prob
from flows.nn import FieldKind
from flows.ode import SolverOptions
from flows.paths import SCHEDULERS, AffinePath, sample_time

__all__ = [
    "MaximumLikelihood",
    "FlowMatching",
    "MLESettings",
    "FMSettings",
    "ObjectiveKind",
    "OBJECTIVES",
    "objective_kind",
    "build_objective",
]


@dataclass
class MLESettings:
    """``objective.*`` for ``objective.name=mle``: maximum likelihood (FFJORD) with RNODE / OT-Flow terms."""

    name: Literal["mle"] = "mle"
    trace: Literal["exact", "hutchinson"] = "exact"
    probe: Literal["rademacher", "gaussian"] = "rademacher"
    kinetic: float = 0.0  # weight of the kinetic energy  ∫‖v‖² dt  (RNODE)
    jacobian: float = 0.0  # weight of the Jacobian Frobenius norm  ∫‖∂v/∂x‖²_F dt  (RNODE)
    hjb: float = 0.0  # a field with an analytic divergence (potential): weight of ∫|∂ₜΦ − ½‖∇Φ‖²| dt (OT-Flow)
    label_dropout: float = 0.0  # data.labels: share of labels replaced by the null label (classifier-free guidance)

    def check(self, field: FieldKind, prefix: str = "objective.") -> None:
        _check_dropout(self.label_dropout, prefix)
        for name in ("kinetic", "jacobian", "hjb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"invalid config value: {prefix}{name} must be >= 0.")
        if self.hjb and not field.analytic_divergence:
            raise ConfigError(
                f"invalid config value: {prefix}hjb is the HJB penalty of a potential field: set "
                f"model.name=potential or {prefix}hjb=0."
            )
        if self.jacobian and field.analytic_divergence:
            raise ConfigError(
                f"invalid config value: {prefix}jacobian needs vector-Jacobian products, which a potential field "
                f"does not use: regularize it with {prefix}hjb (and {prefix}kinetic) instead."
            )


@dataclass
class FMSettings:
    """``objective.*`` for ``objective.name=fm``: flow matching."""

    name: Literal["fm"] = "fm"
    path: Literal["condot", "cosine"] = "condot"  # linear (conditional OT) or variance-preserving cosine
    coupling: Literal["independent", "ot"] = "independent"  # ot: minibatch optimal transport
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    label_dropout: float = 0.0  # data.labels: share of labels replaced by the null label (classifier-free guidance)

    def check(self, field: FieldKind, prefix: str = "objective.") -> None:
        _check_dropout(self.label_dropout, prefix)
        if self.logit_normal_std <= 0:
            raise ConfigError(f"invalid config value: {prefix}logit_normal_std must be > 0.")


def _check_dropout(p: float, prefix: str) -> None:
    if not 0 <= p < 1:
        raise ConfigError(f"invalid config value: {prefix}label_dropout must be in [0, 1).")


def draw_context(context: Tensor | None, dropout: float, null: int | None) -> dict[str, Tensor]:
    """The step's context draw: the batch's context, with a share ``dropout`` of labels set to ``null``."""
    if context is None:
        return {}
    if dropout > 0 and null is not None:
        drop = torch.rand(context.shape[0], device=context.device) < dropout
        context = torch.where(drop, torch.full_like(context, null), context)
    return {"context": context}


class MaximumLikelihood(nn.Module):
    """−log p(x) + λ_K ∫‖v‖²dt + λ_J ∫‖∂v/∂x‖²_F dt  (FFJORD with RNODE regularization);
    for a potential field, + λ_HJB ∫|∂ₜΦ − ½‖∇Φ‖²| dt (OT-Flow's HJB penalty) instead of the Jacobian term."""

    def __init__(self, field: nn.Module, settings: MLESettings, solver: SolverOptions, null: int | None = None):
        super().__init__()
        self.field, self.settings, self.solver, self.null = field, settings, dict(solver), null
        self.augment = aug.augment_of(field)

    def draw(self, x: Tensor, context: Tensor | None = None) -> dict[str, Tensor]:
        """The step's random draws: the context (label dropout), an augmented field's augmentation a ~ N(0, I); a
        Hutchinson probe is drawn inside each solve."""
        draws = draw_context(context, self.settings.label_dropout, self.null)
        return draws | ({"augment": aug.draw(x, self.augment)} if self.augment else {})

    def forward(self, x: Tensor, draws: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Any]]:
        s = self.settings
        draws = draws if draws is not None else self.draw(x)
        a = draws.get("augment")
        if a is not None:  # the joint (x, a): −log p(x, a) + log q(a) is the negative ELBO of log p(x)
            x = aug.join(x, a)
        res = log_prob(
            self.field,
            x,
            trace=s.trace,
            probe=s.probe,
            kinetic=s.kinetic > 0,
            jacobian=s.jacobian > 0,
            hjb=s.hjb > 0,
            context=draws.get("context"),
            **self.solver,
        )
        nll = -(res.log_prob if a is None else res.log_prob - aug.log_q(a)).mean()
        loss = nll
        stats: dict[str, Any] = {"nll": nll.detach(), "nfe": res.nfe}
        for name, integral in (("kinetic", res.kinetic), ("jacobian", res.jacobian), ("hjb", res.hjb)):
            if integral is not None:
                mean = integral.mean()
                loss = loss + getattr(s, name) * mean
                stats[name] = mean.detach()
        return loss, stats


class FlowMatching(nn.Module):
    """E ‖v(x_t, t) − dx_t/dt‖² over times, noise x₀ ~ N(0, I), data x₁, and their coupling.

    The mean is over samples and dimensions (the usual scale: ≈1 at the start for standardized data).
    Vectors and images alike; under mixed precision the loss itself is computed in float32.
    """

    def __init__(self, field: nn.Module, settings: FMSettings, compile: bool = False, null: int | None = None):
        super().__init__()
        self.field, self.settings, self.null = field, settings, null
        self.path = AffinePath(SCHEDULERS[settings.path]())
        self.coupling = COUPLINGS[settings.coupling]
        # torch.compile'd field for the regression; kept out of the module tree (set through __dict__) so
        # that state dicts and checkpoints hold the plain field's keys and load with or without compile
        # (a machine that cannot compile regresses eagerly, with one notice)
        compiled = EagerFallback(torch.compile(field), field, "the field (train.compile)") if compile else field
        self.__dict__["_forward_field"] = compiled
        self.augment = aug.augment_of(field)

    def draw(self, x1: Tensor, context: Tensor | None = None) -> dict[str, Tensor]:
        """The noise x₀ and the times t for a batch, one row per sample (an augmented field: its augmentation a ~
        N(0, I), and x₀ in D + A dimensions): drawn for a whole batch, then sliced into micro-batches (gradient
        accumulation), they give the same per-sample draws as one batch."""
        s = self.settings
        extra = {"augment": aug.draw(x1, self.augment)} if self.augment else {}
        x0 = torch.randn_like(aug.join(x1, extra["augment"]) if extra else x1)
        t = sample_time(len(x1), s.time_sampling, s.logit_normal_mean, s.logit_normal_std, x1.device)
        return {"x0": x0, "t": t} | extra | draw_context(context, s.label_dropout, self.null)

    def forward(self, x1: Tensor, draws: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Any]]:
        draws = draws or self.draw(x1)
        if "augment" in draws:  # the data of the joint: the pairs (x, a)
            x1 = aug.join(x1, draws["augment"])
        context = draws.get("context")
        x0, x1 = self._couple(draws["x0"], x1, context)
        t = draws["t"]
        ps = self.path.sample(x0, x1, t)
        extra = () if context is None else (context,)
        loss = (self._forward_field(ps.xt, t, *extra).float() - ps.dxt).pow(2).mean()
        return loss, {}

    def _couple(self, x0: Tensor, x1: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """The coupling within the (micro-)batch; with labels, minibatch OT pairs noise and data of the same label
        only (the noise given y stays N(0, I), so the flow given y still carries N(0, I) to p(x | y))."""
        if context is None or self.settings.coupling == "independent":
            return self.coupling(x0, x1)
        out = x0.clone()
        for label in context.unique():
            rows = (context == label).nonzero().flatten()
            paired, _ = self.coupling(x0[rows], x1[rows])  # ot keeps x1's order: x0 is permuted to match it
            out[rows] = paired
        return out, x1


@dataclass(frozen=True)
class ObjectiveKind:
    name: str
    settings: type  # a dataclass: this kind's keys, and ``check(field_kind, prefix)``
    build: Callable[..., nn.Module]  # (field, settings, solver, compile, null label or None)
    solves_ode: bool  # an ODE solve (and a double backward) in the loss: float32 only, no torch.compile
    title: str  # what it is, for messages


OBJECTIVES: dict[str, ObjectiveKind] = {}


def _register(kind: ObjectiveKind) -> None:
    OBJECTIVES[kind.name] = kind


_register(
    ObjectiveKind(
        "mle",
        MLESettings,
        lambda f, s, solver, c, null: MaximumLikelihood(f, s, solver, null),
        True,
        "maximum likelihood",
    )
)
_register(
    ObjectiveKind("fm", FMSettings, lambda f, s, solver, c, null: FlowMatching(f, s, c, null), False, "flow matching")
)


def objective_kind(name: str) -> ObjectiveKind:
    if name not in OBJECTIVES:
        unknown_value("objective.name", name, list(OBJECTIVES))
    return OBJECTIVES[name]


def build_objective(
    field: nn.Module, settings: Any, solver: SolverOptions, compile: bool = False, context: Context | None = None
) -> nn.Module:
    """The objective of ``settings`` (a kind's settings) around ``field``; ``solver``: the training solve's options.
    ``compile`` only where the kind solves no ODE in its loss (torch.compile has no double backward). ``context``:
    what a conditional field is conditioned on (its null label serves label dropout)."""
    kind = objective_kind(settings.name)
    if compile and kind.solves_ode:
        raise ConfigError(f"torch.compile is not available for {kind.title}: its loss needs a double backward.")
    null = context.null if context is not None and context.kind == "labels" else None
    return kind.build(field, settings, solver, compile, null)
