import pytest
import scipy.linalg
import torch

from flows.errors import SolverError
from flows.nn import TimeMLP
from flows.ode import solve

TIGHT = dict(atol=1e-9, rtol=1e-9)


def test_linear_flow_equals_matrix_exponential(linear_field):
    x0 = torch.randn(5, 3, dtype=torch.float64)
    sol = solve(linear_field, x0, 0.0, 1.0, **TIGHT)
    expm = torch.from_numpy(scipy.linalg.expm(linear_field.a.detach().numpy()))
    torch.testing.assert_close(sol.x, x0 @ expm.T, atol=1e-7, rtol=1e-7)
    assert sol.nfe.forward > 0


def test_divergence_integral_of_linear_field(linear_field):
    x0 = torch.randn(4, 3, dtype=torch.float64)
    sol = solve(linear_field, x0, 0.0, 1.0, trace="exact", **TIGHT)
    torch.testing.assert_close(sol.divergence, torch.full((4,), linear_field.a.trace().item(), dtype=torch.float64))


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_adjoint_gradients_equal_direct_backprop(trace):
    torch.manual_seed(0)
    field = TimeMLP(2, [16, 16]).double()
    x = torch.randn(8, 2, dtype=torch.float64)
    grads = []
    for adjoint in (False, True):
        field.zero_grad()
        solver = dict(atol=1e-10, rtol=1e-10, adjoint=adjoint)
        sol = solve(
            field,
            x,
            1.0,
            0.0,
            trace=trace,
            kinetic=True,
            jacobian=True,
            generator=torch.Generator().manual_seed(1),
            **solver,
        )
        loss = sol.x.pow(2).sum() + sol.divergence.sum() + sol.kinetic.sum() + sol.jacobian.sum()
        loss.backward()
        grads.append([p.grad.clone() for p in field.parameters()])
        if adjoint:
            assert sol.nfe.backward > 0
    for direct, adjoint in zip(*grads, strict=True):
        torch.testing.assert_close(adjoint, direct, atol=1e-6, rtol=1e-5)


def test_gradcheck_through_solver():
    torch.manual_seed(0)
    field = TimeMLP(2, [4]).double()
    solver = dict(method="rk4", step_size=0.25)

    def f(x):
        sol = solve(field, x, 1.0, 0.0, trace="exact", **solver)
        return sol.x, sol.divergence

    assert torch.autograd.gradcheck(f, torch.randn(3, 2, dtype=torch.float64, requires_grad=True))


def test_solver_underflow_is_a_clear_error():
    class Explosive(torch.nn.Module):
        def forward(self, x, t):
            return x.pow(2) * 100  # blows up in finite time

    with pytest.raises(SolverError, match="kinetic"):
        solve(Explosive(), torch.full((2, 2), 10.0), 0.0, 1.0, max_steps=200, adjoint=True)
