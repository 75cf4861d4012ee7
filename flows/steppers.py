"""flows' own solvers: loops that read nothing back from the device between host checks.

torchdiffeq's loops compare tensors on the host at every step (its fixed-grid loop the step times, its adaptive
loop the error), so on a GPU the host waits for the device once per step. Here the fixed-step methods (euler,
midpoint, rk4) keep their times as Python floats and read nothing at all: a GPU queues the whole solve, and
torch.compile takes one step as a graph (``compile``). The adaptive :func:`integrate_dopri5` decides accept or
reject on the device and asks the host whether it is done once every ``sync_every`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import Tensor

from flows.compiling import EagerFallback
from flows.dynamics import Dynamics
from flows.errors import ConfigError

__all__ = ["OWN_METHODS", "STAGES", "AdaptiveStop", "fixed_grid", "integrate_fixed", "fixed_step", "integrate_dopri5"]

OWN_METHODS = ("euler", "midpoint", "rk4")
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
    dynamics: Dynamics,
    state: tuple[Tensor, ...],
    grid: tuple[float, ...],
    method: str,
    compile: bool | str = False,
    checkpoint: bool = False,
) -> tuple[Tensor, ...]:
    """The augmented state at ``grid[-1]`` by ``method`` over the steps of ``grid`` (:func:`fixed_step`). Nothing
    is read back from the device, so on a GPU the host queues every step without waiting.

    ``compile``: each step runs compiled (one graph taking its times as tensors, so every step reuses it).
    ``checkpoint``: while gradients are on, only the states between steps are kept and each step's graph is
    recomputed in the backward (``torch.utils.checkpoint``): the memory of one step instead of all of them, for
    one more forward per step. Both need ``dynamics`` in forward mode (``derivatives="forward"``), whose gradient
    is a first-order backward."""
    if (compile or checkpoint) and dynamics.derivatives != "forward":
        raise ConfigError("compile and checkpoint need forward-mode derivatives: Dynamics(..., derivatives='forward')")
    step = _compiled(compile) if compile else fixed_step
    times = _times(grid, state[0]) if compile else grid  # compiled: the times as tensors (inputs, not constants)
    keep = checkpoint and torch.is_grad_enabled()
    if compile and torch.is_grad_enabled():  # every step sees states that require grad: one graph, not two
        state = tuple(s if s.requires_grad else s.detach().requires_grad_(True) for s in state)
    for i in range(len(grid) - 1):
        args = (dynamics, state, times[i], times[i + 1], method)
        state = torch.utils.checkpoint.checkpoint(step, *args, use_reentrant=False) if keep else step(*args)
    return state


_TIMES: dict[tuple, Tensor] = {}


def _times(grid: tuple[float, ...], like: Tensor) -> Tensor:
    """The grid as a tensor on ``like``'s device and dtype, made once (a copy from the host waits for the device)."""
    key = (grid, like.device, like.dtype)
    if key not in _TIMES:
        if len(_TIMES) > 64:
            _TIMES.clear()
        _TIMES[key] = torch.tensor(grid, dtype=like.dtype, device=like.device)
    return _TIMES[key]


def fixed_step(
    dynamics: Dynamics, state: tuple[Tensor, ...], a: float | Tensor, b: float | Tensor, method: str
) -> tuple[Tensor, ...]:
    """One step of ``method`` from time a to b: euler, midpoint, or rk4 as torchdiffeq's (the 3/8 rule)."""
    rates = dynamics.rates
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


_COMPILED: dict[str, Callable[..., tuple[Tensor, ...]]] = {}


def _compiled(mode: bool | str) -> Callable[..., tuple[Tensor, ...]]:
    """The compiled fixed step for a torch.compile ``mode`` (True: the default mode), made once per mode."""
    name = "default" if mode is True else str(mode)
    if name not in _COMPILED:
        # every compiled solve of a process shares dynamo's cache (a field, a batch shape and the settings each
        # make a graph): 8 entries, torch's default, would silently send the ninth setting back to eager
        config = torch._dynamo.config
        key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, key, max(getattr(config, key), 64))
        # a new Dynamics per solve needs no new graph: dynamo guards its attributes, not its identity
        compiled = torch.compile(fixed_step, mode=None if name == "default" else name, dynamic=False)
        # a machine that cannot compile (no compiler, an unsupported device) solves eagerly, with one notice
        _COMPILED[name] = EagerFallback(compiled, fixed_step, "the fixed-step solve (solver.compile)")
    return _COMPILED[name]


# Dormand–Prince 5(4), as torchdiffeq's dopri5: nodes, stage weights, the 5th-order solution and its error
DOPRI5_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
DOPRI5_A = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
DOPRI5_E = (
    35 / 384 - 1951 / 21600,
    0.0,
    500 / 1113 - 22642 / 50085,
    125 / 192 - 451 / 720,
    -2187 / 6784 + 12231 / 42400,
    11 / 84 - 649 / 6300,
    -1 / 60,
)
SAFETY, GROW, SHRINK, ORDER = 0.9, 10.0, 0.2, 5  # torchdiffeq's step-size controller


class AdaptiveStop(Exception):
    """An adaptive solve that cannot finish: ``reason`` is ``"max_steps"``, ``"underflow"`` or ``"non-finite"``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def integrate_dopri5(
    rates: Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, ...]],
    state: tuple[Tensor, ...],
    t0: float,
    t1: float,
    *,
    atol: float,
    rtol: float,
    norm: Callable[[tuple[Tensor, ...]], Tensor],
    sync_every: int = 8,
    max_steps: int = 10_000,
) -> tuple[tuple[Tensor, ...], int, int]:
    """dopri5 from t0 to t1 with torchdiffeq's initial step, error norm and controller, deciding on the device.

    ``rates(t, y)`` takes t as a 0-d tensor. Each step's acceptance, the time and the next step size stay on the
    device (a rejected step is masked by ``torch.where``); the host reads them once per round of up to
    ``sync_every`` steps, a round being as long as the steps the current step size needs to reach t1, so few
    evaluations are spent after the end. The last step is shortened to land on t1 exactly (torchdiffeq steps past
    it and interpolates). Step sizes carry no gradient, as in torchdiffeq. Returns (the state at t1, function
    evaluations, host reads); raises :class:`AdaptiveStop` past ``max_steps`` steps, on a step size that underflows
    or on a non-finite one.
    """
    y, dtype, device = state, state[0].dtype, state[0].device
    sign, length = (1.0 if t1 >= t0 else -1.0), abs(t1 - t0)

    def f(s: Tensor, y: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        k = rates((t0 + sign * s).to(dtype), y)
        return k if sign > 0 else tuple(-ki for ki in k)

    zero = torch.zeros((), dtype=torch.float64, device=device)
    k1 = f(zero, y)
    dt = _initial_step(f, y, k1, atol, rtol, norm)
    s, done = zero, torch.zeros((), dtype=torch.bool, device=device)
    nfe, steps, reads, budget = 2, 0, 0, 1
    while True:
        for _ in range(budget):
            with torch.no_grad():
                h = torch.minimum(dt, length - s)
                last = dt >= length - s
            ks = [k1]
            for c, a in zip(DOPRI5_C, DOPRI5_A, strict=True):
                ks.append(f(s + c * h, _combine(y, h, a, ks)))
            y1 = _combine(y, h, DOPRI5_B, ks)
            ks.append(k7 := f(s + h, y1))
            with torch.no_grad():
                error = _combine(
                    tuple(torch.zeros_like(yi) for yi in y), h, DOPRI5_E, [tuple(k.detach() for k in kk) for kk in ks]
                )
                tol = tuple(
                    atol + rtol * torch.maximum(a.detach().abs(), b.detach().abs()) for a, b in zip(y, y1, strict=True)
                )
                ratio = norm(tuple(e / t for e, t in zip(error, tol, strict=True))).double()
                accept = (ratio <= 1) & ~done
                shrink = torch.where(ratio < 1, torch.ones_like(ratio), torch.full_like(ratio, SHRINK))
                factor = torch.clamp(torch.maximum(SAFETY / ratio ** (1 / ORDER), shrink), max=GROW)
                factor = torch.where(ratio == 0, torch.full_like(ratio, GROW), factor)
                dt = torch.where(done, dt, h * factor)
                s = torch.where(accept, torch.where(last, torch.full_like(s, length), s + h), s)
            y = tuple(torch.where(accept, a, b) for a, b in zip(y1, y, strict=True))
            k1 = tuple(torch.where(accept, a, b) for a, b in zip(k7, k1, strict=True))
            done = done | (accept & last)
            nfe, steps = nfe + 6, steps + 1
        finite = torch.stack([torch.isfinite(yi).all() for yi in y]).all()  # the integrals too, as torchdiffeq
        at, step, finished, ok = torch.stack([s, dt, done.double(), finite.double()]).tolist()  # the one host read
        reads += 1
        if finished and ok:
            return y, nfe, reads
        _check_round(ok, step, at, steps, max_steps)
        budget = max(1, min(sync_every, math.ceil((length - at) / step)))


def _combine(
    y: tuple[Tensor, ...], h: Tensor, weights: tuple[float, ...], ks: list[tuple[Tensor, ...]]
) -> tuple[Tensor, ...]:
    """y + h Σ wⱼ kⱼ for each tensor of the state (zero weights skipped)."""
    return tuple(
        yi + h.to(yi.dtype) * sum(w * k[i] for w, k in zip(weights, ks, strict=False) if w) for i, yi in enumerate(y)
    )


def _initial_step(
    f: Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, ...]],
    y: tuple[Tensor, ...],
    k1: tuple[Tensor, ...],
    atol: float,
    rtol: float,
    norm: Callable[[tuple[Tensor, ...]], Tensor],
) -> Tensor:
    """The first step size (Hairer, Nørsett & Wanner II.4), as torchdiffeq selects it, on the device."""
    dtype = y[0].dtype
    with torch.no_grad():
        scale = tuple(atol + yi.detach().abs() * rtol for yi in y)
        d0 = norm(tuple(yi.detach() / si for yi, si in zip(y, scale, strict=True))).double()
        d1 = norm(tuple(ki.detach() / si for ki, si in zip(k1, scale, strict=True))).double()
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1).abs()
        probe = f(h0, tuple(yi.detach() + h0.to(dtype) * ki.detach() for yi, ki in zip(y, k1, strict=True)))
        d2 = (norm(tuple((p - k.detach()) / si for p, k, si in zip(probe, k1, scale, strict=True))).double() / h0).abs()
        small = (d1 <= 1e-15) & (d2 <= 1e-15)
        h1 = torch.where(small, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / torch.maximum(d1, d2)) ** (1 / ORDER))
        return torch.minimum(100 * h0, h1.abs())


def _check_round(ok: float, step: float, at: float, steps: int, max_steps: int) -> None:
    """Why an unfinished solve stops after a round, if it must: a non-finite state or step, too many steps, a step
    size too small to move the time."""
    if not ok:
        raise AdaptiveStop("non-finite")
    if steps >= max_steps:
        raise AdaptiveStop("max_steps")
    if not math.isfinite(step):
        raise AdaptiveStop("non-finite")
    if at + step == at:
        raise AdaptiveStop("underflow")
