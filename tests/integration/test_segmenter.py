"""The segmenter loop against a real Label Studio 1.23 and a real tritonserver, on the demo backbone.

A session YAML makes the project (smart KeyPointLabels + BrushLabels, the bridge connected as
interactive); points placed through the API, taken from the true masks, train a head that Triton
serves beside the backbone; the bridge answers masks (Label Studio RLE) and suggested points, and
an interactive call with a person's clicks answers a mask that honours every click. A mask stored
in Label Studio and read back is the same mask; held-out masks switch the deploy metric to mIoU.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from core.brush_rle import decode_mask, encode_mask
from core.settings import Settings
from labelloop.cli import app
from tests.integration.conftest import BridgeServer, SessionEnv
from tests.label_studio import LabelStudioServer
from trainer.synthetic_blobs import sample_points, write_segmenter_dataset

pytestmark = [pytest.mark.slow, pytest.mark.triton, pytest.mark.label_studio]

MODEL = "blob-defects"
WIDTH, HEIGHT = 448, 336


def _name(task: dict[str, Any]) -> str:
    """Uploads are stored as ``<8 hex>-<name>``."""
    return str(task["data"]["image"]).rsplit("/", 1)[-1].split("-", 1)[1]


def _point(x: float, y: float, label: str, **extra: Any) -> dict[str, Any]:
    return {
        "from_name": "points",
        "to_name": "image",
        "type": "keypointlabels",
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "value": {"x": 100 * x / WIDTH, "y": 100 * y / HEIGHT, "width": 0.5, "keypointlabels": [label]},
        **extra,
    }


def _points(truth: np.ndarray, seed: int) -> list[dict[str, Any]]:
    """20 foreground and 20 background points from a true mask, as a person would place them."""
    picked = sample_points(truth, 20, 20, np.random.default_rng(seed))
    return [_point(x, y, "defect" if k >= 0 else "background") for x, y, k in picked]


def _mask_result(mask: np.ndarray) -> dict[str, Any]:
    return {
        "from_name": "mask",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "value": {"format": "rle", "rle": encode_mask(mask), "brushlabels": ["defect"]},
    }


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def test_a_segmenter_session_learns_from_points_and_refines_with_clicks(
    label_studio: LabelStudioServer,
    session_env: SessionEnv,
    bridge_factory: Callable[[Settings], BridgeServer],
    tmp_path: Path,
) -> None:
    settings, env = session_env.settings, session_env.env
    data = write_segmenter_dataset(tmp_path / "data", n=36, seed=11, size=(WIDTH, HEIGHT))
    truth = {p.name: np.asarray(Image.open(p)) > 0 for p in (data / "masks").glob("*.png")}
    session_file = tmp_path / "session.yaml"
    session_file.write_text(
        yaml.safe_dump(
            {
                "kind": "segmenter",
                "title": "Blob defects",
                "images": "data/images",
                "classes": [{"name": "defect", "color": "#e6194b"}],
                "backbone": "demo",
                "long_side": 448,
            }
        )
    )
    bridge = bridge_factory(settings)
    created = CliRunner().invoke(
        app, ["session", "create", str(session_file), "--bridge-url", bridge.url, "--json"], env=env
    )
    assert created.exit_code == 0, created.output
    project = int(json.loads(created.stdout)["project"])
    api = label_studio.api()
    (backend,) = api.ml_backends(project)
    assert backend["url"] == bridge.url and backend["is_interactive"] is True
    config = str(api.project(project)["label_config"])
    assert '<KeyPointLabels name="points"' in config and '<BrushLabels name="mask"' in config
    assert 'value="background"' in config
    tasks = sorted(api.tasks(project), key=_name)
    labelled, held_back = tasks[:26], tasks[26:]

    # A mask stored in Label Studio and read back is the same mask, pixel for pixel.
    first = truth[_name(labelled[0])]
    api.create_annotation(labelled[0]["id"], [_mask_result(first), *_points(first, 0)])
    exported = api.client.get(f"/api/projects/{project}/export", params={"exportType": "JSON"})
    exported.raise_for_status()
    (stored,) = [t for t in exported.json() if t["id"] == labelled[0]["id"]][0]["annotations"]
    (brush,) = [r for r in stored["result"] if r["type"] == "brushlabels"]
    assert np.array_equal(decode_mask(brush["value"]["rle"], WIDTH, HEIGHT), first)

    for k, task in enumerate(labelled[1:], start=1):
        api.create_annotation(task["id"], _points(truth[_name(task)], k))
    doc = session_env.train(project)
    assert doc["kind"] == "segmenter" and doc["published_version"] == 1, doc
    assert "balanced_point_accuracy" in doc["metrics"]
    assert doc["metric"] == ("miou" if "miou" in doc["metrics"] else "balanced_point_accuracy")

    with bridge.client() as client:
        setup = client.post("/setup", json={"project": f"{project}.1", "schema": config}).json()
        body = {"tasks": held_back, "label_config": config, "project": f"{project}.1"}
        answers = client.post("/predict", json=body).json()["results"]
    assert setup["model_version"] == f"{MODEL}@v1"
    ious = []
    for task, answer in zip(held_back, answers, strict=True):
        assert answer["model_version"] == f"{MODEL}@v1" and 0.0 <= answer["score"] <= 1.0
        masks = [r for r in answer["result"] if r["type"] == "brushlabels"]
        points = [r for r in answer["result"] if r["type"] == "keypointlabels"]
        predicted = decode_mask(masks[0]["value"]["rle"], WIDTH, HEIGHT) if masks else np.zeros((HEIGHT, WIDTH), bool)
        ious.append(_iou(predicted, truth[_name(task)]))
        xy = np.array([[p["value"]["x"] * WIDTH / 100, p["value"]["y"] * HEIGHT / 100] for p in points])
        assert len(points) > 0 and all(0 <= p["score"] <= 1 for p in points)
        assert ((xy >= 0) & (xy <= [WIDTH, HEIGHT])).all()
        gaps = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1)) + np.eye(len(xy)) * 1e9
        assert gaps.min() >= 3.0 - 1e-6  # percent and back
        assert {p["value"]["keypointlabels"][0] for p in points} <= {"defect", "background"}
    assert statistics.mean(ious) >= 0.5, ious

    # Interactive: a person's clicks come back honoured, the mask first, one prediction for the one task.
    task = held_back[0]
    mask = truth[_name(task)]
    rng = np.random.default_rng(3)
    clicks = [_point(x, y, "defect" if k >= 0 else "background") for x, y, k in sample_points(mask, 3, 3, rng)]
    timings = []
    with bridge.client() as client:
        for n in range(1, len(clicks) + 1):
            body = {
                "tasks": [task],
                "label_config": config,
                "project": f"{project}.1",
                "params": {"context": {"result": clicks[:n]}},
            }
            started = time.perf_counter()
            (answer,) = client.post("/predict", json=body).json()["results"]
            timings.append(time.perf_counter() - started)
            first_result = answer["result"][0]
            assert first_result["type"] == "brushlabels" and answer["model_version"] == f"{MODEL}@v1"
            refined = decode_mask(first_result["value"]["rle"], WIDTH, HEIGHT)
            for click in clicks[:n]:
                x = int(click["value"]["x"] * WIDTH / 100)
                y = int(click["value"]["y"] * HEIGHT / 100)
                assert refined[y, x] == (click["value"]["keypointlabels"][0] == "defect"), (n, click)
    print(
        f"held-back IoU mean {statistics.mean(ious):.3f}; interactive round trips (s): {[round(t, 3) for t in timings]}"
    )

    # Label Studio's own call stores the masks under the served version.
    api.retrieve_predictions(project)
    stored_predictions = [p for t in api.tasks(project) for p in t["predictions"] if t["id"] == held_back[1]["id"]]
    assert any(
        p["model_version"] == f"{MODEL}@v1" and any(r["type"] == "brushlabels" for r in p["result"])
        for p in stored_predictions
    )

    # The queue works for a segmenter project too: its served head pre-labels, the tab sorts by its score.
    queued = CliRunner().invoke(app, ["queue", "--project", str(project), "--json", "--limit", "100"], env=env)
    assert queued.exit_code == 0, queued.output
    order = json.loads(queued.stdout)["tasks"]
    scores = [t["score"] for t in order]
    assert {t["task"] for t in order} == {t["id"] for t in held_back} and scores == sorted(scores)
    assert api.project(project)["model_version"] == f"{MODEL}@v1"

    # Full masks on the held-back tasks: where one lands in the held-out set, the rule reads mIoU.
    for k, task in enumerate(held_back, start=100):
        api.create_annotation(task["id"], [_mask_result(truth[_name(task)]), *_points(truth[_name(task)], k)])
    again = session_env.train(project)
    assert again["metric"] == "miou" and 0.0 <= again["metrics"]["miou"] <= 1.0, again["dataset"]
    assert again["deployed"] is not None and "miou" in again["deployed"]["metrics"]
