"""Real peers for the bridge: Label Studio, the bridge itself in uvicorn, and a plain image server."""

from __future__ import annotations

import asyncio
import gzip
import http.server
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import SecretStr
from typer.testing import CliRunner

from core.credentials import bridge_credentials
from core.settings import Settings
from core.studio import DEFECT_LABEL_CONFIG
from labelloop.bench_rig import LoopbackHTTPServer
from labelloop.cli import app
from ls_bridge.app import create_app
from ls_bridge.controls import plan_for_config
from ls_bridge.geometry import PercentBox, percent_to_pixels
from serving.client import ImageDetections, make_client
from tests.conftest import TritonHandle, free_port
from tests.label_studio import LABEL_STUDIO_BIN, LabelStudioServer

BOX_TOLERANCE_PX = 1e-3
# Every route the bridge serves: each must refuse a caller without credentials.
ROUTES = [
    ("GET", "/health"),
    ("POST", "/setup"),
    ("POST", "/predict"),
    ("POST", "/webhook"),
    ("GET", "/metrics"),
    ("GET", "/docs"),
    ("GET", "/redoc"),
    ("GET", "/openapi.json"),
]


def detect_direct(triton: TritonHandle, blobs: list[bytes], conf: float = 0.25) -> list[ImageDetections]:
    """What Triton answers for the same bytes, through the serving client the CLI uses."""

    async def run() -> list[ImageDetections]:
        async with make_client(triton.settings) as client:
            return [await client.detect(b, conf=conf, iou=triton.settings.iou) for b in blobs]

    return asyncio.run(run())


def task_score(triton: TritonHandle, blob: bytes, config: str = DEFECT_LABEL_CONFIG) -> float:
    """The task score the bridge must give: the shipped plan on Triton's own candidates for the image."""
    (candidates,) = detect_direct(triton, [blob])
    plan = plan_for_config(config, tuple(candidates.model.classes), triton.settings.conf)
    (candidates,) = detect_direct(triton, [blob], conf=plan.request_threshold)
    return plan.format({"image": candidates})[1]


def assert_regions_match(result: list[dict[str, Any]], width: int, height: int, boxes: list[dict[str, Any]]) -> None:
    """Label Studio regions equal detections (``labelloop detect --json`` rows): labels, scores, boxes in pixels."""
    assert len(result) == len(boxes)
    for region, box in zip(result, boxes, strict=True):
        assert (region["from_name"], region["to_name"], region["type"]) == ("label", "image", "rectanglelabels")
        assert (region["original_width"], region["original_height"]) == (width, height)
        value = region["value"]
        assert value["rectanglelabels"] == [box["label"]]
        assert region["score"] == pytest.approx(box["score"], abs=1e-6)
        pixels = percent_to_pixels(PercentBox(value["x"], value["y"], value["width"], value["height"]), width, height)
        assert pixels == pytest.approx((box["x1"], box["y1"], box["x2"], box["y2"]), abs=BOX_TOLERANCE_PX)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """One real Label Studio 1.23 for the whole session (its first start migrates, ~40-60 s)."""
    if not LABEL_STUDIO_BIN.is_file():
        pytest.skip(f"Label Studio is not installed at {LABEL_STUDIO_BIN} (scripts/setup.sh creates .venv-ls)")
    with LabelStudioServer(tmp_path_factory.mktemp("label-studio"), port=free_port()) as server:
        yield server


class BridgeServer:
    """``create_app(settings)`` served by uvicorn in a thread on a free loopback port.

    ``auth`` is the basic-auth pair the bridge checks (None with ``bridge_auth="none"``); ``client()``
    sends it unless told otherwise.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = free_port()
        self.app = create_app(settings)
        pair = bridge_credentials(settings) if settings.bridge_auth == "basic" else None
        self.auth = (pair.user, pair.password.get_secret_value()) if pair else None
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"bridge-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the bridge did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("auth", self.auth)
        return httpx.Client(base_url=self.url, timeout=120.0, trust_env=False, **kwargs)


@pytest.fixture
def bridge_factory() -> Iterator[Callable[[Settings], BridgeServer]]:
    """Start bridges for one test; all are stopped when it ends."""
    started: list[BridgeServer] = []

    def start(settings: Settings) -> BridgeServer:
        server = BridgeServer(settings)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@dataclass(frozen=True)
class SessionEnv:
    """A session test's settings and the environment its ``labelloop`` commands run with."""

    settings: Settings
    env: dict[str, str]

    def train(self, project: int) -> dict[str, Any]:
        """``labelloop train --project ID --json``, which must succeed; its document."""
        result = CliRunner().invoke(app, ["train", "--project", str(project), "--json"], env=self.env)
        assert result.exit_code == 0, result.output
        doc: dict[str, Any] = json.loads(result.stdout)
        return doc


@pytest.fixture
def session_env(label_studio: LabelStudioServer, private_triton: TritonHandle, tmp_path: Path) -> SessionEnv:
    """Settings and environment for session commands against the test Label Studio and a private Triton."""
    pat = label_studio.personal_access_token()
    settings = private_triton.settings.model_copy(
        update={
            "label_studio_url": label_studio.url,
            "label_studio_api_key": SecretStr(pat),
            "state_dir": tmp_path / "state",
            "bridge_auth": "none",
        }
    )
    env = {
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": pat,
        "LABELLOOP_MODEL_REPOSITORY": str(settings.model_repository),
        "LABELLOOP_STATE_DIR": str(settings.state_dir),
        "LABELLOOP_TRITON_URL": private_triton.url,
        "LABELLOOP_BRIDGE_AUTH": "none",
    }
    return SessionEnv(settings, env)


class _ImageHandler(http.server.SimpleHTTPRequestHandler):
    """Files from a folder, plus ``/slow/<file>`` (answers after 2 s), ``/redirect?to=<url>``,
    ``/gzip/<file>`` (sent gzip-encoded) and ``/cut/<file>`` (the connection drops mid-body)."""

    server: ImageServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.hits[self.path.split("?", 1)[0]] += 1
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.split("=", 1)[1])
            self.end_headers()
            return
        if self.path.startswith(("/gzip/", "/cut/")):
            kind, name = self.path.strip("/").split("/", 1)
            data = (self.server.root / name).read_bytes()
            body = gzip.compress(data) if kind == "gzip" else data[: len(data) // 2]
            self.send_response(200)
            if kind == "gzip":
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body) if kind == "gzip" else len(data)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        if self.path.startswith("/slow/"):
            time.sleep(2)
            self.path = self.path[len("/slow") :]
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the tests count hits instead."""


class ImageServer(LoopbackHTTPServer):
    """A plain http server for task images on 127.0.0.1, counting the paths it was asked for."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hits: Counter[str] = Counter()

        def handler(*args: object) -> _ImageHandler:
            return _ImageHandler(*args, directory=str(root))  # type: ignore[arg-type]

        super().__init__(handler, "image-server")

    def handle_error(self, request: object, client_address: object) -> None:
        """Quiet: clients that hang up early (size and time limits) are what the tests provoke."""


@pytest.fixture(scope="module")
def image_dir(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo validation images, plus ``broken.png``, a file that is no image at all."""
    root = tmp_path_factory.mktemp("served")
    for path in sorted((demo_dataset.parent / "images" / "val").iterdir()):
        (root / path.name).write_bytes(path.read_bytes())
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


@pytest.fixture(scope="module")
def images(image_dir: Path) -> list[str]:
    """The names of the real images in ``image_dir``."""
    return sorted(p.name for p in image_dir.iterdir() if p.name != "broken.png")


@pytest.fixture(scope="module")
def image_server(image_dir: Path) -> Iterator[ImageServer]:
    with ImageServer(image_dir) as server:
        yield server
