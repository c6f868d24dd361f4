"""One label map for both sides: what the bridge writes for class X trains class X again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from core.errors import ConfigError
from core.labelmap import RECTANGLE_LABELS, ConfigControl, map_labels, parse_label_config
from core.settings import Settings
from ls_bridge.controls import plan_for_config
from serving.client import Detection, ImageDetections, ModelInfo
from trainer.dataset import LabelledImage, build_dataset, labels_from_tasks
from trainer.source import ExportSource

CLASSES = ("dentado", "concave", "perforation")

# Every way a config can name a model class: predicted_values (two classes on one label, one the
# model lacks), an alias that differs from the value, a value differing only in case.
MAPPED = """<View>
  <Image name="image" value="$img"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Hole" alias="H" predicted_values="perforation"/>
    <Label value="Dent" predicted_values="scratch, dentado"/>
    <Label value="CONCAVE"/>
    <Label value="Crack" predicted_values="crack"/>
    <Label value="Other"/>
  </RectangleLabels>
</View>"""


def _control(config: str = MAPPED) -> ConfigControl:
    (control,) = parse_label_config(config).controls_of({RECTANGLE_LABELS})
    return control


def test_the_parser_reads_controls_objects_and_labels() -> None:
    parsed = parse_label_config(MAPPED)
    (image,) = parsed.objects
    assert (image.tag, image.name, image.value_key) == ("Image", "image", "img")
    control = _control()
    assert (control.tag, control.name, control.to_names) == ("RectangleLabels", "label", ("image",))
    assert control.objects == (image,)
    hole = control.labels[0]
    assert (hole.value, hole.alias, hole.name, hole.predicted_values) == ("Hole", "H", "H", ("perforation",))
    assert control.labels[1].predicted_values == ("scratch", "dentado")
    assert [label.name for label in control.labels] == ["H", "Dent", "CONCAVE", "Crack", "Other"]


@pytest.mark.parametrize("config", ["", "<View><Image", "not xml"])
def test_a_config_that_does_not_parse_is_a_config_error(config: str) -> None:
    with pytest.raises(ConfigError, match="cannot be parsed"):
        parse_label_config(config)


def test_model_class_to_label_prefers_predicted_values_then_exact_then_case() -> None:
    config = """<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i">
      <Label value="Dent" predicted_values="dentado"/><Label value="dentado"/>
      <Label value="concave"/><Label value="Concave"/><Label value="Perforation"/>
    </RectangleLabels></View>"""
    label_map = map_labels(_control(config), (*CLASSES, "scratch"))
    assert label_map.to_label == {"dentado": "Dent", "concave": "concave", "perforation": "Perforation"}
    assert label_map.unlabelled == ("scratch",)
    assert label_map.label_for("scratch") is None


def test_an_alias_or_a_value_names_a_class() -> None:
    config = """<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i">
      <Label value="Dentado (dent)" alias="dentado"/><Label value="concave" alias="cc"/>
    </RectangleLabels></View>"""
    label_map = map_labels(_control(config), CLASSES)
    assert label_map.to_label == {"dentado": "dentado", "concave": "cc"}, "regions carry what Label Studio stores"
    assert [label_map.class_for(x) for x in ("dentado", "Dentado (dent)", "cc", "concave")] == [
        "dentado",
        "dentado",
        "concave",
        "concave",
    ]


def test_both_ways_with_a_served_model() -> None:
    label_map = map_labels(_control(), CLASSES)
    assert label_map.to_label == {"perforation": "H", "dentado": "Dent", "concave": "CONCAVE"}
    assert label_map.unknown_predicted == (("Dent", "scratch"), ("Crack", "crack"))
    for model_class, label in label_map.to_label.items():
        assert label_map.class_for(label) == model_class, f"{label} must train {model_class}"
    assert label_map.class_for("Hole") == "perforation", "Label Studio also finds a label by its value"
    assert label_map.class_for("Crack") == "crack", "a class the model lacks is named as predicted_values says"
    assert label_map.class_for("Other") == "Other"
    assert label_map.class_for("not in the config") == "not in the config"
    assert label_map.classes == ("perforation", "dentado", "concave", "crack", "Other")


def test_a_label_showing_two_classes_trains_the_first_it_lists() -> None:
    config = """<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i">
      <Label value="Defect" predicted_values="perforation,dentado"/>
    </RectangleLabels></View>"""
    label_map = map_labels(_control(config), CLASSES)
    assert label_map.to_label == {"perforation": "Defect", "dentado": "Defect"}
    assert label_map.class_for("Defect") == "perforation"


def test_with_nothing_served_the_config_names_the_first_models_classes() -> None:
    first = map_labels(_control(), ())
    assert first.classes == ("perforation", "scratch", "CONCAVE", "crack", "Other")
    served = map_labels(_control(), first.classes)
    assert {label: served.class_for(label) for label in ("H", "Dent", "CONCAVE", "Crack", "Other")} == {
        "H": "perforation",
        "Dent": "scratch",
        "CONCAVE": "CONCAVE",
        "Crack": "crack",
        "Other": "Other",
    }
    assert {served.label_for(c) for c in first.classes} == {"H", "Dent", "CONCAVE", "Crack", "Other"}


# --- the round trip: bridge regions -> annotation -> training dataset ----------------------------------------


def _png(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (100, 200, 3), dtype=np.uint8), "RGB").save(path, "PNG")
    return path


def _detections(model_class: str, score: float = 0.9) -> ImageDetections:
    return ImageDetections(
        width=200,
        height=100,
        model=ModelInfo("defect_detector", 1, list(CLASSES), [320, 320], "CPUExecutionProvider"),
        detections=[Detection(model_class, CLASSES.index(model_class), score, 20.0, 10.0, 60.0, 50.0)],
    )


def test_round_trip_bridge_regions_train_the_served_models_classes(tmp_path: Path) -> None:
    """Regions the bridge writes for class X carry label L; kept as annotations, they train class X."""
    plan = plan_for_config(MAPPED, CLASSES, 0.25)
    tasks = []
    images = {}
    for i in range(12):
        model_class = CLASSES[i % 3]
        regions, _ = plan.format({"img": _detections(model_class)})
        tasks.append(
            {
                "id": i + 1,
                "data": {"img": f"/data/upload/1/{i}.png"},
                "annotations": [{"id": 100 + i, "result": [r.model_dump() for r in regions]}],
            }
        )
        images[i + 1] = _png(tmp_path / "images" / f"{i}.png", i)
    labels_written = {t["annotations"][0]["result"][0]["value"]["rectanglelabels"][0] for t in tasks}
    assert labels_written == {"H", "Dent", "CONCAVE"}, "the bridge writes Label Studio's labels"

    found, config_classes = labels_from_tasks(tasks, MAPPED, CLASSES)
    assert [b.label for t in found for b in t.boxes] == [CLASSES[i % 3] for i in range(12)]
    assert config_classes == ["perforation", "dentado", "concave", "crack", "Other"]

    dataset = build_dataset(
        [LabelledImage(images[t.task_id], t.boxes, f"task {t.task_id}") for t in found], CLASSES, tmp_path / "trainer"
    )
    assert dataset.classes == CLASSES and dataset.new_classes == ()
    names = yaml.safe_load((dataset.data_yaml).read_text())["names"]
    assert names == dict(enumerate(CLASSES)), "the dataset's ids are the served model's"
    written = [p for s in ("train", "val") for p in (dataset.root / "labels" / s).glob("*.txt")]
    written += list((tmp_path / "trainer" / "holdout" / "labels").glob("*.txt"))
    assert len(written) == 12
    counted = {c: sum(s.boxes[c] for s in dataset.splits.values()) for c in CLASSES}
    assert counted == {"dentado": 4, "concave": 4, "perforation": 4}
    # and the model trained on it is served with the same labels
    assert plan_for_config(MAPPED, dataset.classes, 0.25).controls[0].label_map == plan.controls[0].label_map


def test_without_the_map_a_mapped_label_would_become_a_new_class() -> None:
    """The defect this fixes: with the labels taken as they are, 'Dent' is not the model's 'dentado'."""
    result = plan_for_config(MAPPED, CLASSES, 0.25).format({"img": _detections("dentado")})[0][0].model_dump()
    task = {"id": 1, "data": {"img": "u"}, "annotations": [{"id": 1, "result": [result]}]}
    (unmapped,), _ = labels_from_tasks([task])
    (mapped,), _ = labels_from_tasks([task], MAPPED, CLASSES)
    assert [b.label for b in unmapped.boxes] == ["Dent"]
    assert [b.label for b in mapped.boxes] == ["dentado"]


def test_an_export_of_a_mapped_project_is_mapped_by_its_label_config(tmp_path: Path) -> None:
    """A YOLO export names classes by label (alphabetically); with the project's config they become the model's."""
    export = tmp_path / "export"
    (export / "labels").mkdir(parents=True)
    (export / "classes.txt").write_text("CONCAVE\nDent\nH\nOther\n")
    for i, line in enumerate(["0 0.5 0.5 0.2 0.2", "1 0.5 0.5 0.2 0.2", "2 0.5 0.5 0.2 0.2", "3 0.5 0.5 0.2 0.2"]):
        (export / "labels" / f"img{i}.txt").write_text(line + "\n")
        _png(export / "images" / f"img{i}.png", i)
    config = tmp_path / "config.xml"
    config.write_text(MAPPED)

    plain = ExportSource(export).collect(Settings(), tmp_path / "a", CLASSES)
    assert sorted(b.label for i in plain.images for b in i.boxes) == ["CONCAVE", "Dent", "H", "Other"]
    mapped = ExportSource(export, label_config=config).collect(Settings(), tmp_path / "b", CLASSES)
    assert sorted(b.label for i in mapped.images for b in i.boxes) == ["Other", "concave", "dentado", "perforation"]
    assert mapped.classes == ("concave", "dentado", "perforation", "Other")
    with pytest.raises(ConfigError, match="cannot read the label config"):
        ExportSource(export, label_config=tmp_path / "missing.xml").collect(Settings(), tmp_path / "c", CLASSES)


def test_labels_in_nested_views_belong_to_their_control_and_filters_are_no_controls() -> None:
    config = """<View><Image name="front" value="$front"/><Text name="notes" valueList="$lines"/>
      <Filter name="find" toName="boxes"/>
      <RectangleLabels name="boxes" toName="front,missing">
        <View><Label value="Dent" alias="D"/><Label alias="Hole"/><Label background="red"/><Label value="D"/></View>
      </RectangleLabels></View>"""
    parsed = parse_label_config(config)
    (control,) = parsed.controls
    assert (control.name, control.to_names) == ("boxes", ("front", "missing"))
    assert [o.name for o in control.objects] == ["front"], "a toName naming no object is left out"
    assert [(label.value, label.alias) for label in control.labels] == [("D", None), ("Hole", "Hole")]
    assert [(o.tag, o.value) for o in parsed.objects] == [("Image", "$front"), ("Text", "$lines")]


def test_entity_declarations_are_refused() -> None:
    bomb = """<?xml version="1.0"?><!DOCTYPE View [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>
    <View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image"><Label value="&b;"/>
    </RectangleLabels></View>"""
    with pytest.raises(ConfigError, match="cannot be parsed: DOCTYPE and ENTITY declarations are not allowed"):
        parse_label_config(bomb)
