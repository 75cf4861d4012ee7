"""The exponential moving average of the field's weights (kept outside DDP)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["EMA", "ema_weight"]


def ema_weight(decay: float, n: int) -> float:
    """The EMA's step towards the current weights after ``n`` updates: 1 − min(decay, (1 + n) / (10 + n))."""
    return 1 - min(decay, (1 + n) / (10 + n))


class EMA(AveragedModel):
    """``AveragedModel`` (the copy in ``.module``, the counter ``n_averaged``, the same state dict) with an
    update on cached tensor lists that never reads the device: a step skipped on the device is averaged
    with weight zero.
    """

    def __init__(self, field: nn.Module, device: torch.device, decay: float):
        super().__init__(field, device, use_buffers=True)
        pairs = zip(
            [*self.module.parameters(), *self.module.buffers()], [*field.parameters(), *field.buffers()], strict=True
        )
        floating = [(a, c) for a, c in pairs if a.is_floating_point()]
        # plain lists (not registered): the averaged tensors and the field's, in the same order
        self._averaged = [a for a, _ in floating]
        self._current = [c for _, c in floating]
        self.decay = decay
        self.count = 0  # host mirror of n_averaged: reading the buffer would synchronize

    def sync_count(self) -> None:
        """Read ``n_averaged`` back into ``count`` (after loading a state dict)."""
        self.count = int(self.n_averaged)

    @torch.no_grad()
    def update(self, keep: Tensor | None = None) -> None:
        """AveragedModel.update_parameters' rule (copy first, then average with warm-up), on the device.

        ``keep``: a 0/1 device tensor; 0 leaves the average as it is (a step skipped on the device).
        """
        averaged, current = self._averaged, self._current
        if self.count == 0:
            torch._foreach_copy_(averaged, current)
        else:  # a += w (c - a); with a device tensor w (lerp would read it back to the host)
            weight: Tensor | float = ema_weight(self.decay, self.count)
            if keep is not None:
                weight = keep.to(averaged[0].dtype) * weight
            step = torch._foreach_sub(current, averaged)
            torch._foreach_mul_(step, weight)
            torch._foreach_add_(averaged, step)
        self.n_averaged += 1
        self.count += 1
