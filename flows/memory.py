"""How many points one solve takes at once: chosen from the device's free memory and the field's size.

On a GPU a solve of 1,000 points leaves the card idle (the exact 2-D log-density ran at 6.6k points/s in
batches of 1,000 and 1.36M points/s in one batch of 200k on an H200), so every operation that solves in
batches (``Flow.log_prob``, ``sample``, ``encode``, ``decode``, the evaluator and the CLIs) asks
:func:`auto_batch` unless the user gives a size. The memory one point needs is measured, not guessed: the
field runs on a few points of the device, and what autograd keeps for the trace's products (saved tensors)
and the largest activation are read at two batch sizes, so the per-point slope excludes the weights. The
batch is what fits in :data:`FRACTION` of the free memory. On a CPU the caller's default stays the most (larger
solves are not faster there), so CPU behaviour is unchanged unless memory is short: then the batch shrinks.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FRACTION", "free_memory", "fills", "bytes_per_point", "auto_batch"]

FRACTION = 0.5  # of the free memory a batch may take; the rest is headroom for the allocator and the solver
SOLVER_COPIES = 16  # copies of the state an adaptive solve holds (dopri5: 7 stages, the error, y0, y1, ...)
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


def free_memory(device: torch.device | str) -> int | None:
    """Bytes a new allocation can take on ``device``: on a GPU the driver's free memory plus what torch's caching
    allocator holds unused; on a CPU the system's available memory (``MemAvailable``) shared by this machine's
    processes of the run. None where it cannot be read (a meta device, a system without /proc/meminfo)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in lines if line.startswith("MemAvailable:")), None)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return None if kib is None else kib * 1024 // local


def fills(device: torch.device | str) -> bool:
    """Whether a batch on ``device`` grows to whatever fits (an accelerator) rather than stopping at the caller's
    default (a CPU, where larger solves are not faster and memory is shared with everything else)."""
    return torch.device(device).type not in ("cpu", "meta")


def _measure(field: nn.Module, x: Tensor, extra: tuple[Tensor, ...], trace: bool) -> tuple[int, int]:
    """(bytes autograd saves for a VJP of v with respect to x, bytes of the largest activation) for these points."""
    largest = [x.numel() * x.element_size()]

    def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            largest[0] = max(largest[0], output.numel() * output.element_size())

    saved = [0]

    def pack(t: Tensor) -> Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    hooks = [m.register_forward_hook(record) for m in field.modules()]
    t = x.new_full((len(x),), 0.5)
    try:
        if trace:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                field(x.detach().requires_grad_(True), t, *extra)
        else:
            with torch.no_grad():
                field(x, t, *extra)
    finally:
        for h in hooks:
            h.remove()
    return saved[0], largest[0]


def bytes_per_point(
    field: nn.Module, shape: tuple[int, ...], *, trace: bool = False, context: Tensor | None = None
) -> int:
    """Bytes one more point adds to a solve of ``field`` on its device: with ``trace``, the tensors kept for the
    divergence's vector-Jacobian products; the largest activation (a few times, for the backward's buffers and the
    forward's temporaries); and :data:`SOLVER_COPIES` copies of the state. Measured once per field and setting.
    ``context``: rows of the field's context (model space); the first is used."""
    param = next(iter(field.parameters()), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    device = param.device if param is not None else torch.device("cpu")
    key = (tuple(shape), trace, dtype, None if context is None else (tuple(context.shape[1:]), context.dtype))
    cache = _CACHE.setdefault(field, {})
    if key not in cache:
        sizes, found = (2, 6), []
        for n in sizes:
            x = torch.full((n, *shape), 0.5, dtype=dtype, device=device)  # no draw: the global RNG stays as it was
            extra = () if context is None else (context[:1].expand(n, *context.shape[1:]),)
            found.append(_measure(field, x, extra, trace))
        span = sizes[1] - sizes[0]
        saved, largest = ((b - a) / span for a, b in zip(*found, strict=True))
        state = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype, device="cpu").element_size()
        cache[key] = max(1, int(saved + 4 * largest + SOLVER_COPIES * state))
    return cache[key]


def auto_batch(
    field: nn.Module,
    shape: tuple[int, ...],
    n: int,
    default: int,
    *,
    trace: bool = False,
    context: Tensor | None = None,
) -> int:
    """Points per solve for ``n`` points: as many
    as fit in :data:`FRACTION` of the free memory of the field's device, at most ``n`` on an accelerator and at
    most ``default`` on a CPU (so a CPU keeps its defaults unless memory is short); ``default`` where the free
    memory cannot be read. At least 1."""
    param = next(iter(field.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    free = free_memory(device)
    if free is None:
        return max(1, default)
    per_point = bytes_per_point(field, shape, trace=trace, context=context)
    return max(1, min(n if fills(device) else default, int(FRACTION * free // per_point)))
