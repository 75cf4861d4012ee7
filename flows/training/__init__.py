"""The application's trainer: ``Trainer.run`` over small parts (EMA, step guard, schedule and selection,
run writer). ``flows.train`` is the way in."""

from flows.training.schedule import lr_lambda
from flows.training.trainer import Trainer, new_accelerator, train

__all__ = ["Trainer", "train", "lr_lambda", "new_accelerator"]
