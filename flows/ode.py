"""The one module that calls torchdiffeq.

``solve(field, x, t0, t1, trace=..., kinetic=..., method=..., atol=...)`` integrates dx/dt = v(x, t)
together with the integrals the objectives need, each named in the result: the divergence (for the
log-density change), the kinetic energy ∫‖v‖²dt, the Jacobian Frobenius norm ∫‖∂v/∂x‖²_F dt and, for a
potential field, the HJB residual. Only x and the log-density enter step-size control (the
regularizers are plain integrals); the adjoint uses seminorms. Solver settings are plain keywords
(:class:`SolverOptions`) passed per call; nothing is stored on the field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict, Unpack

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from flows.divergence import draw_probe
from flows.dynamics import INTEGRALS, NFE, Dynamics
from flows.errors import ConfigError, SolverError, unknown_value
from flows.steppers import (
    OWN_METHODS,
    STAGES,
    AdaptiveStop,
    fixed_grid,
    fixed_step,
    integrate_dopri5,
    integrate_fixed,
)

OWN_SYNC_EVERY = 8  # dopri5 off the CPU: host reads every this many steps at most (sync_every=None)

__all__ = [
    "ADAPTIVE_METHODS",
    "FIXED_STEP_METHODS",
    "OWN_METHODS",
    "SOLVER_METHODS",
    "SolverOptions",
    "solver_options",
    "check_method",
    "NFE",
    "Solution",
    "Dynamics",
    "fixed_grid",
    "integrate_fixed",
    "fixed_step",
    "solve",
    "solve_path",
]

# torchdiffeq's methods (tests/test_config_data.py checks this list against torchdiffeq's own);
# scipy_solver is left out: it needs options of its own that these settings do not carry
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_STEP_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams")
SOLVER_METHODS = (*ADAPTIVE_METHODS, *FIXED_STEP_METHODS)


class SolverOptions(TypedDict, total=False):
    """The solver keywords every solve takes (defaults in :data:`DEFAULTS`)."""

    method: str  # a torchdiffeq method: adaptive (dopri5, ...) or fixed-step (rk4, euler, ...)
    atol: float  # adaptive methods' tolerances
    rtol: float
    step_size: float | None  # fixed-step methods (None: one step per output time)
    adjoint: bool  # gradients by the adjoint (O(1) memory) instead of backprop through the solver
    max_steps: int  # adaptive methods give up (with a SolverError) past this
    sync_every: (
        int | None
    )  # dopri5: host reads every N steps (flows' own loop); 1: torchdiffeq's; None: 1 on a CPU, else 8
    compile: bool | str  # euler, midpoint, rk4 without the adjoint: torch.compile each step (True, or a mode)
    checkpoint: bool  # euler, midpoint, rk4 without the adjoint: recompute each step's graph in the backward


DEFAULTS: SolverOptions = {
    "method": "dopri5",
    "atol": 1e-5,
    "rtol": 1e-5,
    "step_size": None,
    "adjoint": False,
    "max_steps": 10_000,
    "sync_every": None,
    "compile": False,
    "checkpoint": False,
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def solver_options(prefix: str = "", **options: Unpack[SolverOptions]) -> SolverOptions:
    """``options`` checked and completed with :data:`DEFAULTS` (an unknown keyword or a bad value: ConfigError).

    ``prefix`` names where the options come from in messages (``"solver."`` for a config section)."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown solver option(s) {sorted(unknown)}; valid: {', '.join(DEFAULTS)}.")
    out: SolverOptions = {**DEFAULTS, **options}  # type: ignore[typeddict-item]
    check_method(out["method"], f"{prefix}method")
    p = prefix
    if not (out["atol"] > 0 and out["rtol"] > 0):
        raise ConfigError(f"invalid value: {p}atol and {p}rtol must be > 0 (got {out['atol']}, {out['rtol']}).")
    if out["step_size"] is not None and out["step_size"] <= 0:
        raise ConfigError(f"invalid value: {p}step_size must be > 0 (got {out['step_size']}).")
    if out["max_steps"] <= 0:
        raise ConfigError(f"invalid value: {p}max_steps must be > 0 (got {out['max_steps']}).")
    if out["sync_every"] is not None and out["sync_every"] <= 0:
        raise ConfigError(f"invalid value: {p}sync_every must be > 0 (got {out['sync_every']}).")
    if out["checkpoint"] and (out["method"] not in OWN_METHODS or out["adjoint"]):
        raise ConfigError(
            f"invalid value: {p}checkpoint keeps one step's graph of a fixed-step solve: it needs {p}method in "
            f"{', '.join(OWN_METHODS)} and {p}adjoint=false (the adjoint keeps none at all)."
        )
    mode = out["compile"]
    if isinstance(mode, str) and mode not in COMPILE_MODES:
        unknown_value(f"{p}compile", mode, ["true", "false", *COMPILE_MODES])
    if mode and (out["method"] not in OWN_METHODS or out["adjoint"]):
        raise ConfigError(
            f"invalid value: {p}compile compiles a fixed-step solve: it needs {p}method in {', '.join(OWN_METHODS)} "
            f"and {p}adjoint=false (got method={out['method']}, adjoint={out['adjoint']}); e.g. "
            f"{p}method=rk4 {p}step_size=0.05 {p}adjoint=false {p}compile=true."
        )
    return out


def check_method(method: str, key: str = "method") -> str:
    """``method`` if torchdiffeq has it, else a ConfigError naming ``key`` and the valid methods."""
    if method not in SOLVER_METHODS:
        unknown_value(key, method, SOLVER_METHODS)
    return method


@dataclass
class Solution:
    """The result of one solve: the end state and each integral that was asked for (else None)."""

    x: Tensor  # state at t1
    divergence: Tensor | None = None  # ∫_{t0}^{t1} div v dt, (B,)
    kinetic: Tensor | None = None  # ∫_{t0}^{t1} ‖v‖² dt, (B,)
    jacobian: Tensor | None = None  # ∫_{t0}^{t1} ‖∂v/∂x‖²_F dt, (B,)
    hjb: Tensor | None = None  # ∫_{t0}^{t1} |∂ₜΦ − ½‖∇ₓΦ‖²| dt, (B,): potential fields only
    nfe: NFE = field(default_factory=NFE)


def _rms(x: Tensor) -> Tensor:
    return x.pow(2).mean().sqrt()


def solve(
    field: nn.Module,
    x: Tensor,
    t0: float,
    t1: float,
    *,
    trace: str | None = None,
    probe: str = "rademacher",
    kinetic: bool = False,
    jacobian: bool = False,
    hjb: bool = False,
    generator: torch.Generator | None = None,
    context: Tensor | None = None,
    **solver: Unpack[SolverOptions],
) -> Solution:
    """Integrate x (B, *shape) from t0 to t1 under ``field`` with the requested integrals.

    Args:
        trace: None, ``"exact"`` or ``"hutchinson"``: integrate the divergence (the probe, ``"rademacher"``
            or ``"gaussian"``, is drawn once for this solve with ``generator``).
        kinetic, jacobian, hjb: also integrate ‖v‖², ‖∂v/∂x‖²_F (needs a trace and a field without an
            analytic divergence: it reuses the trace's vector-Jacobian products) or the HJB residual
            (a potential field).
        context: a conditional field's context, one row per point (B, ...), passed as ``field(x, t, context)``.
        **solver: :class:`SolverOptions` (method, atol, rtol, step_size, adjoint, max_steps).

    Returns:
        A :class:`Solution` with ``x`` at t1 and each integral asked for, (B,) each.
    """
    options = solver_options(**solver)
    analytic = getattr(field, "analytic_divergence", False)
    integrals = _integrals(trace, kinetic, jacobian, hjb, analytic)
    eps = draw_probe(x, probe, generator) if trace == "hutchinson" and not analytic else None
    if context is not None and len(context) != x.shape[0]:
        raise ConfigError(f"{len(context)} context rows for {x.shape[0]} points")
    zeros = x.new_zeros(x.shape[0])
    state = (x,) + (zeros,) * len(integrals)
    n_controlled = 2 if trace is not None else 1  # x and the log-density; never the regularizers

    def norm(tensors: tuple[Tensor, ...]) -> Tensor:
        return torch.stack([_rms(t) for t in tensors[:n_controlled]]).max()

    taped = options["adjoint"] and torch.is_grad_enabled()  # the adjoint is torchdiffeq's
    if options["method"] in OWN_METHODS and not taped:
        return _solve_fixed(field, state, t0, t1, integrals, trace, eps, context, options, analytic)
    dynamics = Dynamics(field, integrals, trace or "exact", eps, context=context)
    every = options["sync_every"] or (1 if x.device.type == "cpu" else OWN_SYNC_EVERY)
    if options["method"] == "dopri5" and every > 1 and not taped:
        try:
            finals, _, _ = integrate_dopri5(
                dynamics,
                state,
                t0,
                t1,
                atol=options["atol"],
                rtol=options["rtol"],
                norm=norm,
                sync_every=every,
                max_steps=options["max_steps"],
            )
        except AdaptiveStop as e:
            raise solver_error(e, options) from None
    else:
        times = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
        finals = [o[-1] for o in _odeint(dynamics, state, times, options, field, norm)]
    dynamics.nfe.forward = dynamics.nfe.total
    return Solution(finals[0], **dict(zip(integrals, finals[1:], strict=True)), nfe=dynamics.nfe)


def _integrals(trace: str | None, kinetic: bool, jacobian: bool, hjb: bool, analytic: bool) -> tuple[str, ...]:
    """The integrals a solve carries beside x, in ``INTEGRALS`` order; a clear error for a request that cannot be."""
    if trace not in (None, "exact", "hutchinson"):
        unknown_value("trace", str(trace), ["exact", "hutchinson"])
    if jacobian and (trace is None or analytic):
        raise ConfigError(
            "the Jacobian regularizer needs trace='exact' or 'hutchinson' and a field without an "
            "analytic divergence (a potential field is regularized by hjb instead)"
        )
    if hjb and not analytic:
        raise ConfigError("the HJB penalty needs a field with an analytic divergence (a potential field)")
    asked = {"divergence": trace is not None, "kinetic": kinetic, "jacobian": jacobian, "hjb": hjb}
    return tuple(name for name in INTEGRALS if asked[name])


def _solve_fixed(
    field: nn.Module,
    state: tuple[Tensor, ...],
    t0: float,
    t1: float,
    integrals: tuple[str, ...],
    trace: str | None,
    eps: Tensor | None,
    context: Tensor | None,
    options: SolverOptions,
    analytic: bool,
) -> Solution:
    """euler, midpoint or rk4 by flows' own loop (nothing read back from the device), compiled or checkpointed."""
    if (options["compile"] or options["checkpoint"]) and analytic:
        raise ConfigError(
            "compile and checkpoint: a field with an analytic divergence (the potential) is solved without them"
        )
    grid = fixed_grid(t0, t1, options["step_size"], state[0].dtype)
    forward = options["compile"] or options["checkpoint"]  # their gradients must be first order
    derivatives = "forward" if forward else "reverse"
    dynamics = Dynamics(field, integrals, trace or "exact", eps, context=context, derivatives=derivatives)
    finals = integrate_fixed(
        dynamics, state, grid, options["method"], compile=options["compile"], checkpoint=options["checkpoint"]
    )
    nfe = (len(grid) - 1) * STAGES[options["method"]]
    return Solution(finals[0], **dict(zip(integrals, finals[1:], strict=True)), nfe=NFE(nfe, nfe))


def _odeint(
    dynamics: nn.Module,
    state: tuple[Tensor, ...],
    times: Tensor,
    options: SolverOptions,
    field: nn.Module,
    norm: Callable[[tuple[Tensor, ...]], Tensor] | None = None,
) -> tuple[Tensor, ...]:
    method, fixed = options["method"], options["method"] in FIXED_STEP_METHODS
    kwargs: dict = dict(method=method)
    if fixed:
        if options["step_size"] is not None:
            kwargs["options"] = {"step_size": options["step_size"]}
    else:
        kwargs.update(atol=options["atol"], rtol=options["rtol"])
        kwargs["options"] = {"max_num_steps": options["max_steps"]} | ({"norm": norm} if norm else {})
    try:
        if options["adjoint"] and torch.is_grad_enabled():
            params = tuple(p for p in field.parameters() if p.requires_grad)
            adjoint_options: dict = {"norm": "seminorm"}
            if not fixed:
                adjoint_options["max_num_steps"] = options["max_steps"]
            elif options["step_size"] is not None:
                adjoint_options["step_size"] = options["step_size"]
            return odeint_adjoint(
                dynamics, state, times, adjoint_params=params, adjoint_options=adjoint_options, **kwargs
            )
        return odeint(dynamics, state, times, **kwargs)
    except AssertionError as e:
        raise solver_error(e, options) from None


def solve_path(
    field: nn.Module, x: Tensor, times: Tensor, context: Tensor | None = None, **solver: Unpack[SolverOptions]
) -> tuple[Tensor, NFE]:
    """The states at each of ``times`` (T,), starting from x at times[0]: (T, B, ...), and the NFE."""
    dynamics = Dynamics(field, context=context)
    (path,) = _odeint(dynamics, (x,), times.to(x), solver_options(**solver), field)
    dynamics.nfe.forward = dynamics.nfe.total
    return path, dynamics.nfe


def solver_error(error: Exception, options: SolverOptions) -> SolverError | Exception:
    """Turn torchdiffeq's bare assertions (and flows' own :class:`AdaptiveStop`) into an error that says what to do."""
    text = str(error)
    if "underflow" in text:
        what = "the step size underflowed"
    elif "non-finite" in text:
        what = "the state or the step size became non-finite"
    elif "max_num_steps" in text or "max_steps" in text:
        what = f"the solver needed more than max_steps={options['max_steps']} steps (solver.max_steps in a config)"
    else:
        return error
    return SolverError(
        f"ODE solve failed: {what} ({options['method']}, atol={options['atol']:g}, rtol={options['rtol']:g}). "
        "The vector field has likely become stiff or non-finite. What helps: a smaller "
        "learning rate or stronger gradient clipping (train.lr, train.grad_clip); the transport "
        "regularizers (objective.kinetic=0.01 objective.jacobian=0.01); looser tolerances "
        "(solver.atol, solver.rtol) or a larger solver.max_steps; a smooth activation "
        "(model.activation=tanh or softplus). Resume from the last checkpoint with --resume."
    )
