"""Label Studio as part of the local stack: how to start it, and the admin calls ``up`` makes.

Label Studio lives in its own virtual environment (it needs numpy 2; Triton's stub needs numpy 1).
A local stack needs a few non-default settings (field notes 4 and 6): legacy tokens enabled before
the first start, and loopback ML backends / webhooks allowed. The model connection and the webhook
Label Studio makes with it both carry the bridge's basic-auth pair.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from core.credentials import BasicCredentials
from core.errors import LabelStudioError

__all__ = [
    "DEFECT_LABEL_CONFIG",
    "Credentials",
    "StudioAdmin",
    "basic_authorization",
    "label_studio_command",
    "label_studio_environment",
    "load_or_create_credentials",
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

_CLEARED_ENV = ("LABELLOOP_", "LABEL_STUDIO_", "BASIC_AUTH_", "DJANGO_", "ML_", "SSRF_", "LOCAL_FILES_")


@dataclass(frozen=True)
class Credentials:
    """The admin account ``up`` creates on first start; kept in a 0600 file under the state folder."""

    username: str
    password: str
    token: str


def load_or_create_credentials(path: Path) -> Credentials:
    if path.is_file():
        return Credentials(**json.loads(path.read_text()))
    creds = Credentials(
        username="admin@labelloop.local",
        password=secrets.token_urlsafe(12),
        token=secrets.token_hex(20),  # a legacy token is 40 hex characters
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(asdict(creds), fh)
    return creds


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


class StudioAdmin:
    """The few idempotent admin calls ``labelloop up`` needs (legacy token auth)."""

    def __init__(self, url: str, token: str) -> None:
        self._client = httpx.Client(
            base_url=url.rstrip("/"), headers={"Authorization": f"Token {token}"}, timeout=60.0, trust_env=False
        )

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise LabelStudioError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        if response.is_error:
            raise LabelStudioError(f"{method} {path}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json() if response.content else None

    def ensure_project(self, title: str, label_config: str) -> int:
        """The id of the project with this title, created with ``label_config`` if missing."""
        body = self._call("GET", "/api/projects/", params={"title": title, "page_size": 100})
        projects = body.get("results", []) if isinstance(body, dict) else body
        for project in projects:
            if project.get("title") == title:
                return int(project["id"])
        created = self._call("POST", "/api/projects/", json={"title": title, "label_config": label_config})
        logger.info("created Label Studio project %r (id %s)", title, created["id"])
        return int(created["id"])

    def ml_backends(self, project_id: int) -> list[dict[str, Any]]:
        body = self._call("GET", "/api/ml/", params={"project": project_id})
        return list(body or [])

    def ensure_ml_backend(
        self, project_id: int, url: str, auth: BasicCredentials | None, title: str = "labelloop"
    ) -> int:
        """Connect the bridge as the project's model (once), then make its auth match ``auth``.

        Label Studio checks ``/health`` and ``/setup`` with the given credentials before it saves them.
        """
        fields: dict[str, Any] = {"auth_method": "NONE"}
        if auth is not None:
            fields = {
                "auth_method": "BASIC_AUTH",
                "basic_auth_user": auth.user,
                "basic_auth_pass": auth.password.get_secret_value(),
            }
        for backend in self.ml_backends(project_id):
            if backend.get("url", "").rstrip("/") == url.rstrip("/"):
                # The password is write-only in the API: send it again rather than guess it is current.
                self._call("PATCH", f"/api/ml/{backend['id']}", json={"project": project_id, "url": url, **fields})
                return int(backend["id"])
        created = self._call(
            "POST",
            "/api/ml/",
            json={"project": project_id, "url": url, "title": title, "is_interactive": False, **fields},
        )
        self._call(
            "PATCH",
            f"/api/projects/{project_id}/",
            json={"show_collab_predictions": True, "evaluate_predictions_automatically": True},
        )
        logger.info("connected ML backend %s to project %d", url, project_id)
        return int(created["id"])

    def webhooks(self, project_id: int) -> list[dict[str, Any]]:
        body = self._call("GET", "/api/webhooks/", params={"project": project_id})
        return list(body or [])

    def ensure_webhook(self, project_id: int, url: str, auth: BasicCredentials | None) -> int:
        """The project's webhook to ``url`` (the one Label Studio made with the model, else a new one), with auth.

        Label Studio creates it without credentials: the ``Authorization`` header is added here.
        """
        headers = {} if auth is None else {"Authorization": basic_authorization(auth)}
        for hook in self.webhooks(project_id):
            if hook.get("url", "").rstrip("/") == url.rstrip("/"):
                self._call("PATCH", f"/api/webhooks/{hook['id']}/", json={"headers": headers})
                return int(hook["id"])
        created = self._call(
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


def basic_authorization(auth: BasicCredentials) -> str:
    """The ``Authorization`` header value for HTTP basic auth."""
    pair = f"{auth.user}:{auth.password.get_secret_value()}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")
