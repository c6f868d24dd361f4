"""Label Studio results of the "segmenter" kind: masks, suggested points and the clicks people place.

A segmenter predicts one foreground probability map per class. In Label Studio it meets two
controls on the same ``<Image>``:

- ``<BrushLabels>``: each class's mask becomes one ``brushlabels`` result, run-length coded as
  Label Studio's editor codes brush strokes (:mod:`core.brush_rle`).
- ``<KeyPointLabels>``: suggested points (the second design, FIELD-NOTES §7): confident pixels
  far apart, where a person checks the model fastest, as ``keypointlabels`` results; foreground
  points carry the class's label, background points the label called "background". With
  ``smart="true"`` the same control is the interactive prompt: Label Studio sends the points a
  person just placed in ``params.context.result`` (:func:`clicks_from_context`), and the new mask
  must agree with every one of them (:func:`honour_clicks`).

A config may hold either control alone: masks need ``BrushLabels``, points need ``KeyPointLabels``.
Labels map to model classes through :mod:`core.labelmap`, the map the trainer reads annotations
back with, so ``predicted_values`` and aliases work as they do for boxes.

Coordinates: a point's ``x, y`` are continuous pixel coordinates, pixel ``(col j, row i)`` spanning
``[j, j + 1) x [i, i + 1)``; ``floor`` gives the pixel. Label Studio's percent is ``100 * x / width``
in the same frame, so conversion needs no half-pixel shift.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

import numpy as np
import numpy.typing as npt

from core.brush_rle import encode_mask
from core.labelmap import IMAGE, ConfigControl, LabelMap, map_labels, parse_label_config
from core.masks import upsample
from core.uncertainty import entropy_score
from ls_bridge.schemas import BrushRegion, BrushValue, KeyPointRegion, KeyPointValue, Region
from serving.heads import ImageMasks

__all__ = [
    "BACKGROUND",
    "BRUSH_LABELS",
    "KEYPOINT_LABELS",
    "Click",
    "SegmentControls",
    "SuggestedPoint",
    "brush_result",
    "clicks_from_context",
    "controls",
    "honour_clicks",
    "keypoint_result",
    "segment_controls",
    "sobel_magnitude",
    "suggest_points",
]

logger = logging.getLogger(__name__)

BRUSH_LABELS = "BrushLabels"
KEYPOINT_LABELS = "KeyPointLabels"
BACKGROUND = "background"
_TRUE = frozenset({"true", "1", "yes"})
# Where a session sets none: the probability above which a pixel is in the mask.
DEFAULT_THRESHOLD = 0.5
# A click's disk, as a share of the image's short side, that the refined mask keeps (or keeps out).
CLICK_RADIUS = 0.01
# Suggested points are picked on maps at most this long (Sobel and spacing on a big image cost seconds).
POINT_MAP_SIDE = 512
_CHUNK = 16384  # candidates ranked at a time: enough for 250 well-spaced points in one pass as a rule


@dataclass(frozen=True)
class SegmentControls:
    """The segmentation controls on one ``<Image>``: a ``BrushLabels``, a ``KeyPointLabels``, or both.

    ``background`` is the stored name of the point label that means "no class here" (the label
    called "background", any case); points with it are negative clicks for every class.
    """

    to_name: str
    value_key: str
    brush: ConfigControl | None
    keypoints: ConfigControl | None
    background: str | None

    @property
    def brush_name(self) -> str | None:
        return self.brush.name if self.brush else None

    @property
    def keypoint_name(self) -> str | None:
        return self.keypoints.name if self.keypoints else None

    def brush_map(self, model_classes: Sequence[str]) -> LabelMap | None:
        """The brush labels and the model's classes both ways; None without ``BrushLabels``."""
        return map_labels(self.brush, model_classes) if self.brush else None

    def keypoint_map(self, model_classes: Sequence[str]) -> LabelMap | None:
        """The point labels and the model's classes both ways; None without ``KeyPointLabels``.

        A model class called "background" is not mapped: that label is the negative click.
        """
        if self.keypoints is None:
            return None
        return map_labels(self.keypoints, [c for c in model_classes if not self.is_background(c)])

    def brush_label(self, model_class: str, model_classes: Sequence[str]) -> str | None:
        """The ``brushlabels`` label a class's mask is written with; None when no brush label shows it."""
        label_map = self.brush_map(model_classes)
        return label_map.label_for(model_class) if label_map else None

    def keypoint_label(self, model_class: str, model_classes: Sequence[str]) -> str | None:
        """The ``keypointlabels`` label of a class's foreground points; None when no point label shows it."""
        label_map = self.keypoint_map(model_classes)
        return label_map.label_for(model_class) if label_map else None

    @property
    def from_name(self) -> str:
        """The control the log names for this pair (the brush when there is one)."""
        return self.brush_name or self.keypoint_name or self.to_name

    def serves(self, model_classes: Sequence[str]) -> bool:
        """Whether every class of a head is a label here (of the brush, else of the points)."""
        label_map = self.brush_map(model_classes) or self.keypoint_map(model_classes)
        return bool(model_classes) and label_map is not None and not label_map.unlabelled

    def clicks(
        self, context: Sequence[Mapping[str, Any]], model_classes: Sequence[str]
    ) -> list[tuple[float, float, int]]:
        """A person's points as the head's clicks: ``(x, y, class index)`` as fractions of the image, -1 background.

        A negative smart click (``"is_positive": false``) is background for the head; labels no
        class maps to are left out.
        """
        label_map = self.keypoint_map(model_classes)
        if label_map is None:
            return []
        found = []
        for item, value, label in self.context_points(context):
            name = label_map.to_class.get(label)
            if self.is_background(label) or item.get("is_positive", True) is False:
                index = -1
            elif name is not None and name in model_classes:
                index = list(model_classes).index(name)
            else:
                continue
            x, y = (min(max(float(value[a]) / 100.0, 0.0), 1.0) for a in ("x", "y"))
            found.append((x, y, index))
        return found

    def context_points(
        self, context: Sequence[Mapping[str, Any]]
    ) -> Iterator[tuple[Mapping[str, Any], Mapping[str, Any], str]]:
        """The well-formed points of this ``KeyPointLabels`` on this image in an interactive context.

        Each as ``(result, its value, its label)``; other controls, images, types and points without
        a label or a position are skipped.
        """
        for item in context:
            if item.get("type") != "keypointlabels" or item.get("from_name") != self.keypoint_name:
                continue
            if item.get("to_name", self.to_name) != self.to_name:
                continue
            value = item.get("value") or {}
            labels = value.get("keypointlabels") or []
            if labels and "x" in value and "y" in value:
                yield item, value, str(labels[0])

    def answer(self, output: ImageMasks, request: Any) -> tuple[list[Region], float]:
        """Masks (honouring a person's clicks when interactive), else masks and suggested points; entropy score.

        ``request`` is the bridge's ``HeadRequest``: its ``context`` (interactive clicks) and ``session``
        (``mask_threshold``).
        """
        classes = output.model.classes
        session = getattr(request, "session", None)
        threshold = session.mask_threshold if session is not None else DEFAULT_THRESHOLD
        interactive = bool(getattr(request, "context", ()))
        full = upsample(output.probs, output.width, output.height)
        clicked: dict[str, tuple[Click, ...]] = {}
        if interactive and self.keypoints is not None:
            clicked = clicks_from_context(request.context, self, classes, output.width, output.height)
        radius = max(1, round(CLICK_RADIUS * min(output.width, output.height)))
        results: list[Region] = []
        for k, name in enumerate(classes):
            label = self.brush_label(name, classes)
            if self.brush is None or label is None:
                continue
            mask = full[k] >= threshold
            if clicked.get(name):
                mask = honour_clicks(mask, clicked[name], radius)
            if not mask.any() and not interactive:
                continue
            score = float(full[k][mask].mean()) if mask.any() else 0.0
            results.append(BrushRegion.model_validate(brush_result(self.brush.name, self.to_name, label, mask, score)))
        if not interactive and self.keypoints is not None:
            results += self._suggested(output, classes)
        return results, entropy_score(output.probs)

    def _suggested(self, output: ImageMasks, classes: Sequence[str]) -> list[Region]:
        """§7's suggested points, picked on the maps at most ``POINT_MAP_SIDE`` px long, placed in image pixels."""
        width, height = output.width, output.height
        scale = min(1.0, POINT_MAP_SIDE / max(width, height))
        small = upsample(output.probs, max(1, round(width * scale)), max(1, round(height * scale)))
        name = str(self.keypoint_name)
        picked: list[tuple[str, SuggestedPoint]] = []
        for k, cls in enumerate(classes):
            label = self.keypoint_label(cls, classes)
            if label is not None:
                picked += [(label, p) for p in suggest_points(small[k], image_size=(width, height)) if p.positive]
        if self.background is not None:
            anything = small.max(axis=0)
            picked += [
                (self.background, p) for p in suggest_points(anything, image_size=(width, height)) if not p.positive
            ]
        return [
            KeyPointRegion.model_validate(keypoint_result(name, self.to_name, label, p.x, p.y, width, height, p.score))
            for label, p in picked
        ]

    def is_background(self, label: str) -> bool:
        """Whether a point label (stored name or value) is the background label."""
        if self.keypoints is None or self.background is None:
            return False
        if label.casefold() == BACKGROUND:
            return True
        return any(label in (lab.name, lab.value) for lab in self.keypoints.labels if lab.name == self.background)


def _skipped(control: ConfigControl) -> bool:
    if control.attrs.get("model_skip", "").strip().lower() in _TRUE:
        logger.info("%s: model_skip is set; not pre-labelled", control.name)
        return True
    return False


def _background_label(control: ConfigControl | None) -> str | None:
    if control is None:
        return None
    for label in control.labels:
        if BACKGROUND in (label.value.casefold(), label.name.casefold()):
            return label.name
    return None


def segment_controls(config: str) -> tuple[SegmentControls, ...]:
    """Per ``<Image>`` with a task field, its ``BrushLabels`` and ``KeyPointLabels`` (config order, paired).

    Several controls of one kind on one image pair up in order; a missing partner is None.
    ``model_skip="true"`` controls are left out, as for boxes and choices.
    """
    parsed = parse_label_config(config)
    by_image: dict[str, tuple[str, list[ConfigControl], list[ConfigControl]]] = {}
    for control in parsed.controls_of((BRUSH_LABELS, KEYPOINT_LABELS)):
        if _skipped(control):
            continue
        for obj in control.objects:
            if obj.tag != IMAGE or obj.value_key is None:
                continue
            _, brushes, points = by_image.setdefault(obj.name, (obj.value_key, [], []))
            (brushes if control.tag == BRUSH_LABELS else points).append(control)
    found = []
    for to_name, (value_key, brushes, points) in by_image.items():
        for brush, keypoints in zip_longest(brushes, points):
            found.append(SegmentControls(to_name, value_key, brush, keypoints, _background_label(keypoints)))
    return tuple(found)


@dataclass(frozen=True)
class SuggestedPoint:
    """A point to suggest: continuous pixel coordinates, foreground or not, and how sure the model is.

    ``score`` is the confidence (p for foreground, 1 - p for background); ``importance`` is what
    picked it (confidence + 2 x Sobel gradient magnitude: sure pixels near the edge teach most).
    """

    x: float
    y: float
    positive: bool
    score: float
    importance: float


def sobel_magnitude(image: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """The 3x3 Sobel gradient magnitude (unnormalised, as OpenCV's and SciPy's), edges mirrored."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {a.shape}")
    p = np.pad(a, 1, mode="reflect" if min(a.shape) > 1 else "edge")
    # separable: smooth [1, 2, 1] one way, difference [-1, 0, 1] the other (in place: maps are large)
    rows = p[1:-1] * 2
    rows += p[:-2]
    rows += p[2:]
    cols = p[:, 1:-1] * 2
    cols += p[:, :-2]
    cols += p[:, 2:]
    gx = rows[:, 2:] - rows[:, :-2]
    gy = cols[2:] - cols[:-2]
    gx *= gx
    gy *= gy
    gx += gy
    magnitude: npt.NDArray[np.float32] = np.sqrt(gx, out=gx)
    return magnitude


def suggest_points(
    prob: npt.ArrayLike,
    max_points: int = 250,
    min_distance: float = 3.0,
    fg: float = 0.85,
    bg: float = 0.15,
    image_size: tuple[int, int] | None = None,
) -> list[SuggestedPoint]:
    """Confident, spread-out points of one class's probability map, most important first (FIELD-NOTES §7).

    Candidates are pixels with ``p > fg`` (positive) or ``p < bg`` (negative); importance is
    confidence + 2 x the map's Sobel gradient magnitude. Points are picked greedily by importance,
    at most ``max_points`` per side, each at least ``min_distance`` from every point already
    picked (either side). ``image_size=(width, height)`` of the original image when ``prob`` is
    a downscaled map: points and ``min_distance`` are then in original pixels (a map cell's
    centre); without it, in the map's pixels.
    """
    p = np.asarray(prob, dtype=np.float32)
    if p.ndim != 2:
        raise ValueError(f"expected a (height, width) probability map, got shape {p.shape}")
    h, w = p.shape
    if max_points <= 0 or p.size == 0:
        return []
    if not np.isfinite(p).all():
        p = np.where(np.isfinite(p), p, np.float32(0.5))  # undecided: neither side, no false edge
    width, height = image_size if image_size is not None else (w, h)
    sx, sy = width / w, height / h
    # importance over the whole map, -inf where no candidate: one argpartition ranks both sides
    importance = sobel_magnitude(p).ravel()
    importance *= 2.0
    flat = p.ravel()
    positive = flat > fg
    candidate = positive | (flat < bg)
    confidence = np.where(positive, flat, 1.0 - flat)
    importance += confidence
    importance[~candidate] = -np.inf
    left = int(np.count_nonzero(candidate))
    if not left:
        return []

    quota = {True: max_points, False: max_points}
    # Spacing on the map: a cell is blocked once its centre lies closer than min_distance (original
    # pixels) to a picked centre. Candidates are cell centres, so the test is exact, and O(1).
    flags = bytearray(h * w)  # indexed from Python per candidate; numpy writes it through ``blocked``
    blocked = np.frombuffer(flags, dtype=np.uint8)
    stamp = _Stencil(min_distance, sx, sy)
    picked: list[SuggestedPoint] = []

    def take(chunk: npt.NDArray[np.intp]) -> None:
        """Greedy pass over candidates in importance order: keep those far enough from every pick."""
        rows, cols = np.divmod(chunk, w)
        xs = ((cols + 0.5) * sx).tolist()
        ys = ((rows + 0.5) * sy).tolist()
        for c, x, y, pos in zip(chunk.tolist(), xs, ys, positive[chunk].tolist(), strict=True):
            if not quota[pos] or flags[c]:
                continue
            picked.append(SuggestedPoint(x, y, pos, float(confidence[c]), float(importance[c])))
            quota[pos] -= 1
            stamp.block(blocked.reshape(h, w), c // w, c % w)

    # The usual case: the most important chunk holds enough well-spaced points.
    if left > _CHUNK:
        first = np.argpartition(importance, importance.size - _CHUNK)[-_CHUNK:]
    else:
        first = np.flatnonzero(candidate)
    take(first[np.argsort(-importance[first])])
    if first.size == left or not (quota[True] or quota[False]):
        return picked
    # Spacing wide for the map: rank the rest once and go on in chunks, dropping blocked cells and
    # full sides in numpy first, so Python sees few candidates.
    importance[first] = -np.inf
    rest = np.flatnonzero(importance > -np.inf)
    rest = rest[np.argsort(-importance[rest])]
    for start in range(0, rest.size, _CHUNK):
        chunk = rest[start : start + _CHUNK]
        open_side = np.array([quota[False] > 0, quota[True] > 0])[positive[chunk].astype(np.intp)]
        chunk = chunk[(blocked[chunk] == 0) & open_side]
        if chunk.size:
            take(chunk)
        if not (quota[True] or quota[False]):
            break
    return picked


class _Stencil:
    """The map cells closer than ``d`` original pixels to a cell, as a boolean window to stamp."""

    def __init__(self, d: float, sx: float, sy: float) -> None:
        self.ry, self.rx = (math.ceil(d / sy), math.ceil(d / sx)) if d > 0 else (0, 0)
        dy, dx = np.ogrid[-self.ry : self.ry + 1, -self.rx : self.rx + 1]
        self.window = (dy * sy) ** 2 + (dx * sx) ** 2 < d * d if d > 0 else np.ones((1, 1), dtype=bool)

    def block(self, blocked: npt.NDArray[np.uint8], i: int, j: int) -> None:
        h, w = blocked.shape
        ry, rx = self.ry, self.rx
        i0, i1, j0, j1 = max(i - ry, 0), min(i + ry + 1, h), max(j - rx, 0), min(j + rx + 1, w)
        blocked[i0:i1, j0:j1] |= self.window[i0 - i + ry : i1 - i + ry, j0 - j + rx : j1 - j + rx]


@dataclass(frozen=True)
class Click:
    """A point a person placed, in continuous image pixels: inside the object (positive) or not."""

    x: float
    y: float
    positive: bool


def _pixel(value: float, size: int) -> int:
    return min(max(math.floor(value), 0), size - 1)


def honour_clicks(mask: npt.ArrayLike, clicks: Sequence[Click], radius: int) -> npt.NDArray[np.bool_]:
    """A copy of ``mask`` that agrees with every click: a disk of ``radius`` px set (positive) or cleared.

    Where disks of opposite clicks overlap, each pixel follows the nearest click (the earlier
    one on a tie), so every clicked pixel itself holds what its click says.
    """
    out = np.array(mask, dtype=bool, copy=True)
    if out.ndim != 2:
        raise ValueError(f"expected a (height, width) mask, got shape {out.shape}")
    h, w = out.shape
    if not clicks or out.size == 0:
        return out
    r = max(int(radius), 0)
    best = np.full(out.shape, np.inf, dtype=np.float32)
    value = np.zeros(out.shape, dtype=bool)
    for click in clicks:
        cx, cy = _pixel(click.x, w), _pixel(click.y, h)
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, h), max(cx - r, 0), min(cx + r + 1, w)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        d2 = ((yy - cy) ** 2 + (xx - cx) ** 2).astype(np.float32)
        window = best[y0:y1, x0:x1]
        closer = (d2 <= r * r) & (d2 < window)
        window[closer] = d2[closer]
        value[y0:y1, x0:x1][closer] = click.positive
    touched = np.isfinite(best)
    out[touched] = value[touched]
    return out


def _size(item: Mapping[str, Any], width: int | None, height: int | None) -> tuple[int, int]:
    if width is not None and height is not None:
        return width, height
    try:
        return int(item["original_width"]), int(item["original_height"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError("a context point has no original_width/original_height; pass the image size") from exc


def clicks_from_context(
    result: Sequence[Mapping[str, Any]],
    controls: SegmentControls,
    model_classes: Sequence[str],
    width: int | None = None,
    height: int | None = None,
) -> dict[str, tuple[Click, ...]]:
    """Per model class, the clicks in Label Studio's interactive ``params.context.result``, in image pixels.

    Only ``keypointlabels`` results of this ``KeyPointLabels`` control on this image count. A
    background point is a negative click for every class; a class's point is positive for it and
    negative for the others, except a point Label Studio marks ``"is_positive": false`` (a
    negative smart click), which says only "not this class". Labels no model class maps to are
    ignored. ``width``/``height``: the image the mask is made for (percent is scale-free, so the
    caller's size wins); without them the result's ``original_width/height``.
    """
    classes = list(dict.fromkeys(c for c in model_classes if not controls.is_background(c)))
    clicks: dict[str, list[Click]] = {c: [] for c in classes}
    label_map = controls.keypoint_map(classes)
    if label_map is None:
        return {c: () for c in classes}
    for item, value, label in controls.context_points(result):
        img_w, img_h = _size(item, width, height)
        x, y = float(value["x"]) * img_w / 100.0, float(value["y"]) * img_h / 100.0
        if controls.is_background(label):
            for name in classes:
                clicks[name].append(Click(x, y, positive=False))
            continue
        target = label_map.to_class.get(label)
        if target not in clicks:
            logger.info("%s: point label %r shows no model class; ignored", controls.keypoint_name, label)
            continue
        if item.get("is_positive", True) is False:
            clicks[target].append(Click(x, y, positive=False))
            continue
        for name in classes:
            clicks[name].append(Click(x, y, positive=name == target))
    return {name: tuple(found) for name, found in clicks.items()}


def _region_id(*parts: object) -> str:
    """A short id from the result's content: the same prediction keeps its ids, different results differ."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=5).hexdigest()


def brush_result(
    from_name: str,
    to_name: str,
    label: str,
    mask: npt.ArrayLike,
    score: float,
    region_id: str | None = None,
) -> dict[str, Any]:
    """One mask (H, W) as Label Studio's ``brushlabels`` result, RLE over the whole image."""
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"expected a (height, width) mask, got shape {array.shape}")
    height, width = array.shape
    rle = encode_mask(array)
    region = BrushRegion(
        id=region_id or _region_id("brush", from_name, to_name, label, width, height, rle),
        from_name=from_name,
        to_name=to_name,
        original_width=width,
        original_height=height,
        value=BrushValue(rle=rle, brushlabels=[label]),
        score=float(score),
    )
    return region.model_dump()


def keypoint_result(
    from_name: str,
    to_name: str,
    label: str,
    x_px: float,
    y_px: float,
    width: int,
    height: int,
    score: float,
    point_size_percent: float = 0.5,
    region_id: str | None = None,
) -> dict[str, Any]:
    """One point as Label Studio's ``keypointlabels`` result: position in percent, ``width`` its size in percent."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x = min(max(100.0 * x_px / width, 0.0), 100.0)
    y = min(max(100.0 * y_px / height, 0.0), 100.0)
    region = KeyPointRegion(
        id=region_id or _region_id("point", from_name, to_name, label, round(x, 6), round(y, 6)),
        from_name=from_name,
        to_name=to_name,
        original_width=width,
        original_height=height,
        value=KeyPointValue(x=x, y=y, width=point_size_percent, keypointlabels=[label]),
        score=float(score),
    )
    return region.model_dump()


controls = segment_controls
