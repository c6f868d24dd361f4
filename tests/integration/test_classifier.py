"""The classifier loop against a real Label Studio 1.23 and a real tritonserver, on the demo backbone.

A session YAML makes the project (Choices config, images uploaded, the bridge connected); before any
head exists the bridge answers every task with an empty result; annotations made through the API
train a head (``labelloop train --project --json``) that Triton then serves beside the backbone, and
Label Studio's "Retrieve predictions" stores Choices pre-labels of the published version. Then: a
rule that cannot pass refuses the candidate with the numbers; ``train stop`` ends a run at its next
suspension; a changed class list refuses the warm start and says why.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from core.session import read_recorded, record_session
from core.settings import Settings
from labelloop.cli import app
from tests.integration.conftest import BridgeServer, SessionEnv
from tests.label_studio import LabelStudioServer
from trainer.synthetic_classes import write_classifier_dataset

pytestmark = [pytest.mark.slow, pytest.mark.triton, pytest.mark.label_studio]

COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231")
MODEL = "surface-classes"


def _uploaded_name(task: dict[str, Any]) -> str:
    """Uploads are stored as ``<8 hex>-<name>``."""
    return str(task["data"]["image"]).rsplit("/", 1)[-1].split("-", 1)[1]


def _choice(label: str) -> list[dict[str, Any]]:
    return [{"from_name": "choice", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]


def test_a_classifier_session_trains_publishes_and_pre_labels_in_label_studio(
    label_studio: LabelStudioServer,
    session_env: SessionEnv,
    bridge_factory: Callable[[Settings], BridgeServer],
    tmp_path: Path,
) -> None:
    settings, env = session_env.settings, session_env.env
    data = write_classifier_dataset(tmp_path / "data", n=60, seed=5)
    truth: dict[str, str] = json.loads((data / "labels.json").read_text())["labels"]
    classes = json.loads((data / "labels.json").read_text())["classes"]
    session_file = tmp_path / "session.yaml"
    session_file.write_text(
        yaml.safe_dump(
            {
                "kind": "classifier",
                "title": "Surface classes",
                "images": "data/images",
                "classes": [{"name": c, "color": COLOURS[k]} for k, c in enumerate(classes)],
                "backbone": "demo",
                "long_side": 224,
                "training": {"prediction_interval": 20, "early_stop_patience": 5, "max_epochs": 1000},
            }
        )
    )
    bridge = bridge_factory(settings)
    created = CliRunner().invoke(
        app, ["session", "create", str(session_file), "--bridge-url", bridge.url, "--json"], env=env
    )
    assert created.exit_code == 0, created.output
    summary = json.loads(created.stdout)
    assert summary["tasks"] == 60 and summary["kind"] == "classifier" and summary["model"] == MODEL
    project = int(summary["project"])
    api = label_studio.api()
    assert [b["url"] for b in api.ml_backends(project)] == [bridge.url]
    tasks = api.tasks(project)
    assert sorted(_uploaded_name(t) for t in tasks) == sorted(truth), "uploads keep their file names"

    # Before any head: one entry per task, each empty, named after the session's head at version 0.
    config = str(api.project(project)["label_config"])
    with bridge.client() as client:
        body = {"tasks": tasks[:3], "label_config": config, "project": f"{project}.1"}
        early = client.post("/predict", json=body).json()["results"]
    assert [(r["result"], r["model_version"]) for r in early] == [([], f"{MODEL}@v0")] * 3

    labelled, held_back = tasks[:36], tasks[36:]
    for task in labelled:
        api.create_annotation(task["id"], _choice(truth[_uploaded_name(task)]))
    doc = session_env.train(project)
    assert doc["kind"] == "classifier" and doc["deployed"] is None and doc["published_version"] == 1
    assert doc["dataset"]["train"]["images"] + doc["dataset"]["holdout"]["images"] == 36
    metrics = doc["candidate"]["metrics"]
    assert set(metrics) >= {"accuracy", "macro_f1", "per_class_f1", "confusion_matrix"}
    assert len(metrics["confusion_matrix"]) == len(classes)
    assert doc["decision"]["deploy"] is True

    with bridge.client() as client:
        setup = client.post("/setup", json={"project": f"{project}.1", "schema": config}).json()
        # One bad task (a URL outside the allowed origins) answers empty; the rest of the batch is classified.
        bad = {**held_back[0], "id": 10**6, "data": {"image": "http://example.invalid/x.png"}}
        mixed = {"tasks": [held_back[0], bad], "label_config": config, "project": f"{project}.1"}
        good, failed = client.post("/predict", json=mixed).json()["results"]
    assert setup["model_version"] == f"{MODEL}@v1"
    assert good["result"][0]["type"] == "choices" and good["model_version"] == f"{MODEL}@v1"
    assert failed["result"] == [] and failed["score"] == 0.0
    api.retrieve_predictions(project)
    right = 0
    for task in api.tasks(project):
        if task["id"] not in {t["id"] for t in held_back}:
            continue
        (prediction,) = [p for p in task["predictions"] if p["model_version"] == f"{MODEL}@v1"]
        (result,) = prediction["result"]
        assert result["type"] == "choices" and 0 < result["score"] <= 1
        assert set(result["meta"]["probabilities"]) == set(classes)
        assert 0 <= prediction["score"] <= 1
        right += result["value"]["choices"] == [truth[_uploaded_name(task)]]
    accuracy = right / len(held_back)
    assert accuracy >= 0.7, f"held-back accuracy {accuracy:.2f} on the demo backbone"

    # A rule the candidate cannot pass: refused, with the numbers, and v1 stays served.
    session = read_recorded(settings.state_dir, project)
    assert session is not None
    strict = session.model_copy(update={"rule": session.rule.model_copy(update={"deploy_margin": 1.0})})
    record_session(settings.state_dir, strict, project)
    refused = session_env.train(project)
    assert refused["published_version"] is None and refused["deployed"]["version"] == 1
    assert any("keep the served model" in reason and "1.0000" in reason for reason in refused["decision"]["reasons"])

    # train stop: the run ends at its next suspension and keeps its best weights.
    endless = session.training.model_copy(
        update={"prediction_interval": 2, "max_epochs": 100_000, "early_stop_patience": 100_000, "min_delta": 0.0}
    )
    record_session(settings.state_dir, strict.model_copy(update={"training": endless}), project)
    runs = settings.state_dir / "trainer" / "heads" / MODEL / "runs"
    before = set(runs.iterdir())

    def stop_when_running() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not set(runs.iterdir()) - before:
            time.sleep(0.2)
        time.sleep(2.0)
        CliRunner().invoke(app, ["train", "stop", "--project", str(project)], env=env)

    stopper = threading.Thread(target=stop_when_running)
    stopper.start()
    stopped = session_env.train(project)
    stopper.join()
    assert str(stopped["candidate"]["stopped"]).startswith("labelloop train stop")
    assert 0 < stopped["candidate"]["epochs"] < 100_000 and stopped["candidate"]["metrics"]["macro_f1"] > 0
    # Each suspension replaced the candidate's interim predictions on the next unlabelled tasks, least sure first.
    assert stopped["candidate"]["interim_predictions"] >= 1
    interim = [p for t in api.tasks(project) for p in t["predictions"] if p["model_version"] == f"{MODEL}@v2-candidate"]
    assert len(interim) == 10 and {p["task"] for p in interim} <= {t["id"] for t in held_back}
    assert all(p["result"][0]["value"]["choices"][0] in classes for p in interim)

    # Another class list (here another order): no warm start from v1, and the report says why.
    reordered = strict.model_copy(update={"classes": tuple(reversed(strict.classes))})
    record_session(settings.state_dir, reordered, project)
    fresh = session_env.train(project)
    assert fresh["candidate"]["warm_start"].startswith("refused: the served head v1 has classes")
