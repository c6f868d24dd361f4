"""Session YAML, the classifier's label config and Choices results, its held-out split and its deploy rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError, DatasetError
from core.labelmap import parse_label_config
from core.session import (
    Session,
    choices_config,
    load_session,
    read_recorded,
    record_session,
    segmenter_config,
    slug,
)
from core.uncertainty import margin
from ls_bridge.choices import choices_controls
from ls_bridge.heads import project_id
from serving.client import ModelInfo
from serving.heads import ImageClasses
from trainer.choices_data import ClassifiedImage, split_holdout
from trainer.rules import decide_metric

GOOD = """
kind: classifier
title: Surface classes
images: imgs
classes:
  - {name: scratch, color: "#e6194b"}
  - {name: ok, color: "#3cb44b"}
backbone: demo
long_side: 448
training: {prediction_interval: 20, early_stop_patience: 5, max_epochs: 1000}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "session.yaml"
    path.write_text(text)
    return path


def test_a_session_file_loads_with_defaults_and_paths_resolved(tmp_path: Path) -> None:
    session = load_session(_write(tmp_path, GOOD))
    assert session.kind == "classifier" and session.class_names == ("scratch", "ok")
    assert session.images == (tmp_path / "imgs").resolve()
    assert session.model_name == "surface-classes" == slug("Surface classes")
    assert session.training.lr == 1e-3 and session.training.interim_tasks == 10
    assert (session.rule.retrain_below, session.rule.retrain_delta, session.rule.deploy_margin) == (0.6, -0.03, 0.02)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("long_side: 448", "long_sid: 448"), r"long_sid: unknown key"),
        (("max_epochs: 1000}", "max_epochs: 1000, warmup: 3}"), r"training.warmup: unknown key"),
        (('"#3cb44b"', '"green"'), r"'green' is not a colour"),
        (("name: ok", "name: scratch"), r"classes listed twice: scratch"),
        (("kind: classifier", "kind: pose"), r"kind: Input should be"),
    ],
)
def test_a_bad_session_file_is_one_clear_error(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_session(_write(tmp_path, GOOD.replace(*change)))


def test_a_recorded_session_reads_back_for_its_project(tmp_path: Path) -> None:
    session = load_session(_write(tmp_path, GOOD))
    record_session(tmp_path / "state", session, 7)
    assert read_recorded(tmp_path / "state", 7) == session.model_copy(update={"project": 7})
    assert read_recorded(tmp_path / "state", 8) is None


def _classes(probs: list[float], names: tuple[str, ...] = ("scratch", "ok")) -> ImageClasses:
    info = ModelInfo(name="m", version=3, classes=list(names), imgsz=[448], provider="cpu")
    return ImageClasses(probs=np.array(probs, np.float32), model=info)


def test_the_generated_config_is_one_single_choice_on_the_image_and_results_use_its_labels(tmp_path: Path) -> None:
    session = load_session(_write(tmp_path, GOOD.replace("name: ok", 'name: "o<k>"')))
    config = choices_config(session)
    (control,) = parse_label_config(config).controls_of(("Choices",))
    assert control.attrs["choice"] == "single" and [label.name for label in control.labels] == ["scratch", "o<k>"]
    (planned,) = choices_controls(config)
    assert (planned.from_name, planned.to_name, planned.value_key) == ("choice", "image", "image")
    assert planned.serves(("o<k>", "scratch")) and not planned.serves(("scratch", "dent"))
    region = planned.region(_classes([0.2, 0.8], ("scratch", "o<k>")))
    assert region is not None
    assert region.value.choices == ["o<k>"] and region.score == pytest.approx(0.8)
    assert region.meta["probabilities"] == {"scratch": 0.2, "o<k>": 0.8}


def test_model_skip_leaves_a_choices_control_alone() -> None:
    config = (
        '<View><Image name="i" value="$img"/>'
        '<Choices name="c" toName="i" model_skip="true"><Choice value="a"/></Choices></View>'
    )
    assert choices_controls(config) == ()


def test_the_task_score_is_the_margin_between_the_two_best_classes() -> None:
    assert margin([0.5, 0.5]) == 0.0
    assert margin([0.1, 0.7, 0.2]) == pytest.approx(0.5)
    assert margin([1.0]) == 1.0
    assert margin([0.9, 0.1]) > margin([0.6, 0.4])


def test_label_studio_project_fields_give_the_project_id() -> None:
    assert project_id("12.1733492000") == 12
    assert project_id(5) == 5
    assert project_id(None) is None and project_id("x.1") is None


def _image(k: int, label: str) -> ClassifiedImage:
    return ClassifiedImage(f"{k:064x}", b"", label, k)


def test_the_held_out_split_is_frozen_and_keeps_each_image_s_first_class(tmp_path: Path) -> None:
    images = [_image(k, "a" if k % 2 else "b") for k in range(40)]
    first = split_holdout(images, tmp_path, 0.25)
    held = {i.content_hash for i in first.holdout}
    assert held and len(first.train) + len(first.holdout) == 40 and not held & {i.content_hash for i in first.train}
    relabelled = [ClassifiedImage(i.content_hash, b"", "c", i.task_id) for i in images] + [_image(99, "a")]
    second = split_holdout(relabelled, tmp_path, 0.9)  # the fraction is frozen at the first split
    assert held <= {i.content_hash for i in second.holdout}
    assert {i.label for i in second.holdout if i.content_hash in held} == {i.label for i in first.holdout}, (
        "held-out images keep the class they joined with"
    )
    with pytest.raises(DatasetError, match="need at least one to train on and one held out"):
        split_holdout([_image(1, "a")], tmp_path / "other", 0.2)


def test_the_deploy_rule_reads_the_kind_s_metric() -> None:
    first = decide_metric("macro_f1", 0.7, None, None, (0.6, -0.03, 0.02))
    assert first.deploy and first.retrain_needed and "candidate macro_f1 0.7000 and nothing served" in first.reasons[-1]
    worse = decide_metric("macro_f1", 0.71, 0.70, 0.75, (0.6, -0.03, 0.02))
    assert not worse.deploy and worse.retrain_needed and worse.delta == pytest.approx(-0.05)
    assert worse.reasons[-1] == "candidate macro_f1 0.7100 <= served 0.7000 + 0.0200: keep the served model"
    assert decide_metric("macro_f1", 0.73, 0.70, None, (0.6, -0.03, 0.02)).deploy


def test_a_classifier_needs_two_classes_a_segmenter_one_and_background_is_no_class() -> None:
    with pytest.raises(ValueError, match="a classifier needs at least two classes"):
        Session.model_validate({"kind": "classifier", "title": "t", "classes": [{"name": "a"}]})
    assert Session.model_validate({"kind": "segmenter", "title": "t", "classes": [{"name": "a"}]}).class_names == ("a",)
    with pytest.raises(ValueError, match="'background' is the segmenter's background point label"):
        Session.model_validate({"kind": "segmenter", "title": "t", "classes": [{"name": "a"}, {"name": "Background"}]})
    with pytest.raises(ValueError, match="mask_threshold"):
        Session.model_validate({"kind": "segmenter", "title": "t", "classes": [{"name": "a"}], "mask_threshold": 1.5})


def test_the_segmenter_config_names_its_tags_as_documented() -> None:
    session = Session.model_validate(
        {"kind": "segmenter", "title": "t", "classes": [{"name": "crack", "color": "#112233"}, {"name": "pit"}]}
    )
    config = parse_label_config(segmenter_config(session))
    (points,) = config.controls_of(("KeyPointLabels",))
    (mask,) = config.controls_of(("BrushLabels",))
    assert (points.name, points.to_names, points.attrs["smart"]) == ("points", ("image",), "true")
    assert [label.name for label in points.labels] == ["crack", "pit", "background"]
    assert (mask.name, [label.name for label in mask.labels]) == ("mask", ["crack", "pit"])


@pytest.mark.parametrize("name", ["surface-classes.yaml", "blob-defects.yaml"])
def test_the_example_sessions_in_the_repository_load(name: str) -> None:
    session = load_session(Path(__file__).parents[2] / "examples" / name)
    assert session.kind in ("classifier", "segmenter") and session.classes
