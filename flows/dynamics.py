"""The augmented dynamics of a solve: dx/dt = v(x, t) with the integrands the objectives need.

:class:`Dynamics` holds one solve's settings (the field, what is integrated, the trace and its probe, the context,
the derivatives' mode); :meth:`Dynamics.rates` gives the rates ``(v, *integrands)`` at one time: the divergence (for
the log-density), the kinetic energy ‖v‖², the Jacobian's squared Frobenius norm and, for a potential field, the
HJB residual; by vector-Jacobian products (reverse mode) or Jacobian-vector products (forward mode). Calling it
counts the evaluation (what torchdiffeq integrates); flows' fixed-step loops call ``rates``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flows.divergence import divergence_exact, divergence_hutchinson, divergence_jvp
from flows.errors import ConfigError

__all__ = ["INTEGRALS", "NFE", "Dynamics"]


@dataclass
class NFE:
    """Function evaluations; ``backward`` is complete once ``loss.backward()`` has run."""

    total: int = 0
    forward: int = 0

    @property
    def backward(self) -> int:
        return self.total - self.forward


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
        """:meth:`rates`, counted (what torchdiffeq and flows' dopri5 call)."""
        self.nfe.total += 1
        return self.rates(t, state)

    def rates(self, t: Tensor | float, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The rates ``(v, *integrands)`` of the augmented state at time t (a tensor, or a Python float: then no host
        value is read, so the call can be captured or compiled). ``derivatives``: the divergence and Jacobian by
        vector-Jacobian products (``"reverse"``; with a graph while gradients are enabled) or by Jacobian-vector
        products (``"forward"``, :func:`divergence_jvp`: its gradient is a first-order backward, which torch.compile
        takes)."""
        field, integrals, extra = self.field, self.integrals, self.extra
        x = state[0]
        t = x.new_full((x.shape[0],), t) if isinstance(t, float) else t.expand(x.shape[0])
        rates: dict[str, Tensor | None] = {}
        if getattr(field, "analytic_divergence", False) and ("divergence" in integrals or "hjb" in integrals):
            v, rates["divergence"], phi_t = field.dynamics(x, t)
            if "hjb" in integrals:  # the HJB residual of Φ: ∂ₜΦ − ½‖∇ₓΦ‖², with ∇ₓΦ = −v
                rates["hjb"] = (phi_t - 0.5 * v.pow(2).sum(1)).abs()
        elif "divergence" not in integrals and "jacobian" not in integrals:
            v = field(x, t, *extra)
        elif self.derivatives == "forward":
            probe = self.probe if self.trace == "hutchinson" else None
            v, rates["divergence"], rates["jacobian"] = divergence_jvp(
                lambda y: field(y, t, *extra), x, probe, "jacobian" in integrals
            )
        else:
            create_graph = torch.is_grad_enabled()  # False while the adjoint's forward runs
            with torch.enable_grad():
                if not x.requires_grad:
                    x = x.detach().requires_grad_(True)
                v = field(x, t, *extra)
                frobenius = "jacobian" in integrals
                if self.trace == "exact":
                    rates["divergence"], rates["jacobian"] = divergence_exact(v, x, create_graph, frobenius)
                else:
                    rates["divergence"], rates["jacobian"] = divergence_hutchinson(
                        v, x, self.probe, create_graph, frobenius
                    )
        if "kinetic" in integrals:
            rates["kinetic"] = v.pow(2).flatten(1).sum(1)
        return (v, *(rates[name] for name in integrals))
