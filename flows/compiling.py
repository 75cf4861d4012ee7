"""torch.compile that never ends a run: a compiled callable that falls back to its eager twin.

Compiling needs a working compiler toolchain (a C++ compiler, Triton on a GPU) and a torch build that supports
the device; a user's machine may lack either. :class:`EagerFallback` calls the compiled function and, the
first time it raises where the eager function succeeds, prints one notice and calls the eager function from
then on. An error the eager function raises as well is the call's own error and propagates unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint

__all__ = ["EagerFallback"]

# exceptions that are control flow, not a compiler's failure: activation checkpointing stops a recomputation early by
# raising one through the recomputed function (torch.utils.checkpoint's early stop)
CONTROL_FLOW: tuple[type[BaseException], ...] = tuple(
    c for c in (getattr(torch.utils.checkpoint, "_StopRecomputationError", None),) if isinstance(c, type)
)


class EagerFallback:
    """``compiled(*args)``, or ``eager(*args)`` once compiling has failed (one notice on stderr, naming ``what``)."""

    def __init__(self, compiled: Callable[..., Any], eager: Callable[..., Any], what: str):
        self.compiled, self.eager, self.what, self.failed = compiled, eager, what, False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except (torch.OutOfMemoryError, *CONTROL_FLOW):  # the device's memory or checkpointing: as without compile
            raise
        except Exception as err:  # any compiler failure; the eager call below re-raises the call's own errors
            failure = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
        out = self.eager(*args, **kwargs)  # outside the handler: the failed attempt's tensors are released
        self.failed = True
        print(
            f"notice: torch.compile failed for {self.what} ({failure}); running it without compile from here on",
            file=sys.stderr,
        )
        return out
