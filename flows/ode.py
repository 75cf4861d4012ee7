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

from flows.divergence import divergence_exact, divergence_hutchinson, divergence_jvp, draw_probe
from flows.errors import ConfigError, SolverError, unknown_value

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
    "augmented",
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
    compile: bool | str  # euler, midpoint, rk4 without the adjoint: torch.compile the whole solve (True, or a mode)


DEFAULTS: SolverOptions = {
    "method": "dopri5",
    "atol": 1e-5,
    "rtol": 1e-5,
    "step_size": None,
    "adjoint": False,
    "max_steps": 10_000,
    "compile": False,
}
# the fixed-step methods that flows integrates itself: a loop with no host synchronization (times are Python
# floats), which torch.compile can take whole
OWN_METHODS = ("euler", "midpoint", "rk4")
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
class NFE:
    """Function evaluations; ``backward`` is complete once ``loss.backward()`` has run."""

    total: int = 0
    forward: int = 0

    @property
    def backward(self) -> int:
        return self.total - self.forward


@dataclass
class Solution:
    """The result of one solve: the end state and each integral that was asked for (else None)."""

    x: Tensor  # state at t1
    divergence: Tensor | None = None  # ∫_{t0}^{t1} div v dt, (B,)
    kinetic: Tensor | None = None  # ∫_{t0}^{t1} ‖v‖² dt, (B,)
    jacobian: Tensor | None = None  # ∫_{t0}^{t1} ‖∂v/∂x‖²_F dt, (B,)
    hjb: Tensor | None = None  # ∫_{t0}^{t1} |∂ₜΦ − ½‖∇ₓΦ‖²| dt, (B,): potential fields only
    nfe: NFE = field(default_factory=NFE)


INTEGRALS = ("divergence", "kinetic", "jacobian", "hjb")  # the order of the augmented state after x


class Dynamics(nn.Module):
    """Augmented dynamics ``(t, (x, *integrals)) -> (v, *their rates)`` for one solve.

    Build one per solve (a Hutchinson probe is drawn once per solve). ``integrals`` names what is
    integrated besides x, in :data:`INTEGRALS` order. A field with ``analytic_divergence`` (the
    potential) supplies ``dynamics(x, t) -> (v, div v, ∂ₜΦ)`` itself: its divergence is exact whatever
    ``trace`` asks for, and no probe or VJP is used. Public so that benchmarks can time one evaluation.
    """

    def __init__(
        self,
        field: nn.Module,
        integrals: tuple[str, ...] = (),
        trace: str = "exact",
        probe: Tensor | None = None,
        nfe: NFE | None = None,
        context: Tensor | None = None,
        derivatives: str = "reverse",
    ):
        super().__init__()
        self.field, self.integrals, self.trace, self.probe = field, integrals, trace, probe
        self.derivatives = derivatives
        # a conditional field's context, one row per point (constant along the solve): v(x, t, c)
        self.extra = () if context is None else (context,)
        self.nfe = nfe if nfe is not None else NFE()
        if getattr(field, "analytic_divergence", False) and context is not None:
            raise ConfigError("a field with an analytic divergence (the potential) takes no context")

    def forward(self, t: Tensor | float, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        self.nfe.total += 1
        return augmented(self.field, t, state, self.integrals, self.trace, self.probe, self.extra, self.derivatives)


def augmented(
    field: nn.Module,
    t: Tensor | float,
    state: tuple[Tensor, ...],
    integrals: tuple[str, ...] = (),
    trace: str = "exact",
    probe: Tensor | None = None,
    extra: tuple[Tensor, ...] = (),
    derivatives: str = "reverse",
) -> tuple[Tensor, ...]:
    """The rates ``(v, *integrands)`` of the augmented state at time t (a tensor, or a Python float: then no host
    value is read, so the call can be captured or compiled). ``derivatives``: the divergence and Jacobian by
    vector-Jacobian products (``"reverse"``; with a graph while gradients are enabled) or by Jacobian-vector
    products (``"forward"``, :func:`divergence_jvp`: its gradient is a first-order backward, which torch.compile
    takes)."""
    x = state[0]
    t = x.new_full((x.shape[0],), t) if isinstance(t, float) else t.expand(x.shape[0])
    rates: dict[str, Tensor | None] = {}
    if getattr(field, "analytic_divergence", False) and ("divergence" in integrals or "hjb" in integrals):
        v, rates["divergence"], phi_t = field.dynamics(x, t)
        if "hjb" in integrals:  # the HJB residual of Φ: ∂ₜΦ − ½‖∇ₓΦ‖², with ∇ₓΦ = −v
            rates["hjb"] = (phi_t - 0.5 * v.pow(2).sum(1)).abs()
    elif "divergence" not in integrals and "jacobian" not in integrals:
        v = field(x, t, *extra)
    elif derivatives == "forward":
        frobenius = "jacobian" in integrals
        v, rates["divergence"], rates["jacobian"] = divergence_jvp(
            lambda y: field(y, t, *extra), x, probe if trace == "hutchinson" else None, frobenius
        )
    else:
        create_graph = torch.is_grad_enabled()  # False while the adjoint's forward runs
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            v = field(x, t, *extra)
            frobenius = "jacobian" in integrals
            if trace == "exact":
                rates["divergence"], rates["jacobian"] = divergence_exact(v, x, create_graph, frobenius)
            else:
                rates["divergence"], rates["jacobian"] = divergence_hutchinson(v, x, probe, create_graph, frobenius)
    if "kinetic" in integrals:
        rates["kinetic"] = v.pow(2).flatten(1).sum(1)
    return (v, *(rates[name] for name in integrals))


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
    integrals = tuple(name for name in INTEGRALS if asked[name])
    eps = draw_probe(x, probe, generator) if trace == "hutchinson" and not analytic else None
    if context is not None and len(context) != x.shape[0]:
        raise ConfigError(f"{len(context)} context rows for {x.shape[0]} points")
    zeros = x.new_zeros(x.shape[0])
    state = (x,) + (zeros,) * len(integrals)
    if options["method"] in OWN_METHODS and not (options["adjoint"] and torch.is_grad_enabled()):
        if options["compile"] and analytic:
            raise ConfigError("compile: a field with an analytic divergence (the potential) is solved uncompiled")
        grid = fixed_grid(t0, t1, options["step_size"], x.dtype)
        extra = () if context is None else (context,)
        finals = integrate_fixed(
            field, state, grid, options["method"], integrals, trace or "exact", eps, extra, compile=options["compile"]
        )
        nfe = (len(grid) - 1) * STAGES[options["method"]]
        return Solution(finals[0], **dict(zip(integrals, finals[1:], strict=True)), nfe=NFE(nfe, nfe))
    dynamics = Dynamics(field, integrals, trace or "exact", eps, context=context)
    n_controlled = 2 if trace is not None else 1  # x and the log-density; never the regularizers

    def norm(tensors: tuple[Tensor, ...]) -> Tensor:
        return torch.stack([_rms(t) for t in tensors[:n_controlled]]).max()

    times = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
    out = _odeint(dynamics, state, times, options, field, norm)
    dynamics.nfe.forward = dynamics.nfe.total
    finals = [o[-1] for o in out]
    return Solution(finals[0], **dict(zip(integrals, finals[1:], strict=True)), nfe=dynamics.nfe)


THIRD = 1 / 3
STAGES = {"euler": 1, "midpoint": 2, "rk4": 4}  # field evaluations per step of each of OWN_METHODS


def fixed_grid(t0: float, t1: float, step_size: float | None, dtype: torch.dtype = torch.float32) -> tuple[float, ...]:
    """The times of a fixed-step solve from t0 to t1, as torchdiffeq makes them (in ``dtype``, on the host): steps of
    ``step_size`` with a shorter last one, or one step without a step size. Decreasing times mirror increasing ones."""
    if step_size is None:
        return (float(t0), float(t1))
    sign = 1.0 if t1 >= t0 else -1.0
    start, end = torch.tensor(sign * t0, dtype=dtype, device="cpu"), torch.tensor(sign * t1, dtype=dtype, device="cpu")
    count = int(torch.ceil((end - start) / step_size + 1))
    grid = torch.arange(0, count, dtype=dtype, device="cpu") * step_size + start
    grid[-1] = end
    return tuple(sign * float(g) for g in grid)


def integrate_fixed(
    field: nn.Module,
    state: tuple[Tensor, ...],
    grid: tuple[float, ...],
    method: str,
    integrals: tuple[str, ...] = (),
    trace: str = "exact",
    probe: Tensor | None = None,
    extra: tuple[Tensor, ...] = (),
    derivatives: str = "reverse",
    compile: bool | str = False,
) -> tuple[Tensor, ...]:
    """The augmented state at ``grid[-1]`` by ``method`` over the steps of ``grid`` (:func:`fixed_step`). Nothing
    is read back from the device, so on a GPU the host queues every step without waiting. ``compile``: each step
    runs compiled (one graph per step, taking its times as tensors, so every step reuses it; forward-mode
    derivatives, whose gradient torch.compile supports)."""
    if not compile:
        for a, b in zip(grid[:-1], grid[1:], strict=False):
            state = fixed_step(field, state, a, b, method, integrals, trace, probe, extra, derivatives)
        return state
    step, times = _compiled(compile), state[0].new_tensor(grid)  # one copy of the times per solve
    for i in range(len(grid) - 1):
        state = step(field, state, times[i], times[i + 1], method, integrals, trace, probe, extra)
    return state


def fixed_step(
    field: nn.Module,
    state: tuple[Tensor, ...],
    a: float | Tensor,
    b: float | Tensor,
    method: str,
    integrals: tuple[str, ...] = (),
    trace: str = "exact",
    probe: Tensor | None = None,
    extra: tuple[Tensor, ...] = (),
    derivatives: str = "reverse",
) -> tuple[Tensor, ...]:
    """One step of ``method`` from time a to b: euler, midpoint, or rk4 as torchdiffeq's (the 3/8 rule)."""

    def rates(t: float | Tensor, y: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return augmented(field, t, y, integrals, trace, probe, extra, derivatives)

    dt = b - a
    k1 = rates(a, state)
    if method == "euler":
        dy = tuple(dt * k for k in k1)
    elif method == "midpoint":
        mid = tuple(y + k * (0.5 * dt) for y, k in zip(state, k1, strict=True))
        dy = tuple(dt * k for k in rates(a + 0.5 * dt, mid))
    else:  # rk4: the 3/8 rule
        k2 = rates(a + dt * THIRD, tuple(y + dt * k * THIRD for y, k in zip(state, k1, strict=True)))
        k3 = rates(a + dt * 2 * THIRD, tuple(y + dt * (q - p * THIRD) for y, p, q in zip(state, k1, k2, strict=True)))
        k4 = rates(b, tuple(y + dt * (p - q + r) for y, p, q, r in zip(state, k1, k2, k3, strict=True)))
        dy = tuple((p + 3 * (q + r) + w) * dt * 0.125 for p, q, r, w in zip(k1, k2, k3, k4, strict=True))
    return tuple(y + d for y, d in zip(state, dy, strict=True))


def _step_forward(*args: object) -> tuple[Tensor, ...]:
    """:func:`fixed_step` with forward-mode derivatives: the form torch.compile takes with its gradient."""
    return fixed_step(*args, derivatives="forward")  # type: ignore[arg-type]


_COMPILED: dict[str, Callable[..., tuple[Tensor, ...]]] = {}


def _compiled(mode: bool | str) -> Callable[..., tuple[Tensor, ...]]:
    """The compiled fixed step for a torch.compile ``mode`` (True: the default mode), made once per mode."""
    name = "default" if mode is True else str(mode)
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_step_forward, mode=None if name == "default" else name, dynamic=False)
    return _COMPILED[name]


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


def solver_error(error: AssertionError, options: SolverOptions) -> SolverError | AssertionError:
    """Turn torchdiffeq's bare assertions into an error that says what to do."""
    text = str(error)
    if "underflow in dt" in text:
        what = "the step size underflowed"
    elif "max_num_steps" in text:
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
