"""Label Studio: the one client of its REST API, and how ``labelloop up`` starts it locally.

:class:`StudioClient` holds every call labelloop makes (projects, tasks, predictions, ML backends,
webhooks) as thin typed methods over one ``httpx.AsyncClient``; its auth (legacy token or refreshed
Personal Access Token) is :mod:`core.studio_auth`, and every failure is a ``LabelStudioError`` that
says what was called and, for 401/403, which key to check.

Label Studio lives in its own virtual environment (it needs numpy 2; Triton's stub needs numpy 1).
A local stack needs a few non-default settings (field notes 4 and 6): legacy tokens enabled before
the first start, and loopback ML backends / webhooks allowed. The model connection and the webhook
Label Studio makes with it both carry the bridge's basic-auth pair. The admin token ``up`` creates
is kept under the state folder, where the other commands find it when no key is configured.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from pydantic import SecretStr

from core.credentials import BasicCredentials
from core.errors import ConfigError, LabelStudioError
from core.files import write_json_atomic
from core.settings import Settings
from core.studio_auth import LabelStudioAuth

__all__ = [
    "DEFECT_LABEL_CONFIG",
    "Credentials",
    "StudioClient",
    "credentials_file",
    "label_studio_command",
    "label_studio_environment",
    "load_or_create_credentials",
    "local_studio_url",
    "model_version_name",
    "studio_settings",
]

logger = logging.getLogger(__name__)

# The seed project's config; class order matches the default model's.
DEFECT_LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image" model_score_threshold="0.25">
    <Label value="dentado" background="#FFA39E"/>
    <Label value="concave" background="#D4380D"/>
    <Label value="perforation" background="#FFC069"/>
  </RectangleLabels>
</View>"""

_API_TIMEOUT_S = 120.0
_CLEARED_ENV = ("LABELLOOP_", "LABEL_STUDIO_", "BASIC_AUTH_", "DJANGO_", "ML_", "SSRF_", "LOCAL_FILES_")


@dataclass(frozen=True)
class Credentials:
    """The admin account ``up`` creates on first start; kept in a 0600 file under the state folder."""

    username: str
    password: str
    token: str


def credentials_file(state_dir: Path) -> Path:
    """Where ``up`` keeps the admin account of the Label Studio it runs."""
    return state_dir / "label_studio" / "credentials.json"


def local_studio_url(settings: Settings) -> str:
    """The URL of the Label Studio ``up`` runs (loopback only)."""
    return f"http://127.0.0.1:{settings.label_studio_port}"


def load_or_create_credentials(path: Path) -> Credentials:
    if path.is_file():
        return Credentials(**json.loads(path.read_text()))
    creds = Credentials(
        username="admin@labelloop.local",
        password=secrets.token_urlsafe(12),
        token=secrets.token_hex(20),  # a legacy token is 40 hex characters
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, asdict(creds), mode=0o600)
    return creds


def studio_settings(settings: Settings, command: str) -> Settings:
    """``settings`` with Label Studio's URL and key: configured ones, else those of the Label Studio ``up`` runs.

    Raises:
        ConfigError: neither is configured and ``up`` has run no Label Studio with this state folder.
    """
    url, key = settings.label_studio_url, settings.label_studio_api_key
    if url and key is not None:
        return settings
    stored = credentials_file(settings.state_dir)
    if not url and key is None and stored.is_file():
        try:
            token = load_or_create_credentials(stored).token
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"{stored} is unreadable ({type(exc).__name__}): set LABEL_STUDIO_API_KEY") from exc
        logger.info("using the Label Studio that `labelloop up` runs (%s)", local_studio_url(settings))
        return settings.model_copy(
            update={"label_studio_url": local_studio_url(settings), "label_studio_api_key": SecretStr(token)}
        )
    missing = " and ".join(
        name for name, value in (("LABEL_STUDIO_URL", url), ("LABEL_STUDIO_API_KEY", key)) if not value
    )
    if url or key is not None:
        hint = "set both, or neither to use the Label Studio `labelloop up` runs"
    else:
        hint = f"or run `labelloop up`: with neither set, its Label Studio is used; none ran with {settings.state_dir}"
    raise ConfigError(f"{command} needs Label Studio's address and key: export {missing} ({hint})")


def label_studio_environment(
    base: dict[str, str], data_dir: Path, creds: Credentials, document_root: Path
) -> dict[str, str]:
    """Label Studio's environment for a loopback stack; nothing of ours leaks into it."""
    env = {k: v for k, v in base.items() if not k.startswith(_CLEARED_ENV)}
    return env | {
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": creds.username,
        "LABEL_STUDIO_PASSWORD": creds.password,
        "LABEL_STUDIO_USER_TOKEN": creds.token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        # The bridge and Label Studio share loopback: allow the ML backend and its webhook there.
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "LOG_LEVEL": "WARNING",
    }


def label_studio_command(binary: Path, port: int) -> list[str]:
    return [
        str(binary),
        "start",
        "--no-browser",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--internal-host",
        "127.0.0.1",
    ]


def model_version_name(model_name: str, version: int) -> str:
    """What Label Studio stores as ``model_version``: a new Triton version makes it predict again."""
    return f"{model_name}@v{version}"


class StudioClient:
    """Label Studio's REST API for one base URL; use as ``async with``."""

    def __init__(self, base_url: str, token: str, *, timeout_s: float = _API_TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.auth = LabelStudioAuth(self.base_url, token)
        self._client = httpx.AsyncClient(base_url=self.base_url, auth=self.auth, timeout=timeout_s, trust_env=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> StudioClient:
        """A client for the configured Label Studio (see :func:`studio_settings` for the fallback)."""
        if not settings.label_studio_url or settings.label_studio_api_key is None:
            raise ConfigError("Label Studio's API needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        return cls(settings.label_studio_url, settings.label_studio_api_key.get_secret_value())

    async def __aenter__(self) -> StudioClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, *, none_if_missing: bool = False, **kwargs: Any) -> Any:
        """One API call; the JSON answer (None when empty), or LabelStudioError saying what failed."""
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise LabelStudioError(
                f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc} (is Label Studio running there?)"
            ) from exc
        if none_if_missing and response.status_code == 404:
            return None
        if response.is_error:
            hint = " (check LABEL_STUDIO_API_KEY)" if response.status_code in (401, 403) else ""
            raise LabelStudioError(f"{method} {path}: HTTP {response.status_code}{hint}: {response.text[:300]}")
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise LabelStudioError(f"{method} {path}: the answer is not JSON") from exc

    async def project(self, project_id: int) -> dict[str, Any]:
        """The project, with ``label_config`` and ``task_number``."""
        body = await self._call("GET", f"/api/projects/{project_id}/")
        if not isinstance(body, dict):
            raise LabelStudioError(f"GET /api/projects/{project_id}/: unexpected answer {str(body)[:200]}")
        return body

    async def task_pages(self, project_id: int, page_size: int = 100) -> AsyncIterator[list[dict[str, Any]]]:
        """Every task of a project with its annotations and predictions, one page at a time, in id order."""
        page = 1
        while True:
            params = {"project": project_id, "page": page, "page_size": page_size, "fields": "all"}
            # Label Studio answers 404 ("Invalid page.") past the last page.
            body = await self._call("GET", "/api/tasks/", none_if_missing=page > 1, params=params)
            if body is None:
                return
            tasks = body.get("tasks", []) if isinstance(body, Mapping) else body
            if not isinstance(tasks, list):
                raise LabelStudioError(f"GET /api/tasks/: unexpected answer {str(body)[:200]}")
            if not tasks:
                return
            yield [t for t in tasks if isinstance(t, dict)]
            if len(tasks) < page_size:
                return
            page += 1

    async def tasks(self, project_id: int) -> list[dict[str, Any]]:
        """Every task of a project, all pages."""
        return [task async for page in self.task_pages(project_id) for task in page]

    async def import_predictions(self, project_id: int, predictions: Sequence[Mapping[str, Any]]) -> None:
        """Store predictions (each with its ``task`` id) in one call."""
        await self._call("POST", f"/api/projects/{project_id}/import/predictions", json=list(predictions))

    async def replace_predictions(
        self, project_id: int, model_version: str, predictions: Sequence[Mapping[str, Any]]
    ) -> None:
        """Store ``predictions`` (each with its ``task``) as the only ones of ``model_version`` on their tasks."""
        for task_id in sorted({int(p["task"]) for p in predictions}):
            for old in await self._call("GET", "/api/predictions/", params={"task": task_id}) or []:
                if old.get("model_version") == model_version:
                    await self._call("DELETE", f"/api/predictions/{old['id']}/")
        await self.import_predictions(project_id, predictions)

    async def set_model_version(self, project_id: int, model_version: str) -> None:
        """Make ``model_version`` the project's: the Data Manager's prediction score counts only its predictions.

        Label Studio refuses a version that no stored prediction carries: store predictions first.
        """
        await self._call("PATCH", f"/api/projects/{project_id}/", json={"model_version": model_version})

    async def ensure_view(
        self, project_id: int, title: str, ordering: Sequence[str], filters: Mapping[str, Any]
    ) -> int:
        """The id of the project's Data Manager tab ``title``, created or set to this ordering and filters.

        Label Studio replaces a view's ``data`` whole on PATCH: what else the tab holds (its columns) is sent back.
        """
        data = {"title": title, "ordering": list(ordering), "filters": dict(filters)}
        for view in await self._call("GET", "/api/dm/views/", params={"project": project_id}) or []:
            current = view.get("data") or {}
            if current.get("title") == title:
                await self._call("PATCH", f"/api/dm/views/{view['id']}/", json={"data": {**current, **data}})
                return int(view["id"])
        created = await self._call("POST", "/api/dm/views/", json={"project": project_id, "data": data})
        logger.info("created Data Manager view %r (id %s) in project %d", title, created["id"], project_id)
        return int(created["id"])

    async def view_tasks(self, project_id: int, view_id: int, limit: int) -> list[dict[str, Any]]:
        """The first ``limit`` tasks of a Data Manager view, in its order (each with ``predictions_score``)."""
        params = {"project": project_id, "view": view_id, "page": 1, "page_size": limit}
        body = await self._call("GET", "/api/tasks/", none_if_missing=True, params=params)
        tasks = body.get("tasks", []) if isinstance(body, Mapping) else body or []
        if not isinstance(tasks, list):
            raise LabelStudioError(f"GET /api/tasks/?view={view_id}: unexpected answer {str(body)[:200]}")
        return [t for t in tasks if isinstance(t, dict)][:limit]

    async def ensure_project(self, title: str, label_config: str) -> int:
        """The id of the project with this title, created with ``label_config`` if missing."""
        body = await self._call("GET", "/api/projects/", params={"title": title, "page_size": 100})
        projects = body.get("results", []) if isinstance(body, dict) else body
        for project in projects or []:
            if project.get("title") == title:
                return int(project["id"])
        created = await self._call("POST", "/api/projects/", json={"title": title, "label_config": label_config})
        logger.info("created Label Studio project %r (id %s)", title, created["id"])
        return int(created["id"])

    async def upload_images(self, project_id: int, paths: Sequence[Path], batch: int = 20) -> int:
        """Upload image files as tasks (Label Studio keeps each file name behind its upload prefix); the task count."""
        created = 0
        for start in range(0, len(paths), batch):
            chunk = paths[start : start + batch]
            # Label Studio reads one file per form field: each needs its own field name.
            files = [(f"file{k}", (p.name, p.read_bytes())) for k, p in enumerate(chunk)]
            body = await self._call("POST", f"/api/projects/{project_id}/import", files=files)
            created += int((body or {}).get("task_count", len(chunk)))
        return created

    async def use_predictions(self, project_id: int) -> None:
        """Show predictions to annotators and ask the connected model for them when a task opens."""
        await self._call(
            "PATCH",
            f"/api/projects/{project_id}/",
            json={"show_collab_predictions": True, "evaluate_predictions_automatically": True},
        )

    async def ml_backends(self, project_id: int) -> list[dict[str, Any]]:
        return list(await self._call("GET", "/api/ml/", params={"project": project_id}) or [])

    async def ensure_ml_backend(
        self,
        project_id: int,
        url: str,
        auth: BasicCredentials | None,
        title: str = "labelloop",
        interactive: bool = False,
    ) -> int:
        """Connect the bridge as the project's model (once), then make its auth match ``auth``.

        Label Studio checks ``/health`` and ``/setup`` with the given credentials before it saves them.
        ``interactive`` makes Label Studio send a person's clicks (smart tools) to ``/predict`` as they are made.
        Label Studio's own webhook to the model carries no credentials; the bridge's ``/webhook`` (the
        trainer's events) needs them, so the webhook gets them here.
        """
        fields: dict[str, Any] = {"auth_method": "NONE", "is_interactive": interactive}
        if auth is not None:
            fields |= {
                "auth_method": "BASIC_AUTH",
                "basic_auth_user": auth.user,
                "basic_auth_pass": auth.password.get_secret_value(),
            }
        for backend in await self.ml_backends(project_id):
            if backend.get("url", "").rstrip("/") == url.rstrip("/"):
                # The password is write-only in the API: send it again rather than guess it is current.
                await self._call(
                    "PATCH", f"/api/ml/{backend['id']}", json={"project": project_id, "url": url, **fields}
                )
                await self.ensure_webhook(project_id, f"{url.rstrip('/')}/webhook", auth)
                return int(backend["id"])
        created = await self._call(
            "POST",
            "/api/ml/",
            json={"project": project_id, "url": url, "title": title, **fields},
        )
        await self.use_predictions(project_id)
        await self.ensure_webhook(project_id, f"{url.rstrip('/')}/webhook", auth)
        logger.info("connected ML backend %s to project %d", url, project_id)
        return int(created["id"])

    async def webhooks(self, project_id: int) -> list[dict[str, Any]]:
        return list(await self._call("GET", "/api/webhooks/", params={"project": project_id}) or [])

    async def ensure_webhook(self, project_id: int, url: str, auth: BasicCredentials | None) -> int:
        """The project's webhook to ``url`` (the one Label Studio made with the model, else a new one), with auth.

        Label Studio creates it without credentials: the ``Authorization`` header is added here.
        """
        headers = {} if auth is None else {"Authorization": auth.authorization}
        for hook in await self.webhooks(project_id):
            if hook.get("url", "").rstrip("/") == url.rstrip("/"):
                await self._call("PATCH", f"/api/webhooks/{hook['id']}/", json={"headers": headers})
                return int(hook["id"])
        created = await self._call(
            "POST",
            "/api/webhooks/",
            json={
                "project": project_id,
                "url": url,
                "send_payload": True,
                "send_for_all_actions": True,
                "headers": headers,
            },
        )
        logger.info("created webhook %s for project %d", url, project_id)
        return int(created["id"])
