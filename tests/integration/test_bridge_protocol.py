"""The ML backend protocol against the running bridge, a real tritonserver and a real image server."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from core.events import EventStore
from core.settings import Settings
from core.studio import DEFECT_LABEL_CONFIG as SEED_CONFIG
from serving.client import ImageDetections, make_client
from serving.control import activate_version
from serving.repository import ModelCard, ModelRepository
from tests.conftest import TritonHandle, free_port
from tests.integration.conftest import (
    ROUTES,
    BridgeServer,
    ImageServer,
    assert_regions_match,
    detect_direct,
    task_score,
)

pytestmark = [pytest.mark.slow, pytest.mark.triton]

VERSION = "defect_detector@v1"

BridgeFactory = Callable[[Settings], BridgeServer]


def _settings(triton: TritonHandle, image_server: ImageServer, tmp_path: Path, **extra: Any) -> Settings:
    update = {"allowed_origins": [f"http://{image_server.host}"], "state_dir": tmp_path / "state", **extra}
    return triton.settings.model_copy(update=update)


@pytest.fixture
def bridge(
    triton_server: TritonHandle, image_server: ImageServer, tmp_path: Path, bridge_factory: BridgeFactory
) -> BridgeServer:
    return bridge_factory(_settings(triton_server, image_server, tmp_path))


def _task(task_id: int, url: str) -> dict[str, Any]:
    return {"id": task_id, "data": {"image": url}, "project": 1, "predictions": [], "annotations": []}


def _predict(bridge: BridgeServer, tasks: list[dict[str, Any]], config: str = SEED_CONFIG) -> httpx.Response:
    body = {"tasks": tasks, "project": "1.1700000000", "label_config": config, "params": {"context": None}}
    with bridge.client() as client:
        # ASCII-escaped, as Label Studio (requests' json=) sends it: a lone surrogate travels as \udcff.
        return client.post("/predict", content=json.dumps(body), headers={"content-type": "application/json"})


def assert_same_boxes(result: list[dict[str, Any]], expected: ImageDetections) -> None:
    boxes = [asdict(d) for d in expected.detections]
    assert_regions_match(result, expected.width, expected.height, boxes)


def test_health_is_up_with_the_served_version(bridge: BridgeServer) -> None:
    with bridge.client() as client:
        started = time.perf_counter()
        response = client.get("/health")
        elapsed = time.perf_counter() - started
    assert response.status_code == 200
    assert response.json() | {"detail": None} == {
        "status": "UP",
        "model_class": "labelloop-bridge",
        "model_version": VERSION,
        "classes": ["dentado", "concave", "perforation"],
        "detail": None,
    }
    assert elapsed < 1.0  # Label Studio gives /health one second


def test_without_triton_health_is_down_and_errors_are_clean(
    image_server: ImageServer, tmp_path: Path, bridge_factory: BridgeFactory, triton_server: TritonHandle
) -> None:
    settings = _settings(triton_server, image_server, tmp_path, triton_url=f"127.0.0.1:{free_port()}")
    bridge = bridge_factory(settings)
    with bridge.client() as client:
        health = client.get("/health")
        setup = client.post("/setup", json={"project": "1.1", "schema": SEED_CONFIG})
    assert health.status_code == 503 and health.json()["status"] == "DOWN"
    assert "TritonUnavailableError" in health.json()["detail"]
    assert setup.status_code == 503
    assert setup.json()["error"] == "TritonUnavailableError" and "Traceback" not in setup.text
    predict = _predict(bridge, [_task(1, image_server.url("broken.png"))])
    assert predict.status_code == 503 and predict.json()["error"] == "TritonUnavailableError"


@pytest.mark.parametrize("extra_params", ["", "  ", '{"threshold": 0.4}', None, {"threshold": 0.4}])
def test_setup_accepts_extra_params_as_label_studio_sends_them(bridge: BridgeServer, extra_params: Any) -> None:
    """The Connect Model form sends its "Extra params" textarea as text (empty or JSON); the API null or an object."""
    body = {"project": "1.1700000000", "schema": SEED_CONFIG, "extra_params": extra_params}
    with bridge.client() as client:
        response = client.post("/setup", json=body)
    assert response.status_code == 200 and response.json() == {"model_version": VERSION}, response.text


def test_setup_answers_the_model_version_and_refuses_configs_with_nothing_to_predict(bridge: BridgeServer) -> None:
    text_only = '<View><Image name="image" value="$image"/><TextArea name="c" toName="image"/></View>'
    choices_only = (
        '<View><Image name="image" value="$image"/>'
        '<Choices name="c" toName="image"><Choice value="a"/><Choice value="b"/></Choices></View>'
    )
    with bridge.client() as client:
        good = client.post(
            "/setup",
            json={"project": "1.1700000000", "schema": SEED_CONFIG, "hostname": "http://x", "access_token": "t"},
        )
        bad = client.post("/setup", json={"project": "1.1700000000", "schema": text_only})
        head_to_come = client.post("/setup", json={"project": "1.1700000000", "schema": choices_only})
        no_match = client.post(
            "/setup",
            json={
                "schema": SEED_CONFIG.replace('"concave"', '"x"')
                .replace('"dentado"', '"y"')
                .replace('"perforation"', '"z"')
            },
        )
    assert good.status_code == 200 and good.json() == {"model_version": VERSION}
    assert bad.status_code == 400
    assert bad.json() == {
        "detail": "nothing to pre-label in this label config: it needs a RectangleLabels -> Image pair "
        "(found: TextArea 'c' -> image)",
        "error": "ConfigError",
    }
    # A Choices config is a classifier's: before any head is served it names the head to come at v0.
    assert head_to_come.status_code == 200 and head_to_come.json() == {"model_version": "classifier@v0"}
    assert no_match.status_code == 400 and "dentado, concave, perforation" in no_match.json()["detail"]


def test_predict_answers_every_task_in_order_like_triton(
    bridge: BridgeServer, triton_server: TritonHandle, image_server: ImageServer, image_dir: Path, images: list[str]
) -> None:
    names = [*images[:10], images[0]]  # a repeated image is a separate task
    tasks = [_task(100 + i, image_server.url(name)) for i, name in enumerate(names)]
    response = _predict(bridge, tasks)
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == len(tasks)
    expected = detect_direct(triton_server, [(image_dir / n).read_bytes() for n in names])
    assert sum(len(e.detections) for e in expected) > 0
    for result, want in zip(results, expected, strict=True):
        assert result["model_version"] == VERSION
        assert_same_boxes(result["result"], want)
    # the uncertainty score: from each image's boxes and near-misses, the same for a repeated image
    for result, name in zip(results, names, strict=True):
        assert result["score"] == pytest.approx(task_score(triton_server, (image_dir / name).read_bytes()), abs=1e-6)
        assert 0.0 <= result["score"] <= 1.0
    assert results[0]["score"] == results[-1]["score"] and len({r["score"] for r in results}) > 2


def _labels(results: list[dict[str, Any]]) -> list[list[str]]:
    return [[region["value"]["rectanglelabels"][0] for region in r["result"]] for r in results]


def test_a_published_version_is_planned_with_its_own_classes(
    private_triton: TritonHandle,
    image_server: ImageServer,
    images: list[str],
    tmp_path: Path,
    bridge_factory: BridgeFactory,
) -> None:
    """The bridge asks Triton what it serves once; later answers name their version and its classes."""
    import onnx

    settings = _settings(private_triton, image_server, tmp_path)
    bridge = bridge_factory(settings)
    config = SEED_CONFIG.replace("</RectangleLabels>", '  <Label value="scratch"/>\n  </RectangleLabels>')
    tasks = [_task(i, image_server.url(name)) for i, name in enumerate(images[:24])]
    first = _predict(bridge, tasks, config).json()["results"]
    assert {r["model_version"] for r in first} == {VERSION}
    assert "perforation" in sum(_labels(first), [])

    # Version 2: the same network with its class 2 renamed, published and loaded behind the bridge.
    repo = ModelRepository(settings.model_repository)
    model = onnx.load(str(repo.onnx_path(settings.model_name, 1)))
    names = next(p for p in model.metadata_props if p.key == "names")
    names.value = names.value.replace("'perforation'", "'scratch'")
    renamed = tmp_path / "renamed.onnx"
    onnx.save(model, str(renamed))
    card = ModelCard(name=settings.model_name, version=0, classes=["dentado", "concave", "scratch"], imgsz=320)
    version = repo.add_version(card, renamed)

    async def activate() -> None:
        async with make_client(settings) as client:
            await activate_version(client, repo, version)

    asyncio.run(activate())
    second = _predict(bridge, tasks, config).json()["results"]
    assert {r["model_version"] for r in second} == {"defect_detector@v2"}
    assert _labels(second) == [[{"perforation": "scratch"}.get(x, x) for x in labels] for labels in _labels(first)]


def test_failed_tasks_answer_empty_and_the_batch_goes_on(
    bridge: BridgeServer,
    triton_server: TritonHandle,
    image_server: ImageServer,
    image_dir: Path,
    images: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = image_server.server_address[1]
    tasks = [
        _task(1, image_server.url(images[0])),
        _task(2, image_server.url("broken.png")),  # not an image: Triton refuses it
        _task(3, image_server.url("missing.png")),  # 404
        _task(4, f"http://localhost:{port}/{images[1]}"),  # not an allowed host
        _task(5, "/data/upload/1/x.png"),  # needs LABEL_STUDIO_URL, which is not set
        {"id": 6, "data": {"picture": image_server.url(images[1])}},  # no $image field
        _task(7, image_server.url(images[2])),
    ]
    hits_before = image_server.hits[f"/{images[1]}"]
    with caplog.at_level(logging.WARNING, logger="ls_bridge"):
        response = _predict(bridge, tasks)
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == len(tasks)
    assert all(r["model_version"] == VERSION for r in results)
    for i in (1, 2, 3, 4, 5):
        assert results[i] == {"result": [], "score": 0.0, "model_version": VERSION}
    good = detect_direct(triton_server, [(image_dir / images[0]).read_bytes(), (image_dir / images[2]).read_bytes()])
    assert_same_boxes(results[0]["result"], good[0])
    assert_same_boxes(results[6]["result"], good[1])
    warnings = [r.getMessage() for r in caplog.records if r.name == "ls_bridge.predictor"]
    assert len(warnings) == 5
    for task_id, error in [
        (2, "ImageError"),
        (3, "FetchError"),
        (4, "FetchError"),
        (5, "FetchError"),
        (6, "FetchError"),
    ]:
        assert sum(w.startswith(f"task {task_id}: no pre-labels ({error}:") for w in warnings) == 1
    assert image_server.hits[f"/{images[1]}"] == hits_before  # the refused host was never contacted
    with bridge.client() as client:
        metrics = client.get("/metrics").text
    assert 'labelloop_bridge_tasks_total{outcome="failed"} 5' in metrics
    assert 'labelloop_bridge_errors_total{error="ImageError",where="task"} 1' in metrics


def test_a_malformed_task_url_fails_only_its_task(
    bridge: BridgeServer,
    triton_server: TritonHandle,
    image_server: ImageServer,
    image_dir: Path,
    images: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ValueError / InvalidURL / UnicodeEncodeError from URL handling become that task's FetchError."""
    host = image_server.host
    bad = {
        2: ("http://[::1/a.png", "ValueError"),
        3: (f"http://{host}/\x00{images[1]}", "InvalidURL"),
        4: (f"http://{host}/\udcff.png", "UnicodeEncodeError"),
        5: (f"http://{host.split(':')[0]}:99x/{images[1]}", "InvalidURL"),
    }
    tasks = [
        _task(1, image_server.url(images[0])),
        *(_task(task_id, url) for task_id, (url, _) in bad.items()),
        _task(6, image_server.url(images[2])),
    ]
    with caplog.at_level(logging.WARNING, logger="ls_bridge"):
        response = _predict(bridge, tasks)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["result"] for r in results[1:5]] == [[], [], [], []]
    good = detect_direct(triton_server, [(image_dir / images[0]).read_bytes(), (image_dir / images[2]).read_bytes()])
    assert_same_boxes(results[0]["result"], good[0])
    assert_same_boxes(results[5]["result"], good[1])
    warnings = [r.getMessage() for r in caplog.records if r.name == "ls_bridge.predictor"]
    for task_id, (_, error) in bad.items():
        (line,) = [w for w in warnings if w.startswith(f"task {task_id}: no pre-labels (FetchError: ")]
        assert f"malformed URL ({error}" in line, line


def test_metrics_count_requests_and_time_each_stage(
    bridge: BridgeServer, image_server: ImageServer, images: list[str]
) -> None:
    assert _predict(bridge, [_task(i, image_server.url(n)) for i, n in enumerate(images[:4])]).status_code == 200
    with bridge.client() as client:
        client.get("/health")
        response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    assert 'labelloop_bridge_requests_total{path="/predict",status="200"} 1' in text
    assert 'labelloop_bridge_requests_total{path="/health",status="200"} 1' in text
    assert 'labelloop_bridge_tasks_total{outcome="ok"} 4' in text
    for stage in ("fetch", "infer", "format"):
        assert f'labelloop_bridge_stage_seconds_count{{stage="{stage}"}} 4' in text
        assert f'labelloop_bridge_stage_seconds_bucket{{stage="{stage}",le="+Inf"}} 4' in text


def test_webhook_events_are_stored_for_the_trainer(bridge: BridgeServer) -> None:
    event = {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 3},
        "task": {"id": 17, "data": {"image": "/data/upload/3/a.png"}},
        "annotation": {"id": 9, "result": []},
    }
    with bridge.client() as client:
        created = client.post("/webhook", json=event)
        no_action = client.post("/webhook", json={"project": 3})
    assert created.status_code == 201 and created.json() == {"status": "ok", "id": 1}
    assert no_action.status_code == 422
    assert no_action.json() == {
        "detail": "not a Label Studio webhook event: action: Field required",
        "error": "RequestValidationError",
    }
    (stored,) = EventStore.for_settings(bridge.settings).since(0)
    assert (stored.action, stored.project_id, stored.task_id, stored.payload) == ("ANNOTATION_CREATED", 3, 17, event)


def test_basic_auth_guards_every_route(
    triton_server: TritonHandle, image_server: ImageServer, tmp_path: Path, bridge_factory: BridgeFactory
) -> None:
    settings = _settings(
        triton_server, image_server, tmp_path, basic_auth_user="ls", basic_auth_pass=SecretStr("s3cret")
    )
    bridge = bridge_factory(settings)
    with bridge.client(auth=None) as client:
        for method, path in ROUTES:
            anonymous = client.request(method, path, json={})
            assert anonymous.status_code == 401, path
            assert anonymous.headers["www-authenticate"] == 'Basic realm="labelloop-bridge"'
            wrong = client.request(method, path, json={}, auth=("ls", "wrong"))
            assert wrong.status_code == 401, path
        assert client.get("/health", auth=("ls", "s3cret")).json()["status"] == "UP"
        header = "Basic " + base64.b64encode(b"ls:s3cret").decode()
        assert client.get("/metrics", headers={"Authorization": header}).status_code == 200
        assert client.get("/docs", headers={"Authorization": header}).status_code == 200


def test_predict_500_tasks_within_label_studios_timeout(
    bridge: BridgeServer, image_server: ImageServer, images: list[str]
) -> None:
    tasks = [_task(i, image_server.url(images[i % len(images)])) for i in range(500)]
    started = time.perf_counter()
    response = _predict(bridge, tasks)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 500 and all(r["model_version"] == VERSION for r in results)
    assert sum(len(r["result"]) for r in results) > 0
    print(f"\n/predict with 500 tasks: {elapsed:.1f}s ({1000 * elapsed / 500:.1f} ms per task)")
    assert elapsed < 100.0  # ML_TIMEOUT_PREDICT
