"""Backbone features kept for reuse: on disk for the trainer, in memory (LRU, bounded in MB) for serving.

Features depend on the image's bytes, the backbone version and the long side it was resized to;
the key holds all three, so a new backbone version or another long side never reads stale tokens.
Tokens are stored as fp16 ``(h, w, C)`` arrays, as Triton serves them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["DiskFeatureCache", "FeatureKey", "MemoryFeatureCache"]

logger = logging.getLogger(__name__)

Tokens = npt.NDArray[Any]


@dataclass(frozen=True)
class FeatureKey:
    """What a feature grid depends on: image content, backbone name and version, long side."""

    image_sha256: str
    backbone: str
    version: int
    long_side: int

    @classmethod
    def for_image(cls, data: bytes, backbone: str, version: int, long_side: int) -> FeatureKey:
        return cls(hashlib.sha256(data).hexdigest(), backbone, int(version), int(long_side))


class MemoryFeatureCache:
    """An LRU of feature grids bounded by their total size in MB; safe to share between threads.

    An entry may carry a small ``extra`` beside its tokens (a segmenter keeps the image's size there,
    so a click on a cached image needs neither the backbone nor a decode).
    """

    def __init__(self, max_mb: float) -> None:
        self.max_bytes = int(max_mb * 1024 * 1024)
        self._items: OrderedDict[FeatureKey, tuple[Tokens, Any]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: FeatureKey) -> Tokens | None:
        entry = self.get_entry(key)
        return None if entry is None else entry[0]

    def get_entry(self, key: FeatureKey) -> tuple[Tokens, Any] | None:
        """The tokens and the ``extra`` stored with them, or None."""
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: FeatureKey, tokens: Tokens, extra: Any = None) -> None:
        """Keep ``tokens`` (as fp16), evicting the least recently used; a grid over the whole budget is not kept."""
        tokens = np.asarray(tokens, np.float16)
        tokens.setflags(write=False)  # shared by every reader: nobody may change it in place
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[0].nbytes
            if tokens.nbytes > self.max_bytes:
                return
            self._items[key] = (tokens, extra)
            self._bytes += tokens.nbytes
            while self._bytes > self.max_bytes:
                _, (evicted, _) = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes


class DiskFeatureCache:
    """Feature grids as fp16 ``.npy`` files under ``root`` (``<state_dir>/features``), kept across runs."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: FeatureKey) -> Path:
        return (
            self.root
            / key.backbone
            / f"v{key.version}"
            / f"long{key.long_side}"
            / key.image_sha256[:2]
            / f"{key.image_sha256}.npy"
        )

    def get(self, key: FeatureKey) -> Tokens | None:
        path = self.path(key)
        try:
            tokens: Tokens = np.load(path, allow_pickle=False)
            return tokens
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # a file cut short by a crash: recompute it
            logger.warning("unreadable cached features %s (%s); recomputing", path, exc)
            return None

    def put(self, key: FeatureKey, tokens: Tokens) -> Path:
        """Write the grid as fp16, whole or not at all (concurrent writers of one key are harmless)."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.npy")
        try:
            np.save(tmp, np.asarray(tokens, np.float16), allow_pickle=False)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path
