"""Choices controls turned into classifier pre-labels (the classifier kind's Label Studio results).

A ``<Choices>`` on an ``<Image>`` gets one ``choices`` result: the most probable class, shown as the
label it maps to (:mod:`core.labelmap`, the map the trainer reads annotations back with), its
probability as the result's ``score`` and every class's probability in ``meta``, where a reviewer
sees them. The task's score is an uncertainty, lower first, as for boxes: the margin between the
two most probable classes (0: a coin toss, 1: certain).

``model_skip="true"`` on the control leaves it alone, as for boxes.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.labelmap import IMAGE, ConfigControl, LabelMap, map_labels, parse_label_config
from core.uncertainty import margin
from ls_bridge.schemas import ChoicesRegion, ChoicesValue, Region
from serving.heads import ImageClasses

__all__ = ["CHOICES", "ChoicesControl", "choices_controls", "controls"]

logger = logging.getLogger(__name__)

CHOICES = "Choices"
_TRUE = frozenset({"true", "1", "yes"})


@dataclass(frozen=True)
class ChoicesControl:
    """One ``<Choices>`` on one ``<Image>``: where results go and which task field holds the image."""

    control: ConfigControl
    to_name: str
    value_key: str

    @property
    def from_name(self) -> str:
        return self.control.name

    def label_map(self, model_classes: Sequence[str]) -> LabelMap:
        return map_labels(self.control, model_classes)

    def serves(self, model_classes: Sequence[str]) -> bool:
        """Whether every one of a head's classes is a choice of this control (then the head can fill it)."""
        return bool(model_classes) and not self.label_map(model_classes).unlabelled

    def clicks(self, context: Sequence[dict[str, Any]], model_classes: Sequence[str]) -> list[tuple[float, float, int]]:
        """A classifier takes no clicks."""
        return []

    def answer(self, output: ImageClasses, request: object) -> tuple[list[Region], float]:
        """The ``choices`` result (none when the best class has no choice) and the top-two margin."""
        region = self.region(output)
        return ([region] if region is not None else []), margin(output.probs.tolist())

    def region(self, classes: ImageClasses) -> ChoicesRegion | None:
        """The ``choices`` result of one image's probabilities; None when the best class has no choice."""
        names = classes.model.classes
        to_label = self.label_map(names).to_label
        best = int(np.argmax(classes.probs))
        label = to_label.get(names[best])
        if label is None:
            return None
        probabilities = {to_label.get(n, n): round(float(p), 4) for n, p in zip(names, classes.probs, strict=True)}
        shown = ", ".join(f"{n} {p:.2f}" for n, p in sorted(probabilities.items(), key=lambda kv: -kv[1]))
        return ChoicesRegion(
            id=uuid.uuid4().hex[:10],
            from_name=self.from_name,
            to_name=self.to_name,
            value=ChoicesValue(choices=[label]),
            score=float(classes.probs[best]),
            meta={"text": [shown], "probabilities": probabilities},
        )


def choices_controls(config: str) -> tuple[ChoicesControl, ...]:
    """The config's ``<Choices>`` controls on images, in config order (``model_skip`` ones left out)."""
    found = []
    for control in parse_label_config(config).controls_of((CHOICES,)):
        if control.attrs.get("model_skip", "").strip().lower() in _TRUE:
            logger.info("%s: model_skip is set; not pre-labelled", control.name)
            continue
        for obj in control.objects:
            if obj.tag == IMAGE and obj.value_key is not None:
                found.append(ChoicesControl(control, obj.name, obj.value_key))
    return tuple(found)


controls = choices_controls
