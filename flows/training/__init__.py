"""The application's trainer: ``Trainer.run`` over small parts (EMA, step guard, schedule and selection,
run writer). ``flows.train`` is the way in: it builds a ``Trainer`` and runs it."""

from flows.training.accelerator import new_accelerator
from flows.training.schedule import lr_lambda
from flows.training.trainer import Trainer

__all__ = ["Trainer", "lr_lambda", "new_accelerator"]
