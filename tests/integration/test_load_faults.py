"""Load with faults: a 500-task "Retrieve predictions" with 5 % broken tasks, and a version published
in the middle of it, while single-task requests (what Label Studio sends when a task is opened) go on.

Every good task gets its pre-labels, every bad one a per-task error, and no request is lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.settings import Settings
from core.studio import DEFECT_LABEL_CONFIG
from serving.client import ImageDetections, make_client
from serving.publish import build_model, publish_built
from serving.repository import ModelCard
from tests.conftest import TEST_IMGSZ, TritonHandle
from tests.integration.conftest import BridgeServer, ImageServer, assert_regions_match

pytestmark = [pytest.mark.slow, pytest.mark.triton]

TASKS = 500
BROKEN_EVERY = 20  # 5 %


def _broken_urls(server: ImageServer, image: str) -> list[tuple[str, str]]:
    """(URL, the error class its task must report), one of each kind of fault."""
    port = server.server_address[1]
    return [
        ("http://[::1/x.png", "FetchError"),  # malformed URL
        (server.url("broken.png"), "ImageError"),  # bytes that are no image
        (f"http://localhost:{port}/{image}", "FetchError"),  # a host that is not allowed
        (f"http://127.0.0.1:1/{image}", "FetchError"),  # the allowed host on another port
        (server.url("missing.jpg"), "FetchError"),  # 404
    ]


def _task(task_id: int, url: str) -> dict[str, Any]:
    return {"id": task_id, "data": {"image": url}, "project": 1, "predictions": [], "annotations": []}


def _body(tasks: list[dict[str, Any]]) -> str:
    return json.dumps({"tasks": tasks, "project": "1.1", "label_config": DEFECT_LABEL_CONFIG, "params": {}})


def _tasks_done(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    return sum(float(m) for m in re.findall(r'^labelloop_bridge_tasks_total\{outcome="\w+"\} (\S+)$', text, re.M))


def _direct(settings: Settings, blobs: dict[str, bytes]) -> dict[str, ImageDetections]:
    async def run() -> dict[str, ImageDetections]:
        async with make_client(settings) as client:
            return {name: await client.detect(b, conf=settings.conf, iou=settings.iou) for name, b in blobs.items()}

    return asyncio.run(run())


def test_a_big_batch_with_broken_tasks_and_a_publish_in_the_middle(
    private_triton: TritonHandle,
    trained_weights: Path,
    image_server: ImageServer,
    image_dir: Path,
    images: list[str],
    tmp_path: Path,
    bridge_factory: Callable[[Settings], BridgeServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = private_triton.settings.model_copy(
        update={"allowed_origins": [f"http://{image_server.host}"], "state_dir": tmp_path / "state"}
    )
    bridge = bridge_factory(settings)
    broken = _broken_urls(image_server, images[0])
    tasks, expected_error, wanted = [], {}, {}
    for i in range(TASKS):
        if i % BROKEN_EVERY == BROKEN_EVERY - 1:
            url, error = broken[(i // BROKEN_EVERY) % len(broken)]
            expected_error[i] = error
        else:
            url = image_server.url(images[i % len(images)])
            wanted[i] = images[i % len(images)]
        tasks.append(_task(i, url))
    assert len(expected_error) == TASKS // BROKEN_EVERY
    # Version 2 is the same network, built now so that only the write and the load fall mid-batch.
    built = build_model(settings, trained_weights, TEST_IMGSZ, tmp_path / "built", [])
    card = ModelCard(name=settings.model_name, version=0, classes=[], imgsz=TEST_IMGSZ)

    big: dict[str, Any] = {}
    singles: list[tuple[float, float, int, str]] = []  # (sent, answered, status, model_version)
    stop = threading.Event()

    def retrieve_predictions() -> None:
        with bridge.client() as client:
            response = client.post("/predict", content=_body(tasks), headers={"content-type": "application/json"})
        big["response"], big["answered"] = response, time.monotonic()

    def open_tasks() -> None:
        with bridge.client() as client:
            n = 0
            while not stop.is_set():
                sent = time.monotonic()
                body = _body([_task(10_000 + n, image_server.url(images[n % len(images)]))])
                response = client.post("/predict", content=body, headers={"content-type": "application/json"})
                version = response.json()["results"][0]["model_version"] if response.status_code == 200 else ""
                singles.append((sent, time.monotonic(), response.status_code, version))
                n += 1
                time.sleep(0.05)

    with caplog.at_level(logging.WARNING, logger="ls_bridge"):
        workers = [threading.Thread(target=retrieve_predictions), threading.Thread(target=open_tasks)]
        for worker in workers:
            worker.start()
        with bridge.client() as client:
            deadline = time.monotonic() + 60
            while _tasks_done(client) < 50 and time.monotonic() < deadline:
                time.sleep(0.05)
        version, served = publish_built(settings, built, trained_weights, card, True)
        published = time.monotonic()
        workers[0].join(timeout=120)
        time.sleep(1.0)  # a few single-task requests after the switch
        stop.set()
        workers[1].join(timeout=30)

    assert version == 2 and served is not None and served.version == 2
    response = big["response"]
    assert response.status_code == 200, response.text
    assert big["answered"] > published, "the publish did not happen during the batch"
    results = response.json()["results"]
    assert len(results) == TASKS
    assert {r["model_version"] for r in results} <= {"defect_detector@v1", "defect_detector@v2"}
    # Every bad task: an empty result and one warning naming it and its error class.
    warnings = [r.getMessage() for r in caplog.records if r.name == "ls_bridge.predictor"]
    for i, error in expected_error.items():
        assert results[i]["result"] == [] and results[i]["score"] == 0.0
        assert sum(w.startswith(f"task {i}: no pre-labels ({error}:") for w in warnings) == 1, i
    failed = {int(m.group(1)) for w in warnings if (m := re.match(r"task (\d+): no pre-labels", w))}
    assert failed == set(expected_error)
    # Every good task: exactly the boxes Triton gives its image (both versions are the same network).
    direct = _direct(settings, {name: (image_dir / name).read_bytes() for name in set(wanted.values())})
    for i, name in wanted.items():
        expected = direct[name]
        assert_regions_match(
            results[i]["result"], expected.width, expected.height, [asdict(d) for d in expected.detections]
        )
    # No single-task request was lost, and those sent after the switch got version 2.
    assert singles and all(status == 200 for _, _, status, _ in singles)
    after = [v for sent, _, _, v in singles if sent > published]
    assert after and set(after) == {"defect_detector@v2"}
