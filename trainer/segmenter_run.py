"""A segmenter session's training run: :func:`trainer.head_run.run_head` with the segmenter's parts.

Points and masks (:mod:`trainer.points_data`) become labelled grid cells; the head of
:mod:`trainer.segment` learns from them. Judged on the held-out images: balanced point accuracy on
their points, and mIoU on those that carry a full mask. The deploy rule reads mIoU when held-out
masks exist, otherwise balanced point accuracy, and the run document's ``metric`` says which.
Interim predictions are ``brushlabels`` masks with the entropy score as the task's score.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from core.brush_rle import encode_mask
from core.image_decode import decode_image
from core.masks import upsample
from core.session import Session
from core.settings import Settings
from core.uncertainty import entropy_score
from serving.pbtxt import SegmenterConfig
from trainer.choices_data import ClassifiedImage, Collected
from trainer.classify import HeadParams
from trainer.head_run import HeadRunReport, request_stop, run_head
from trainer.points_data import ImageLabels, collect_points, image_labels
from trainer.segment import (
    CellPoints,
    SegmenterCheckpoint,
    SegmenterHead,
    export_head_onnx,
    mask_metrics,
    point_metrics,
    predict_proba,
    train_head,
)

__all__ = ["MIOU", "POINTS", "SegmenterOps", "request_stop", "run", "summary"]

MIOU = "miou"
POINTS = "balanced_point_accuracy"

Tokens = npt.NDArray[Any]


def _onnx_maps(onnx: Path, tokens: Sequence[Tokens]) -> list[npt.NDArray[np.float32]]:
    """Per-class maps (K, h, w) of a head's ONNX, one grid at a time as Triton runs it."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    return [np.asarray(session.run(None, {"tokens": t[None].astype(np.float32)})[0][0], np.float32) for t in tokens]


@dataclass
class SegmenterOps:
    """The segmenter's parts of a head run."""

    session: Session
    kind: str = "segmenter"
    brush: str | None = field(default=None, init=False)
    limits: tuple[int, int] = field(default=(50_000_000, 60_000_000), init=False)

    async def collect(self, settings: Settings, project: int, session: Session) -> Collected:
        self.limits = (settings.max_image_bytes, settings.max_image_pixels)
        collected, self.brush = await collect_points(
            settings, project, session.class_names, session.training.interim_tasks
        )
        return collected

    def labels(
        self, collected: Collected, images: Sequence[ClassifiedImage], tokens: Sequence[Tokens]
    ) -> list[ImageLabels]:
        to_class = {label: name for name, label in collected.to_label.items()}
        classes = self.session.class_names
        return [
            image_labels(image, classes, to_class, (int(t.shape[0]), int(t.shape[1])))
            for image, t in zip(images, tokens, strict=True)
        ]

    def metric(self, held: Sequence[ImageLabels]) -> str:
        return MIOU if any(h.truth is not None for h in held) else POINTS

    def judge(
        self, onnx: Path, tokens: Sequence[Tokens], held: Sequence[ImageLabels], head_classes: Sequence[str]
    ) -> dict[str, Any]:
        """Balanced point accuracy on held-out points (mask cells where an image has none), mIoU on held-out masks."""
        classes = self.session.class_names
        maps = _onnx_maps(onnx, tokens)
        # The head's channels in the session's class order; a class the head lacks is all background.
        order = [list(head_classes).index(c) if c in head_classes else None for c in classes]
        maps = [np.stack([m[i] if i is not None else np.zeros_like(m[0]) for i in order]) for m in maps]
        points = [h.points if len(h.points) else h.cells for h in held]
        metrics: dict[str, Any] = {
            POINTS: point_metrics(maps, points),
            "held_out_points": int(sum(len(p) for p in points)),
            "held_out_masks": int(sum(h.truth is not None for h in held)),
        }
        with_mask = [(m, h.truth) for m, h in zip(maps, held, strict=True) if h.truth is not None]
        if with_mask:
            found = mask_metrics([m for m, _ in with_mask], [t for _, t in with_mask], self.session.mask_threshold)
            # No class in any held-out mask nor in any prediction: nothing was missed, nothing invented.
            metrics[MIOU] = found["miou"] if found["miou"] is not None else 1.0
            metrics["per_class_iou"] = {classes[k]: iou for k, iou in found["per_class_iou"].items()}
        return metrics

    def load_checkpoint(self, path: Path) -> SegmenterCheckpoint:
        return SegmenterCheckpoint.load(path)

    def train(
        self,
        tokens: Sequence[Tokens],
        labels: Sequence[ImageLabels],
        params: HeadParams,
        warm: Any,
        on_epoch: Callable[[int, float, Any], bool],
    ) -> tuple[SegmenterHead, int]:
        cells: list[CellPoints] = [label.cells for label in labels]
        result = train_head(tokens, cells, self.session.class_names, params, warm=warm, on_epoch=on_epoch)
        return result.head, result.epochs

    def checkpoint(self, head: SegmenterHead) -> SegmenterCheckpoint:
        return SegmenterCheckpoint.from_head(head, self.session.class_names)

    def export(self, head: SegmenterHead, path: Path) -> Path:
        return export_head_onnx(head, path)

    def interim(
        self, head: SegmenterHead, collected: Collected, tokens: Sequence[Tokens], version: str
    ) -> list[dict[str, Any]]:
        """Masks of the pending tasks (no suggested points: those come from the served head)."""
        if self.brush is None:
            return []
        classes = self.session.class_names
        rows = []
        for image, probs in zip(collected.pending, predict_proba(head, tokens), strict=True):
            height, width = decode_image(image.data, *self.limits).pixels.shape[:2]
            full = upsample(probs, width, height)
            results = []
            for k, name in enumerate(classes):
                mask = full[k] >= self.session.mask_threshold
                if not mask.any():
                    continue
                results.append(
                    {
                        "from_name": self.brush,
                        "to_name": collected.to_name,
                        "type": "brushlabels",
                        "original_width": width,
                        "original_height": height,
                        "image_rotation": 0,
                        "value": {"format": "rle", "rle": encode_mask(mask), "brushlabels": [name]},
                        "score": float(full[k][mask].mean()),
                    }
                )
            rows.append(
                {"task": image.task_id, "model_version": version, "score": entropy_score(probs), "result": results}
            )
        return rows

    def config(self, settings: Settings, backbone: str) -> SegmenterConfig:
        return SegmenterConfig(
            name=self.session.model_name,
            backbone=backbone,
            classes=self.session.class_names,
            intra_op_threads=max(1, settings.ort_threads),
        )


def run(settings: Settings, project_id: int, session: Session) -> HeadRunReport:
    """One segmenter run (``labelloop train --project``, the watcher)."""
    return run_head(SegmenterOps(session), settings, project_id, session)


def summary(document: dict[str, Any]) -> str:
    """The human summary of a run document: dataset, both evaluations, the decision and what was published."""
    decision = document["decision"]
    lines = [
        f"segmenter {document['model']}: dataset {json.dumps(document['dataset'])}, judged on {document['metric']}"
    ]
    for name, entry in (("served", document["deployed"]), ("candidate", document["candidate"])):
        if entry is None:
            lines.append(f"{name}: none")
            continue
        metrics = entry["metrics"]
        shown = ", ".join(f"{key} {metrics[key]:.4f}" for key in (MIOU, POINTS) if metrics.get(key) is not None)
        lines.append(f"{name}{' v' + str(entry['version']) if 'version' in entry else ''}: {shown}")
    lines += [f"  - {reason}" for reason in decision["reasons"]]
    published = document["published_version"]
    lines.append(f"published version {published}" if published is not None else "nothing published")
    return "\n".join(lines)
