"""What a conditional flow is conditioned on: a context vector c (standardized) or a class label y.

A conditional field is ``v(x, t, c)``; the context enters the network the way the time does and is never
modelled, so no log-determinant of its standardization enters a likelihood. :class:`Context` holds
what the flow needs to turn a user's context into the field's input:

- ``kind="vector"``: ``dim`` features, standardized with the training rows' ``shift`` and ``scale``; with
  ``shape=(M, d)`` the context is M exchangeable i.i.d. trials of d numbers (``dim = M d``, rows flattened):
  each of the d features is standardized with statistics pooled over the trials, so the field's input
  (and its permutation-invariant embedding, :class:`flows.nn.trials.TrialEmbedding`) is the same for any
  order of the trials;
- ``kind="labels"``: ``classes`` classes 0..K-1 (the field also knows a null class K, the
  "no label" of classifier-free guidance), and ``prior`` p(y), the training labels' frequencies, which
  the marginal p(x) = Σ_y p(y) p(x | y) uses.

``broadcast`` checks a user's context against the flow and lines it up with the points: one context for
all rows, or one per row.

A context vector can also carry an affine **conditional standardization** fitted on the training rows: the
linear regression of the (model-space) data on the standardized context, x ≈ μ + B c, and the Cholesky
factor L of the residuals' covariance. The flow then models z = L⁻¹(x − μ − B c), an exact affine map
with the constant log-det −Σ log Lᵢᵢ: a posterior that is close to a linear-Gaussian one is close to
N(0, I) before training starts (and a linear-Gaussian one is exact), and any other is only re-scaled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flows.errors import FlowsError

__all__ = ["Context", "guided"]


@dataclass
class Context:
    kind: str  # "vector" or "labels"
    dim: int = 0  # vector: number of context features
    classes: int = 0  # labels: number of classes
    shift: Tensor | None = None  # vector: (dim,) standardization on the training rows
    scale: Tensor | None = None
    prior: Tensor | None = None  # labels: (classes,) p(y)
    dropout: float = 0.0  # labels: the share of training labels replaced by the null label (guidance needs > 0)
    offset: Tensor | None = None  # vector: (D,) μ of the conditional standardization (None: none)
    weights: Tensor | None = None  # (D, dim) B
    chol: Tensor | None = None  # (D, D) lower-triangular L
    shape: tuple[int, ...] = ()  # vector: the shape of one context, (dim,) or (M, d) for M i.i.d. trials

    def __post_init__(self) -> None:
        if self.kind not in ("vector", "labels"):
            raise FlowsError(f"context kind must be 'vector' or 'labels' (got {self.kind!r})")
        if self.kind == "vector":
            self.shape = tuple(int(s) for s in self.shape) or (self.dim,)
            if math.prod(self.shape) != self.dim or len(self.shape) > 2:
                raise FlowsError(f"a context of shape {self.shape} does not hold {self.dim} features")
            self.shift = self.shift if self.shift is not None else torch.zeros(self.dim, device="cpu")
            self.scale = self.scale if self.scale is not None else torch.ones(self.dim, device="cpu")
        else:
            prior = self.prior if self.prior is not None else torch.ones(self.classes, device="cpu")
            self.prior = prior.double() / prior.double().sum()

    @property
    def null(self) -> int:
        """The null label (classifier-free guidance): index ``classes``."""
        return self.classes

    @property
    def trials(self) -> bool:
        """Whether a context is M exchangeable trials of d numbers, ``shape == (M, d)``."""
        return len(self.shape) == 2

    def features(self, c: Tensor) -> Tensor:
        """What the conditional standardization regresses on: the context rows (B, dim), or for trials their mean
        over the trials (B, d), the same for any order of the trials."""
        return c.reshape(len(c), *self.shape).mean(1) if self.trials else c

    def describe(self) -> str:
        if self.trials:
            return f"a context of {self.shape[0]} i.i.d. trials of {self.shape[1]} numbers"
        if self.kind == "vector":
            return f"a context of {self.dim} features"
        return f"a label in 0..{self.classes - 1}"

    # ------------------------------------------------------------------ user context → field input
    def model(self, c: Tensor) -> Tensor:
        """Raw context rows → what the field takes: standardized floats (B, dim), or labels (B,) int64."""
        if self.kind == "labels":
            return c.long()
        return (c - self.shift.to(c.device, c.dtype)) / self.scale.to(c.device, c.dtype)

    def check(self, c: Any, device: torch.device, what: str) -> Tensor:
        """``c`` as a tensor of rows: (K, dim) floats or (K,) labels; a clear error for anything else."""
        c = torch.as_tensor(c, device=device)
        if self.kind == "labels":
            if c.is_floating_point() and not torch.equal(c, c.round()):
                raise FlowsError(f"{what}: labels must be integers in 0..{self.classes - 1}, got {c.flatten()[:8]}")
            c = c.long().reshape(-1)
            bad = (c < 0) | (c >= self.classes)
            if bad.any():
                raise FlowsError(
                    f"{what}: label {int(c[bad][0])} is outside the {self.classes} classes (0..{self.classes - 1})"
                )
            return c
        c = c.to(device, torch.get_default_dtype() if not c.is_floating_point() else c.dtype)
        given, one = tuple(c.shape), self.shape
        if given == one or (self.trials and given == (self.dim,)):  # one context
            c = c.reshape(1, self.dim)
        elif c.ndim == len(one) + 1 and tuple(c.shape[1:]) == one or c.ndim == 2 and c.shape[1] == self.dim:
            c = c.reshape(len(c), self.dim)  # K contexts (trials: (K, M, d) or flattened (K, M d))
        elif c.ndim >= 3 and math.prod(c.shape[1:]) == self.dim:  # K contexts of a simulator's (M, d) x, flattened
            c = c.reshape(len(c), self.dim)
        elif c.ndim >= 2 and c.numel() == self.dim:  # one (M, d) x of a flattened context
            c = c.reshape(1, self.dim)
        else:
            shown = ", ".join(map(str, one))
            raise FlowsError(
                f"{what}: the model was trained with {self.describe()}; expected shape ({shown}{',' * (len(one) == 1)})"
                f" or (K, {shown}), got {given}"
            )
        if not torch.isfinite(c).all():
            raise FlowsError(f"{what}: the context has NaN or Inf values")
        return c

    def broadcast(self, c: Any, n: int, device: torch.device, what: str) -> Tensor:
        """A context for each of ``n`` points: one context for all, or exactly one per point."""
        c = self.check(c, device, what)
        if len(c) == 1:
            return c.expand(n, *c.shape[1:])
        if len(c) != n:
            raise FlowsError(f"{what}: {len(c)} contexts for {n} points; give one context, or one per point")
        return c

    # ------------------------------------------------------------------ conditional standardization
    @property
    def affine(self) -> bool:
        return self.chol is not None

    def fit_affine(self, x: Tensor, c: Tensor, ridge: float = 1e-3) -> Context:
        """Fit μ, B and L on model-space rows x (N, D) and their standardized contexts c (N, dim) (float64 least
        squares with a ``ridge`` relative to N, and a floor on the residual variance); returns self."""
        x, c = x.double(), self.features(c).double()
        n, d = x.shape
        design = torch.cat([torch.ones(n, 1, dtype=torch.float64, device=x.device), c], 1)
        gram = design.T @ design + ridge * n * torch.eye(design.shape[1], dtype=torch.float64, device=x.device)
        gram[0, 0] -= ridge * n  # the intercept is not shrunk
        coef = torch.linalg.solve(gram, design.T @ x)  # (1 + dim, D)
        resid = x - design @ coef
        cov = resid.T @ resid / max(n - 1, 1) + 1e-6 * torch.eye(d, dtype=torch.float64, device=x.device)
        self.offset, self.weights, self.chol = coef[0], coef[1:].T.contiguous(), torch.linalg.cholesky(cov)
        return self

    def whiten(self, x: Tensor, c: Tensor) -> Tensor:
        """Model-space x (B, D) → L⁻¹(x − μ − B c), with c the field's context input (B, dim); x if no fit."""
        if not self.affine:
            return x
        mean = self.offset.to(x) + self.features(c).to(x) @ self.weights.to(x).T
        return torch.linalg.solve_triangular(self.chol.to(x), (x - mean).T, upper=False).T

    def color(self, z: Tensor, c: Tensor) -> Tensor:
        """The inverse of :meth:`whiten`: μ + B c + L z."""
        if not self.affine:
            return z
        return self.offset.to(z) + self.features(c).to(z) @ self.weights.to(z).T + z @ self.chol.to(z).T

    def whiten_log_det(self) -> float:
        """log|det ∂ whiten(x)/∂x| = −Σ log Lᵢᵢ (0 without a fit)."""
        return -float(self.chol.diagonal().log().sum()) if self.affine else 0.0

    # ------------------------------------------------------------------ the inference file
    def tensors(self) -> dict[str, Tensor]:
        if self.kind == "vector":
            out = {"context.shift": self.shift.float().contiguous(), "context.scale": self.scale.float().contiguous()}
            if self.affine:
                out |= {"context.offset": self.offset, "context.weights": self.weights, "context.chol": self.chol}
            return {k: v.contiguous() for k, v in out.items()}
        return {"context.prior": self.prior.double().contiguous()}

    def metadata(self) -> str:
        meta = {"kind": self.kind, "dim": self.dim, "classes": self.classes, "dropout": self.dropout}
        return json.dumps(meta | ({"shape": list(self.shape)} if self.trials else {}))

    @classmethod
    def from_file(cls, metadata: str, tensors: dict[str, Tensor]) -> Context:
        meta = json.loads(metadata)
        return cls(
            meta["kind"],
            int(meta["dim"]),
            int(meta["classes"]),
            tensors.get("context.shift"),
            tensors.get("context.scale"),
            tensors.get("context.prior"),
            float(meta.get("dropout", 0.0)),
            tensors.get("context.offset"),
            tensors.get("context.weights"),
            tensors.get("context.chol"),
            tuple(meta.get("shape", ())),
        )

    def to(self, device: torch.device | str) -> Context:
        def move(t: Tensor | None) -> Tensor | None:
            return t.to(device) if t is not None else None

        return Context(
            self.kind,
            self.dim,
            self.classes,
            move(self.shift),
            move(self.scale),
            move(self.prior),
            self.dropout,
            move(self.offset),
            move(self.weights),
            move(self.chol),
            self.shape,
        )


class guided(torch.nn.Module):  # noqa: N801 (used like a function: guided(field, w, null))
    """Classifier-free guidance: ``(1 + w) v(x, t, y) − w v(x, t, ∅)`` (w = 0: the conditional field).

    Both fields are evaluated in one batch of 2B. For sampling only: the guided field is not the flow
    of any density the model defines.
    """

    def __init__(self, field: torch.nn.Module, weight: float, null: int):
        super().__init__()
        self.field, self.weight, self.null = field, float(weight), null

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        b = x.shape[0]
        shared = t.ndim == 0 or t.numel() == 1 or t.stride(0) == 0  # one time for the batch (the solver's)
        t2 = t.reshape(-1)[:1].expand(2 * b) if shared else torch.cat([t, t])
        both = self.field(torch.cat([x, x]), t2, torch.cat([context, torch.full_like(context, self.null)]))
        cond, uncond = both[:b], both[b:]
        return cond + self.weight * (cond - uncond)
