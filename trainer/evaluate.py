"""Evaluate a detector (``.pt`` or a served ``.onnx``) on one split, from ultralytics' metrics object.

The numbers come from ``DetMetrics`` (``box.map50`` etc.), never from parsed stdout: the seed
project scraped ``yolo val`` output and broke when its format changed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.errors import DatasetError
from serving.export import configure_ultralytics_offline
from trainer.dataset import dataset_names
from trainer.train import map_ultralytics_errors, pick_device

__all__ = ["EvalResult", "evaluate"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    """Box metrics on one split; per-class AP50 covers the classes that split has boxes of."""

    map50: float
    map50_95: float
    precision: float
    recall: float
    per_class_ap50: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        return cls(
            map50=float(data["map50"]),
            map50_95=float(data["map50_95"]),
            precision=float(data.get("precision", 0.0)),
            recall=float(data.get("recall", 0.0)),
            per_class_ap50={str(k): float(v) for k, v in dict(data.get("per_class_ap50", {})).items()},
        )


def evaluate(
    weights_or_onnx: Path,
    data_yaml: Path,
    imgsz: int,
    split: str = "test",
    *,
    expected_classes: Sequence[str] = (),
    device: str = "",
    batch: int = 16,
    run_dir: Path | None = None,
) -> EvalResult:
    """Validate ``weights_or_onnx`` on ``split`` of ``data_yaml``; class names come from the dataset.

    ``expected_classes`` are the classes with boxes in the split. ultralytics drops the boxes of
    classes a model cannot predict (a class added since it was trained), which would flatter it;
    each such class counts here as AP 0 in mAP50 and mAP50-95 (precision and recall stay
    ultralytics' own, over the classes it scored).
    """
    if not weights_or_onnx.is_file():
        raise DatasetError(f"no model file at {weights_or_onnx}")
    names = dataset_names(data_yaml)
    if not names:
        raise DatasetError(f"{data_yaml} has no class names")
    out = run_dir if run_dir is not None else data_yaml.parent / "eval"
    configure_ultralytics_offline(out.parent / "ultralytics")
    from ultralytics import YOLO

    logger.info("evaluating %s on the %s split of %s (imgsz %d)", weights_or_onnx, split, data_yaml, imgsz)
    with map_ultralytics_errors(f"evaluating {weights_or_onnx.name}"):
        model = YOLO(str(weights_or_onnx), task="detect")
        metrics = model.val(
            data=str(data_yaml),
            split=split,
            imgsz=imgsz,
            batch=batch,
            device=pick_device(device),
            plots=False,
            verbose=False,
            save_json=False,
            project=str(out.parent.resolve()),
            name=out.name,
            exist_ok=True,
        )
        box = metrics.box
        per_class = {
            names[int(c)] if int(c) < len(names) else str(int(c)): float(ap)
            for c, ap in zip(box.ap_class_index, box.ap50, strict=True)
        }
        map50, map50_95 = float(box.map50), float(box.map)
    missing = [c for c in expected_classes if c not in per_class]
    if missing:
        logger.warning("%s cannot predict %s: counted as AP 0", weights_or_onnx.name, missing)
        scored = len(per_class)
        per_class |= dict.fromkeys(missing, 0.0)
        map50 = map50 * scored / len(per_class)
        map50_95 = map50_95 * scored / len(per_class)
    result = EvalResult(
        map50=map50, map50_95=map50_95, precision=float(box.mp), recall=float(box.mr), per_class_ap50=per_class
    )
    logger.info("%s: mAP50 %.4f, mAP50-95 %.4f", weights_or_onnx.name, result.map50, result.map50_95)
    return result
