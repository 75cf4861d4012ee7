"""The Accelerator of a run, made in one place."""

from __future__ import annotations

import os
from datetime import timedelta

from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, parse_flag_from_env

from flows.config import Config
from flows.tracking import check_installed, tracker_names

__all__ = ["new_accelerator", "end", "run_device"]


# seconds a collective of several processes may wait before it fails (read once, when the processes first meet)
PROCESS_TIMEOUT = "FLOWS_PROCESS_TIMEOUT"


def run_device() -> tuple[str, bool]:
    """The device type this process's run will use (cuda, cpu, mps, ...) and whether it is the main process.

    Accelerate's process state, which the Accelerator adopts: the GPU of this rank under ``accelerate launch``,
    the CPU with ``CUDA_VISIBLE_DEVICES=""`` or ``accelerate launch --cpu`` (ACCELERATE_USE_CPU, read as the
    Accelerator reads it)."""
    seconds = os.environ.get(PROCESS_TIMEOUT)
    group = {"timeout": timedelta(seconds=float(seconds))} if seconds else {}  # torch's default: 30 minutes
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **group)
    return state.device.type, state.is_main_process


def new_accelerator(cfg: Config) -> Accelerator:
    """An Accelerator for ``cfg``. Accelerate keeps one process-wide state: a second run in this process
    (flows.train in a notebook) may ask for other settings (mixed precision, trackers); the process group
    itself is kept."""
    AcceleratorState._reset_state(reset_partial_state=False)
    trackers = tracker_names(cfg)
    check_installed(trackers)  # before anything is written
    return Accelerator(
        step_scheduler_with_optimizer=False,
        mixed_precision=cfg.train.mixed_precision,
        log_with=trackers or None,
        gradient_accumulation_steps=cfg.train.grad_accum,
        project_config=ProjectConfiguration(project_dir=cfg.run_dir, logging_dir=f"{cfg.run_dir}/logs"),
    )


def end(acc: Accelerator) -> None:
    """End a run's processes together: every process waits for the others, then trackers stop and the process
    group is destroyed. A process that destroyed its group and exited while another was still writing its files
    closed the connections under that one, which then aborted at exit (gloo: ``terminate called without an
    active exception``, in 2 of 5 clean CI runs of the two-process test)."""
    acc.wait_for_everyone()
    acc.end_training()
