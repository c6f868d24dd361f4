"""A classifier session's training run: :func:`trainer.head_run.run_head` with the classifier's parts.

Choices annotations (:mod:`trainer.choices_data`), the head of :mod:`trainer.classify`, judged by
accuracy, macro-F1, per-class F1 and the confusion matrix; the deploy rule reads macro-F1. Interim
predictions are ``choices`` results with the top-two margin as the task's score.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from core.session import Session
from core.settings import Settings
from core.uncertainty import margin
from serving.pbtxt import ClassifierConfig
from trainer.choices_data import ClassifiedImage, Collected, collect_choices
from trainer.classify import (
    ClassifierHead,
    HeadCheckpoint,
    HeadParams,
    classification_metrics,
    export_head_onnx,
    predict_proba,
    train_head,
)
from trainer.head_run import HeadRunReport, request_stop, run_head

__all__ = ["METRIC", "ClassifierOps", "onnx_predictions", "request_stop", "run", "summary"]

METRIC = "macro_f1"

Tokens = npt.NDArray[Any]


def onnx_predictions(onnx: Path, tokens: Sequence[Tokens]) -> npt.NDArray[np.float32]:
    """Class probabilities of a head's ONNX over feature grids, one image at a time as Triton runs it."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    rows = [np.asarray(session.run(None, {"tokens": t[None].astype(np.float32)})[0][0]) for t in tokens]
    probs: npt.NDArray[np.float32] = np.stack(rows).astype(np.float32)
    return probs


@dataclass(frozen=True)
class ClassifierOps:
    """The classifier's parts of a head run."""

    session: Session
    kind: str = "classifier"

    async def collect(self, settings: Settings, project: int, session: Session) -> Collected:
        return await collect_choices(settings, project, session.class_names, session.training.interim_tasks)

    def labels(self, collected: Collected, images: Sequence[ClassifiedImage], tokens: Sequence[Tokens]) -> list[int]:
        index = {name: k for k, name in enumerate(self.session.class_names)}
        return [index[i.label] for i in images]

    def metric(self, held: Any) -> str:
        return METRIC

    def judge(self, onnx: Path, tokens: Sequence[Tokens], held: Any, head_classes: Sequence[str]) -> dict[str, Any]:
        """Metrics over the session's classes of a head whose outputs are ``head_classes`` (matched by name)."""
        classes = self.session.class_names
        index = {name: k for k, name in enumerate(classes)}
        best = onnx_predictions(onnx, tokens).argmax(axis=1)
        predicted = [index.get(head_classes[int(p)], len(classes)) for p in best]
        if max(predicted) < len(classes):
            return classification_metrics(list(held), predicted, classes)
        # The head answered a class the session no longer has: a wrong answer, in a column of its own.
        return classification_metrics(list(held), predicted, [*classes, "(not a session class)"])

    def load_checkpoint(self, path: Path) -> HeadCheckpoint:
        return HeadCheckpoint.load(path)

    def train(
        self,
        tokens: Sequence[Tokens],
        labels: Any,
        params: HeadParams,
        warm: Any,
        on_epoch: Callable[[int, float, Any], bool],
    ) -> tuple[ClassifierHead, int]:
        result = train_head(tokens, labels, self.session.class_names, params, warm=warm, on_epoch=on_epoch)
        return result.head, result.epochs

    def checkpoint(self, head: ClassifierHead) -> HeadCheckpoint:
        return HeadCheckpoint.from_head(head, self.session.class_names)

    def export(self, head: ClassifierHead, path: Path) -> Path:
        return export_head_onnx(head, path)

    def interim(
        self, head: ClassifierHead, collected: Collected, tokens: Sequence[Tokens], version: str
    ) -> list[dict[str, Any]]:
        classes = self.session.class_names
        rows = []
        for image, row in zip(collected.pending, predict_proba(head, tokens), strict=True):
            best = int(np.argmax(row))
            label = collected.to_label.get(classes[best], classes[best])
            result = {
                "from_name": collected.control,
                "to_name": collected.to_name,
                "type": "choices",
                "value": {"choices": [label]},
                "score": float(row[best]),
            }
            rows.append({"task": image.task_id, "model_version": version, "score": margin(row), "result": [result]})
        return rows

    def config(self, settings: Settings, backbone: str) -> ClassifierConfig:
        return ClassifierConfig(
            name=self.session.model_name,
            backbone=backbone,
            classes=self.session.class_names,
            intra_op_threads=max(1, settings.ort_threads),
        )


def run(settings: Settings, project_id: int, session: Session) -> HeadRunReport:
    """One classifier run (``labelloop train --project``, the watcher)."""
    return run_head(ClassifierOps(session), settings, project_id, session)


def summary(document: dict[str, Any]) -> str:
    """The human summary of a run document: dataset, both evaluations, the decision and what was published."""
    decision = document["decision"]
    lines = [f"classifier {document['model']}: dataset {json.dumps(document['dataset'])}"]
    for name, entry in (("served", document["deployed"]), ("candidate", document["candidate"])):
        if entry is None:
            lines.append(f"{name}: none")
            continue
        metrics = entry["metrics"]
        lines.append(
            f"{name}{' v' + str(entry['version']) if 'version' in entry else ''}: accuracy {metrics['accuracy']:.4f}, "
            f"macro-F1 {metrics['macro_f1']:.4f}, per class {json.dumps(metrics['per_class_f1'])}"
        )
    lines += [f"  - {reason}" for reason in decision["reasons"]]
    published = document["published_version"]
    lines.append(f"published version {published}" if published is not None else "nothing published")
    return "\n".join(lines)
