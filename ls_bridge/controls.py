"""Label configs turned into plans for pre-labels.

One class per control tag (``RectangleLabelsModel``, ``TAG = "RectangleLabels"``), found through
``CONTROL_MODELS``. Each pairs one control with one object tag (``RectangleLabels`` -> ``Image``),
maps model classes to the control's labels and turns detections into Label Studio regions.
Nothing here runs a model: the detections come in, regions go out. The config is parsed and the
labels mapped by :mod:`core.labelmap`, the same map the trainer reads annotations back with.

The task-level ``score`` is an uncertainty for Label Studio's Data Manager to sort by, ascending:
lower means the model is less sure, so that task teaches it more. Each box the model drew, and each
box it nearly drew (confidence from half the control's threshold up), is a decision; its margin is
how far its confidence lies from the threshold that decided it, scaled to 0 (on the threshold) ..
1 (confidence 0 or 1). The task's score is its least sure decision's margin; with no box at all,
1.0 (nothing there, and the model is sure of it). An image with only faint boxes, none drawn, thus
sorts before one with clear boxes or none.

Per-control knobs are attributes in the label config, as Label Studio's own ML backends read them:
``model_score_threshold`` (drop boxes below it), ``model_skip="true"`` (leave the control alone)
and, on a ``<Label>``, ``predicted_values="a,b"`` (model classes shown as that label).
"""

from __future__ import annotations

import logging
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

from core.errors import ConfigError
from core.labelmap import IMAGE, RECTANGLE_LABELS, ConfigControl, ConfigObject, LabelMap, map_labels, parse_label_config
from ls_bridge.geometry import PixelBox, pixels_to_percent
from ls_bridge.schemas import RectangleRegion, RectangleValue
from serving.client import ImageDetections

__all__ = [
    "CONTROL_MODELS",
    "ControlModel",
    "LabelPlan",
    "RectangleLabelsModel",
    "plan_for_config",
]

logger = logging.getLogger(__name__)

_TRUE = frozenset({"true", "1", "yes"})


def _log_gaps(label_map: LabelMap, model_classes: Sequence[str]) -> None:
    """One line per model class left without a label, and per ``predicted_values`` entry naming no class."""
    for label, value in label_map.unknown_predicted:
        logger.warning(
            "%s: predicted_values %r on label %r names no model class (model classes: %s)",
            label_map.control,
            value,
            label,
            ", ".join(model_classes),
        )
    for name in label_map.unlabelled:
        logger.warning("%s: model class %r has no label; its boxes are dropped", label_map.control, name)


@dataclass(frozen=True)
class ControlModel(ABC):
    """One control tag paired with one object tag, with its label map and score threshold."""

    TAG: ClassVar[str]
    OBJECT_TAGS: ClassVar[frozenset[str]]

    from_name: str
    to_name: str
    value_key: str
    score_threshold: float
    label_map: Mapping[str, str]

    @classmethod
    def is_control_matched(cls, control_tag: str, object_tag: str) -> bool:
        return control_tag == cls.TAG and object_tag in cls.OBJECT_TAGS

    @classmethod
    def create(
        cls,
        control: ConfigControl,
        obj: ConfigObject,
        model_classes: Sequence[str],
        default_threshold: float,
    ) -> ControlModel | None:
        """Build the model for one control/object pair, or None when the pair cannot be predicted."""
        attrs = control.attrs
        if attrs.get("model_skip", "").strip().lower() in _TRUE:
            logger.info("%s: model_skip is set; not pre-labelled", control.name)
            return None
        if obj.value_key is None:
            logger.warning("%s -> %s: object value %r is not a task field ($name)", control.name, obj.name, obj.value)
            return None
        threshold = attrs.get("model_score_threshold")
        try:
            score_threshold = float(threshold) if threshold is not None else default_threshold
        except ValueError as exc:
            raise ConfigError(f"{control.name}: model_score_threshold={threshold!r} is not a number") from exc
        label_map = map_labels(control, model_classes)
        _log_gaps(label_map, model_classes)
        return cls(
            from_name=control.name,
            to_name=obj.name,
            value_key=obj.value_key,
            score_threshold=score_threshold,
            label_map=label_map.to_label,
        )

    @abstractmethod
    def regions(self, detections: ImageDetections) -> list[RectangleRegion]:
        """The Label Studio results for this control from one image's detections."""

    @abstractmethod
    def margins(self, detections: ImageDetections) -> list[float]:
        """Each decision's margin from this control's threshold, 0 (a coin toss) .. 1 (certain)."""

    @property
    def floor(self) -> float:
        """The lowest confidence that still counts as a decision: half the threshold."""
        return self.score_threshold / 2


@dataclass(frozen=True)
class RectangleLabelsModel(ControlModel):
    """Boxes on an image, as ``rectanglelabels`` results in percent of the displayed image."""

    TAG: ClassVar[str] = RECTANGLE_LABELS
    OBJECT_TAGS: ClassVar[frozenset[str]] = frozenset({IMAGE})

    def regions(self, detections: ImageDetections) -> list[RectangleRegion]:
        results = []
        for det in detections.detections:
            label = self.label_map.get(det.label)
            if label is None or det.score < self.score_threshold:
                continue
            box = pixels_to_percent(PixelBox(det.x1, det.y1, det.x2, det.y2), detections.width, detections.height)
            if box.width <= 0 or box.height <= 0:
                continue
            results.append(
                RectangleRegion(
                    id=uuid.uuid4().hex[:10],
                    from_name=self.from_name,
                    to_name=self.to_name,
                    original_width=detections.width,
                    original_height=detections.height,
                    value=RectangleValue(x=box.x, y=box.y, width=box.width, height=box.height, rectanglelabels=[label]),
                    score=det.score,
                )
            )
        return results

    def margins(self, detections: ImageDetections) -> list[float]:
        t = self.score_threshold
        return [
            _margin(det.score, t)
            for det in detections.detections
            if det.label in self.label_map and det.score >= self.floor
        ]


def _margin(confidence: float, threshold: float) -> float:
    """How far ``confidence`` lies from ``threshold``, as a share of the way to 0 or 1."""
    if confidence >= threshold:
        return (confidence - threshold) / (1.0 - threshold) if threshold < 1.0 else 0.0
    return (threshold - confidence) / threshold


CONTROL_MODELS: dict[str, type[ControlModel]] = {RectangleLabelsModel.TAG: RectangleLabelsModel}


@dataclass(frozen=True)
class LabelPlan:
    """What to predict for a label config: the control models and the task fields they read."""

    controls: tuple[ControlModel, ...]
    config: str
    model_classes: tuple[str, ...]
    default_threshold: float

    def for_classes(self, model_classes: tuple[str, ...]) -> LabelPlan:
        """The same config planned for another version's classes (itself when they are the same)."""
        if model_classes == self.model_classes:
            return self
        return plan_for_config(self.config, model_classes, self.default_threshold)

    @property
    def value_keys(self) -> tuple[str, ...]:
        """Task ``data`` keys holding image URLs, each once, in config order."""
        return tuple(dict.fromkeys(c.value_key for c in self.controls))

    @property
    def request_threshold(self) -> float:
        """What Triton must return: every control's boxes, and the ones it nearly drew (the score needs them)."""
        return min(c.floor for c in self.controls)

    def format(self, detections: Mapping[str, ImageDetections]) -> tuple[list[RectangleRegion], float]:
        """Regions for one task (detections keyed by task field) and its uncertainty score (module docstring)."""
        present = [c for c in self.controls if c.value_key in detections]
        regions = [r for c in present for r in c.regions(detections[c.value_key])]
        score = min((m for c in present for m in c.margins(detections[c.value_key])), default=1.0)
        return regions, score


@lru_cache(maxsize=64)
def plan_for_config(config: str, model_classes: tuple[str, ...], default_threshold: float) -> LabelPlan:
    """Parse a label config once per (config, classes); ConfigError when nothing in it can be predicted."""
    parsed = parse_label_config(config)
    controls: list[ControlModel] = []
    for control in parsed.controls:
        for obj in control.objects:
            model_cls = next((m for m in CONTROL_MODELS.values() if m.is_control_matched(control.tag, obj.tag)), None)
            if model_cls is None:
                continue
            model = model_cls.create(control, obj, model_classes, default_threshold)
            if model is not None:
                controls.append(model)
    if not controls:
        supported = ", ".join(f"{t} -> {'/'.join(sorted(m.OBJECT_TAGS))}" for t, m in CONTROL_MODELS.items())
        raise ConfigError(
            f"nothing to pre-label in this label config: it needs a {supported} pair (found: {parsed.describe()})"
        )
    if not any(c.label_map for c in controls):
        labels = sorted({label.name for c in parsed.controls_of(CONTROL_MODELS) for label in c.labels})
        raise ConfigError(
            f"no model class matches a label in the config: model classes [{', '.join(model_classes)}], "
            f"config labels [{', '.join(labels)}]. Rename the labels, or add "
            'predicted_values="<model class>" to a <Label>'
        )
    return LabelPlan(tuple(controls), config, model_classes, default_threshold)
