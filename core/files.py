"""Files written whole or not at all: a reader never sees half a config, card or state file."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

__all__ = ["write_atomic", "write_json_atomic"]


def write_atomic(path: Path, data: str | bytes, *, mode: int | None = None) -> None:
    """Write beside ``path`` and rename over it; ``mode`` (for example 0o600) is set before the rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any, *, mode: int | None = None) -> None:
    """``write_atomic`` of ``data`` as sorted, indented JSON."""
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True), mode=mode)
