"""Training batches from an in-memory tensor, split over processes.

Each epoch is a permutation drawn from ``(seed, epoch)``; every global batch of ``batch_size`` rows is
cut into one contiguous slice per process (Accelerate's ``split_batches`` semantics), so the union of
the processes' slices is exactly the one-process batch. The position in the data is a pure function
of the step, so resuming needs no sampler state. A conditional run's contexts (one row per data row) are
cut with the same index: batches are then ``(rows, contexts)`` pairs. One indexing op per batch: no per-sample
``__getitem__``, no collate (a DataLoader spent 0.8 ms of a 2 ms flow-matching step on that).

Device: a dataset of at most ``resident_bytes`` is copied to the device once, and batches are cut there
(no host-to-device copy per step); a larger one stays on the host and each batch is copied. The
permutation is always drawn on the host from ``(seed, epoch)``, so a seed gives the same batches on
every device.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from flows.errors import ConfigError

__all__ = ["Batches"]


class Batches:
    def __init__(
        self,
        data: Tensor,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        device: torch.device | str = "cpu",
        resident_bytes: int = 2**30,
        context: Tensor | None = None,
    ):
        if batch_size % world:
            raise ConfigError(f"batch size {batch_size} is not divisible by {world} processes")
        self.device = torch.device(device)
        self.resident = data.numel() * data.element_size() <= resident_bytes
        if self.resident:
            data = data.to(self.device)
            context = context.to(self.device) if context is not None else None
        self.data, self.batch_size, self.seed, self.context = data, batch_size, seed, context
        self.per_process, self.rank = batch_size // world, rank

    def __len__(self) -> int:
        """Global batches per epoch (the last partial batch is dropped)."""
        return len(self.data) // self.batch_size

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        gen = torch.Generator("cpu").manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.data), generator=gen, device="cpu").to(self.data.device)
        start = self.rank * self.per_process
        for b in range(skip, len(self)):
            index = perm[b * self.batch_size + start : b * self.batch_size + start + self.per_process]
            rows = self.data[index].to(self.device, non_blocking=True)
            if self.context is None:
                yield rows
            else:
                yield rows, self.context[index].to(self.device, non_blocking=True)  # on the data's device, as index

    def from_step(self, step: int) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        """All batches from global step ``step`` on, across epochs, forever."""
        epoch, skip = divmod(step, len(self))
        while True:
            yield from self.epoch(epoch, skip)
            epoch, skip = epoch + 1, 0
