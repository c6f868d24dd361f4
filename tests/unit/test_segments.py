"""Segmenter results for Label Studio: controls, suggested points, clicks, masks and points as LS JSON."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from core.brush_rle import decode_mask
from core.uncertainty import entropy_score
from ls_bridge.segments import (
    Click,
    SegmentControls,
    brush_result,
    clicks_from_context,
    honour_clicks,
    keypoint_result,
    segment_controls,
    sobel_magnitude,
    suggest_points,
)

CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<KeyPointLabels name="points" toName="image" smart="true">'
    '<Label value="defect" background="#e6194b"/><Label value="background" background="#888888"/>'
    "</KeyPointLabels>"
    '<BrushLabels name="mask" toName="image"><Label value="defect" background="#e6194b"/></BrushLabels>'
    "</View>"
)

# Other names, two classes, an alias, predicted_values, a differently cased background label.
TWO_CLASSES = """<View>
  <Image name="photo" value="$img"/>
  <BrushLabels name="seg" toName="photo">
    <Label value="Crack" alias="C"/>
    <Label value="Rust spot" predicted_values="rust"/>
  </BrushLabels>
  <KeyPointLabels name="clicks" toName="photo" smart="true">
    <Label value="crack"/>
    <Label value="Rust spot" predicted_values="rust"/>
    <Label value="Background"/>
  </KeyPointLabels>
  <Choices name="quality" toName="photo"><Choice value="ok"/></Choices>
</View>"""
CLASSES = ("crack", "rust")


def _only(config: str) -> SegmentControls:
    (controls,) = segment_controls(config)
    return controls


# --- controls ---------------------------------------------------------------------------------


def test_config_with_brush_and_points() -> None:
    controls = _only(CONFIG)
    assert (controls.to_name, controls.value_key) == ("image", "image")
    assert (controls.brush_name, controls.keypoint_name, controls.background) == ("mask", "points", "background")
    assert controls.brush_label("defect", ["defect"]) == "defect"
    assert controls.keypoint_label("defect", ["defect"]) == "defect"
    assert controls.is_background("background") and controls.is_background("BACKGROUND")
    assert not controls.is_background("defect")


def test_config_with_other_names_and_two_classes() -> None:
    controls = _only(TWO_CLASSES)
    assert (controls.to_name, controls.value_key, controls.brush_name, controls.keypoint_name) == (
        "photo",
        "img",
        "seg",
        "clicks",
    )
    assert controls.background == "Background"
    assert [controls.brush_label(c, CLASSES) for c in CLASSES] == ["C", "Rust spot"]
    assert [controls.keypoint_label(c, CLASSES) for c in CLASSES] == ["crack", "Rust spot"]
    point_map = controls.keypoint_map(CLASSES)
    assert point_map is not None and "Background" not in point_map.to_label.values()


def test_brush_only_and_points_only_configs() -> None:
    brush = _only(
        '<View><Image name="i" value="$x"/><BrushLabels name="b" toName="i"><Label value="a"/></BrushLabels></View>'
    )
    assert brush.keypoints is None and brush.keypoint_map(["a"]) is None and brush.background is None
    assert brush.brush_label("a", ["a"]) == "a"
    assert clicks_from_context([], brush, ["a"]) == {"a": ()}
    points = _only(
        '<View><Image name="i" value="$x"/><KeyPointLabels name="k" toName="i">'
        '<Label value="a"/><Label value="BackGround"/></KeyPointLabels></View>'
    )
    assert points.brush is None and points.brush_label("a", ["a"]) is None
    assert points.keypoint_label("a", ["a"]) == "a" and points.background == "BackGround"


def test_configs_without_segment_controls_or_skipped() -> None:
    assert segment_controls('<View><Image name="i" value="$x"/><Choices name="c" toName="i"/></View>') == ()
    skipped = CONFIG.replace('<BrushLabels name="mask"', '<BrushLabels model_skip="true" name="mask"')
    controls = _only(skipped)
    assert controls.brush is None and controls.keypoint_name == "points"


# --- suggested points -----------------------------------------------------------------------------


def _disk_map(h: int, w: int, cy: float, cx: float, r: float, soft: float = 4.0) -> np.ndarray:
    yy, xx = np.ogrid[:h, :w]
    return (1.0 / (1.0 + np.exp(-(r - np.hypot(yy - cy, xx - cx)) / soft))).astype(np.float32)


def _min_spacing(points: list) -> float:
    xy = np.array([(p.x, p.y) for p in points])
    d = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
    np.fill_diagonal(d, np.inf)
    return float(d.min())


def test_suggested_points_hold_every_rule() -> None:
    prob = _disk_map(120, 160, 60, 70, 35)
    points = suggest_points(prob, max_points=40, min_distance=5.0)
    pos = [p for p in points if p.positive]
    neg = [p for p in points if not p.positive]
    assert len(pos) == 40 and len(neg) == 40
    for p in points:
        assert 0 <= p.x < 160 and 0 <= p.y < 120
        value = prob[int(p.y), int(p.x)]
        assert (value > 0.85) if p.positive else (value < 0.15)
        assert 0.0 <= p.score <= 1.0
        assert p.score == pytest.approx(value if p.positive else 1 - value, abs=1e-6)
    assert _min_spacing(points) >= 5.0
    for side in (pos, neg):
        importance = [p.importance for p in side]
        assert importance == sorted(importance, reverse=True)


def test_importance_is_confidence_plus_twice_the_sobel_edge() -> None:
    prob = _disk_map(64, 64, 32, 32, 16, soft=2.0)
    edge = sobel_magnitude(prob)
    points = suggest_points(prob, max_points=5, min_distance=2.0)
    for p in points:
        i, j = int(p.y), int(p.x)
        assert p.importance == pytest.approx(p.score + 2 * edge[i, j], rel=1e-5)
    # the most important candidate of each side comes first
    conf = np.where(prob > 0.85, prob, np.where(prob < 0.15, 1 - prob, -np.inf))
    importance = conf + 2 * edge
    best_fg = importance[prob > 0.85].max()
    first_fg = next(p for p in points if p.positive)
    assert first_fg.importance == pytest.approx(best_fg, rel=1e-5)


def test_sobel_matches_the_textbook_kernel() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((9, 11)).astype(np.float32)
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float32)
    padded = np.pad(a, 1, mode="reflect")
    gx = np.zeros_like(a)
    gy = np.zeros_like(a)
    for i in range(9):
        for j in range(11):
            window = padded[i : i + 3, j : j + 3]
            gx[i, j] = (window * kx).sum()
            gy[i, j] = (window * kx.T).sum()
    assert np.allclose(sobel_magnitude(a), np.hypot(gx, gy), atol=1e-5)


def test_no_candidates_and_wide_spacing() -> None:
    assert suggest_points(np.full((20, 20), 0.5)) == []
    assert suggest_points(np.zeros((0, 0))) == []
    prob = _disk_map(100, 100, 50, 50, 30)
    wide = suggest_points(prob, max_points=250, min_distance=25.0)
    assert 0 < len(wide) < 40 and _min_spacing(wide) >= 25.0


def test_downscaled_map_gives_points_in_original_pixels() -> None:
    prob = _disk_map(64, 48, 32, 24, 14)  # a 480x640 image at a tenth
    points = suggest_points(prob, max_points=30, min_distance=12.0, image_size=(480, 640))
    assert points
    for p in points:
        assert 0 <= p.x < 480 and 0 <= p.y < 640
        value = prob[int(p.y / 10), int(p.x / 10)]
        assert (value > 0.85) if p.positive else (value < 0.15)
        assert (p.x / 10) % 1 == pytest.approx(0.5)  # a map cell's centre
    assert _min_spacing(points) >= 12.0


def test_suggest_points_is_fast_on_a_megapixel_map() -> None:
    prob = _disk_map(1000, 1000, 450, 500, 300, soft=20.0)
    suggest_points(prob)  # warm
    start = time.perf_counter()
    points = suggest_points(prob)
    elapsed = time.perf_counter() - start
    assert len(points) == 500 and _min_spacing(points) >= 3.0
    assert elapsed < 0.25, f"{elapsed:.3f} s"  # ~50 ms measured; slack for a shared CPU


# --- clicks ------------------------------------------------------------------------------------------


def test_honour_clicks_sets_and_clears_disks() -> None:
    mask = np.zeros((20, 20), dtype=bool)
    mask[10:, :] = True
    out = honour_clicks(mask, [Click(3.4, 3.9, True), Click(15.0, 15.0, False)], radius=2)
    assert out[3, 3] and out[1, 3] and out[3, 5] and not out[0, 0]
    assert not out[15, 15] and not out[13, 15] and out[18, 18]
    assert out.sum() == mask.sum() + 13 - 13  # a 13-pixel disk set, another cleared
    assert not mask[3, 3]  # the input is left alone


def test_overlapping_disks_keep_each_clicked_pixel() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    clicks = [Click(4.5, 4.5, True), Click(5.5, 4.5, False), Click(9.9, 9.9, True), Click(-3, 50, False)]
    out = honour_clicks(mask, clicks, radius=3)
    assert out[4, 4] and not out[4, 5] and out[9, 9] and not out[9, 0]
    assert out[4, 2] and not out[4, 8]  # beyond the overlap, each disk holds


CONTEXT: list[dict[str, Any]] = [
    {
        "original_width": 640,
        "original_height": 480,
        "image_rotation": 0,
        "value": {"x": 25.0, "y": 50.0, "width": 0.6666666666666666, "keypointlabels": ["crack"]},
        "is_positive": True,
        "id": "Q1w2E3r4T5",
        "from_name": "clicks",
        "to_name": "photo",
        "type": "keypointlabels",
        "origin": "manual",
    },
    {
        "original_width": 640,
        "original_height": 480,
        "image_rotation": 0,
        "value": {"x": 75.0, "y": 10.0, "width": 0.6666666666666666, "keypointlabels": ["Background"]},
        "is_positive": True,
        "id": "a9S8d7F6g5",
        "from_name": "clicks",
        "to_name": "photo",
        "type": "keypointlabels",
        "origin": "manual",
    },
    {  # alt-click: a negative smart point, "not rust here"
        "original_width": 640,
        "original_height": 480,
        "value": {"x": 50.0, "y": 50.0, "width": 0.67, "keypointlabels": ["Rust spot"]},
        "is_positive": False,
        "id": "z1X2c3V4b5",
        "from_name": "clicks",
        "to_name": "photo",
        "type": "keypointlabels",
    },
    {  # another control's region and a box: not clicks
        "value": {"x": 1.0, "y": 1.0, "width": 5.0, "height": 5.0, "rectanglelabels": ["crack"]},
        "from_name": "boxes",
        "to_name": "photo",
        "type": "rectanglelabels",
    },
]


def test_clicks_from_a_label_studio_context() -> None:
    clicks = clicks_from_context(CONTEXT, _only(TWO_CLASSES), CLASSES)
    assert clicks == {
        "crack": (Click(160.0, 240.0, True), Click(480.0, 48.0, False)),
        "rust": (Click(160.0, 240.0, False), Click(480.0, 48.0, False), Click(320.0, 240.0, False)),
    }


def test_clicks_take_the_callers_size_when_label_studio_sends_none() -> None:
    items = [{k: v for k, v in CONTEXT[0].items() if k not in ("original_width", "original_height")}]
    clicks = clicks_from_context(items, _only(TWO_CLASSES), CLASSES, width=200, height=100)
    assert clicks["crack"] == (Click(50.0, 50.0, True),)
    with pytest.raises(ValueError, match="image size"):
        clicks_from_context(items, _only(TWO_CLASSES), CLASSES)


def test_clicks_with_the_task_config() -> None:
    context = [
        dict(
            CONTEXT[0], from_name="points", to_name="image", value=dict(CONTEXT[0]["value"], keypointlabels=["defect"])
        )
    ]
    assert clicks_from_context(context, _only(CONFIG), ["defect"]) == {"defect": (Click(160.0, 240.0, True),)}


# --- results ----------------------------------------------------------------------------------------


def test_brush_result_is_label_studio_json() -> None:
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:12, 8:30] = True
    result = brush_result("seg", "photo", "C", mask, 0.8125)
    assert set(result) == {
        "id",
        "from_name",
        "to_name",
        "type",
        "original_width",
        "original_height",
        "image_rotation",
        "value",
        "score",
    }
    assert (result["type"], result["original_width"], result["original_height"]) == ("brushlabels", 40, 30)
    assert result["image_rotation"] == 0 and result["score"] == 0.8125
    assert result["value"]["format"] == "rle" and result["value"]["brushlabels"] == ["C"]
    assert (decode_mask(result["value"]["rle"], 40, 30) == mask).all()
    assert isinstance(result["id"], str) and 0 < len(result["id"]) <= 12


def test_keypoint_result_is_label_studio_json() -> None:
    result = keypoint_result("clicks", "photo", "crack", 160.0, 120.0, 640, 480, 0.93, point_size_percent=0.7)
    assert result["type"] == "keypointlabels"
    assert (result["original_width"], result["original_height"], result["image_rotation"]) == (640, 480, 0)
    assert result["value"] == {"x": 25.0, "y": 25.0, "width": 0.7, "keypointlabels": ["crack"]}
    assert result["score"] == 0.93


def test_result_ids_are_stable_and_unique() -> None:
    points = suggest_points(_disk_map(50, 50, 25, 25, 12), max_points=20)
    results = [keypoint_result("k", "i", "a", p.x, p.y, 50, 50, p.score) for p in points]
    mask = np.eye(50, dtype=bool)
    results += [brush_result("b", "i", "a", mask, 0.5), brush_result("b", "i", "c", mask, 0.5)]
    ids = [r["id"] for r in results]
    assert len(set(ids)) == len(ids)
    again = keypoint_result("k", "i", "a", points[0].x, points[0].y, 50, 50, points[0].score)
    assert again["id"] == results[0]["id"]


# --- entropy score -----------------------------------------------------------------------------------


def test_entropy_score_is_lower_nearer_a_coin_toss() -> None:
    scores = [entropy_score(np.full((2, 8, 8), p)) for p in (0.5, 0.6, 0.75, 0.9, 0.99, 1.0)]
    assert scores == sorted(scores) and len(set(scores)) == len(scores)
    assert scores[0] == pytest.approx(0.0) and scores[-1] == pytest.approx(1.0, abs=1e-4)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert entropy_score(np.full((1, 4, 4), 0.2)) == pytest.approx(entropy_score(np.full((1, 4, 4), 0.8)))
    mixed = np.stack([np.full((4, 4), 0.99), np.full((4, 4), 0.5)])
    assert entropy_score(mixed) == pytest.approx((scores[4] + scores[0]) / 2)
    assert entropy_score(np.zeros((0, 4, 4))) == 1.0


def _masks(probs: np.ndarray, width: int = 64, height: int = 48, classes: tuple[str, ...] = ("defect",)) -> Any:
    from serving.client import ModelInfo
    from serving.heads import ImageMasks

    info = ModelInfo(name="seg", version=3, classes=list(classes), imgsz=[448], provider="cpu")
    return ImageMasks(probs=probs.astype(np.float32), width=width, height=height, model=info)


def _grid() -> np.ndarray:
    """A 6 x 8 map: a confident defect in the middle, confident background around it."""
    probs = np.full((1, 6, 8), 0.02, np.float32)
    probs[0, 2:4, 3:5] = 0.97
    return probs


def test_a_segmenter_answer_is_masks_then_suggested_points_with_the_entropy_score() -> None:
    from ls_bridge.heads import HeadRequest

    (control,) = segment_controls(CONFIG)
    assert control.serves(["defect"]) and not control.serves(["crack"])
    output = _masks(_grid())
    results, score = control.answer(output, HeadRequest())
    kinds = [r.type for r in results]
    assert kinds[0] == "brushlabels" and set(kinds[1:]) == {"keypointlabels"}
    mask = decode_mask(results[0].value.rle, 64, 48)
    assert mask[20, 32] and not mask[2, 2]  # the middle is the defect, the corner is not
    labels = {r.value.keypointlabels[0] for r in results[1:]}
    assert labels == {"defect", "background"}
    assert score == pytest.approx(entropy_score(output.probs))
    # A class no brush label shows gives no mask; an empty map no mask either (outside interactive calls).
    empty, _ = control.answer(_masks(np.zeros((1, 6, 8))), HeadRequest())
    assert [r.type for r in empty if r.type == "brushlabels"] == []


def test_interactive_answers_honour_every_click_and_carry_no_suggested_points() -> None:
    from ls_bridge.heads import HeadRequest

    (control,) = segment_controls(CONFIG)

    def point(x: float, y: float, label: str) -> dict[str, Any]:
        value = {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]}
        return {"type": "keypointlabels", "from_name": "points", "to_name": "image", "value": value}

    # A foreground click far outside the predicted blob, a background click inside it.
    context = [point(5.0, 5.0, "defect"), point(50.0, 50.0, "background")]
    assert control.clicks(context, ["defect"]) == [(0.05, 0.05, 0), (0.5, 0.5, -1)]
    results, _ = control.answer(_masks(_grid()), HeadRequest(context=context))
    assert [r.type for r in results] == ["brushlabels"]
    mask = decode_mask(results[0].value.rle, 64, 48)
    assert mask[int(0.05 * 48), int(0.05 * 64)] and not mask[24, 32]
