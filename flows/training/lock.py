"""One writer per run directory: ``RUN/.lock``, held with ``fcntl.flock`` for as long as a run trains.

A second ``train.py --resume RUN`` (or ``flows.train``/``flows.infer`` on the same directory) started while
the first still runs is refused with a :class:`RunLocked` naming the process that holds the run. The kernel
drops a ``flock`` when its process ends, however it ends (kill -9 included), so a lock file left behind by a
killed run never blocks a resume: only a live holder does.

Only the main process of a launch takes the lock (the other processes of an ``accelerate launch`` are the
same run); when it is refused, the launcher ends the others. Where ``fcntl`` is missing (Windows), runs are
not locked.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from flows.errors import TrainingAborted

__all__ = ["run_lock", "RunLocked", "LOCK_FILE"]

LOCK_FILE = ".lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class RunLocked(TrainingAborted):
    """Another live process is writing this run directory."""


def _main_process() -> bool:
    """The main process of a launch (torchrun/accelerate set RANK); a plain process is its own main one."""
    return int(os.environ.get("RANK", "0")) == 0


def _holder(handle: IO[str]) -> str:
    """Who holds the lock, from what it wrote into the file."""
    handle.seek(0)
    try:
        info = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        info = {}
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"process {info.get('pid')} on {info.get('host')} (since {since}: {info.get('command', '?')})"


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold ``run_dir``'s lock while the body runs; :class:`RunLocked` if a live process holds it."""
    if fcntl is None or not _main_process():
        yield
        return
    root = Path(run_dir)
    created = [p for p in (root, *root.parents) if not p.exists()]  # removed again if the run leaves them empty
    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunLocked(
                f"run directory '{root}' is in use by {_holder(handle)}: one run writes a directory at a time. "
                f"Wait for it to end (or stop it), then --resume {root}; nothing was changed."
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.time(),
            "command": " ".join(sys.argv)[:300],
        }
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(info))
        handle.flush()
        try:
            yield
        finally:  # an empty file at rest: a run refused for another reason leaves the directory as it found it
            handle.seek(0)
            handle.truncate()
    finally:
        handle.close()  # releases the lock; the file stays (a later run takes it over)
        if created and {p.name for p in root.iterdir()} == {LOCK_FILE}:  # a run refused before it wrote anything
            (root / LOCK_FILE).unlink()
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
