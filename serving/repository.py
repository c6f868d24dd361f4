"""The Triton model repository: models, integer version folders and their model cards.

A version is written into a hidden staging folder and renamed to ``<N>`` in one step, so
Triton (which ignores non-numeric folders) never sees a half-written version.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core import kinds
from core.errors import ConfigError, RepositoryError
from core.files import write_atomic
from serving.pbtxt import DetectorConfig, render_python

__all__ = [
    "CARD_FILE",
    "ModelCard",
    "ModelRepository",
    "ONNX_FILE",
    "WEIGHTS_FILE",
    "runtime_files",
    "sha256_file",
]

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.pt"
CARD_FILE = "card.json"
_SET_ASIDE_PREFIX = ".failed-"


@dataclass
class ModelCard:
    """What a version is and where it came from; stored as ``card.json`` beside the ONNX."""

    name: str
    version: int
    classes: list[str]
    imgsz: int
    created: str = ""
    parent_version: int | None = None
    source_weights_sha256: str | None = None
    onnx_sha256: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    dataset_hash: str | None = None
    train_args: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    # model.onnx's precision; for int8, the agreement gate's numbers (or, for fp32, why int8 was refused)
    precision: str = "fp32"
    quantization: dict[str, Any] = field(default_factory=dict)
    # What the version is for; picks its Triton runtime (cards written before kinds are detectors).
    kind: str = "detector"
    # Backbones only: the network and the normalisation its served features were computed with.
    arch: str | None = None
    patch_size: int | None = None
    hidden_size: int | None = None
    num_register_tokens: int | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    # Heads only: the backbone (name, version) whose features the head was trained on; imgsz is its long side.
    backbone: str | None = None
    backbone_version: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: Path) -> ModelCard:
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise RepositoryError(f"unreadable model card {path}: {exc}") from exc


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ModelRepository:
    """Reads and writes one Triton model repository folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def model_dir(self, name: str) -> Path:
        return self.root / name

    def version_dir(self, name: str, version: int) -> Path:
        return self.model_dir(name) / str(version)

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "config.pbtxt").is_file())

    def versions(self, name: str) -> list[int]:
        """Published versions, oldest first (what Triton would consider)."""
        model_dir = self.model_dir(name)
        if not model_dir.is_dir():
            return []
        return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())

    def latest(self, name: str) -> int | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def card(self, name: str, version: int) -> ModelCard:
        path = self.version_dir(name, version) / CARD_FILE
        if not path.is_file():
            raise RepositoryError(f"{name} version {version} has no {CARD_FILE}")
        return ModelCard.from_file(path)

    def kind(self, name: str) -> str:
        """The kind of a model: its newest readable card's (a model without one is a detector, as before kinds)."""
        for version in reversed(self.versions(name)):
            try:
                return self.card(name, version).kind
            except RepositoryError:
                continue
        return "detector"

    def onnx_path(self, name: str, version: int) -> Path:
        return self.version_dir(name, version) / ONNX_FILE

    def weights_path(self, name: str, version: int) -> Path | None:
        path = self.version_dir(name, version) / WEIGHTS_FILE
        return path if path.is_file() else None

    def write_config(self, cfg: DetectorConfig) -> Path:
        """Write ``config.pbtxt`` for the python runtime (atomically, only if it changed)."""
        return self.write_config_text(cfg.name, render_python(cfg))

    def write_config_text(self, name: str, text: str) -> Path:
        """Write a rendered ``config.pbtxt`` for any kind (atomically, only if it changed)."""
        model_dir = self.model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        path = model_dir / "config.pbtxt"
        if not path.is_file() or path.read_text() != text:
            write_atomic(path, text)
        return path

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        model_dir = self.model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        with (model_dir / ".lock").open("w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def add_version(
        self,
        card: ModelCard,
        onnx: Path,
        weights: Path | None = None,
        extra_files: dict[str, Path] | None = None,
    ) -> int:
        """Publish ``onnx`` (and its source weights) as the next version; returns its number.

        The card's ``version``, ``created`` and hashes are filled in here.
        """
        if not onnx.is_file():
            raise RepositoryError(f"no ONNX file at {onnx}")
        if not (self.model_dir(card.name) / "config.pbtxt").is_file():
            raise RepositoryError(f"model {card.name!r} has no config.pbtxt in {self.root}; write it first")
        runtime = runtime_files(card.kind)
        with self._lock(card.name):
            version = (self.latest(card.name) or 0) + 1
            staging = self.model_dir(card.name) / f".staging-{uuid.uuid4().hex}"
            try:
                staging.mkdir()
                _write_files(staging, runtime)
                shutil.copyfile(onnx, staging / ONNX_FILE)
                if weights is not None:
                    shutil.copyfile(weights, staging / WEIGHTS_FILE)
                    card.source_weights_sha256 = sha256_file(weights)
                for fname, src in (extra_files or {}).items():
                    shutil.copyfile(src, staging / fname)
                card.version = version
                card.onnx_sha256 = sha256_file(staging / ONNX_FILE)
                card.created = card.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
                (staging / CARD_FILE).write_text(card.to_json())
                _fsync_tree(staging)
                os.rename(staging, self.version_dir(card.name, version))
            except OSError as exc:
                shutil.rmtree(staging, ignore_errors=True)
                raise RepositoryError(f"could not write {card.name} version {version}: {exc}") from exc
        logger.info("wrote %s version %d", card.name, version)
        return version

    def install_runtime(self, name: str, version: int) -> None:
        """Overwrite a version's Triton runtime with this labelloop's; only for copies Triton does not serve.

        A published version keeps the runtime it was written with; the bench measures the code at hand.
        """
        card = self.version_dir(name, version) / CARD_FILE
        kind = ModelCard.from_file(card).kind if card.is_file() else "detector"
        _write_files(self.version_dir(name, version), runtime_files(kind))

    def set_aside(self, name: str, version: int, reason: str) -> Path:
        """Move a version out of Triton's sight (kept for inspection, never deleted)."""
        src = self.version_dir(name, version)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        dst = self.model_dir(name) / f"{_SET_ASIDE_PREFIX}{version}-{stamp}"
        with self._lock(name):
            os.rename(src, dst)
        (dst / "FAILED.txt").write_text(reason + "\n")
        logger.warning("set aside %s version %d as %s: %s", name, version, dst.name, reason)
        return dst


def runtime_files(kind: str = "detector") -> dict[str, bytes]:
    """The python-backend code every version folder of ``kind`` carries, by file name (from the kinds registry)."""
    entry = kinds.KINDS.get(kind)
    if entry is None or not entry.runtime:
        served = sorted(k.name for k in kinds.KINDS.values() if k.runtime)
        why = "" if entry is None else " (it has none yet)"
        raise RepositoryError(f"no Triton runtime for model kind {kind!r}{why}; kinds with one: {', '.join(served)}")
    try:
        return {f.name: kinds.runtime_source(f.module).read_bytes() for f in entry.runtime}
    except (ConfigError, OSError) as exc:
        raise RepositoryError(f"the Triton runtime of kind {kind!r} cannot be read: {exc}") from exc


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    for fname, data in files.items():
        (folder / fname).write_bytes(data)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with path.open("rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
