"""``labelloop up | down | status``: Triton, the bridge and Label Studio as one local stack.

``up`` is idempotent: it bootstraps the default model only when the repository is empty, reuses
daemons that are still running, and creates the project and the model connection only once.
Everything binds to 127.0.0.1; logs and run records live under the state folder.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from core.console import fail
from core.errors import ConfigError, LabelloopError, LabelStudioError, TritonUnavailableError
from core.processes import Daemon
from core.settings import Settings, load_settings
from core.studio import (
    DEFECT_LABEL_CONFIG,
    Credentials,
    StudioAdmin,
    label_studio_command,
    label_studio_environment,
    load_or_create_credentials,
)
from serving.client import ModelInfo, make_client
from serving.repository import ModelRepository

__all__ = ["app", "stack_status"]

logger = logging.getLogger(__name__)
app = typer.Typer(no_args_is_help=True)

TRITON, BRIDGE, LABEL_STUDIO = "triton", "bridge", "label-studio"


@dataclass(frozen=True)
class StackPaths:
    """Where ``up`` keeps what it owns."""

    state: Path

    @property
    def studio_data(self) -> Path:
        return self.state / "label_studio"

    @property
    def credentials(self) -> Path:
        return self.studio_data / "credentials.json"

    @property
    def stack_file(self) -> Path:
        return self.state / "run" / "stack.json"


def _labelloop(*args: str) -> list[str]:
    return [sys.executable, "-m", "labelloop", "--log-level", "INFO", *args]


def _wait(what: str, probe: Callable[[], bool], daemon: Daemon | None, timeout_s: float) -> None:
    """Poll ``probe`` until true; fail early with the log's tail when the daemon dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if probe():
            return
        if daemon is not None and not daemon.running():
            tail = daemon.log_path.read_text(errors="replace").splitlines()[-5:] if daemon.log_path.exists() else []
            raise LabelloopError(f"{what} exited during start-up; see {daemon.log_path}: {' | '.join(tail)}")
        time.sleep(0.5)
    raise LabelloopError(f"{what} not ready after {timeout_s:.0f}s" + (f"; see {daemon.log_path}" if daemon else ""))


def _triton_info(settings: Settings) -> ModelInfo | None:
    async def probe() -> ModelInfo | None:
        async with make_client(settings.model_copy(update={"triton_retries": 0, "triton_timeout_s": 5.0})) as c:
            try:
                return await c.info()
            except LabelloopError:
                return None

    return asyncio.run(probe())


def _http_ok(url: str, expect: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200) -> bool:
    try:
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            return expect(client.get(url))
    except httpx.HTTPError:
        return False


def _bridge_up(response: httpx.Response) -> bool:
    return response.status_code == 200 and response.json().get("status") == "UP"


def ensure_model(settings: Settings) -> None:
    """Train and publish the default model when the repository has none (about 5-10 minutes on a CPU)."""
    if ModelRepository(settings.model_repository).latest(settings.model_name) is not None:
        return
    from trainer.pipeline import RunOptions, bootstrap

    typer.echo("==> no model yet: training the default detector on synthetic data (about 5-10 min on 2 CPU cores)")
    report = bootstrap(settings, RunOptions.from_settings(settings, epochs=15, batch=8))
    typer.echo(f"==> version {report.version}: mAP50 {report.metrics.map50:.3f} in {report.seconds:.0f}s")


def start_triton(settings: Settings) -> ModelInfo:
    daemon = Daemon(settings.state_dir, TRITON)
    if not daemon.running():
        daemon.start(
            _labelloop(
                "serve",
                "--model-repository",
                str(settings.model_repository.resolve()),
                "--model",
                settings.model_name,
                "--host",
                settings.host,
                "--grpc-port",
                str(settings.grpc_port),
                "--http-port",
                str(settings.http_port),
                "--metrics-port",
                str(settings.metrics_port),
            ),
            env=_child_env(settings),
            cwd=Path.cwd(),
            url=settings.triton_url,
        )
    typer.echo(f"==> waiting for Triton at {settings.triton_url}")
    _wait("Triton", lambda: _triton_info(settings) is not None, daemon, settings.triton_start_timeout_s)
    info = _triton_info(settings)
    if info is None:
        raise TritonUnavailableError(f"Triton at {settings.triton_url} stopped answering")
    return info


def _child_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our daemons get the state folder explicitly; secrets travel in the environment, never argv."""
    env = dict(os.environ) | {"LABELLOOP_STATE_DIR": str(settings.state_dir.resolve())}
    return env | (extra or {})


def start_label_studio(settings: Settings, paths: StackPaths) -> Credentials:
    binary = settings.label_studio_venv / "bin" / "label-studio"
    if not binary.is_file():
        raise ConfigError(f"Label Studio is not installed at {binary}: run `make setup` (or use --no-label-studio)")
    creds = load_or_create_credentials(paths.credentials)
    daemon = Daemon(settings.state_dir, LABEL_STUDIO)
    url = f"http://127.0.0.1:{settings.label_studio_port}"
    if not daemon.running():
        document_root = paths.studio_data / "files"
        document_root.mkdir(parents=True, exist_ok=True)
        daemon.start(
            label_studio_command(binary.resolve(), settings.label_studio_port),
            env=label_studio_environment(dict(os.environ), paths.studio_data.resolve(), creds, document_root.resolve()),
            cwd=paths.studio_data,
            url=url,
        )
    typer.echo(f"==> waiting for Label Studio at {url} (the first start runs migrations: about a minute)")
    _wait("Label Studio", lambda: _http_ok(f"{url}/health"), daemon, 300.0)
    return creds


def start_bridge(settings: Settings, studio_url: str | None, token: str | None) -> str:
    daemon = Daemon(settings.state_dir, BRIDGE)
    url = f"http://{settings.bridge_host}:{settings.bridge_port}"
    if not daemon.running():
        extra = {}
        if studio_url:
            extra["LABELLOOP_LABEL_STUDIO_URL"] = studio_url
        if token:
            extra["LABELLOOP_LABEL_STUDIO_API_KEY"] = token
        daemon.start(
            _labelloop(
                "bridge",
                "--host",
                settings.bridge_host,
                "--port",
                str(settings.bridge_port),
                "--triton-url",
                settings.triton_url,
                "--model",
                settings.model_name,
            ),
            env=_child_env(settings, extra),
            cwd=Path.cwd(),
            url=url,
        )
    typer.echo(f"==> waiting for the bridge at {url}")
    _wait("the bridge", lambda: _http_ok(f"{url}/health", _bridge_up), daemon, 60.0)
    return url


def stack_status(settings: Settings) -> dict[str, Any]:
    """The state of each part, as ``labelloop status --json`` prints it."""
    paths = StackPaths(settings.state_dir)
    saved = json.loads(paths.stack_file.read_text()) if paths.stack_file.is_file() else {}
    info = _triton_info(settings.model_copy(update={"triton_url": saved.get("triton_url", settings.triton_url)}))
    bridge_url = saved.get("bridge_url", f"http://{settings.bridge_host}:{settings.bridge_port}")
    studio_url = saved.get("label_studio_url", settings.label_studio_url)
    project_id = saved.get("project_id")
    connected = False
    if studio_url and project_id and paths.credentials.is_file():
        admin = StudioAdmin(studio_url, load_or_create_credentials(paths.credentials).token)
        try:
            connected = any(b.get("url", "").rstrip("/") == bridge_url for b in admin.ml_backends(project_id))
        except LabelStudioError:
            connected = False
        finally:
            admin.close()
    bridge_status = "DOWN"
    try:
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            bridge_status = str(client.get(f"{bridge_url}/health").json().get("status", "DOWN"))
    except (httpx.HTTPError, ValueError):
        pass
    return {
        "triton": {
            "url": saved.get("triton_url", settings.triton_url),
            "ready": info is not None,
            "model": settings.model_name,
            "version": info.version if info else None,
            "managed": Daemon(settings.state_dir, TRITON).running(),
        },
        "bridge": {"url": bridge_url, "status": bridge_status, "managed": Daemon(settings.state_dir, BRIDGE).running()},
        "label_studio": {
            "url": studio_url,
            "project_id": project_id,
            "ml_backend_connected": connected,
            "managed": Daemon(settings.state_dir, LABEL_STUDIO).running(),
        },
    }


@app.command()
def up(
    triton_url: Annotated[
        str | None, typer.Option("--triton-url", help="Use this (remote) Triton instead of starting one.")
    ] = None,
    no_label_studio: Annotated[
        bool, typer.Option("--no-label-studio", help="Bring your own Label Studio (set LABEL_STUDIO_URL / _API_KEY).")
    ] = False,
) -> None:
    """Start Triton, the bridge and Label Studio (training the default model first if there is none)."""
    settings = load_settings(triton_url=triton_url)
    if triton_url is None:  # we start Triton: clients reach it where it listens
        client_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        settings = settings.model_copy(update={"triton_url": f"{client_host}:{settings.grpc_port}"})
    paths = StackPaths(settings.state_dir)
    try:
        if triton_url is None:
            ensure_model(settings)
            info = start_triton(settings)
        else:
            found = _triton_info(settings)
            if found is None:
                raise TritonUnavailableError(f"no detector answers at {triton_url}")
            info = found
        studio_url, token, creds, project_id = settings.label_studio_url, None, None, None
        if settings.label_studio_api_key is not None:
            token = settings.label_studio_api_key.get_secret_value()
        if not no_label_studio:
            creds = start_label_studio(settings, paths)
            studio_url, token = f"http://127.0.0.1:{settings.label_studio_port}", creds.token
        bridge_url = start_bridge(settings, studio_url, token)
        if creds is not None and studio_url is not None:
            admin = StudioAdmin(studio_url, creds.token)
            try:
                project_id = admin.ensure_project(settings.project_title, DEFECT_LABEL_CONFIG)
                admin.ensure_ml_backend(project_id, bridge_url)
            finally:
                admin.close()
    except LabelloopError as exc:
        raise fail(exc) from exc
    paths.stack_file.parent.mkdir(parents=True, exist_ok=True)
    paths.stack_file.write_text(
        json.dumps(
            {
                "triton_url": settings.triton_url,
                "bridge_url": bridge_url,
                "label_studio_url": studio_url,
                "project_id": project_id,
            }
        )
    )
    typer.echo(f"\nTriton        {settings.triton_url}  ({info.name} v{info.version}: {', '.join(info.classes)})")
    typer.echo(f"Bridge        {bridge_url}  (Label Studio's model URL)")
    if creds is not None:
        typer.echo(f"Label Studio  {studio_url}/projects/{project_id}  login {creds.username} / {creds.password}")
        typer.echo(
            "\nNext: open the project, import images (Import button), and the boxes appear as pre-labels;\n"
            "or select tasks -> Actions -> Retrieve Predictions. Then verify/correct and submit;\n"
            "`labelloop train --project "
            f"{project_id}` turns your labels into a new model version.\n"
            f"Logs: {settings.state_dir / 'logs'}   Stop everything: `labelloop down`"
        )
    else:
        typer.echo("\nNext: in your Label Studio, Settings -> Model -> Connect Model, URL " + bridge_url)


@app.command()
def down() -> None:
    """Stop what `labelloop up` started, and only that."""
    settings = load_settings()
    for name in (BRIDGE, LABEL_STUDIO, TRITON):
        stopped = Daemon(settings.state_dir, name).stop()
        typer.echo(f"{name}: {'stopped' if stopped else 'not running'}")
    StackPaths(settings.state_dir).stack_file.unlink(missing_ok=True)


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The state of Triton, the bridge and Label Studio."""
    state = stack_status(load_settings())
    if as_json:
        typer.echo(json.dumps(state, indent=2))
        return
    t, b, ls = state["triton"], state["bridge"], state["label_studio"]
    typer.echo(f"triton        {t['url']}: {'ready' if t['ready'] else 'not ready'} {t['model']} v{t['version']}")
    typer.echo(f"bridge        {b['url']}: {b['status']}")
    typer.echo(
        f"label studio  {ls['url']}: project {ls['project_id']}, "
        f"model {'connected' if ls['ml_backend_connected'] else 'not connected'}"
    )
