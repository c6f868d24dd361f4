"""The segmenter's dataset: points and masks of a Label Studio project, turned into labelled grid cells.

A task's chosen annotation (as for every kind: completed, not cancelled, ground truth first) gives:

- its ``keypointlabels`` points on the session's ``<KeyPointLabels>``: a class label is a foreground
  point of that class, the ``background`` label a background point. Suggested points a person
  accepted are annotations like any other, so they count;
- its ``brushlabels`` masks on the ``<BrushLabels>``, if any: an image with a mask is fully labelled.
  On a training image every grid cell it covers becomes a label (a cell over half inside a class's
  mask is that class, a cell almost clear of every mask is background); on a held-out image the
  mask is what mIoU is measured against.

Images, the held-out split (frozen, by content hash) and the unlabelled tasks for interim
predictions come from :func:`trainer.choices_data.collect_annotated`, shared with the classifier.
An image's ``label`` is ``mask`` or ``points``: what the split's counts show.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from core.brush_rle import decode_mask
from core.errors import DatasetError
from core.labelmap import ConfigControl, LabelConfig, map_labels
from core.masks import point_cell
from core.session import BACKGROUND
from core.settings import Settings
from trainer.choices_data import ClassifiedImage, Collected, collect_annotated
from trainer.segment import CellPoints

__all__ = ["ImageLabels", "collect_points", "image_labels"]

logger = logging.getLogger(__name__)

KEYPOINTS, BRUSH = "KeyPointLabels", "BrushLabels"
# A mask cell is a class when more than this share of it is inside, background when less than _CLEAR.
_INSIDE, _CLEAR = 0.5, 0.05


def _fitting(config: LabelConfig, tag: str, classes: Sequence[str]) -> ConfigControl | None:
    found = [c for c in config.controls_of((tag,)) if not map_labels(c, classes).unlabelled]
    return found[0] if found else None


async def collect_points(
    settings: Settings, project_id: int, classes: Sequence[str], pending: int = 0
) -> tuple[Collected, str | None]:
    """Every task whose chosen annotation holds points or a mask on the session's controls, image downloaded.

    Also the name of the project's ``<BrushLabels>`` (None without one), where interim masks go.
    """
    brush: list[str] = []

    def controls(config: LabelConfig) -> list[ConfigControl]:
        found = [c for c in (_fitting(config, KEYPOINTS, classes), _fitting(config, BRUSH, classes)) if c]
        brush.extend(c.name for c in found if c.tag == BRUSH)
        if not found:
            raise DatasetError(
                f"project {project_id} has no <KeyPointLabels> or <BrushLabels> showing every class "
                f"[{', '.join(classes)}] (found: {config.describe()})"
            )
        return found

    def read(annotation: Mapping[str, Any], found: Sequence[ConfigControl]) -> tuple[str, tuple[Any, ...]] | None:
        names = {c.name for c in found}
        kept = tuple(
            r
            for r in annotation.get("result") or []
            if isinstance(r, Mapping)
            and r.get("from_name") in names
            and r.get("type") in ("keypointlabels", "brushlabels")
        )
        if not kept:
            return None
        return ("mask" if any(r["type"] == "brushlabels" for r in kept) else "points"), kept

    collected = await collect_annotated(settings, project_id, classes, controls, read, pending, "point or mask")
    return collected, (brush[0] if brush else None)


@dataclass(frozen=True)
class ImageLabels:
    """One image's labels on its token grid: labelled cells, and the full label map when it has a mask."""

    cells: CellPoints
    points: CellPoints
    truth: npt.NDArray[np.int32] | None


def _class_index(label: str, classes: Sequence[str], to_class: Mapping[str, str]) -> int | None:
    """-1 for background, the class's index, or None for a label that is neither."""
    if label.lower() == BACKGROUND:
        return -1
    name = to_class.get(label, label)
    return classes.index(name) if name in classes else None


def image_labels(
    image: ClassifiedImage, classes: Sequence[str], to_class: Mapping[str, str], grid: tuple[int, int]
) -> ImageLabels:
    """The labelled cells of ``image`` on a ``grid`` (h, w): its points, plus its mask's cells when it has one.

    ``to_class`` maps the config's labels to session classes (:mod:`core.labelmap`).
    """
    rows: list[int] = []
    cols: list[int] = []
    kinds: list[int] = []
    truth: npt.NDArray[np.int32] | None = None
    for result in image.results:
        value = result.get("value") or {}
        labels = value.get(result["type"]) or []
        k = _class_index(str(labels[0]), classes, to_class) if labels else None
        if k is None:
            continue
        if result["type"] == "keypointlabels":
            row, col = point_cell(float(value["x"]) / 100, float(value["y"]) / 100, 1, 1, *grid)
            rows.append(row)
            cols.append(col)
            kinds.append(k)
        elif k >= 0 and value.get("rle"):
            width, height = int(result["original_width"]), int(result["original_height"])
            mask = decode_mask(value["rle"], width, height)
            if truth is None:
                truth = np.zeros((height, width), np.int32)
            if truth.shape == mask.shape:
                truth[mask] = k + 1
    points = CellPoints.of(rows, cols, kinds)
    if truth is None:
        return ImageLabels(points, points, None)
    r, c, kk = _mask_cells(truth, len(classes), grid)
    cells = CellPoints.of([*rows, *r], [*cols, *c], [*kinds, *kk])
    return ImageLabels(cells, points, truth)


def _mask_cells(
    truth: npt.NDArray[np.int32], count: int, grid: tuple[int, int]
) -> tuple[list[int], list[int], list[int]]:
    """Cells a label map decides: a class over half of the cell, or background when almost nothing is in it."""
    h, w = grid
    height, width = truth.shape
    ys = np.minimum((np.arange(height) * h) // height, h - 1)
    xs = np.minimum((np.arange(width) * w) // width, w - 1)
    cell = ys[:, None] * w + xs[None, :]
    area = np.bincount(cell.ravel(), minlength=h * w).astype(np.float64)
    cover = np.stack(
        [np.bincount(cell.ravel(), weights=(truth == k + 1).ravel(), minlength=h * w) for k in range(count)]
    ) / np.maximum(area, 1)
    rows: list[int] = []
    cols: list[int] = []
    kinds: list[int] = []
    for index in range(h * w):
        best = int(np.argmax(cover[:, index]))
        if cover[best, index] > _INSIDE:
            kinds.append(best)
        elif cover[:, index].sum() < _CLEAR:
            kinds.append(-1)
        else:
            continue
        rows.append(index // w)
        cols.append(index % w)
    return rows, cols, kinds
