"""The one Label Studio client: paging, errors that say what to fix, and the Label Studio `up` runs as the default.

A small real HTTP server plays Label Studio's API here (answers as Label Studio 1.23 gives them);
the real Label Studio runs in tests/integration/test_trainer_label_studio.py and test_stack.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from core.errors import ConfigError, LabelStudioError
from core.settings import Settings
from core.studio import DEFECT_LABEL_CONFIG, Credentials, StudioClient, credentials_file, studio_settings
from labelloop.cli import app
from tests.conftest import free_port

TOKEN = "0123456789abcdef0123456789abcdef01234567"
Route = Callable[[dict[str, list[str]]], tuple[int, Any]]


class FakeStudioAPI:
    """A real HTTP server on loopback answering GET routes; it records the path and Authorization of each call."""

    def __init__(self, routes: dict[str, Route], token: str = TOKEN) -> None:
        self.calls: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                outer.calls.append((self.path, self.headers.get("Authorization")))
                if self.headers.get("Authorization") != f"Token {token}":
                    status, body = 401, {"detail": "Invalid token."}
                elif url.path in routes:
                    status, body = routes[url.path](parse_qs(url.query))
                else:
                    status, body = 404, {"detail": "Not found."}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeStudioAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _task_pages(total: int, page_size: int = 100) -> Route:
    """``/api/tasks/`` as Label Studio pages it: 404 ("Invalid page.") past the last page."""

    def route(query: dict[str, list[str]]) -> tuple[int, Any]:
        page = int(query["page"][0])
        ids = list(range(1, total + 1))[(page - 1) * page_size : page * page_size]
        if page > 1 and not ids:
            return 404, {"detail": "Invalid page."}
        return 200, {"tasks": [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"}} for i in ids], "total": total}

    return route


@pytest.fixture()
def studio() -> Iterator[FakeStudioAPI]:
    routes: dict[str, Route] = {
        "/api/projects/7/": lambda q: (200, {"id": 7, "label_config": DEFECT_LABEL_CONFIG, "task_number": 200}),
        "/api/tasks/": _task_pages(200),
    }
    with FakeStudioAPI(routes) as server:
        yield server


async def _tasks(url: str, token: str = TOKEN) -> list[dict[str, Any]]:
    async with StudioClient(url, token) as client:
        return await client.tasks(7)


def test_every_page_is_read_and_the_404_past_the_last_ends_it(studio: FakeStudioAPI) -> None:
    tasks = asyncio.run(_tasks(studio.url))
    assert [t["id"] for t in tasks] == list(range(1, 201))
    pages = [parse_qs(urlsplit(path).query)["page"] for path, _ in studio.calls]
    assert pages == [["1"], ["2"], ["3"]], "a full last page is followed by one more request, answered 404"


def test_a_refused_key_says_which_setting_to_check(studio: FakeStudioAPI) -> None:
    with pytest.raises(LabelStudioError, match=r"GET /api/tasks/: HTTP 401 \(check LABEL_STUDIO_API_KEY\)"):
        asyncio.run(_tasks(studio.url, token="f" * 40))


def test_no_label_studio_at_the_address_says_so() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(LabelStudioError, match=rf"GET {url}/api/tasks/: ConnectError.*is Label Studio running there"):
        asyncio.run(_tasks(url))


# --- without a configured Label Studio: the one `labelloop up` runs ---------------------------------------------


def _store_up_credentials(state: Path) -> None:
    """What `labelloop up` leaves in the state folder (core.studio.load_or_create_credentials)."""
    path = credentials_file(state)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(asdict(Credentials("admin@labelloop.local", "pw", TOKEN))))


def test_configured_label_studio_wins(tmp_path: Path) -> None:
    _store_up_credentials(tmp_path)
    settings = Settings(state_dir=tmp_path, label_studio_url="http://ls:8080", label_studio_api_key=SecretStr("k"))
    assert studio_settings(settings, "x") is settings


def test_with_nothing_configured_the_stacks_label_studio_is_used(tmp_path: Path) -> None:
    _store_up_credentials(tmp_path)
    found = studio_settings(Settings(state_dir=tmp_path, label_studio_port=8123), "x")
    assert found.label_studio_url == "http://127.0.0.1:8123"
    assert found.label_studio_api_key is not None and found.label_studio_api_key.get_secret_value() == TOKEN


@pytest.mark.parametrize(
    ("configured", "missing"),
    [
        ({}, "export LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or run `labelloop up`"),
        ({"label_studio_url": "http://ls:8080"}, "export LABEL_STUDIO_API_KEY (set both, or neither"),
        ({"label_studio_api_key": SecretStr("k")}, "export LABEL_STUDIO_URL (set both, or neither"),
    ],
)
def test_without_either_the_error_names_the_exports(tmp_path: Path, configured: dict[str, Any], missing: str) -> None:
    if configured:
        _store_up_credentials(tmp_path)  # a half-configured Label Studio is never mixed with the stack's
    with pytest.raises(ConfigError, match=r"prelabel needs Label Studio's address and key: ") as info:
        studio_settings(Settings(state_dir=tmp_path, **configured), "prelabel")
    assert missing in str(info.value)


def test_train_project_reads_the_label_studio_up_runs(studio: FakeStudioAPI, tmp_path: Path) -> None:
    """`up` prints a project; `labelloop train --project` then needs no exports: it finds `up`'s token."""
    _store_up_credentials(tmp_path / "state")
    env = {
        "LABELLOOP_STATE_DIR": str(tmp_path / "state"),
        "LABELLOOP_MODEL_REPOSITORY": str(tmp_path / "models"),
        "LABELLOOP_TRITON_URL": f"127.0.0.1:{free_port()}",
        "LABELLOOP_LABEL_STUDIO_PORT": str(studio.port),
    }
    result = CliRunner().invoke(app, ["train", "--project", "7"], env=env)
    # The fake project's tasks carry no annotation: the run got that far with the stored token.
    assert result.exit_code == 1 and "project 7 has no completed, non-cancelled annotations" in result.stderr
    assert studio.calls[0] == ("/api/projects/7/", f"Token {TOKEN}")
    assert {auth for _, auth in studio.calls} == {f"Token {TOKEN}"}
