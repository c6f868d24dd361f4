"""``labelloop up | down | status``: Triton, the bridge, Label Studio and the trainer as one local stack.

``up`` is idempotent: it bootstraps the default model only when the repository is empty, reuses
daemons that are still running, and creates the project and the model connection only once.
Everything binds to 127.0.0.1; logs and run records live under the state folder. The bridge
asks for basic auth (``core.credentials``: generated once, kept owner-only); Label Studio's
model connection and its webhook to the bridge carry the same pair. The trainer watcher turns
Label Studio's "Start training" and every ``train_every_annotations`` annotations into runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from core.console import fail
from core.errors import ConfigError, LabelloopError, LabelStudioError, TritonUnavailableError
from core.processes import Daemon

if TYPE_CHECKING:  # the commands import these when they run: `labelloop --help` stays fast
    from core.credentials import BasicCredentials
    from core.settings import Settings
    from core.studio import Credentials
    from serving.client import ModelInfo

__all__ = ["app", "stack_status"]

logger = logging.getLogger(__name__)
app = typer.Typer(no_args_is_help=True)

TRITON, BRIDGE, LABEL_STUDIO, TRAINER, BOOTSTRAP = "triton", "bridge", "label-studio", "trainer", "bootstrap"
# ``up`` serves the default model's first epoch that reaches this validation mAP50 (held-out mAP50
# must clear the re-train threshold too) and goes on training; the fully trained model follows as
# the next version when it is better (docs/detector.md). Measured on 2 cores: docs/operations.md.
EARLY_MAP50 = 0.7
# How long ``up`` waits for the default model's first version (training on a slow CPU included).
_BOOTSTRAP_WAIT_S = 3600.0


@dataclass(frozen=True)
class StackPaths:
    """Where ``up`` keeps what it owns."""

    state: Path

    @property
    def credentials(self) -> Path:
        from core.studio import credentials_file

        return credentials_file(self.state)

    @property
    def studio_data(self) -> Path:
        return self.credentials.parent

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


def _listening(address: str) -> bool:
    """Whether something accepts TCP connections at ``host:port`` (no gRPC client needed to know it is down)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=2.0):
            return True
    except (OSError, ValueError):
        return False


def _triton_info(settings: Settings) -> ModelInfo | None:
    if not _listening(settings.triton_url):
        return None
    from serving.client import make_client

    async def probe() -> ModelInfo | None:
        async with make_client(settings.model_copy(update={"triton_retries": 0, "triton_timeout_s": 5.0})) as c:
            try:
                return await c.info()
            except LabelloopError:
                return None

    return asyncio.run(probe())


def _get_json(url: str, auth: BasicCredentials | None = None, timeout_s: float = 2.0) -> tuple[int, Any] | None:
    """GET one of our loopback daemons (no proxy): its HTTP status and JSON body (None if not JSON), or None if silent.

    The standard library does it: `labelloop status` loads no HTTP client to learn that nothing runs.
    """
    headers = {} if auth is None else {"Authorization": auth.authorization}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=timeout_s) as response:
            status, body = int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            status, body = exc.code, exc.read()
    except (OSError, ValueError):  # URLError and timeouts are OSErrors
        return None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def _answers(url: str) -> bool:
    answer = _get_json(url)
    return answer is not None and answer[0] == 200


def _bridge_up(url: str, auth: BasicCredentials | None) -> bool:
    answer = _get_json(f"{url}/health", auth)
    if answer is None:
        return False
    status, body = answer
    if status == 401:
        # A bridge left running with other credentials never becomes ready for us: say so now.
        raise ConfigError(
            f"the bridge at {url} refuses our basic-auth credentials (it runs with others): "
            "run `labelloop down`, then `labelloop up` again"
        )
    return status == 200 and isinstance(body, dict) and body.get("status") == "UP"


def bridge_auth(settings: Settings) -> BasicCredentials | None:
    """The pair the bridge checks (created and stored owner-only on first use); None with ``bridge_auth: none``."""
    from core.credentials import bridge_credentials

    return None if settings.bridge_auth == "none" else bridge_credentials(settings)


def start_bootstrap(settings: Settings) -> Daemon | None:
    """Start training the default model in the background when the repository has none (or it is training)."""
    from serving.repository import ModelRepository

    daemon = Daemon(settings.state_dir, BOOTSTRAP)
    if daemon.running():
        return daemon
    if ModelRepository(settings.model_repository).latest(settings.model_name) is not None:
        return None
    typer.echo("==> no model yet: training the default detector on synthetic data in the background")
    extra = {
        "LABELLOOP_TRITON_URL": settings.triton_url,
        "LABELLOOP_MODEL_NAME": settings.model_name,
        "LABELLOOP_MODEL_REPOSITORY": str(settings.model_repository.resolve()),
    }
    daemon.start(
        _labelloop("bootstrap", "--early-map50", str(EARLY_MAP50)), env=_child_env(settings, extra), cwd=Path.cwd()
    )
    return daemon


def wait_for_first_version(settings: Settings, daemon: Daemon) -> None:
    """Wait for the bootstrap's first published version, showing each epoch as it ends."""
    from serving.repository import ModelRepository
    from trainer.history import trainer_dir
    from trainer.pipeline import BOOTSTRAP_PROGRESS

    repo = ModelRepository(settings.model_repository)
    progress = trainer_dir(settings) / "bootstrap" / BOOTSTRAP_PROGRESS
    shown: list[Any] = [None]

    def published() -> bool:
        try:
            seen = json.loads(progress.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            seen = {}
        if seen.get("epoch") and seen.get("epoch") != shown[0]:
            shown[0] = seen["epoch"]
            typer.echo(
                f"==> default detector: epoch {seen['epoch']}/{seen.get('epochs')}, "
                f"validation mAP50 {_fmt(seen.get('val_map50'))}"
            )
        return repo.latest(settings.model_name) is not None

    _wait("the default model's training", published, daemon, _BOOTSTRAP_WAIT_S)
    version = repo.latest(settings.model_name)
    card = repo.card(settings.model_name, version or 0)
    typer.echo(f"==> version {version} published: held-out mAP50 {_fmt(card.metrics.get('map50'))}")
    if daemon.running():
        typer.echo(
            "    training goes on in the background; the fully trained model is served as the next version "
            f"if it is better (log: {daemon.log_path})"
        )


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
                "--http" if settings.triton_http else "--no-http",
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
    from core.studio import label_studio_command, label_studio_environment, load_or_create_credentials, local_studio_url

    binary = settings.label_studio_venv / "bin" / "label-studio"
    if not binary.is_file():
        raise ConfigError(f"Label Studio is not installed at {binary}: run `make setup` (or use --no-label-studio)")
    creds = load_or_create_credentials(paths.credentials)
    daemon = Daemon(settings.state_dir, LABEL_STUDIO)
    url = local_studio_url(settings)
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
    _wait("Label Studio", lambda: _answers(f"{url}/health"), daemon, 300.0)
    return creds


def start_bridge(settings: Settings, studio_url: str | None, token: str | None, auth: BasicCredentials | None) -> str:
    """Start the bridge; it finds the same credentials in the same state folder (no secret on its argv)."""
    daemon = Daemon(settings.state_dir, BRIDGE)
    url = f"http://{settings.bridge_host}:{settings.bridge_port}"
    if not daemon.running():
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
            env=_child_env(settings, _studio_env(studio_url, token)),
            cwd=Path.cwd(),
            url=url,
        )
    typer.echo(f"==> waiting for the bridge at {url}")
    _wait("the bridge", lambda: _bridge_up(url, auth), daemon, 60.0)
    return url


def _studio_env(studio_url: str | None, token: str | None) -> dict[str, str]:
    env = {}
    if studio_url:
        env["LABELLOOP_LABEL_STUDIO_URL"] = studio_url
    if token:
        env["LABELLOOP_LABEL_STUDIO_API_KEY"] = token
    return env


def start_trainer(settings: Settings, studio_url: str, token: str, project_id: int | None) -> None:
    """Start ``labelloop trainer watch``: it trains from the bridge's stored events, one run at a time."""
    daemon = Daemon(settings.state_dir, TRAINER)
    if daemon.running():
        return
    from trainer.pipeline import WATCH_STATE_FILE, trainer_dir

    state_file = trainer_dir(settings) / WATCH_STATE_FILE
    started = time.time()
    extra = _studio_env(studio_url, token) | {
        "LABELLOOP_TRITON_URL": settings.triton_url,
        "LABELLOOP_MODEL_NAME": settings.model_name,
        "LABELLOOP_MODEL_REPOSITORY": str(settings.model_repository.resolve()),
    }
    daemon.start(
        _labelloop("trainer", "watch", *(["--project", str(project_id)] if project_id is not None else [])),
        env=_child_env(settings, extra),
        cwd=Path.cwd(),
    )
    typer.echo(f"==> waiting for the trainer watcher (train after {settings.train_every_annotations} annotations)")
    # The watcher saves its cursor after its first look at the event store: then it is watching.
    _wait(
        "the trainer watcher",
        lambda: state_file.is_file() and state_file.stat().st_mtime >= started - 1.0,
        daemon,
        120.0,
    )


def last_run(settings: Settings) -> dict[str, Any] | None:
    """The newest record of the trainer's history (``labelloop train``, the watcher, bootstrap), or None."""
    from trainer.history import HISTORY_FILE, History, trainer_dir

    newest = deque(History(trainer_dir(settings) / HISTORY_FILE).records(), maxlen=1)
    return newest[0] if newest else None


def stack_status(settings: Settings) -> dict[str, Any]:
    """The state of each part, as ``labelloop status --json`` prints it."""
    from core.credentials import bridge_credentials

    paths = StackPaths(settings.state_dir)
    saved = json.loads(paths.stack_file.read_text()) if paths.stack_file.is_file() else {}
    info = _triton_info(settings.model_copy(update={"triton_url": saved.get("triton_url", settings.triton_url)}))
    bridge_url = saved.get("bridge_url", f"http://{settings.bridge_host}:{settings.bridge_port}")
    studio_url = saved.get("label_studio_url", settings.label_studio_url)
    project_id = saved.get("project_id")
    connected = False
    if studio_url and project_id and paths.credentials.is_file():
        from core.studio import load_or_create_credentials  # with httpx: only when there is a project to ask about

        token = load_or_create_credentials(paths.credentials).token
        connected = asyncio.run(_bridge_connected(studio_url, token, project_id, bridge_url))
    auth = None if settings.bridge_auth == "none" else bridge_credentials(settings, create=False)
    answer = _get_json(f"{bridge_url}/health", auth, timeout_s=5.0)
    bridge_status = "DOWN"
    if answer is not None:
        status, body = answer
        if status == 401:
            bridge_status = "UNAUTHORIZED"
        elif isinstance(body, dict):
            bridge_status = str(body.get("status", "DOWN"))
    return {
        "triton": {
            "url": saved.get("triton_url", settings.triton_url),
            "ready": info is not None,
            "model": settings.model_name,
            "version": info.version if info else None,
            "managed": Daemon(settings.state_dir, TRITON).running(),
        },
        "bridge": {
            "url": bridge_url,
            "status": bridge_status,
            "auth": settings.bridge_auth,
            "managed": Daemon(settings.state_dir, BRIDGE).running(),
        },
        "label_studio": {
            "url": studio_url,
            "project_id": project_id,
            "ml_backend_connected": connected,
            "managed": Daemon(settings.state_dir, LABEL_STUDIO).running(),
        },
        "trainer": {
            "watching": Daemon(settings.state_dir, TRAINER).running(),
            "bootstrapping": Daemon(settings.state_dir, BOOTSTRAP).running(),
            "train_every_annotations": settings.train_every_annotations,
            "last_run": _run_summary(last_run(settings)),
        },
    }


async def _bridge_connected(studio_url: str, token: str, project_id: int, bridge_url: str) -> bool:
    """Whether the project's model connection points at the bridge (False when Label Studio does not answer)."""
    from core.studio import StudioClient

    try:
        async with StudioClient(studio_url, token) as studio:
            return any(b.get("url", "").rstrip("/") == bridge_url for b in await studio.ml_backends(project_id))
    except LabelStudioError:
        return False


async def _connect_project(
    settings: Settings, studio_url: str, token: str, bridge_url: str, auth: BasicCredentials | None
) -> int:
    """The seed project, its model connection to the bridge and the webhook the trainer's events come by."""
    from core.studio import DEFECT_LABEL_CONFIG, StudioClient

    async with StudioClient(studio_url, token) as studio:
        project_id = await studio.ensure_project(settings.project_title, DEFECT_LABEL_CONFIG)
        await studio.ensure_ml_backend(project_id, bridge_url, auth)
    return project_id


def _run_summary(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """What ``status`` shows of a history record: when, what, the decision and what it published."""
    if record is None:
        return None
    decision = record.get("decision") or {}
    served = record.get("served") or {}
    candidate = record.get("candidate") or {}
    return {
        "time": record.get("time"),
        "kind": record.get("kind"),
        "run_id": record.get("run_id"),
        "served_version": served.get("version"),
        "served_map50": served.get("map50"),
        "candidate_map50": candidate.get("map50"),
        "retrain_needed": decision.get("retrain_needed"),
        "deploy": decision.get("deploy"),
        "reasons": list(decision.get("reasons") or []),
        "published_version": record.get("published_version"),
        "error": record.get("error"),
    }


@app.command()
def up(
    triton_url: Annotated[
        str | None, typer.Option("--triton-url", help="Use this (remote) Triton instead of starting one.")
    ] = None,
    no_label_studio: Annotated[
        bool, typer.Option("--no-label-studio", help="Bring your own Label Studio (set LABEL_STUDIO_URL / _API_KEY).")
    ] = False,
    no_trainer: Annotated[
        bool, typer.Option("--no-trainer", help="Do not start the trainer watcher (train with `labelloop train`).")
    ] = False,
) -> None:
    """Start Triton, the bridge, Label Studio and the trainer watcher (training a default model first if none)."""
    from core.credentials import credentials_path
    from core.settings import load_settings
    from core.studio import local_studio_url

    settings = load_settings(triton_url=triton_url)
    if triton_url is None:  # we start Triton: clients reach it where it listens
        client_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        settings = settings.model_copy(update={"triton_url": f"{client_host}:{settings.grpc_port}"})
    paths = StackPaths(settings.state_dir)
    watching = False
    try:
        auth = bridge_auth(settings)
        # The default model trains while Label Studio starts: the first pre-label comes minutes sooner.
        training = start_bootstrap(settings) if triton_url is None else None
        studio_url, token, creds, project_id = settings.label_studio_url, None, None, None
        if settings.label_studio_api_key is not None:
            token = settings.label_studio_api_key.get_secret_value()
        if not no_label_studio:
            creds = start_label_studio(settings, paths)
            studio_url, token = local_studio_url(settings), creds.token
        if triton_url is None:
            if training is not None:
                wait_for_first_version(settings, training)
            info = start_triton(settings)
        else:
            found = _triton_info(settings)
            if found is None:
                raise TritonUnavailableError(f"no detector answers at {triton_url}")
            info = found
        bridge_url = start_bridge(settings, studio_url, token, auth)
        if creds is not None and studio_url is not None:
            project_id = asyncio.run(_connect_project(settings, studio_url, creds.token, bridge_url, auth))
        if not no_trainer and studio_url and token:
            start_trainer(settings, studio_url, token, project_id)
            watching = True
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
    if auth is not None:
        typer.echo(f"  basic auth  user {auth.user}; password in {credentials_path(settings)} (owner-only)")
    if watching:
        typer.echo(
            f'Trainer       watching: "Start training" or {settings.train_every_annotations} new annotations '
            "train a candidate, published if the rules say so"
        )
    if creds is not None:
        typer.echo(f"Label Studio  {studio_url}/projects/{project_id}  login {creds.username} / {creds.password}")
        typer.echo(
            "\nNext: open the project, import images (Import button), and the boxes appear as pre-labels;\n"
            "or select tasks -> Actions -> Retrieve Predictions. Then verify/correct and submit;\n"
            "Settings -> Model -> Start Training (or enough new annotations) trains a new model version.\n"
            f"Logs: {settings.state_dir / 'logs'}   State: `labelloop status`   Stop everything: `labelloop down`"
        )
    else:
        typer.echo(
            f"\nNext: in your Label Studio, Settings -> Model -> Connect Model, URL {bridge_url}"
            + (", Authentication: Basic (the user and password above)" if auth is not None else "")
            + f",\nand add the header `Authorization: Basic <base64 user:password>` to its webhook {bridge_url}/webhook"
        )


@app.command()
def down() -> None:
    """Stop what `labelloop up` started, and only that."""
    from core.settings import load_settings

    settings = load_settings()
    for name in (BOOTSTRAP, TRAINER, BRIDGE, LABEL_STUDIO, TRITON):
        stopped = Daemon(settings.state_dir, name).stop()
        typer.echo(f"{name}: {'stopped' if stopped else 'not running'}")
    StackPaths(settings.state_dir).stack_file.unlink(missing_ok=True)


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The state of Triton, the bridge, Label Studio and the trainer, with the last training run."""
    from core.settings import load_settings

    try:
        state = stack_status(load_settings())
    except LabelloopError as exc:
        raise fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(state, indent=2))
        return
    t, b, ls, tr = state["triton"], state["bridge"], state["label_studio"], state["trainer"]
    typer.echo(f"triton        {t['url']}: {'ready' if t['ready'] else 'not ready'} {t['model']} v{t['version']}")
    typer.echo(f"bridge        {b['url']}: {b['status']} (auth: {b['auth']})")
    typer.echo(
        f"label studio  {ls['url']}: project {ls['project_id']}, "
        f"model {'connected' if ls['ml_backend_connected'] else 'not connected'}"
    )
    watcher = f"watching (every {tr['train_every_annotations']} annotations)" if tr["watching"] else "not watching"
    typer.echo(f"trainer       {watcher}" + (", training the default model" if tr["bootstrapping"] else ""))
    typer.echo(f"last run      {_run_text(tr['last_run'])}")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _run_text(run: dict[str, Any] | None) -> str:
    """One paragraph: when and what ran, what the rules decided and why."""
    if run is None:
        return "none yet"
    head = f"{run['time']} {run['kind']}" + (f" {run['run_id']}" if run["run_id"] else "")
    if run["kind"] == "bootstrap":
        outcome = "not better: kept" if run["published_version"] is None else f"published v{run['published_version']}"
        return f"{head}: {outcome} (candidate mAP50 {_fmt(run['candidate_map50'])})"
    if run["published_version"] is not None:
        outcome = f"deployed: published v{run['published_version']}"
    elif run["deploy"] is False or run["kind"] == "evaluate":
        outcome = f"not deployed: v{run['served_version']} stays served"
    else:
        outcome = "not deployed"
    lines = [
        f"{head}: {outcome}",
        f"  served v{run['served_version']} mAP50 {_fmt(run['served_map50'])}, "
        f"candidate mAP50 {_fmt(run['candidate_map50'])}",
        *(f"  - {reason}" for reason in run["reasons"]),
    ]
    if run["error"]:
        lines.append(f"  error: {run['error']}")
    return "\n".join(lines)
