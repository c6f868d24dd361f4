"""Train a YOLO detector with ultralytics: the trainer's only import of ultralytics.

Fine-tuning starts from a served version's ``weights.pt``; the very first model starts from a
model YAML (random weights: nothing is downloaded, so this works air-gapped).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import TrainingError
from serving.export import configure_ultralytics_offline

__all__ = [
    "DEFAULT_MODEL_YAML",
    "EpochCheckpoint",
    "TrainResult",
    "map_ultralytics_errors",
    "pick_device",
    "snapshot_weights",
    "train_detector",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_YAML = "yolov8n.yaml"


@dataclass(frozen=True)
class TrainResult:
    """Where the trained weights are, and the arguments that made them."""

    best: Path
    run_dir: Path
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EpochCheckpoint:
    """The checkpoint of an epoch in progress and its validation mAP50: what an early publish looks at."""

    epoch: int  # 1-based
    epochs: int
    val_map50: float
    weights: Path  # ultralytics' last.pt, overwritten next epoch: ``snapshot_weights`` keeps it


def snapshot_weights(weights: Path, out: Path) -> Path:
    """A copy of a training checkpoint without its optimizer state: a third of the size, loadable as weights."""
    from ultralytics.utils.torch_utils import strip_optimizer

    with map_ultralytics_errors(f"saving {weights.name}"):
        strip_optimizer(weights, s=str(out))
    if not out.is_file():
        raise TrainingError(f"{weights} is not an ultralytics checkpoint")
    return out


def _on_model_save(callback: Callable[[EpochCheckpoint], None]) -> Callable[[Any], None]:
    """An ultralytics callback that hands each validated epoch's checkpoint to ``callback``."""

    def run(trainer: Any) -> None:
        map50 = trainer.metrics.get("metrics/mAP50(B)") if isinstance(trainer.metrics, dict) else None
        if map50 is not None and Path(trainer.last).is_file():
            callback(EpochCheckpoint(trainer.epoch + 1, trainer.epochs, float(map50), Path(trainer.last)))

    return run


@contextmanager
def map_ultralytics_errors(what: str) -> Iterator[None]:
    """Translate anything ultralytics raises into ``TrainingError`` (it raises many types)."""
    try:
        yield
    except TrainingError:
        raise
    except Exception as exc:  # noqa: BLE001 - the edge where third-party failures become ours
        raise TrainingError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


def pick_device(device: str) -> str:
    """'' means: the first CUDA GPU when torch sees one, else the CPU."""
    if device:
        return device
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def train_detector(
    data_yaml: Path,
    run_dir: Path,
    base: Path | None = None,
    model_yaml: str = DEFAULT_MODEL_YAML,
    epochs: int = 30,
    imgsz: int = 320,
    batch: int = 16,
    device: str = "",
    patience: int = 50,
    lr0: float | None = None,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    on_checkpoint: Callable[[EpochCheckpoint], None] | None = None,
) -> TrainResult:
    """Train (from ``base`` weights, or from scratch) and return the best checkpoint.

    The optimizer is named explicitly: with ``optimizer="auto"`` ultralytics ignores ``lr0``.
    ``on_checkpoint`` sees every validated epoch as it is saved; training waits for it.
    """
    configure_ultralytics_offline(run_dir.parent / "ultralytics")
    from ultralytics import YOLO

    start = str(base) if base is not None else model_yaml
    args: dict[str, Any] = {
        "data": str(data_yaml),
        "epochs": epochs,
        "imgsz": imgsz,
        "batch": batch,
        # ultralytics accumulates gradients up to a nominal batch of 64: on a few hundred images
        # that leaves a handful of optimizer steps per epoch, and from-scratch training stalls.
        "nbs": batch,
        "device": pick_device(device),
        "patience": patience,
        "optimizer": "AdamW",
        # Fine-tuning wants a gentler step than training from scratch.
        "lr0": lr0 if lr0 is not None else (0.0005 if base is not None else 0.002),
        # ultralytics warms biases up from lr 0.1 unless optimizer="auto"; with AdamW that wrecks a
        # trained head in the first epoch of a fine-tune (held-out mAP50 0.94 -> 0.73 seen here).
        **({"warmup_bias_lr": 0.0} if base is not None else {}),
        "seed": seed,
        "deterministic": True,
        "plots": False,
        "amp": False,
        "workers": 2,
        "project": str(run_dir.parent.resolve()),
        "name": run_dir.name,
        "exist_ok": True,
        "verbose": False,
        **(overrides or {}),
    }
    logger.info("training from %s: %s", start, {k: v for k, v in args.items() if k != "data"})
    with map_ultralytics_errors("training"):
        model = YOLO(start)
        if on_checkpoint is not None:
            model.add_callback("on_model_save", _on_model_save(on_checkpoint))
        model.train(**args)
        best = Path(model.trainer.best)
    if not best.is_file():
        raise TrainingError(f"training finished without a checkpoint in {run_dir}")
    return TrainResult(best=best, run_dir=Path(model.trainer.save_dir), args={"start": start, **args})
