"""The one module that calls torchdiffeq.

``solve(field, x, t0, t1, solver, ...)`` integrates dx/dt = v(x, t) together with the optional
integrals the objectives need: the divergence (for the log-density change), the kinetic energy
∫‖v‖²dt and the Jacobian Frobenius norm ∫‖∂v/∂x‖²_F dt. Only x and the log-density enter
step-size control (the regularizers are plain integrals); the adjoint uses seminorms.
Solver settings are data passed per call; nothing is stored on the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from flows.config import FIXED_STEP_METHODS, SolverConfig
from flows.divergence import divergence_exact, divergence_hutchinson, draw_probe
from flows.errors import SolverError

__all__ = ["NFE", "Solution", "solve", "solve_path"]

FIXED_STEP = frozenset(FIXED_STEP_METHODS)


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
    x: Tensor  # state at t1
    divergence: Tensor | None  # ∫_{t0}^{t1} div v dt, (B,)
    kinetic: Tensor | None  # ∫_{t0}^{t1} ‖v‖² dt, (B,)
    jacobian: Tensor | None  # ∫_{t0}^{t1} ‖∂v/∂x‖²_F dt, (B,)
    nfe: NFE = field(default_factory=NFE)
    hjb: Tensor | None = None  # ∫_{t0}^{t1} |∂ₜΦ − ½‖∇ₓΦ‖²| dt, (B,): potential fields only


class _Dynamics(nn.Module):
    """Augmented dynamics for one solve (built per call: the probe is drawn once per solve).

    A field with ``analytic_divergence`` (the potential) supplies ``dynamics(x, t) -> (v, div v, ∂ₜΦ)``
    itself: its divergence is exact whatever ``trace`` asks for, and no probe or VJP is used.
    """

    def __init__(
        self,
        field: nn.Module,
        trace: str | None,
        probe: Tensor | None,
        kinetic: bool,
        jacobian: bool,
        nfe: NFE,
        hjb: bool = False,
    ):
        super().__init__()
        self.field, self.trace, self.probe = field, trace, probe
        self.kinetic, self.jacobian, self.nfe, self.hjb = kinetic, jacobian, nfe, hjb
        self.analytic = getattr(field, "analytic_divergence", False)

    def forward(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        self.nfe.total += 1
        x = state[0]
        t = t.expand(x.shape[0])
        if self.analytic and (self.trace is not None or self.hjb):
            v, div, phi_t = self.field.dynamics(x, t)
            out = [v]
            if self.trace is not None:
                out.append(div)
            if self.kinetic:
                out.append(v.pow(2).sum(1))
            if self.hjb:  # the HJB residual of Φ: ∂ₜΦ − ½‖∇ₓΦ‖², with ∇ₓΦ = −v
                out.append((phi_t - 0.5 * v.pow(2).sum(1)).abs())
            return tuple(out)
        if self.trace is None and not self.jacobian:
            v = self.field(x, t)
            return (v,) + ((v.pow(2).flatten(1).sum(1),) if self.kinetic else ())
        create_graph = torch.is_grad_enabled()  # False while the adjoint's forward runs
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            v = self.field(x, t)
            if self.trace == "exact":
                div, frob = divergence_exact(v, x, create_graph, self.jacobian)
            else:
                div, frob = divergence_hutchinson(v, x, self.probe, create_graph, self.jacobian)
        out = [v]
        if self.trace is not None:
            out.append(div)
        if self.kinetic:
            out.append(v.pow(2).flatten(1).sum(1))
        if self.jacobian:
            out.append(frob)
        return tuple(out)


def _rms(x: Tensor) -> Tensor:
    return x.pow(2).mean().sqrt()


def solve(
    field: nn.Module,
    x: Tensor,
    t0: float,
    t1: float,
    solver: SolverConfig,
    trace: str | None = None,
    probe: str = "rademacher",
    kinetic: bool = False,
    jacobian: bool = False,
    generator: torch.Generator | None = None,
    hjb: bool = False,
) -> Solution:
    """Integrate x from t0 to t1 under ``field`` with the requested integrals.

    trace: None, "exact" or "hutchinson" (the probe is drawn once for this solve).
    jacobian needs a trace (it reuses its vector-Jacobian products); hjb needs a potential field.
    """
    analytic = getattr(field, "analytic_divergence", False)
    if jacobian and (trace is None or analytic):
        raise ValueError("the Jacobian regularizer needs trace='exact' or 'hutchinson' and a non-potential field")
    if hjb and not analytic:
        raise ValueError("the HJB penalty needs a potential field (model.name=potential)")
    eps = draw_probe(x, probe, generator) if trace == "hutchinson" and not analytic else None
    nfe = NFE()
    dynamics = _Dynamics(field, trace, eps, kinetic, jacobian, nfe, hjb)
    zeros = x.new_zeros(x.shape[0])
    state = (x,) + (zeros,) * (int(trace is not None) + int(kinetic) + int(jacobian) + int(hjb))
    n_controlled = 2 if trace is not None else 1  # x and the log-density; never the regularizers

    def norm(tensors: tuple[Tensor, ...]) -> Tensor:
        return torch.stack([_rms(t) for t in tensors[:n_controlled]]).max()

    times = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
    out = _odeint(dynamics, state, times, solver, field, norm)
    nfe.forward = nfe.total
    finals = [o[-1] for o in out]
    x1, rest = finals[0], finals[1:]
    div = rest.pop(0) if trace is not None else None
    kin = rest.pop(0) if kinetic else None
    jac = rest.pop(0) if jacobian else None
    hjb_integral = rest.pop(0) if hjb else None
    return Solution(x1, div, kin, jac, nfe, hjb_integral)


def _odeint(
    dynamics: nn.Module, state: tuple[Tensor, ...], times: Tensor, solver: SolverConfig, field: nn.Module, norm=None
) -> tuple[Tensor, ...]:
    kwargs: dict = dict(method=solver.method)
    if solver.method in FIXED_STEP:
        if solver.step_size is not None:
            kwargs["options"] = {"step_size": solver.step_size}
    else:
        kwargs.update(atol=solver.atol, rtol=solver.rtol)
        kwargs["options"] = {"max_num_steps": solver.max_steps} | ({"norm": norm} if norm else {})
    try:
        if solver.adjoint and torch.is_grad_enabled():
            params = tuple(p for p in field.parameters() if p.requires_grad)
            adjoint_options: dict = {"norm": "seminorm"}
            if solver.method not in FIXED_STEP:
                adjoint_options["max_num_steps"] = solver.max_steps
            elif solver.step_size is not None:
                adjoint_options["step_size"] = solver.step_size
            return odeint_adjoint(
                dynamics, state, times, adjoint_params=params, adjoint_options=adjoint_options, **kwargs
            )
        return odeint(dynamics, state, times, **kwargs)
    except AssertionError as e:
        raise solver_error(e, solver) from None


def solve_path(field: nn.Module, x: Tensor, times: Tensor, solver: SolverConfig) -> tuple[Tensor, NFE]:
    """The states at each of ``times`` (T,), starting from x at times[0]: (T, B, ...)."""
    nfe = NFE()
    (path,) = _odeint(_Dynamics(field, None, None, False, False, nfe), (x,), times.to(x), solver, field)
    nfe.forward = nfe.total
    return path, nfe


def solver_error(error: AssertionError, solver: SolverConfig) -> SolverError | AssertionError:
    """Turn torchdiffeq's bare assertions into an error that says what to do."""
    text = str(error)
    if "underflow in dt" in text:
        what = "the step size underflowed"
    elif "max_num_steps" in text:
        what = f"the solver needed more than solver.max_steps={solver.max_steps} steps"
    else:
        return error
    return SolverError(
        f"ODE solve failed: {what} ({solver.method}, atol={solver.atol:g}, rtol={solver.rtol:g}). "
        "The vector field has likely become stiff or non-finite. What helps: a smaller "
        "learning rate or stronger gradient clipping (train.lr, train.grad_clip); the transport "
        "regularizers (objective.kinetic=0.01 objective.jacobian=0.01); looser tolerances "
        "(solver.atol, solver.rtol) or a larger solver.max_steps; a smooth activation "
        "(model.activation=tanh or softplus). Resume from the last checkpoint with --resume."
    )
