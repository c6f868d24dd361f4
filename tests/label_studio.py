"""A real Label Studio (from ``.venv-ls``) as a test peer, and a small typed client for its API.

    with LabelStudioServer(tmp_dir, port=free_port()) as ls:   # starts, waits for /health
        api = ls.api()                                          # legacy token of the admin
        project = api.create_project("parts", LABEL_CONFIG)
        api.import_files(project, [Path("a.png"), Path("b.jpg")])
        api.connect_ml(project, "http://127.0.0.1:9090", basic_auth=("user", "pass"))
        api.retrieve_predictions(project)
        tasks = api.tasks(project)                               # with their predictions

Label Studio runs on loopback only, started exactly as ``labelloop up`` starts it
(``core.studio``; field notes 4 and 6): legacy tokens enabled at first start,
``ML_BLOCK_LOCAL_IP=false`` and ``SSRF_PROTECTION_ENABLED=false`` so a backend on 127.0.0.1 may be
connected, local-file serving under ``document_root``, and no version check, analytics or Sentry.
The first start of a fresh data folder runs migrations (about 40-60 s); its log is
``<data_dir>/label-studio.log``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from core.processes import stop_group
from core.studio import Credentials, label_studio_command, label_studio_environment

__all__ = ["LABEL_STUDIO_BIN", "LabelStudioAPI", "LabelStudioServer"]

ROOT = Path(__file__).resolve().parent.parent
LABEL_STUDIO_BIN = ROOT / ".venv-ls" / "bin" / "label-studio"


class LabelStudioAPI:
    """The Label Studio REST calls the tests need; every call raises on an HTTP error unless told not to."""

    def __init__(self, base_url: str, authorization: str) -> None:
        self.client = httpx.Client(
            base_url=base_url, headers={"Authorization": authorization}, timeout=120.0, trust_env=False
        )

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> LabelStudioAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _json(self, response: httpx.Response) -> Any:
        if response.is_error:
            raise AssertionError(
                f"{response.request.method} {response.request.url.path}: HTTP {response.status_code} {response.text}"
            )
        return response.json() if response.content else None

    def create_project(self, title: str, label_config: str) -> int:
        body = self._json(self.client.post("/api/projects/", json={"title": title, "label_config": label_config}))
        return int(body["id"])

    def project(self, project_id: int) -> dict[str, Any]:
        body: dict[str, Any] = self._json(self.client.get(f"/api/projects/{project_id}/"))
        return body

    def import_files(self, project_id: int, paths: Sequence[Path]) -> list[int]:
        """Upload files, one task each; returns the new task ids (each file needs its own field name)."""
        before = {t["id"] for t in self.tasks(project_id)}
        files = {f"file{i}": (path.name, path.read_bytes()) for i, path in enumerate(paths)}
        body = self._json(self.client.post(f"/api/projects/{project_id}/import", files=files))
        assert body["task_count"] == len(paths), body
        return sorted(t["id"] for t in self.tasks(project_id) if t["id"] not in before)

    def import_tasks(self, project_id: int, tasks: Sequence[dict[str, Any]]) -> None:
        body = self._json(self.client.post(f"/api/projects/{project_id}/import", json=list(tasks)))
        assert body["task_count"] == len(tasks), body

    def connect_ml(
        self,
        project_id: int,
        url: str,
        *,
        title: str = "labelloop",
        basic_auth: tuple[str, str] | None = None,
        check: bool = True,
    ) -> httpx.Response:
        """``POST /api/ml``: Label Studio checks /health and /setup before it accepts the backend."""
        body: dict[str, Any] = {"project": project_id, "url": url, "title": title, "is_interactive": False}
        if basic_auth is not None:
            body |= {"auth_method": "BASIC_AUTH", "basic_auth_user": basic_auth[0], "basic_auth_pass": basic_auth[1]}
        response = self.client.post("/api/ml", json=body)
        if check:
            self._json(response)
        return response

    def ml_backends(self, project_id: int) -> list[dict[str, Any]]:
        body: list[dict[str, Any]] = self._json(self.client.get("/api/ml", params={"project": project_id}))
        return body

    def retrieve_predictions(self, project_id: int) -> Any:
        """The Data Manager's "Retrieve predictions" action on every task of the project."""
        return self._json(
            self.client.post(
                "/api/dm/actions",
                params={"id": "retrieve_tasks_predictions", "project": project_id},
                json={"selectedItems": {"all": True, "excluded": []}},
            )
        )

    def tasks(self, project_id: int) -> list[dict[str, Any]]:
        """Every task with its predictions, in id order."""
        tasks: list[dict[str, Any]] = []
        page = 1
        while True:
            params: dict[str, int | str] = {"project": project_id, "page": page, "page_size": 100, "fields": "all"}
            response = self.client.get("/api/tasks/", params=params)
            if response.status_code == 404 and page > 1:
                break
            batch = self._json(response)["tasks"]
            tasks += batch
            if len(batch) < 100:
                break
            page += 1
        return sorted(tasks, key=lambda t: int(t["id"]))

    def predictions(self, task_id: int) -> list[dict[str, Any]]:
        body: list[dict[str, Any]] = self._json(self.client.get("/api/predictions/", params={"task": task_id}))
        return body

    def create_annotation(self, task_id: int, result: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = self._json(
            self.client.post(f"/api/tasks/{task_id}/annotations/", json={"result": result})
        )
        return body

    def webhooks(self, project_id: int) -> list[dict[str, Any]]:
        body: list[dict[str, Any]] = self._json(self.client.get("/api/webhooks/", params={"project": project_id}))
        return body

    def update_webhook(self, webhook_id: int, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = self._json(self.client.patch(f"/api/webhooks/{webhook_id}/", json=fields))
        return body

    def add_local_storage(self, project_id: int, path: Path, regex: str = r".*\.(png|jpe?g)$") -> int:
        """A local-files import storage over ``path`` (under the document root), synced into tasks."""
        body = self._json(
            self.client.post(
                "/api/storages/localfiles/",
                json={
                    "project": project_id,
                    "path": str(path),
                    "regex_filter": regex,
                    "use_blob_urls": True,
                    "title": path.name,
                },
            )
        )
        self._json(self.client.post(f"/api/storages/localfiles/{body['id']}/sync"))
        return int(body["id"])

    def create_pat(self) -> str:
        """A new Personal Access Token (a JWT refresh token); Label Studio allows one per user at a time."""
        return str(self._json(self.client.post("/api/token/"))["token"])


class LabelStudioServer:
    """One ``label-studio start`` process with its own data folder, on 127.0.0.1."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        *,
        username: str = "admin@labelloop.test",
        password: str = "labelloop-test-pw",
        document_root: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.username = username
        self.password = password
        self.token = secrets.token_hex(20)  # a legacy token: 40 hex characters
        self.document_root = Path(document_root).resolve() if document_root else self.data_dir / "files"
        self.log_file = self.data_dir / "label-studio.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._apis: list[LabelStudioAPI] = []
        self._pat: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        creds = Credentials(username=self.username, password=self.password, token=self.token)
        return label_studio_environment(dict(os.environ), self.data_dir, creds, self.document_root)

    def start(self) -> None:
        if not LABEL_STUDIO_BIN.is_file():
            raise FileNotFoundError(f"Label Studio is not installed at {LABEL_STUDIO_BIN}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.document_root.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                label_studio_command(LABEL_STUDIO_BIN, self.port),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
                cwd=self.data_dir,
                start_new_session=True,
            )

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_file.is_file():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Until ``GET /health`` answers 200; fails early, with the log tail, if the process dies."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self._proc is None or self._proc.poll() is not None:
                    raise RuntimeError(f"Label Studio exited during start-up:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        raise TimeoutError(f"Label Studio not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the whole process group, then SIGKILL; idempotent."""
        for api in self._apis:
            api.close()
        self._apis.clear()
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_group(proc, "Label Studio", timeout_s)

    def api(self, authorization: str | None = None) -> LabelStudioAPI:
        """A client; by default with the admin's legacy token (``Token <key>``)."""
        api = LabelStudioAPI(self.url, authorization or f"Token {self.token}")
        self._apis.append(api)
        return api

    def personal_access_token(self) -> str:
        """The admin's Personal Access Token, created on first use (a user holds only one at a time)."""
        if self._pat is None:
            self._pat = self.api().create_pat()
        return self._pat

    def __enter__(self) -> LabelStudioServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
