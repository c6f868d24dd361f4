"""The whole loop against a real Label Studio 1.23.2 and a real Triton.

People verify images in Label Studio (annotations made through its API, one skipped task with
wrong boxes among them); ``labelloop train --project`` reads them with a Personal Access Token,
trains, evaluates, publishes; Triton serves the new version; and the bridge's predictions that
Label Studio stores next carry the new ``model_version``. The project's labels are not the model's
class names: ``predicted_values``, an alias and a different case map them, and training must use
the bridge's map (issue 19 item 3) to keep the served model's classes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageOps
from pydantic import SecretStr
from typer.testing import CliRunner

from core.events import EventStore
from core.settings import Settings
from core.studio import model_version_name
from tests.conftest import TEST_IMGSZ, TritonHandle
from tests.integration.conftest import BridgeServer
from tests.integration.test_trainer import serve_a_weaker_version, served_version
from tests.label_studio import LabelStudioServer
from trainer import cli
from trainer.history import History
from trainer.synthetic import CLASSES, write_dataset

pytestmark = [pytest.mark.slow, pytest.mark.triton, pytest.mark.label_studio]

# Labels deliberately in neither the model's nor alphabetical order, and named otherwise: only the
# label map (core.labelmap) connects them to the model's classes.
CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Perforation hole" alias="P" predicted_values="perforation"/>
    <Label value="Dent" predicted_values="dentado"/>
    <Label value="CONCAVE"/>
  </RectangleLabels>
</View>
"""
# What Label Studio stores for each model class: the alias when the label has one.
LABELS = {"perforation": "P", "dentado": "Dent", "concave": "CONCAVE"}


def _regions(image: Path, label_file: Path) -> list[dict[str, Any]]:
    """Ground-truth YOLO boxes as Label Studio rectangles (percent of the displayed image)."""
    with Image.open(image) as im:
        width, height = ImageOps.exif_transpose(im).size
    regions = []
    for i, line in enumerate(label_file.read_text().splitlines()):
        cls, xc, yc, w, h = line.split()
        x, y, bw, bh = float(xc) - float(w) / 2, float(yc) - float(h) / 2, float(w), float(h)
        regions.append(
            {
                "id": f"r{i}",
                "from_name": "label",
                "to_name": "image",
                "type": "rectanglelabels",
                "original_width": width,
                "original_height": height,
                "image_rotation": 0,
                "value": {
                    "x": x * 100,
                    "y": y * 100,
                    "width": bw * 100,
                    "height": bh * 100,
                    "rotation": 0,
                    "rectanglelabels": [LABELS[CLASSES[int(cls)]]],
                },
            }
        )
    return regions


def _uploaded_name(task: dict[str, Any]) -> str:
    """Uploads are stored as ``<8 hex>-<name>``."""
    return str(task["data"]["image"]).rsplit("/", 1)[-1].split("-", 1)[1]


def test_train_from_a_label_studio_project_reaches_triton_and_label_studio(
    label_studio: LabelStudioServer,
    private_triton: TritonHandle,
    trained_weights: Path,
    bridge_factory: Callable[[Settings], BridgeServer],
    tmp_path: Path,
) -> None:
    serve_a_weaker_version(private_triton, trained_weights)
    pat = label_studio.personal_access_token()
    settings = private_triton.settings.model_copy(
        update={
            "label_studio_url": label_studio.url,
            "label_studio_api_key": SecretStr(pat),
            "state_dir": tmp_path,
            "bridge_auth": "none",  # this test is about training; auth is tested with the bridge
        }
    )
    bridge = bridge_factory(settings)
    api = label_studio.api()
    project = api.create_project("trainer loop", CONFIG)
    api.connect_ml(project, bridge.url)

    verified = write_dataset(tmp_path / "verified", n=90, seed=41).parent
    skipped = write_dataset(tmp_path / "skipped", n=4, seed=42).parent
    files = {p.name: p for p in sorted((verified / "images").rglob("*.*"))}
    skipped_files = {f"skipped-{p.name}": p for p in sorted((skipped / "images").rglob("*.*"))}
    for name, path in skipped_files.items():
        (tmp_path / "uploads").mkdir(exist_ok=True)
        (tmp_path / "uploads" / name).write_bytes(path.read_bytes())
    api.import_files(project, [*files.values(), *sorted((tmp_path / "uploads").iterdir())])
    api.retrieve_predictions(project)
    before = api.tasks(project)
    assert {p["model_version"] for t in before for p in t["predictions"]} == {
        model_version_name(settings.model_name, 2)
    }
    predicted = {
        label for t in before for p in t["predictions"] for r in p["result"] for label in r["value"]["rectanglelabels"]
    }
    assert predicted and predicted <= set(LABELS.values()), "the bridge writes the project's labels"

    for task in before:
        name = _uploaded_name(task)
        if name in files:
            image = files[name]
            api.create_annotation(
                task["id"], _regions(image, verified / "labels" / image.parent.name / f"{image.stem}.txt")
            )
        else:  # skipped by the annotator, with boxes that are all wrong: must never be trained on
            wrong = [
                {**r, "value": {**r["value"], "rectanglelabels": [LABELS["concave"]]}}
                for r in task["predictions"][0]["result"]
            ]
            response = api.client.post(
                f"/api/tasks/{task['id']}/annotations/", json={"result": wrong, "was_cancelled": True}
            )
            assert response.status_code == 201, response.text
    events = EventStore.for_settings(settings).since(0, actions={"ANNOTATION_CREATED"})
    assert len(events) == len(before) and {e.project_id for e in events} == {project}

    env = {
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": pat,
        "LABELLOOP_MODEL_REPOSITORY": str(settings.model_repository),
        "LABELLOOP_STATE_DIR": str(tmp_path),
        "LABELLOOP_TRITON_URL": private_triton.url,
        "LABELLOOP_IMGSZ": str(TEST_IMGSZ),
        "LABELLOOP_DEVICE": "cpu",
        "LABELLOOP_BATCH": "8",
    }
    result = CliRunner().invoke(cli.app, ["train", "--project", str(project), "--epochs", "3", "--json"], env=env)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)

    splits = doc["dataset"]["splits"]
    assert sum(s["images"] for s in splits.values()) == len(files), "skipped (cancelled) tasks are left out"
    assert doc["dataset"]["classes"] == list(CLASSES), "the served model's classes, not the project's labels"
    assert doc["dataset"]["new_classes"] == []
    empty = sum(1 for p in (verified / "labels").rglob("*.txt") if not p.read_text().strip())
    assert sum(s["negatives"] for s in splits.values()) == empty
    truth = {c: 0 for c in CLASSES}
    for label in (verified / "labels").rglob("*.txt"):
        for line in label.read_text().splitlines():
            truth[CLASSES[int(line.split()[0])]] += 1
    assert {c: sum(s["boxes"][c] for s in splits.values()) for c in CLASSES} == truth
    assert doc["deployed"]["version"] == 2 and doc["published_version"] == 3
    assert doc["candidate"]["map50"] > doc["deployed"]["map50"] + 0.02

    # Triton serves version 3 (a real inference says so), and Label Studio's next predictions carry it.
    assert served_version(private_triton.settings) == 3
    api.retrieve_predictions(project)
    after = api.tasks(project)
    new_version = model_version_name(settings.model_name, 3)
    assert all(new_version in {p["model_version"] for p in t["predictions"]} for t in after), [
        [p["model_version"] for p in t["predictions"]] for t in after
    ]
    new_results = [r for t in after for p in t["predictions"] if p["model_version"] == new_version for r in p["result"]]
    assert new_results and {label for r in new_results for label in r["value"]["rectanglelabels"]} <= set(
        LABELS.values()
    )
    records = list(History(tmp_path / "trainer" / "history.jsonl").records())
    assert [(r["kind"], r["served"]["version"], r["published_version"]) for r in records] == [("train", 2, 3)]
