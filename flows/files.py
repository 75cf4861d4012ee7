"""Files written whole or not at all: a kill mid-write leaves the old file (or none), never half of one.

Every writer goes through a temporary file beside the target, ``.NAME.tmpPID``, renamed over it with
``os.replace`` once complete (atomic on POSIX and Windows within one file system). :func:`atomic_write`
takes the bytes or text; :func:`atomic_path` hands a writer that wants a path (``np.savez``, safetensors'
``save_file``, ``shutil.copyfile``) the temporary one. :func:`leftovers` finds what killed writers left.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write", "leftovers", "temporary"]


def temporary(path: str | Path) -> Path:
    """The temporary file this process writes ``path`` through: ``.NAME.tmpPID`` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def leftovers(path: str | Path) -> list[Path]:
    """Temporary files of ``path`` that writers (of any process) left behind, e.g. when they were killed."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.tmp*"))


def _sync(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; on leaving the block it replaces ``path`` (after
    ``os.fsync`` when ``fsync``), or, if the block raised, it is removed and ``path`` is left as it was.

    The writer must write to exactly the path given (``np.savez`` appends ``.npz`` to a name without it: give
    it an open file instead)."""
    path = Path(path)
    tmp = temporary(path)
    try:
        yield tmp
        if fsync:
            _sync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str, fsync: bool = False) -> Path:
    """Write ``data`` (text: UTF-8) to ``path`` whole or not at all; returns ``path``."""
    with atomic_path(path, fsync) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)
