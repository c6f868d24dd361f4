"""The bridge's exposure, against the running app (no Triton needed): auth by default, the API docs
behind it, a bounded and validated /webhook, /setup's extra params, and /predict's deadline."""

from __future__ import annotations

import base64
import logging
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.credentials import credentials_path
from core.events import EventStore
from core.settings import Settings
from core.studio import DEFECT_LABEL_CONFIG
from tests.conftest import free_port
from tests.integration.conftest import ROUTES, BridgeServer

BridgeFactory = Callable[[Settings], BridgeServer]


def _settings(tmp_path: Path, **extra: Any) -> Settings:
    """A bridge whose Triton address answers nothing (nothing listens there)."""
    return Settings(state_dir=tmp_path / "state", triton_url=f"127.0.0.1:{free_port()}", **extra)


def test_auth_is_on_by_default_with_a_generated_pair_stored_owner_only(
    tmp_path: Path, bridge_factory: BridgeFactory
) -> None:
    settings = _settings(tmp_path)
    bridge = bridge_factory(settings)
    path = credentials_path(settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert bridge.auth is not None and bridge.auth[0] == "labelloop"
    with bridge.client(auth=None) as anonymous:
        for method, route in ROUTES:
            response = anonymous.request(method, route, json={})
            assert response.status_code == 401, route
            assert response.headers["www-authenticate"] == 'Basic realm="labelloop-bridge"'
            assert "openapi" not in response.text and "swagger" not in response.text.lower()
            assert anonymous.request(method, route, json={}, auth=(bridge.auth[0], "wrong")).status_code == 401
    with bridge.client() as client:
        docs = client.get("/docs")
        assert docs.status_code == 200 and "swagger-ui" in docs.text and "/openapi.json" in docs.text
        assert client.get("/redoc").status_code == 200
        schema = client.get("/openapi.json").json()
        assert {"/predict", "/setup", "/webhook", "/health"} <= set(schema["paths"])
        assert client.get("/metrics").status_code == 200


def test_no_auth_must_be_asked_for_and_warns(
    tmp_path: Path, bridge_factory: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path, bridge_auth="none")
    with caplog.at_level(logging.WARNING, logger="ls_bridge"):
        bridge = bridge_factory(settings)
    assert any("bridge_auth is 'none'" in r.getMessage() for r in caplog.records)
    assert not credentials_path(settings).exists()
    with bridge.client() as client:
        assert client.get("/openapi.json").status_code == 200


@pytest.fixture
def small_webhook(tmp_path: Path, bridge_factory: BridgeFactory) -> BridgeServer:
    return bridge_factory(_settings(tmp_path, webhook_max_bytes=1024))


def test_webhook_refuses_a_declared_oversized_body(small_webhook: BridgeServer) -> None:
    event = {"action": "ANNOTATION_CREATED", "task": {"id": 1}, "pad": "x" * 2000}
    with small_webhook.client() as client:
        response = client.post("/webhook", json=event)
        assert client.post("/webhook", json={"action": "ANNOTATION_CREATED", "task": {"id": 2}}).status_code == 201
    assert response.status_code == 413
    assert response.json() == {
        "detail": "the webhook body is over the 1024-byte limit (webhook_max_bytes)",
        "error": "PayloadTooLarge",
    }
    assert [e.task_id for e in EventStore.for_settings(small_webhook.settings).since(0)] == [2]


def test_webhook_refuses_an_oversized_stream_before_it_ends(small_webhook: BridgeServer) -> None:
    """A chunked body that never ends: only a limit checked while streaming can answer at all."""
    assert small_webhook.auth is not None
    token = base64.b64encode(":".join(small_webhook.auth).encode()).decode()
    head = (
        "POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Basic {token}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b'{"action": "ANNOTATION_CREATED", "pad": "' + b"x" * 600
    with socket.create_connection(("127.0.0.1", small_webhook.port), timeout=10) as sock:
        sock.sendall(head.encode())
        for _ in range(3):  # 3 x 640 bytes > 1024, and no terminating chunk: the body never ends
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = b""
        while b"}" not in answer and (data := sock.recv(65536)):  # the head, then the JSON body
            answer += data
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b'"error":"PayloadTooLarge"' in answer
    assert EventStore.for_settings(small_webhook.settings).since(0) == []


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"{not json", "not a Label Studio webhook event: Invalid JSON"),
        (b'["ANNOTATION_CREATED"]', "not a Label Studio webhook event: Input should be an object"),
        (b'{"project": {"id": 3}}', "not a Label Studio webhook event: action: Field required"),
        (b'{"action": ""}', "not a Label Studio webhook event: action: String should have at least 1 character"),
    ],
)
def test_webhook_validates_its_body(small_webhook: BridgeServer, body: bytes, detail: str) -> None:
    with small_webhook.client() as client:
        response = client.post("/webhook", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"] == "RequestValidationError"
    assert response.json()["detail"].startswith(detail), response.json()


@pytest.mark.parametrize(
    ("extra_params", "detail"),
    [
        ("{bad", "extra_params: extra params are not valid JSON (Expecting property name"),
        ('["a"]', "extra_params: extra params must be a JSON object, not list"),
    ],
)
def test_setup_explains_extra_params_it_cannot_read(
    tmp_path: Path, bridge_factory: BridgeFactory, extra_params: str, detail: str
) -> None:
    bridge = bridge_factory(_settings(tmp_path))
    body = {"project": "1.1", "schema": DEFECT_LABEL_CONFIG, "extra_params": extra_params}
    with bridge.client() as client:
        response = client.post("/setup", json=body)
    assert response.status_code == 422
    assert response.json()["error"] == "RequestValidationError"
    assert response.json()["detail"].startswith(detail), response.json()
    assert "Connect Model" in response.json()["detail"] or "object" in response.json()["detail"]


@pytest.fixture
def silent_triton() -> Iterator[str]:
    """A TCP port that accepts connections and never answers: every gRPC call runs into its deadline."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    thread = threading.Thread(target=accept, name="silent-triton", daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    server.close()
    thread.join(timeout=5)
    for conn in held:
        conn.close()


def test_predict_answers_within_its_budget_when_triton_hangs(
    tmp_path: Path, bridge_factory: BridgeFactory, silent_triton: str
) -> None:
    """Retries on DEADLINE_EXCEEDED stop when the request's budget is spent (without it: 11 x 1 s + backoff)."""
    settings = _settings(tmp_path, predict_deadline_s=2.0, triton_timeout_s=1.0, triton_retries=10).model_copy(
        update={"triton_url": silent_triton}
    )
    bridge = bridge_factory(settings)
    body = {"tasks": [{"id": 1, "data": {"image": "http://images.test/a.png"}}], "label_config": DEFECT_LABEL_CONFIG}
    with bridge.client() as client:
        started = time.monotonic()
        response = client.post("/predict", json=body)
        elapsed = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "TritonUnavailableError"
    assert "time budget" in response.json()["detail"]
    assert elapsed < 2.0 + 0.5
