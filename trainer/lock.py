"""One training run at a time per trainer folder: ``train.lock``, held for the run, fails a second run at once."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.errors import TrainingError

__all__ = ["LOCK_FILE", "training_lock"]

LOCK_FILE = "train.lock"


@contextmanager
def training_lock(folder: Path) -> Iterator[None]:
    """Hold ``train.lock`` for one run; a second run fails at once instead of waiting."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK_FILE).open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise TrainingError(f"another training run holds {folder / LOCK_FILE} (pid {holder})") from exc
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
