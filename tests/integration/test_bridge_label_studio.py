"""End to end with a real Label Studio 1.23.2: it connects the bridge, asks it for pre-labels and stores them.

Every step goes through Label Studio's own API and actions ("Retrieve predictions" is the Data
Manager action the UI sends), and the stored predictions are compared with ``labelloop detect``
on the same files.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import SecretStr
from typer.testing import CliRunner

from core.events import EventStore
from core.settings import Settings
from core.studio import DEFECT_LABEL_CONFIG as SEED_CONFIG
from labelloop.cli import app
from tests.conftest import TritonHandle
from tests.integration.conftest import BridgeServer, assert_regions_match, task_score
from tests.label_studio import LabelStudioAPI, LabelStudioServer

pytestmark = [pytest.mark.slow, pytest.mark.triton, pytest.mark.label_studio]

VERSION = "defect_detector@v1"
N_IMAGES = 6
ORIENTATION = 0x0112

BridgeFactory = Callable[[Settings], BridgeServer]


def _kind(path: Path) -> str:
    with Image.open(path) as image:
        orientation = image.getexif().get(ORIENTATION, 1)
        return f"exif{orientation}" if orientation != 1 else image.mode


@pytest.fixture(scope="module")
def images(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Validation images, one of each kind the demo data has first (EXIF-rotated, gray, RGBA), then plain."""
    candidates = sorted((demo_dataset.parent / "images" / "val").iterdir())
    firsts: dict[str, Path] = {}
    for path in candidates:
        firsts.setdefault(_kind(path), path)
    assert any(kind.startswith("exif") for kind in firsts), firsts
    chosen = list(firsts.values())[:N_IMAGES]
    chosen += [p for p in candidates if p not in chosen][: N_IMAGES - len(chosen)]
    root = tmp_path_factory.mktemp("e2e-images")
    for path in chosen:
        shutil.copyfile(path, root / path.name)
    return [root / path.name for path in chosen]


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("broken") / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not an image at all")
    return path


@pytest.fixture(scope="module")
def detected(triton_server: TritonHandle, images: list[Path]) -> dict[str, dict[str, Any]]:
    """``labelloop detect --json`` on the same files, keyed by file name: what Label Studio must show."""
    result = CliRunner().invoke(app, ["detect", "--json", "--triton-url", triton_server.url, *map(str, images)])
    assert result.exit_code == 0, result.output
    rows = {Path(row["image"]).name: row for row in json.loads(result.stdout)}
    assert sum(len(r["detections"]) for r in rows.values()) > 0
    return rows


@pytest.fixture(scope="module")
def scores(triton_server: TritonHandle, images: list[Path]) -> dict[str, float]:
    """The task score each file must get (its boxes and near-misses, straight from Triton), keyed by file name."""
    return {path.name: task_score(triton_server, path.read_bytes()) for path in images}


def _bridge_settings(triton: TritonHandle, ls: LabelStudioServer, state: Path, token: str, **extra: Any) -> Settings:
    update = {
        "label_studio_url": ls.url,
        "label_studio_api_key": SecretStr(token),
        "state_dir": state,
        **extra,
    }
    return triton.settings.model_copy(update=update)


def _basic_header(pair: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(":".join(pair).encode()).decode()


def _connect_with_auth(api: LabelStudioAPI, project: int, bridge: BridgeServer) -> None:
    """Connect as a user does with auth on: the pair in Connect Model, and on the webhook Label Studio creates.

    Label Studio's auto-created webhook carries no credentials; the header added to it does
    (docs/label-studio.md, Basic auth).
    """
    assert bridge.auth is not None
    api.connect_ml(project, bridge.url, basic_auth=bridge.auth)
    (webhook,) = api.webhooks(project)
    api.update_webhook(webhook["id"], headers={"Authorization": _basic_header(bridge.auth)})


def _file_name(task: dict[str, Any]) -> str:
    """The original file name: uploads are stored as ``<8 hex>-<name>``, local files keep theirs."""
    url: str = task["data"]["image"]
    name = url.rsplit("/", 1)[-1]
    return name.split("-", 1)[1] if url.startswith("/data/upload/") else name


def _cli_project(
    label_studio: LabelStudioServer,
    triton: TritonHandle,
    title: str,
    files: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[LabelStudioAPI, int]:
    """A project holding ``files``, and the environment the CLI finds Label Studio (with a PAT) and Triton in."""
    api = label_studio.api()
    project = api.create_project(title, SEED_CONFIG)
    api.import_files(project, files)
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.personal_access_token())
    monkeypatch.setenv("LABELLOOP_TRITON_URL", triton.url)
    return api, project


def _assert_predictions_equal_detect(
    tasks: list[dict[str, Any]], detected: dict[str, dict[str, Any]], scores: dict[str, float]
) -> int:
    """Each predicted task holds exactly one prediction equal to ``labelloop detect``; returns how many."""
    checked = 0
    for task in tasks:
        name = _file_name(task)
        if name not in detected:
            continue
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == VERSION
        row = detected[name]
        assert_regions_match(prediction["result"], row["width"], row["height"], row["detections"])
        assert prediction["score"] == pytest.approx(scores[name], abs=1e-6)
        checked += 1
    return checked


@pytest.mark.parametrize("token_kind", ["pat", "legacy"])
def test_label_studio_stores_the_bridges_prelabels(
    token_kind: str,
    label_studio: LabelStudioServer,
    triton_server: TritonHandle,
    bridge_factory: BridgeFactory,
    images: list[Path],
    broken: Path,
    detected: dict[str, dict[str, Any]],
    scores: dict[str, float],
    tmp_path: Path,
) -> None:
    api = label_studio.api()
    token = label_studio.personal_access_token() if token_kind == "pat" else label_studio.token
    # Auth on by default: the bridge checks the pair it generated into its state folder.
    bridge = bridge_factory(_bridge_settings(triton_server, label_studio, tmp_path / "state", token))
    project = api.create_project(f"e2e {token_kind}", SEED_CONFIG)
    _connect_with_auth(api, project, bridge)
    (backend,) = api.ml_backends(project)
    assert backend["readable_state"] == "Connected" and backend["model_version"] == VERSION

    # Uploads (one broken), local files through a local storage, and a cloud URI Label Studio must presign.
    api.import_files(project, [*images, broken])
    local = label_studio.document_root / f"parts-{token_kind}"
    local.mkdir()
    for path in images[:2]:
        shutil.copyfile(path, local / path.name)
    api.add_local_storage(project, local)
    cloud_uri = f"s3://labelloop-test/{token_kind}/part.png"
    api.import_tasks(project, [{"image": cloud_uri}])

    api.retrieve_predictions(project)

    tasks = api.tasks(project)
    assert len(tasks) == N_IMAGES + 1 + 2 + 1
    assert all(len(t["predictions"]) == 1 for t in tasks), [t["predictions"] for t in tasks]
    assert _assert_predictions_equal_detect(tasks, detected, scores) == N_IMAGES + 2
    failed = [t for t in tasks if t["data"]["image"].endswith("broken.png") or t["data"]["image"] == cloud_uri]
    assert [(t["predictions"][0]["result"], t["predictions"][0]["model_version"]) for t in failed] == [
        ([], VERSION),
        ([], VERSION),
    ]
    # The bridge asked Label Studio to presign the cloud URI: Label Studio decoded it (and has no storage for it).
    assert f"Could not find storage for URI {cloud_uri}" in label_studio.log_file.read_text()

    auth = bridge.app.state.bridge.predictor.fetcher.auth
    assert auth is not None and auth.kind == token_kind
    assert (auth.refreshes >= 1) if token_kind == "pat" else (auth.refreshes == 0)

    # The webhook Label Studio created with the connection delivers annotations to the trainer's store.
    (webhook,) = api.webhooks(project)
    assert webhook["url"] == f"{bridge.url}/webhook"
    annotated = tasks[0]["id"]
    api.create_annotation(annotated, tasks[0]["predictions"][0]["result"])
    events = EventStore.for_settings(bridge.settings).since(0, actions={"ANNOTATION_CREATED"})
    assert [(e.project_id, e.task_id) for e in events] == [(project, annotated)]


def test_label_studio_connects_only_with_the_right_basic_auth(
    label_studio: LabelStudioServer,
    triton_server: TritonHandle,
    bridge_factory: BridgeFactory,
    images: list[Path],
    detected: dict[str, dict[str, Any]],
    scores: dict[str, float],
    tmp_path: Path,
) -> None:
    credentials = ("labelstudio", "bridge-pass-123")
    settings = _bridge_settings(
        triton_server,
        label_studio,
        tmp_path / "state",
        label_studio.personal_access_token(),
        basic_auth_user=credentials[0],
        basic_auth_pass=SecretStr(credentials[1]),
    )
    bridge = bridge_factory(settings)
    api = label_studio.api()
    project = api.create_project("e2e basic auth", SEED_CONFIG)
    refused = "authentication parameters were either not provided or are incorrect"
    for basic_auth in (None, (credentials[0], "wrong")):
        response = api.connect_ml(project, bridge.url, basic_auth=basic_auth, check=False)
        assert response.status_code == 400 and refused in response.text, response.text
    assert api.ml_backends(project) == []
    api.connect_ml(project, bridge.url, basic_auth=credentials)
    api.import_files(project, images[:3])
    api.retrieve_predictions(project)
    assert _assert_predictions_equal_detect(api.tasks(project), detected, scores) == 3

    # Label Studio's auto-created webhook carries no credentials; the header added to it does
    # (docs/label-studio.md, Basic auth).
    store = EventStore.for_settings(settings)
    (webhook,) = api.webhooks(project)
    task = api.tasks(project)[0]["id"]
    api.create_annotation(task, [])
    assert store.since(0, actions={"ANNOTATION_CREATED"}) == []
    api.update_webhook(webhook["id"], headers={"Authorization": _basic_header(credentials)})
    api.create_annotation(task, [])
    assert [e.task_id for e in store.since(0, actions={"ANNOTATION_CREATED"})] == [task]


def test_connect_model_sends_extra_params_as_text(
    label_studio: LabelStudioServer,
    triton_server: TritonHandle,
    bridge_factory: BridgeFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Label Studio's Connect Model form stores "Extra params" as text and sends it to /setup as is."""
    bridge = bridge_factory(
        _bridge_settings(triton_server, label_studio, tmp_path / "state", label_studio.token, bridge_auth="none")
    )
    api = label_studio.api()
    for extra_params in ("", '{"threshold": 0.4}'):
        project = api.create_project(f"e2e extra params {extra_params!r}", SEED_CONFIG)
        body = {"project": project, "url": bridge.url, "title": "labelloop", "extra_params": extra_params}
        response = api.client.post("/api/ml", json=body)
        assert response.status_code == 201, response.text
        (backend,) = api.ml_backends(project)
        assert backend["extra_params"] == extra_params
        assert backend["readable_state"] == "Connected" and backend["model_version"] == VERSION

    project = api.create_project("e2e extra params broken", SEED_CONFIG)
    with caplog.at_level(logging.WARNING, logger="ls_bridge"):
        response = api.client.post(
            "/api/ml", json={"project": project, "url": bridge.url, "title": "labelloop", "extra_params": "{oops"}
        )
    # Label Studio 1.23 shows the status line, not the body, in its dialog; the bridge's log says why.
    assert response.status_code == 400 and "422 Client Error" in response.text, response.text
    logged = [r.getMessage() for r in caplog.records if r.name == "ls_bridge.app"]
    assert any("POST /setup: invalid request: extra_params: extra params are not valid JSON" in m for m in logged)


def test_prelabel_streams_a_whole_project_and_skips_what_is_done(
    label_studio: LabelStudioServer,
    triton_server: TritonHandle,
    images: list[Path],
    broken: Path,
    detected: dict[str, dict[str, Any]],
    scores: dict[str, float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api, project = _cli_project(label_studio, triton_server, "e2e prelabel", [*images, broken], monkeypatch)
    args = ["prelabel", "--project", str(project), "--batch-size", "4"]

    first = CliRunner().invoke(app, args)
    assert first.exit_code == 2, first.output  # the broken image failed; the rest were written
    assert f"project {project}: {N_IMAGES} predicted" in first.stdout
    assert f"0 already had {VERSION}, 1 failed" in first.stdout
    tasks = api.tasks(project)
    assert _assert_predictions_equal_detect(tasks, detected, scores) == N_IMAGES
    assert [t["predictions"] for t in tasks if t["data"]["image"].endswith("broken.png")] == [[]]

    again = CliRunner().invoke(app, args)
    assert f"project {project}: 0 predicted (0 boxes), {N_IMAGES} already had {VERSION}, 1 failed" in again.stdout
    assert all(len(t["predictions"]) <= 1 for t in api.tasks(project))


def test_queue_orders_the_data_manager_tab_least_sure_first(
    label_studio: LabelStudioServer,
    triton_server: TritonHandle,
    images: list[Path],
    broken: Path,
    scores: dict[str, float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api, project = _cli_project(label_studio, triton_server, "e2e queue", [*images, broken], monkeypatch)
    labelled = api.tasks(project)[0]
    api.create_annotation(labelled["id"], [])  # submitted: no longer in the queue

    result = CliRunner().invoke(app, ["queue", "--project", str(project), "--json", "--limit", "100"])
    assert result.exit_code == 0, result.output
    queue = json.loads(result.stdout)["tasks"]
    names = {t["id"]: _file_name(t) for t in api.tasks(project)}
    assert len(queue) == N_IMAGES  # every image but the labelled one; the broken one has no prediction
    assert labelled["id"] not in [q["task"] for q in queue]
    # least sure first, the unreadable image (no prediction of the version) last
    assert queue[-1]["score"] is None and names[queue[-1]["task"]] == "broken.png"
    ranked = [q["score"] for q in queue[:-1]]
    assert ranked == sorted(ranked) and len(set(ranked)) > 2
    for q in queue[:-1]:
        assert q["score"] == pytest.approx(scores[names[q["task"]]], abs=1e-6)

    # What a person opens: the tab exists in Label Studio, sorted ascending, for the served version.
    assert api.project(project)["model_version"] == VERSION
    (view,) = api.client.get("/api/dm/views/", params={"project": project}).json()
    assert view["data"]["title"] == "Most uncertain first"
    assert view["data"]["ordering"] == ["tasks:predictions_score"]
    shown = api.client.get("/api/tasks/", params={"project": project, "view": view["id"], "page_size": 100}).json()
    assert [t["id"] for t in shown["tasks"]] == [q["task"] for q in queue]

    # Idempotent: a second run finds the same tab, and the one new label drops out.
    api.create_annotation(queue[0]["task"], [])
    again = CliRunner().invoke(app, ["queue", "--project", str(project), "--json", "--limit", "100"])
    assert again.exit_code == 0, again.output
    assert [q["task"] for q in json.loads(again.stdout)["tasks"]] == [q["task"] for q in queue[1:]]
    assert len(api.client.get("/api/dm/views/", params={"project": project}).json()) == 1
    text = CliRunner().invoke(app, ["queue", "--project", str(project), "--limit", "2"])
    assert text.exit_code == 0, text.output
    assert f'tab "Most uncertain first" sorted by {VERSION}\'s score, lowest (least sure) first' in text.stdout
    assert f"task {queue[1]['task']:>8}  score {queue[1]['score']:.4f}" in text.stdout
