"""What the GPU path rests on, checked on a CPU: the memory-based batch choice (with a fake free-memory
budget), the fixed-step solves that read nothing back from the device (equal to torchdiffeq's, and run on the
meta device, where any host read fails), forward-mode derivatives, and the compiled solve."""

import shutil

import pytest
import torch
from helpers import FLOAT32, mlp_field, unit

import flows.memory as memory
from flows.errors import ConfigError
from flows.flow import Flow
from flows.ode import OWN_METHODS, Dynamics, fixed_grid, integrate_fixed, solve, solver_options

INTEGRALS = ("divergence", "kinetic", "jacobian")


def mle_solve(f, x, torchdiffeq: bool, monkeypatch=None, **solver):
    """The MLE augmented solve from data to noise; through torchdiffeq when asked (flows' own loop disabled)."""
    if torchdiffeq:
        monkeypatch.setattr("flows.ode.OWN_METHODS", ())
    sol = solve(f, x, 1.0, 0.0, trace="exact", kinetic=True, jacobian=True, **solver)
    if torchdiffeq:
        monkeypatch.undo()
    return sol


# ------------------------------------------------------------------ fixed-step solves without host reads
@pytest.mark.parametrize("method", OWN_METHODS)
@pytest.mark.parametrize("step_size", [None, 0.1, 0.3])
def test_own_fixed_step_solves_equal_torchdiffeq_values_and_gradients(method, step_size, monkeypatch):
    f, x = mlp_field(), torch.randn(32, 2)
    results = []
    for via_torchdiffeq in (True, False):
        f.zero_grad()
        sol = mle_solve(f, x, via_torchdiffeq, monkeypatch, method=method, step_size=step_size, adjoint=False)
        (sol.x.pow(2).sum() - sol.divergence.sum() + sol.kinetic.sum() + sol.jacobian.sum()).backward()
        results.append(([sol.x, sol.divergence, sol.kinetic, sol.jacobian], [p.grad.clone() for p in f.parameters()]))
        assert sol.nfe.forward == sol.nfe.total > 0
    (ref, ref_grads), (own, own_grads) = results
    for a, b in zip(own + own_grads, ref + ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5)  # float32 rounding (times made in float64)


def test_fixed_grid_is_torchdiffeqs():
    assert fixed_grid(0.0, 1.0, None) == (0.0, 1.0)
    g = fixed_grid(1.0, 0.0, 0.3)
    assert len(g) == 5 and g[0] == 1.0 and g[-1] == 0.0 and abs(g[1] - 0.7) < 1e-6  # a shorter last step
    assert len(fixed_grid(0.0, 1.0, 0.1)) == 11


def test_a_fixed_step_solve_and_its_gradient_read_nothing_back_from_the_device():
    """On the meta device any host read (.item(), a tensor in an if) raises: the own loop runs through, forward
    and backward, with the MLE state; torchdiffeq's adaptive loop does not (it reads its step control)."""
    f = mlp_field().to("meta")
    x = torch.randn(8, 2, device="meta")
    for derivatives in ("reverse", "forward"):
        state = (x, *(x.new_zeros(8) for _ in INTEGRALS))
        dynamics = Dynamics(f, INTEGRALS, derivatives=derivatives)
        out = integrate_fixed(dynamics, state, fixed_grid(1.0, 0.0, 0.25), "rk4")
        sum(o.sum() for o in out).backward()
        assert all(o.device.type == "meta" for o in out)
    with pytest.raises(RuntimeError, match="meta"):
        solve(f, x, 1.0, 0.0, trace="exact", method="dopri5")


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_forward_mode_derivatives_equal_reverse_mode(trace):
    f, x = mlp_field(dim=3), torch.randn(16, 3)
    probe = torch.randn_like(x)
    state = (x, *(x.new_zeros(16) for _ in INTEGRALS))
    grid = fixed_grid(1.0, 0.0, 0.5)
    rev = integrate_fixed(Dynamics(f, INTEGRALS, trace, probe), state, grid, "midpoint")
    fwd = integrate_fixed(Dynamics(f, INTEGRALS, trace, probe, derivatives="forward"), state, grid, "midpoint")
    same = 4 if trace == "exact" else 3  # Hutchinson's Frobenius: ‖Jε‖² forward, ‖εᵀJ‖² reverse (both unbiased)
    for a, b in list(zip(fwd, rev, strict=True))[:same]:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # torch.compile on a CPU: half a minute
@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile on a CPU needs a C compiler")
def test_the_compiled_solve_equals_the_eager_one_with_its_gradients():
    f, x = mlp_field(hidden=(8,)), torch.randn(16, 2)
    losses, grads = [], []
    for compiled in (False, "default"):
        f.zero_grad()
        sol = solve(
            f, x, 1.0, 0.0, trace="exact", kinetic=True, jacobian=True, method="rk4", step_size=0.5, compile=compiled
        )
        loss = (sol.x.pow(2).sum(1) - sol.divergence + sol.kinetic + sol.jacobian).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in f.parameters()])
    torch.testing.assert_close(losses[1], losses[0], **FLOAT32)  # the compiled kernels sum in their own order
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compile_is_for_fixed_step_solves_without_the_adjoint():
    assert solver_options(method="rk4", step_size=0.1, compile="reduce-overhead")["compile"] == "reduce-overhead"
    for bad in (dict(method="dopri5"), dict(method="rk4", adjoint=True), dict(method="heun3")):
        with pytest.raises(ConfigError, match="compile"):
            solver_options(compile=True, **bad)
    with pytest.raises(ConfigError, match="reduce-overhead"):
        solver_options(method="rk4", compile="fast")
    flow = Flow(mlp_field(), unit(2), (2,), solver=solver_options(method="rk4", step_size=0.1, compile=True))
    assert flow._solve_options(method="dopri5")["compile"] is False  # an adaptive solve of a compiled run
    assert flow._solve_options(steps=4)["compile"] is True


# ------------------------------------------------------------------ the batch from the device's free memory
@pytest.fixture
def gpu_budget(monkeypatch):
    """A fake accelerator with ``budget[0]`` bytes free: the batch fills it (at most the points asked for)."""
    budget = [0]
    monkeypatch.setattr(memory, "free_memory", lambda device: budget[0])
    monkeypatch.setattr(memory, "fills", lambda device: True)
    return budget


def test_a_fake_budget_gives_the_batch_that_fits(gpu_budget):
    f = mlp_field(hidden=(64, 64))
    per = memory.bytes_per_point(f, (2,), trace=True)
    gpu_budget[0] = 2**30
    expected = int(memory.FRACTION * 2**30 // per)
    assert memory.auto_batch(f, (2,), 10**9, 1000, trace=True) == expected
    gpu_budget[0] = 2**31
    assert memory.auto_batch(f, (2,), 10**9, 1000, trace=True) in (2 * expected, 2 * expected + 1)  # linear
    assert memory.auto_batch(f, (2,), 500, 1000, trace=True) == 500  # never more than the points asked for
    gpu_budget[0] = 10
    assert memory.auto_batch(f, (2,), 500, 1000, trace=True) == 1  # at least one point


def test_the_measured_bytes_grow_with_the_field_and_the_trace():
    small, wide = mlp_field(hidden=(16,)), mlp_field(hidden=(256, 256))
    assert memory.bytes_per_point(wide, (2,), trace=True) > 4 * memory.bytes_per_point(small, (2,), trace=True)
    assert memory.bytes_per_point(wide, (2,), trace=True) > memory.bytes_per_point(wide, (2,), trace=False)
    # the weights are not charged per point: the slope between two batch sizes excludes them
    assert memory.bytes_per_point(wide, (2,), trace=True) < 256 * 2 * 4 * 16


def test_log_prob_and_sample_take_the_chosen_batch_a_given_batch_wins_and_the_cpu_keeps_its_defaults(
    gpu_budget, monkeypatch
):
    flow = Flow(mlp_field(), unit(2), (2,), solver=solver_options(method="rk4", step_size=0.25))
    x = torch.randn(2500, 2)
    sizes = []
    real = Flow._log_prob_batch
    monkeypatch.setattr(Flow, "_log_prob_batch", lambda self, raw, *a: sizes.append(len(raw)) or real(self, raw, *a))
    per = memory.bytes_per_point(flow.field, (2,), trace=True)
    gpu_budget[0] = int(700 * per / memory.FRACTION)  # room for 700 points
    fitted = flow.log_prob(x)
    assert sizes == [700, 700, 700, 400]
    sizes.clear()
    given = flow.log_prob(x, batch_size=1250)
    assert sizes == [1250, 1250]
    torch.testing.assert_close(fitted, given, **FLOAT32)  # fixed steps: the batch changes nothing beyond float32 sums
    sizes.clear()
    flow.log_prob(x, probes=2, trace="hutchinson")
    assert sizes == [350] * 7 + [50]  # each point solved twice at once
    monkeypatch.undo()
    monkeypatch.setattr(memory, "free_memory", lambda device: 2**40)  # a CPU with plenty of memory: today's defaults
    monkeypatch.setattr(Flow, "_log_prob_batch", lambda self, raw, *a: sizes.append(len(raw)) or real(self, raw, *a))
    sizes.clear()
    flow.log_prob(x)
    assert sizes == [1000, 1000, 500]
    assert memory.auto_batch(flow.field, (2,), 50_000, 10_000) == 10_000
    monkeypatch.setattr(memory, "free_memory", lambda device: int(300 * per / memory.FRACTION))  # a CPU short of it
    assert memory.auto_batch(flow.field, (2,), 50_000, 1000, trace=True) == 300


def test_sample_encode_and_decode_take_the_chosen_batch(gpu_budget, monkeypatch):
    import flows.flow as flow_module
    import flows.sampling as sampling

    flow = Flow(mlp_field(), unit(2), (2,), solver=solver_options(method="euler", step_size=0.5))
    gpu_budget[0] = int(300 * memory.bytes_per_point(flow.field, (2,)) / memory.FRACTION)
    got = []
    for name in ("sample", "encode", "decode"):
        real = getattr(sampling, name)
        monkeypatch.setattr(flow_module, name, lambda *a, real=real, **k: got.append(k["batch_size"]) or real(*a, **k))
    x = flow.sample(1000)
    flow.decode(flow.encode(x))
    assert got == [300, 300, 300]
    flow.sample(1000, batch_size=64)
    assert got[-1] == 64


def test_measuring_a_field_draws_nothing_from_the_global_generator():
    """A resumed run measures at another moment than the original did: the measurement must not move the RNG."""
    f = mlp_field(hidden=(24,))
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    memory.bytes_per_point(f, (2,), trace=True)
    torch.testing.assert_close(torch.rand(3), expected)


# ------------------------------------------------------------------ dopri5 with few host reads
class Linear(torch.nn.Module):
    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = torch.nn.Parameter(a)

    def forward(self, x, t):
        return x @ self.a.T


@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (1.0, 0.0)])
def test_own_dopri5_matches_the_matrix_exponential_and_the_trace(t0, t1):
    a = torch.tensor([[0.3, -1.2, 0.1], [0.8, -0.2, 0.4], [0.0, 0.5, -0.6]], dtype=torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64)
    sol = solve(Linear(a), x, t0, t1, trace="exact", atol=1e-10, rtol=1e-10, sync_every=8)
    expected = x @ torch.linalg.matrix_exp(a * (t1 - t0)).T
    torch.testing.assert_close(sol.x, expected, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(sol.divergence, torch.full((6,), float(a.trace()) * (t1 - t0), dtype=torch.float64))


def test_own_dopri5_agrees_with_torchdiffeq_within_tolerance_reads_the_host_rarely_and_differentiates():
    from flows.steppers import integrate_dopri5

    f = mlp_field(hidden=(32, 32), dtype=torch.float64)
    with torch.no_grad():
        for p in f.parameters():
            p.mul_(3)  # a field with some curvature: dozens of steps
    x = torch.randn(64, 2, dtype=torch.float64)
    results = []
    for every in (1, 8):  # 1: torchdiffeq's loop
        f.zero_grad()
        sol = solve(f, x, 1.0, 0.0, trace="exact", kinetic=True, atol=1e-8, rtol=1e-8, sync_every=every)
        (sol.x.pow(2).sum() - sol.divergence.sum() + sol.kinetic.sum()).backward()
        results.append((sol, torch.cat([p.grad.flatten() for p in f.parameters()])))
    (ref, ref_grad), (own, own_grad) = results
    torch.testing.assert_close(own.x, ref.x, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(own.divergence, ref.divergence, atol=1e-6, rtol=1e-6)
    assert (own_grad - ref_grad).norm() <= 1e-5 * ref_grad.norm()
    assert own.nfe.forward <= ref.nfe.forward + 6 * 8  # at most one round of masked steps after the end
    state = (x, x.new_zeros(64))

    def rates(t, y):
        return (f(y[0], t.expand(64)), y[0].pow(2).sum(1))

    def norm(ys):
        return ys[0].pow(2).mean().sqrt()

    with torch.no_grad():
        _, nfe, reads = integrate_dopri5(rates, state, 1.0, 0.0, atol=1e-8, rtol=1e-8, norm=norm, sync_every=8)
    steps = (nfe - 2) // 6
    assert steps >= 16 and reads <= steps / 4  # one host read per round of up to 8 steps


def test_own_dopri5_stops_with_the_solver_error():
    from flows.errors import SolverError

    f = mlp_field()
    with pytest.raises(SolverError, match="max_steps=3"):
        solve(f, torch.randn(8, 2), 1.0, 0.0, atol=1e-12, rtol=1e-12, max_steps=3, sync_every=8)
    nan = Linear(torch.full((2, 2), float("nan")))
    with pytest.raises(SolverError, match="non-finite"):
        solve(nan, torch.randn(8, 2), 1.0, 0.0, sync_every=8)


def test_a_checkpointed_solve_has_the_same_gradients_and_keeps_one_steps_graph():
    f, x = mlp_field(hidden=(32, 32)), torch.randn(64, 2)
    saved, grads = [], []
    for checkpoint in (False, True):
        f.zero_grad()
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sol = solve(
                f,
                x,
                1.0,
                0.0,
                trace="exact",
                kinetic=True,
                jacobian=True,
                method="rk4",
                step_size=0.1,
                adjoint=False,
                checkpoint=checkpoint,
            )
        (sol.x.pow(2).sum() - sol.divergence.sum() + sol.kinetic.sum() + sol.jacobian.sum()).backward()
        saved.append(total[0])
        grads.append([p.grad.clone() for p in f.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    assert saved[1] < saved[0] / 5  # the graphs of 10 steps, against the states between them
    with pytest.raises(ConfigError, match="checkpoint"):
        solver_options(method="dopri5", checkpoint=True)


def test_the_unets_plain_group_norm_equals_torchs():
    from flows.nn.unet import group_norm_plain

    norm = torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(3, 8, 5, 7) * 3 + 1
    torch.testing.assert_close(group_norm_plain(x, 4, norm.weight, norm.bias, norm.eps), norm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile on a CPU needs a C compiler")
def test_a_compiled_and_checkpointed_unet_likelihood_solve_equals_the_eager_one():
    from flows.nn.unet import TimeUNet

    torch.manual_seed(0)
    f, x = TimeUNet((1, 8, 8), 8, (1, 2), 1, (4,), 4), torch.randn(4, 1, 8, 8)
    results = []
    for opts in (dict(), dict(compile=True, checkpoint=True)):
        f.zero_grad()
        gen = torch.Generator().manual_seed(0)
        sol = solve(
            f,
            x,
            1.0,
            0.0,
            trace="hutchinson",
            kinetic=True,
            method="rk4",
            step_size=0.5,
            generator=gen,
            adjoint=False,
            **opts,
        )
        (sol.x.pow(2).sum() - sol.divergence.sum() + sol.kinetic.sum()).backward()
        results.append((sol.divergence.detach(), torch.cat([p.grad.flatten() for p in f.parameters()])))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-4, rtol=1e-4)
    assert (results[1][1] - results[0][1]).norm() <= 1e-4 * results[0][1].norm()


def test_review_mends_solver_flags_forward_mode_batches_and_a_non_finite_integral(gpu_budget):
    from flows.errors import SolverError
    from flows.nn.unet import group_norm_plain
    from flows.steppers import integrate_dopri5

    flow = Flow(mlp_field(), unit(2), (2,), solver=solver_options(method="rk4", step_size=0.1, checkpoint=True))
    assert flow._solve_options(method="dopri5")["checkpoint"] is False  # a checkpointed run's flow, solved adaptively
    gpu_budget[0] = 2**30
    eager = Flow(flow.field, unit(2), (2,), solver=solver_options(method="rk4", step_size=0.1))
    plain = eager._log_prob_batch_size(10**9, eager._log_prob_options("exact"))
    forward = flow._log_prob_batch_size(10**9, flow._log_prob_options("exact"))  # the flow's own solver: checkpointed
    assert forward in (plain // 2, plain // 2 + 1)  # the D = 2 vmapped Jacobian columns are counted
    norm = torch.nn.GroupNorm(2, 4)
    x = torch.randn(3, 4, 5, 5) + 20
    out = group_norm_plain(x.bfloat16(), 2, norm.weight, norm.bias, norm.eps)
    assert out.dtype == torch.float32  # as the fused kernel under autocast
    torch.testing.assert_close(out, norm(x.bfloat16().float()), atol=1e-4, rtol=1e-4)
    x = torch.randn(8, 2)

    def rates(t, y):
        return (-y[0], torch.full_like(y[1], float("nan")))

    with pytest.raises(Exception, match="non-finite"):
        integrate_dopri5(rates, (x, x.new_zeros(8)), 0.0, 1.0, atol=1e-5, rtol=1e-5, norm=lambda ys: ys[0].norm())
    assert issubclass(SolverError, Exception)
