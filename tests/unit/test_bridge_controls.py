"""Label configs become plans: every RectangleLabels->Image pair, thresholds, label maps, LS JSON."""

from __future__ import annotations

import logging

import pytest

from core.errors import ConfigError
from core.studio import DEFECT_LABEL_CONFIG as SEED_CONFIG
from ls_bridge.controls import RectangleLabelsModel, plan_for_config
from serving.client import Detection, ImageDetections, ModelInfo

CLASSES = ("dentado", "concave", "perforation")


def _detections(*boxes: tuple[str, float, float, float, float, float]) -> ImageDetections:
    return ImageDetections(
        width=200,
        height=100,
        model=ModelInfo("defect_detector", 3, list(CLASSES), [320, 320], "CPUExecutionProvider"),
        detections=[
            Detection(label=label, class_id=CLASSES.index(label), score=score, x1=x1, y1=y1, x2=x2, y2=y2)
            for label, score, x1, y1, x2, y2 in boxes
        ],
    )


def test_seed_config_gives_one_rectangle_control() -> None:
    plan = plan_for_config(SEED_CONFIG, CLASSES, 0.5)
    (control,) = plan.controls
    assert isinstance(control, RectangleLabelsModel)
    assert (control.from_name, control.to_name, control.value_key) == ("label", "image", "image")
    assert control.score_threshold == 0.25  # from the config, not the 0.5 default
    assert control.label_map == {c: c for c in CLASSES}
    assert plan.value_keys == ("image",)


def test_regions_are_label_studio_json_with_the_uncertainty_score() -> None:
    plan = plan_for_config(SEED_CONFIG, CLASSES, 0.25)
    regions, score = plan.format(
        {"image": _detections(("concave", 0.9, 20, 10, 60, 30), ("perforation", 0.5, 0, 0, 200, 100))}
    )
    first = regions[0].model_dump()
    assert first["from_name"] == "label" and first["to_name"] == "image"
    assert first["type"] == "rectanglelabels"
    assert (first["original_width"], first["original_height"], first["image_rotation"]) == (200, 100, 0)
    assert first["value"].pop("rectanglelabels") == ["concave"]
    assert first["value"] == pytest.approx({"x": 10.0, "y": 10.0, "width": 20.0, "height": 20.0, "rotation": 0.0})
    assert first["score"] == 0.9
    assert regions[1].value.rectanglelabels == ["perforation"]
    # the least sure decision: 0.5 is a third of the way from the 0.25 threshold to 1
    assert score == pytest.approx((0.5 - 0.25) / 0.75)
    assert len({r.id for r in regions}) == 2


def test_boxes_below_the_control_threshold_are_dropped() -> None:
    config = SEED_CONFIG.replace('model_score_threshold="0.25"', 'model_score_threshold="0.6"')
    plan = plan_for_config(config, CLASSES, 0.25)
    assert plan.request_threshold == 0.3  # boxes it nearly drew count for the score
    regions, score = plan.format({"image": _detections(("concave", 0.59, 0, 0, 10, 10), ("dentado", 0.8, 0, 0, 5, 5))})
    assert [r.value.rectanglelabels for r in regions] == [["dentado"]]
    assert score == pytest.approx(0.01 / 0.6)  # the dropped 0.59 box was a near coin toss


def _score(*boxes: tuple[str, float]) -> float:
    plan = plan_for_config(SEED_CONFIG, CLASSES, 0.25)
    return plan.format({"image": _detections(*[(label, p, 0, 0, 10, 10) for label, p in boxes])})[1]


def test_the_score_is_the_least_sure_decision_lower_first() -> None:
    """Lower is more informative: Label Studio's Data Manager sorted ascending is the labelling queue."""
    assert _score() == 1.0  # nothing there, and no doubt about it
    assert _score(("concave", 0.1)) == 1.0  # under half the threshold: not a decision
    # drawn boxes: the more confident, the higher the score; on the threshold, 0
    drawn = [_score(("concave", p)) for p in (0.25, 0.3, 0.5, 0.7, 0.9, 1.0)]
    assert drawn == sorted(drawn) and drawn[0] == 0.0 and drawn[-1] == 1.0 and len(set(drawn)) == len(drawn)
    # boxes it nearly drew: the closer to the threshold, the lower; an empty-looking but busy image sorts first
    near = [_score(("concave", p)) for p in (0.24, 0.2, 0.15, 0.125)]
    assert near == sorted(near) and near[-1] == pytest.approx(0.5)
    assert _score(("concave", 0.2), ("dentado", 0.2)) < _score(("concave", 0.95)) < _score()
    # one unsure box makes the whole task unsure
    assert _score(("concave", 0.95), ("perforation", 0.3)) == _score(("perforation", 0.3))
    # a class with no label in the config is never drawn, so it is no decision either
    config = SEED_CONFIG.replace('<Label value="perforation" background="#FFC069"/>', "")
    plan = plan_for_config(config, CLASSES, 0.25)
    assert plan.format({"image": _detections(("perforation", 0.3, 0, 0, 10, 10))})[1] == 1.0


def test_labels_are_mapped_by_the_shared_label_map(caplog: pytest.LogCaptureFixture) -> None:
    """predicted_values, aliases and case come from core.labelmap; the gaps are logged here, once each."""
    config = """<View><Image name="image" value="$image"/>
      <RectangleLabels name="label" toName="image">
        <Label value="Dent" predicted_values="dent, dentado"/>
        <Label value="Concavity" alias="C" predicted_values="concave"/>
        <Label value="PERFORATION"/>
      </RectangleLabels></View>"""
    with caplog.at_level(logging.WARNING):
        plan = plan_for_config(config, (*CLASSES, "scratch"), 0.25)
    assert plan.controls[0].label_map == {"dentado": "Dent", "concave": "C", "perforation": "PERFORATION"}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "predicted_values 'dent'" in messages[0] and "'scratch' has no label" in messages[1]
    regions, _ = plan.format({"image": _detections(("concave", 0.9, 0, 0, 10, 10), ("dentado", 0.8, 0, 0, 10, 10))})
    assert [r.value.rectanglelabels for r in regions] == [["C"], ["Dent"]], "an alias is what Label Studio stores"


def test_each_unmapped_class_is_logged_once_per_config(caplog: pytest.LogCaptureFixture) -> None:
    config = SEED_CONFIG.replace('<Label value="perforation" background="#FFC069"/>', "")
    classes = (*CLASSES[:2], "perforation")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            plan_for_config(config + " ", classes, 0.25)
    assert sum("'perforation'" in r.getMessage() for r in caplog.records) == 1
    regions, _ = plan_for_config(config + " ", classes, 0.25).format(
        {"image": _detections(("perforation", 0.9, 0, 0, 10, 10), ("dentado", 0.9, 0, 0, 10, 10))}
    )
    assert [r.value.rectanglelabels for r in regions] == [["dentado"]]


def test_every_rectangle_image_pair_is_planned() -> None:
    config = """
    <View>
      <Image name="front" value="$front"/>
      <Image name="back" value="$back"/>
      <RectangleLabels name="defects" toName="front,back"><Label value="dentado"/></RectangleLabels>
      <RectangleLabels name="holes" toName="back" model_score_threshold="0.4">
        <Label value="Perforation"/>
      </RectangleLabels>
      <RectangleLabels name="ignored" toName="front" model_skip="true"><Label value="concave"/></RectangleLabels>
      <Choices name="quality" toName="front"><Choice value="ok"/></Choices>
    </View>
    """
    plan = plan_for_config(config, CLASSES, 0.25)
    pairs = [(c.from_name, c.to_name, c.value_key, c.score_threshold) for c in plan.controls]
    assert pairs == [
        ("defects", "front", "front", 0.25),
        ("defects", "back", "back", 0.25),
        ("holes", "back", "back", 0.4),
    ]
    assert plan.value_keys == ("front", "back")
    regions, _ = plan.format(
        {
            "front": _detections(("dentado", 0.9, 0, 0, 10, 10)),
            "back": _detections(("perforation", 0.5, 0, 0, 10, 10), ("dentado", 0.3, 0, 0, 10, 10)),
        }
    )
    assert [(r.from_name, r.to_name, r.value.rectanglelabels[0]) for r in regions] == [
        ("defects", "front", "dentado"),
        ("defects", "back", "dentado"),
        ("holes", "back", "Perforation"),
    ]


def test_config_without_rectangles_is_a_clear_config_error() -> None:
    config = (
        '<View><Image name="image" value="$image"/>'
        '<Choices name="c" toName="image"><Choice value="a"/></Choices></View>'
    )
    with pytest.raises(ConfigError, match=r"nothing to pre-label.*RectangleLabels -> Image.*Choices 'c' -> image"):
        plan_for_config(config, CLASSES, 0.25)


def test_config_whose_labels_match_no_class_names_both_sets() -> None:
    config = SEED_CONFIG.replace('"dentado"', '"cat"').replace('"concave"', '"dog"').replace('"perforation"', '"bird"')
    with pytest.raises(ConfigError) as info:
        plan_for_config(config, CLASSES, 0.25)
    message = str(info.value)
    assert "dentado, concave, perforation" in message and "bird, cat, dog" in message
    assert "predicted_values" in message


@pytest.mark.parametrize("config", ["", "<View><Image", "not xml"])
def test_unparsable_config_is_a_config_error(config: str) -> None:
    with pytest.raises(ConfigError, match="cannot be parsed"):
        plan_for_config(config, CLASSES, 0.25)


def test_bad_threshold_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model_score_threshold='high'"):
        plan_for_config(SEED_CONFIG.replace('"0.25"', '"high"'), CLASSES, 0.25)


def test_a_plan_for_other_classes_maps_labels_by_the_new_names() -> None:
    plan = plan_for_config(SEED_CONFIG, CLASSES, 0.25)
    assert plan.for_classes(CLASSES) is plan
    reordered = plan.for_classes(("perforation", "dentado", "concave"))
    assert reordered.controls[0].label_map == {c: c for c in CLASSES}
    assert reordered.model_classes == ("perforation", "dentado", "concave")
    with pytest.raises(ConfigError, match="no model class matches"):
        plan.for_classes(("scratch",))
