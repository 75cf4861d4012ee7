"""A trained flow as a Python object: sample, log-density, encode and decode, in the data's units.

``flows.load(run)`` returns a :class:`Flow`; the trainer's evaluations and pictures, the CLIs and the
benchmarks call these same methods, so a notebook and a command line give the same numbers.

Units. Inputs and outputs are in the units of the data the run was trained on: the preprocessing
(standardization, dequantization, logit) is applied and inverted here, and its log-determinant is
part of :meth:`Flow.log_prob`. For discrete data (images, digits: integer levels ``0..L-1``)
:meth:`Flow.sample` and :meth:`Flow.decode` return integer-valued levels, and :meth:`Flow.log_prob`
is the density of the dequantized values scaled to ``[0, 1)^D`` (the convention behind bits/dim:
``bits/dim = (−log p / D + log L) / log 2``).

Per data point, ``log_prob`` averages the log-density over ``probes`` Hutchinson probes (an unbiased
estimate of log p, since the trajectory does not depend on the probe) and importance-weights it over
``deq_samples`` uniform dequantizations, log P(v) ≥ log (1/K Σ_k p(y_k)) (the K-sample bound used by
flow matching and Flow++).

Augmented flows (``model.augment`` = A > 0, :mod:`flows.augment`) solve in D + A dimensions: ``sample``
returns the data part, ``log_prob`` is the importance-weighted lower bound over ``augment_samples`` draws of
the augmentation (its info says ``likelihood: "lower bound"``), and ``encode``/``decode`` are refused (a data
point has no single base point: it depends on the augmentation drawn with it).

Conditional flows (``flow.context`` is a :class:`flows.context.Context`) take ``context=`` in every
operation, in the data's units: a context vector (C,) or one per point (N, C), or class labels (an int, or
one per point). ``sample(n, context=c)`` gives (n, *shape) for one context and (K, n, *shape) for K
contexts; ``guidance=w`` samples a label-conditional model with classifier-free guidance. A
label-conditional ``log_prob(x)`` without labels is the exact marginal log Σ_y p(y) p(x | y).

Gradients. Every operation runs without a graph unless asked: ``grad=True`` (or :meth:`Flow.rsample`) makes it
differentiable with respect to its inputs and to every field parameter that requires a gradient, through the same
solve (a fixed-step solve, ``steps=8``, keeps the graph small). A loaded flow's weights are frozen;
:meth:`Flow.parameters` unfreezes them for an optimizer. :meth:`Flow.distribution` is a
``torch.distributions.Distribution`` view of the same flow (:mod:`flows.distribution`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

import torch
from torch import Tensor, nn

from flows import augment as aug
from flows.context import Context, guided
from flows.errors import FlowsError
from flows.likelihood import auto_trace, log_prob
from flows.memory import auto_batch
from flows.ode import DEFAULTS, FIXED_STEP_METHODS, OWN_METHODS, SolverOptions, solver_options
from flows.preprocess import Preprocess
from flows.sampling import SampleResult, decode, encode, sample, transport_summary

if TYPE_CHECKING:
    from flows.distribution import FlowDistribution

__all__ = ["Flow", "SolveOptions"]

# points per solve on a device whose free memory cannot be read (a CPU); elsewhere flows.memory.auto_batch decides
SOLVE_BATCH = 10_000  # sample, encode, decode
LOG_PROB_BATCH = 1000
AUGMENT_SAMPLES = 8  # an augmented flow's importance samples per point in log_prob (K)


class SolveOptions(TypedDict, total=False):
    """Solver overrides every :class:`Flow` operation takes; the flow's own ``solver`` fills the rest."""

    method: str | None  # a torchdiffeq method: dopri5 (adaptive, the default), rk4, euler, ...
    atol: float | None  # adaptive methods' tolerances
    rtol: float | None
    steps: int | None  # a fixed-step solve with this many steps (rk4 unless method is fixed-step)
    compile: bool | str | None  # euler, midpoint, rk4: torch.compile the whole solve (True, or a torch.compile mode)


@dataclass(eq=False)
class Flow:
    """A vector field with its preprocessing.

    Attributes:
        field: the network ``v(x, t)`` in model space (EMA weights unless loaded with ``weights="model"``).
        preprocess: data units ↔ model space, with its log-determinant.
        shape: the shape of one sample, ``(D,)`` or ``(C, H, W)``.
        solver: the default solver of every operation (:class:`flows.ode.SolverOptions`; a run's
            ``eval.solver``).
        config: the run's configuration (``flows.load`` gives a :class:`flows.Config`), else None.
        step: the training step the weights come from.
        path: the ``model.safetensors`` file, if loaded from one.
        context: what a conditional flow is conditioned on (None: an unconditional flow).
    """

    field: nn.Module
    preprocess: Preprocess
    shape: tuple[int, ...]
    solver: dict[str, Any] = field(default_factory=lambda: dict(DEFAULTS))
    config: Any = None
    step: int = 0
    path: Path | None = None
    context: Context | None = None

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """Number of dimensions of one sample, ``prod(shape)``."""
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        """Where the field's weights (and so every result) live."""
        param = next(iter(self.field.parameters()), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def augment(self) -> int:
        """Extra dimensions (vectors) or channels (images) the field solves in (``model.augment``; 0: a plain
        flow)."""
        return aug.augment_of(self.field)

    @property
    def state_shape(self) -> tuple[int, ...]:
        """The shape of one point of the ODE's state: :attr:`shape`, augmented by :attr:`augment`."""
        return aug.augmented_shape(self.shape, self.augment)

    @property
    def likelihood(self) -> str:
        """What :meth:`log_prob` gives by default: ``"exact"``, or ``"lower bound"`` for an augmented flow
        (importance-weighted over its augmentation; the info dict of ``return_info=True`` says it for other
        settings)."""
        return aug.BOUND if self.augment else "exact"

    @property
    def levels(self) -> int | None:
        """Number of discrete values per dimension (discrete data), else None."""
        return self.preprocess.levels

    def parameters(self) -> Iterator[nn.Parameter]:
        """The field's parameters, made trainable (a loaded flow's are frozen), for an optimizer of your own:
        ``torch.optim.Adam(flow.parameters())`` with ``flow.log_prob(x, grad=True)`` in the loss."""
        self.field.requires_grad_(True)
        return self.field.parameters()

    def to(self, device: torch.device | str) -> Flow:
        """Move the field and the preprocessing constants to ``device`` (in place); returns self."""
        self.field.to(device)
        self.preprocess = self.preprocess.to(device)
        self.context = self.context.to(device) if self.context is not None else None
        return self

    def __repr__(self) -> str:
        given = f", context={self.context.describe()!r}" if self.context is not None else ""
        given += f", augment={self.augment}" if self.augment else ""
        return (
            f"Flow({type(self.field).__name__}, shape={self.shape}{given}, step={self.step}, "
            f"device={self.device}, path={str(self.path) if self.path else None!r})"
        )

    # ------------------------------------------------------------------ what the field is (a mixture: its members')
    @property
    def _dtype(self) -> torch.dtype | None:
        """The field's precision (None: a field without weights)."""
        param = next(iter(self.field.parameters()), None)
        return param.dtype if param is not None else None

    @property
    def _analytic(self) -> bool:
        """Whether the field supplies its own divergence (the potential)."""
        return bool(getattr(self.field, "analytic_divergence", False))

    def _auto_trace(self, trace: str) -> str:
        return auto_trace(trace, self.field, self.shape)  # an augmented flow: by the data's dimension

    def _check_guidance(self, guidance: float) -> None:
        self._guided_field(guidance)

    def _batch(
        self, n: int, default: int, *, trace: bool = False, context: Tensor | None = None, copies: int = 1
    ) -> int:
        """Points per solve of ``n`` points when the caller gives none: what fits in the device's free memory
        (:func:`flows.memory.auto_batch`), ``default`` on a CPU. ``trace``: a log-density solve; ``context``: model
        space rows of the context; ``copies``: solves of each point at once (probes x dequantizations, guidance)."""
        return max(
            1,
            auto_batch(self.field, self.state_shape, n * copies, default * copies, trace=trace, context=context)
            // copies,
        )

    # ------------------------------------------------------------------ solver options
    def _solve_options(
        self,
        method: str | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        steps: int | None = None,
        compile: bool | str | None = None,
    ) -> SolverOptions:
        """The flow's solver with any of these replaced (and no adjoint), as :class:`flows.ode.SolverOptions`.

        ``steps``: a fixed-step solve with that many steps (rk4 unless ``method`` is a fixed-step method).
        ``compile``: compile the fixed-step solve (:mod:`flows.ode`); a flow saved with it compiles only while the
        method is euler, midpoint or rk4.
        """
        base = {**DEFAULTS, **self.solver}
        changes: dict[str, Any] = {"method": method} if method is not None else {}
        changes |= {k: float(v) for k, v in (("atol", atol), ("rtol", rtol)) if v is not None}
        if steps is not None:
            if steps <= 0:
                raise FlowsError(f"steps must be positive (got {steps})")
            changes["step_size"] = 1.0 / steps
            changes.setdefault("method", base["method"] if base["method"] in FIXED_STEP_METHODS else "rk4")
        # a compiled or checkpointed run's flow solved adaptively (or a potential field) drops both
        own = changes.get("method", base["method"]) in OWN_METHODS and not self._analytic
        if not own:
            changes |= {"compile": False, "checkpoint": False}
        if compile is not None:
            changes["compile"] = compile
        return solver_options(**{**base, **changes, "adjoint": False})  # checks method, atol and rtol

    # ------------------------------------------------------------------ data units <-> model space
    def _as_data(self, x: Tensor, what: str) -> Tensor:
        x = torch.as_tensor(x, device=self.device)  # numpy arrays too
        if tuple(x.shape[1:]) != self.shape or x.ndim != len(self.shape) + 1:
            expected = ", ".join(map(str, self.shape))
            raise FlowsError(f"{what}: expected a batch of shape (N, {expected}), got {tuple(x.shape)}")
        # the field's precision (numpy's float64 meets a float32 field as float32); a field without weights keeps
        # the input's
        dtype = self._dtype or (x.dtype if x.is_floating_point() else torch.get_default_dtype())
        return x.to(self.device, dtype)

    def _to_data(self, x: Tensor) -> Tensor:
        """Model space → data units (discrete data: the integer level of each dequantized value)."""
        y = self.preprocess.inverse(x)
        if self.levels is None:
            return y
        return torch.floor(y * self.levels).clamp_(0, self.levels - 1)

    # ------------------------------------------------------------------ contexts
    def _rows(self, context: Any, n: int, what: str) -> Tensor | None:
        """The context of each of ``n`` points in data units (one for all, or one each), checked; None for an
        unconditional flow (which refuses a context)."""
        if self.context is None:
            if context is not None:
                raise FlowsError(f"{what}: this flow is unconditional: it takes no context")
            return None
        if context is None:
            raise FlowsError(f"{what}: this flow is conditional on {self.context.describe()}: pass context=")
        rows = self.context.broadcast(context, n, self.device, what)
        dtype = self._dtype  # numpy's float64 meets a float32 field as float32
        return rows.to(dtype) if rows.is_floating_point() and dtype is not None else rows

    def _guided_field(self, guidance: float) -> nn.Module:
        """The field that :meth:`sample` solves at classifier-free guidance ``guidance`` (0: the field itself);
        a clear error when this flow cannot be guided."""
        if guidance == 0:
            return self.field
        ctx = self.context
        if ctx is None or ctx.kind != "labels" or ctx.dropout <= 0:
            why = (
                "it was trained without objective.label_dropout (the null label is untrained)"
                if ctx is not None and ctx.kind == "labels"
                else "guidance needs a label-conditional model trained with objective.label_dropout > 0"
            )
            raise FlowsError(f"guidance={guidance}: this flow cannot be guided: {why}")
        return guided(self.field, guidance, ctx.null)

    def _model_context(self, context: Any, n: int, what: str) -> Tensor | None:
        rows = self._rows(context, n, what)
        return self.context.model(rows) if rows is not None else None

    # ------------------------------------------------------------------ the operations
    def sample(
        self,
        n: int,
        *,
        context: Any = None,
        guidance: float = 0.0,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        grad: bool = False,
        return_info: bool = False,
        progress: bool = False,
        chunk: int | None = None,
        **solve: Unpack[SolveOptions],
    ) -> Tensor | tuple[Tensor, dict[str, Any]]:
        """Draw ``n`` samples: base noise at t=0 solved to t=1.

        Args:
            n: number of samples (per context).
            context: a conditional flow's context in data units: one (a vector (C,) or (1, C), or a label) for
                ``(n, *shape)`` samples, or K of them ((K, C) vectors, K labels) for ``(K, n, *shape)``. A
                label-conditional flow without labels samples the labels from their training frequencies
                (the info dict's ``label``).
            guidance: classifier-free guidance weight w (label-conditional flows trained with
                ``objective.label_dropout``): the field (1 + w) v(x, t, y) − w v(x, t, ∅); 0 is none.
            generator: for the noise; must live on ``self.device``.
            batch_size: points per solve (bounds memory); default: as many as fit in the device's free memory
                (:func:`flows.memory.auto_batch`), 10,000 on a CPU. (``chunk``: its former name, deprecated.)
            grad: differentiable samples (a reparameterized draw, :meth:`rsample`): gradients reach the field's
                parameters that require them; continuous data only.
            return_info: also return a dict with ``nfe``, ``seconds``, ``kinetic_energy`` (mean ∫‖v‖²dt,
                model space), ``straightness`` (1 for straight constant-speed paths), ``noise`` (n, *state_shape)
                and ``solver``.
            **solve: ``method``, ``atol``, ``rtol``, ``steps``, ``compile`` (:class:`SolveOptions`; default: the
                flow's solver, adaptive).

        Returns:
            Samples ``(n, *shape)`` (or ``(K, n, *shape)``) in data units on ``self.device`` (and the info dict).
        """
        batch_size = _renamed(chunk, batch_size)
        if n <= 0 or (batch_size is not None and batch_size <= 0):
            raise FlowsError(f"n and batch_size must be positive (got {n}, {batch_size})")
        if grad and self.levels is not None:
            raise FlowsError("grad=True: samples of discrete data are integer levels, which have no gradient")
        solver = self._solve_options(**solve)
        self._check_guidance(guidance)  # a flow that cannot be guided: the error before any work
        start = time.perf_counter()
        ctx, k, rows = self.context, 1, None
        if ctx is not None and context is None and ctx.kind == "labels":  # labels drawn from p(y)
            rows = torch.multinomial(ctx.prior.to(self.device).float(), n, replacement=True, generator=generator)
        elif ctx is None or context is None:
            self._rows(context, n, "sample")  # refuses a context given to an unconditional flow, or one missing
        else:
            given = ctx.check(context, self.device, "sample")
            k, rows = len(given), given.repeat_interleave(n, 0)
        with torch.set_grad_enabled(grad):
            x, info = self._draw(k * n, generator, batch_size, progress, solver, rows, guidance)
        if rows is not None and ctx is not None and ctx.kind == "labels":
            info["label"] = rows
        if k > 1:
            x = x.reshape(k, n, *self.shape)
            info["noise"] = info["noise"].reshape(k, n, *self.state_shape)
        return self._result(x, info, solver, start, return_info)

    def rsample(self, n: int, **options: Any) -> Tensor | tuple[Tensor, dict[str, Any]]:
        """A reparameterized draw: :meth:`sample` with ``grad=True`` (the same keywords)."""
        return self.sample(n, grad=True, **options)

    def distribution(self, context: Any = None, **options: Any) -> FlowDistribution:
        """This flow as a ``torch.distributions.Distribution`` (``sample``, ``rsample``, ``log_prob``,
        ``event_shape`` = :attr:`shape`; ``batch_shape`` = (K,) for K contexts, () for one or none), for code written
        against ``torch.distributions``. ``options``: what :meth:`log_prob` and :meth:`sample` take (``steps=8``,
        ``trace=``, ``batch_size=``, ...). Its ``log_prob`` and ``rsample`` are differentiable."""
        from flows.distribution import FlowDistribution

        return FlowDistribution(self, context, **options)

    def _draw(
        self,
        n: int,
        generator: torch.Generator | None,
        batch_size: int | None,
        progress: bool,
        solver: SolverOptions,
        context: Tensor | None = None,
        guidance: float = 0.0,
    ) -> tuple[Tensor, dict[str, Any]]:
        """(``n`` samples in data units, their info: ``nfe``, transport, ``kinetic``, ``noise``); ``context``: one
        row per sample in data units; ``guidance``: the classifier-free guidance weight."""
        c = self.context.model(context) if context is not None else None
        field = self._guided_field(guidance)
        batch_size = batch_size or self._batch(n, SOLVE_BATCH, context=c, copies=2 if guidance else 1)
        state = self.state_shape
        res = sample(
            field, n, state, batch_size=batch_size, generator=generator, progress=progress, context=c, **solver
        )
        x = aug.data_part(res.x, self.shape) if self.augment else res.x
        x = self.context.color(x, c) if c is not None else x
        return self._to_data(x), {**self._info(res), "noise": res.z}

    def decode(
        self,
        z: Tensor,
        *,
        context: Any = None,
        batch_size: int | None = None,
        grad: bool = False,
        return_info: bool = False,
        chunk: int | None = None,
        **solve: Unpack[SolveOptions],
    ) -> Tensor | tuple[Tensor, dict[str, Any]]:
        """Base points ``z`` (N, *shape) at t=0 → data units at t=1 (the inverse of :meth:`encode`); a conditional
        flow's ``context``: one for all points or one per point. ``batch_size``, ``grad``: as in :meth:`sample`."""
        self._refuse_augmented("decode")
        batch_size = _renamed(chunk, batch_size)
        solver = self._solve_options(**solve)
        start = time.perf_counter()
        z = self._as_data(z, "decode")
        with torch.set_grad_enabled(grad):
            c = self._model_context(context, len(z), "decode")
            batch_size = batch_size or self._batch(len(z), SOLVE_BATCH, context=c)
            res = decode(self.field, z, batch_size=batch_size, context=c, **solver)
            x = self.context.color(res.x, c) if c is not None else res.x
            x = self._to_data(x)
        return self._result(x, self._info(res), solver, start, return_info)

    def encode(
        self,
        x: Tensor,
        *,
        context: Any = None,
        batch_size: int | None = None,
        grad: bool = False,
        return_info: bool = False,
        progress: bool = False,
        chunk: int | None = None,
        **solve: Unpack[SolveOptions],
    ) -> Tensor | tuple[Tensor, dict[str, Any]]:
        """Data ``x`` (N, *shape), data units → base points at t=0, ``(N, *shape)`` on ``self.device``.

        Discrete data is placed at the centre of its dequantization cell, so ``decode(encode(x))``
        returns the same levels. A conditional flow's ``context``: one for all points or one per point.
        ``batch_size``, ``grad``: as in :meth:`sample`.
        """
        self._refuse_augmented("encode")
        batch_size = _renamed(chunk, batch_size)
        solver = self._solve_options(**solve)
        start = time.perf_counter()
        with torch.set_grad_enabled(grad):
            model_x = self.preprocess(self._as_data(x, "encode"), dequantize=False)
            c = self._model_context(context, len(model_x), "encode")
            model_x = self.context.whiten(model_x, c) if c is not None else model_x
            batch_size = batch_size or self._batch(len(model_x), SOLVE_BATCH, context=c)
            res = encode(self.field, model_x, batch_size=batch_size, progress=progress, context=c, **solver)
        return self._result(res.x, self._info(res), solver, start, return_info)

    def _refuse_augmented(self, what: str) -> None:
        if self.augment:
            raise FlowsError(
                f"{what}: this flow is augmented (model.augment={self.augment}): it maps the pair (x, a) of a data "
                "point and an augmentation a ~ N(0, I) to a base point, so a data point alone has no single base "
                "point (nor a base point a single data point). Use sample() for data, log_prob() for its bound."
            )

    def log_prob(
        self,
        x: Tensor,
        *,
        context: Any = None,
        trace: str = "auto",
        probes: int = 1,
        deq_samples: int = 1,
        augment_samples: int | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        grad: bool = False,
        return_info: bool = False,
        **solve: Unpack[SolveOptions],
    ) -> Tensor | tuple[Tensor, dict[str, Any]]:
        """Exact log-density of each point (an augmented flow: a lower bound), every preprocessing log-determinant
        counted.

        Args:
            x: ``(N, *shape)`` in data units (discrete data: the integer levels).
            context: a conditional flow's context, one for all points or one per point: log p(x | c). A
                label-conditional flow without labels gives the exact marginal log Σ_y p(y) p(x | y), with p(y)
                the training labels' frequencies (one solve per class).
            trace: ``"exact"`` (D vector-Jacobian products per evaluation), ``"hutchinson"`` (unbiased,
                ``probes`` probes per point, averaged) or ``"auto"`` (exact for a vector field of
                dimension ≤ 64, and always for a field with an analytic divergence).
            deq_samples: discrete data: importance-weighted over this many dequantizations (a tighter bound).
            augment_samples: an augmented flow: importance-weighted over this many augmentations a ~ N(0, I),
                K in log (1/K) Σ_k p(x, a_k) / q(a_k), a lower bound that tightens as K grows (:mod:`flows.augment`);
                default 8 with the exact trace, 1 (the ELBO) with Hutchinson's, where K > 1 is an estimate.
            generator: for probes, dequantization noise and augmentations; must live on ``self.device``.
            batch_size: points per solve (bounds memory; each point is solved probes x deq_samples x
                augment_samples times at once); default: as many as fit in the device's free memory
                (:func:`flows.memory.auto_batch`), 1,000 on a CPU.
            grad: differentiable with respect to ``x`` (and a context) and to the field's parameters that require
                gradients (:meth:`parameters`), through the same solve; a fixed-step ``steps=`` keeps it cheap.
            return_info: also return a dict with ``nfe`` (per solve), ``seconds``, ``batch_size`` (points per solve),
                ``variance`` (N,) (of the
                per-probe estimates; zeros for the exact trace), ``trace``, ``probes``, ``deq_samples``,
                ``augment_samples``, ``likelihood`` ("exact", "lower bound" or "estimate"), ``solver``.
            **solve: ``method``, ``atol``, ``rtol``, ``steps``, ``compile`` (:class:`SolveOptions`; default: the
                flow's solver).

        Returns:
            ``(N,)`` float64 on ``self.device`` (and the info dict); −inf for a point on or outside the run's
            ``data.bounds`` (no solve).
        """
        opts = self._log_prob_options(trace, probes, deq_samples, augment_samples, **solve)
        if batch_size is not None and batch_size <= 0:
            raise FlowsError("batch_size must be positive")
        start = time.perf_counter()
        with torch.set_grad_enabled(grad):
            x = self._as_data(x, "log_prob")
            marginal = context is None and self.context is not None and self.context.kind == "labels"
            rows = None if marginal else self._rows(context, len(x), "log_prob")
            keep = self.preprocess.inside(x)  # bounded data: a point on or outside a bound has density 0, unsolved
            if keep is not None:
                x, rows = x[keep], rows[keep] if rows is not None else None
            batch_size = batch_size or self._log_prob_batch_size(max(len(x), 1), opts, rows)
            lps, variances, nfe = [], [], []
            parts = rows.split(batch_size) if rows is not None else [None] * -(-len(x) // batch_size)
            for part, c in zip(x.split(batch_size), parts, strict=True):
                lp, var, n = self._log_prob_batch(part, opts, generator, c)
                lps.append(lp)
                variances.append(var.detach())
                nfe.append(n)
            lp, var = _spread(lps, keep, -math.inf), _spread(variances, keep, 0.0)
        if not return_info:
            return lp
        info = {"nfe": sum(nfe) / max(len(nfe), 1), "seconds": time.perf_counter() - start, "batch_size": batch_size}
        return lp, info | {"variance": var} | opts

    def _log_prob_batch_size(
        self, n: int, opts: dict[str, Any], context: Tensor | None = None, default: int = LOG_PROB_BATCH
    ) -> int:
        """Points per solve of :meth:`log_prob` on ``n`` points with ``opts`` (:meth:`_log_prob_options`): what fits
        in the device's free memory, ``default`` on a CPU. ``context``: their contexts (data units), if any."""
        if self.context is not None:  # a context row to measure with (a label for the marginal's solves)
            some = context[:1] if context is not None else torch.zeros(1, dtype=torch.long, device=self.device)
            context = self.context.model(some.to(self.device))
        copies = opts["probes"] * opts["deq_samples"] * opts["augment_samples"]
        solver = opts["solver"]
        if opts["trace"] == "exact" and (solver.get("compile") or solver.get("checkpoint")):
            copies *= math.prod(self.state_shape)  # forward mode: the Jacobian columns, one vmapped batch
        return self._batch(n, default, trace=True, context=context, copies=copies)

    def _log_prob_options(
        self,
        trace: str = "auto",
        probes: int = 1,
        deq_samples: int = 1,
        augment_samples: int | None = None,
        **solve: Unpack[SolveOptions],
    ) -> dict[str, Any]:
        """What :meth:`log_prob` resolves its arguments to: ``trace`` ("auto" decided), ``probes``, ``deq_samples``
        and ``augment_samples`` (1 where they do not apply), ``likelihood`` and ``solver``; what its info dict
        reports of them."""
        trace = self._auto_trace(trace)
        if probes <= 0 or deq_samples <= 0 or (augment_samples is not None and augment_samples <= 0):
            raise FlowsError("probes, deq_samples and augment_samples must be positive")
        if augment_samples is None:  # a bound by default: Hutchinson's estimates are unbiased only at K = 1
            augment_samples = AUGMENT_SAMPLES if trace == "exact" else 1
        augment_samples = augment_samples if self.augment else 1
        return {
            "trace": trace,
            "probes": probes if trace == "hutchinson" else 1,
            "deq_samples": deq_samples if self.levels is not None else 1,
            "augment_samples": augment_samples,
            "likelihood": aug.likelihood(self.augment, trace, augment_samples),
            "solver": dict(self._solve_options(**solve)),
        }

    def _log_prob_batch(
        self, raw: Tensor, opts: dict[str, Any], generator: torch.Generator | None, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor, int]:
        """(log p (B,), variance over probes of the per-probe estimates (B,), NFE) of one batch of raw points;
        ``context``: one row per point in data units (None on a label-conditional flow: the marginal)."""
        if context is None and self.context is not None:
            return self._marginal_batch(raw, opts, generator)
        pre, probes, b = self.preprocess, opts["probes"], raw.shape[0]
        draws = opts["deq_samples"] * opts["augment_samples"]  # importance samples (dequantization, augmentation)
        reps = raw.repeat(draws * probes, *([1] * (raw.ndim - 1)))  # (draws * probes * B, ...)
        noise = torch.rand(reps.shape, generator=generator, device=raw.device) if pre.levels is not None else None
        x = pre(reps, noise=noise)
        c, z, log_det = None, x, pre.log_det(x)
        if context is not None:  # the conditional standardization, if any: an affine map with a constant log-det
            c = self.context.model(context).repeat(draws * probes, *([1] * (context.ndim - 1)))
            z, log_det = self.context.whiten(x, c), log_det + self.context.whiten_log_det()
        if self.augment:  # one augmentation per importance sample, shared by its probes: log p(x, a) − log q(a)
            a = aug.draw(z[: draws * b], self.augment, generator)
            a = a.reshape(draws, 1, b, *a.shape[1:]).expand(-1, probes, *([-1] * a.ndim)).flatten(0, 2)
            z, log_det = aug.join(z, a), log_det - aug.log_q(a).double()
        res = log_prob(self.field, z, trace=opts["trace"], generator=generator, context=c, **opts["solver"])
        lp = (res.log_prob.double() + log_det).reshape(draws, probes, b)
        var = lp.var(1).mean(0) if probes > 1 else torch.zeros(b, dtype=torch.float64, device=lp.device)
        lp = lp.mean(1)  # unbiased over probes
        lp = torch.logsumexp(lp, 0) - math.log(draws)  # importance-weighted over dequantizations and augmentations
        return lp, var, res.nfe.forward

    def _marginal_batch(
        self, raw: Tensor, opts: dict[str, Any], generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, int]:
        """log Σ_y p(y) p(x | y) of one batch (one solve per class); the variance by the delta method. Every class
        sees the same dequantization noise and probes (the generator's state is replayed), so the sum is over the
        densities of the same points."""
        prior = self.context.prior.to(raw.device, torch.float64)
        if generator is None:
            seed = int(torch.randint(2**62, (1,), device="cpu"))
            generator = torch.Generator(raw.device).manual_seed(seed)
        state, parts = generator.get_state(), []
        for y in range(self.context.classes):
            generator.set_state(state)
            parts.append(self._log_prob_batch(raw, opts, generator, torch.full((len(raw),), y, device=raw.device)))
        return mix(parts, prior)

    @staticmethod
    def _info(res: SampleResult) -> dict[str, Any]:
        """What a solve reports: ``nfe``, transport (kinetic energy, straightness) and per-point ``kinetic``."""
        return {"nfe": res.nfe, **transport_summary(res), "kinetic": res.kinetic}

    def _result(
        self, out: Tensor, info: dict[str, Any], solver: SolverOptions, start: float, return_info: bool
    ) -> Tensor | tuple[Tensor, dict[str, Any]]:
        if not return_info:
            return out
        return out, {**info, "seconds": time.perf_counter() - start, "solver": dict(solver)}


def mix(parts: list[tuple[Tensor, Tensor, int]], weights: Tensor) -> tuple[Tensor, Tensor, int]:
    """log Σ_k w_k p_k(x) of K components' (log p_k (B,), probe variance (B,), NFE), with ``weights`` (K,) summing
    to 1 (a mixture's members, a label's classes); the variance by the delta method, Σ_k r_k² var_k with r_k the
    responsibilities; the NFE summed."""
    weighted = torch.stack([p[0] for p in parts]) + weights.to(parts[0][0].device, torch.float64).log()[:, None]
    lp = torch.logsumexp(weighted, 0)
    resp = (weighted - lp).exp()
    var = (resp**2 * torch.stack([p[1] for p in parts])).sum(0)
    return lp, var.detach(), sum(p[2] for p in parts)


def _renamed(chunk: int | None, batch_size: int | None) -> int | None:
    """``chunk=``, the former name of ``batch_size=`` (points per solve), still accepted with a warning."""
    if chunk is None:
        return batch_size
    warnings.warn("chunk= is now batch_size= (points per solve)", DeprecationWarning, stacklevel=3)
    if batch_size is not None and batch_size != chunk:
        raise FlowsError(f"give batch_size= only (chunk={chunk} is its former name)")
    return chunk


def _spread(parts: list[Tensor], keep: Tensor | None, fill: float) -> Tensor:
    """The values of the kept points (in order) at their places among all points, ``fill`` elsewhere."""
    if keep is None:
        return torch.cat(parts)
    out = torch.full(keep.shape, fill, dtype=torch.float64, device=keep.device)
    if parts:
        out[keep] = torch.cat(parts)
    return out
