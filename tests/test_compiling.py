"""A compiled solve (solver.compile) or field (train.compile) that cannot compile falls back to eager, once."""

import pytest
import torch
from helpers import FLOAT32, mlp_field, tiny_overrides

import flows.steppers
from flows.api import train
from flows.compiling import EagerFallback
from flows.config import load_config
from flows.ode import solve


def broken_compile(fn, *args, **kwargs):
    def fails(*a, **k):
        raise RuntimeError("backend 'inductor' failed: no C++ compiler found\nsecond line of the trace")

    return fails


@pytest.fixture
def no_compiler(monkeypatch):
    """Every torch.compile gives a function that fails as a machine without a compiler does."""
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(flows.steppers, "_COMPILED", {})


def test_a_solve_that_cannot_compile_runs_eagerly_with_one_notice(no_compiler, capsys):
    f, x = mlp_field(hidden=(8,)), torch.randn(16, 2)
    options = dict(trace="exact", kinetic=True, method="rk4", step_size=0.25)
    eager = solve(f, x, 1.0, 0.0, **options)
    for _ in range(2):
        fallen = solve(f, x, 1.0, 0.0, compile=True, **options)
        torch.testing.assert_close(fallen.x, eager.x, **FLOAT32)  # forward mode, times as tensors: float32 sums
        torch.testing.assert_close(fallen.divergence, eager.divergence, **FLOAT32)
    notices = [line for line in capsys.readouterr().err.splitlines() if "notice" in line]
    assert notices == [
        "notice: torch.compile failed for the fixed-step solve (solver.compile) (RuntimeError: backend 'inductor' "
        "failed: no C++ compiler found); running it without compile from here on"
    ]


def test_an_error_of_the_call_itself_is_not_hidden_nor_is_running_out_of_memory():
    def eager(x):
        raise ValueError("the field's own error")

    with pytest.raises(ValueError, match="own error"):
        EagerFallback(eager, eager, "f")(1)

    def oom(x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    call = EagerFallback(oom, lambda x: x, "f")
    with pytest.raises(torch.OutOfMemoryError):
        call(1)
    assert not call.failed  # still compiled: the next call may fit


def test_checkpointings_early_stop_passes_through_a_compiled_step():
    """torch.utils.checkpoint stops a recomputation by raising through the recomputed function: not a compiler
    failure (falling back there ran the eager step on with the stop set: 'target_frame.early_stop is set')."""
    from flows.compiling import CONTROL_FLOW

    assert CONTROL_FLOW, "torch.utils.checkpoint's early-stop exception has moved: update flows.compiling"

    def stop(x):
        raise CONTROL_FLOW[0]()

    call = EagerFallback(stop, lambda x: x, "f")
    with pytest.raises(CONTROL_FLOW[0]):
        call(1)
    assert not call.failed
    # and end to end: a checkpointed function that goes through the fallback recomputes and differentiates
    w = torch.randn(3, requires_grad=True)
    step = EagerFallback(lambda x: (x * w).sin().cos(), lambda x: (x * w).sin().cos(), "step")
    x = torch.randn(3)
    out = torch.utils.checkpoint.checkpoint(step, x, use_reentrant=False)
    (grad,) = torch.autograd.grad(out.sum(), w)
    (expected,) = torch.autograd.grad((x * w).sin().cos().sum(), w)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("objective", ["mle", "fm"])
def test_a_run_whose_compile_fails_trains_to_the_end(no_compiler, tmp_path, capsys, objective):
    extra = {
        "mle": ["solver.adjoint=false", "solver.compile=true"],
        "fm": ["objective.name=fm", "train.compile=true"],
    }[objective]
    result = train(load_config(None, [*tiny_overrides(tmp_path / "r", steps=3), *extra])).result
    assert result["nll"] == result["nll"]  # finite: the run ended with its evaluation
    assert capsys.readouterr().err.count("notice: torch.compile failed") == 1
