"""``labelloop bridge | prelabel | queue``; each imports the server and its clients when it runs (a fast ``--help``)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from typing import TYPE_CHECKING, Annotated

import typer

from core.console import fail
from core.errors import ConfigError, LabelloopError

if TYPE_CHECKING:
    from core.settings import Settings

__all__ = ["app"]

logger = logging.getLogger(__name__)
app = typer.Typer(no_args_is_help=True)

TritonUrl = Annotated[str | None, typer.Option("--triton-url", help="Triton gRPC host:port.")]
ModelName = Annotated[str | None, typer.Option("--model", help="Detector name in the repository.")]
ProjectId = Annotated[
    int,
    typer.Option(
        "--project",
        help="Label Studio project id: at LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY, "
        "else the Label Studio `labelloop up` runs.",
    ),
]


def _log_auth(settings: Settings) -> None:
    """Say where the bridge's password is; never the password."""
    from core.credentials import credentials_path

    if settings.bridge_auth == "none":
        return
    if settings.basic_auth_user:
        logger.info("basic auth on: user %r, password from basic_auth_pass (BASIC_AUTH_PASS)", settings.basic_auth_user)
    else:
        logger.info("basic auth on: user and password in %s (owner-only)", credentials_path(settings))


@app.command()
def bridge(
    port: Annotated[int | None, typer.Option(help="Port to listen on (default 9090).")] = None,
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default 127.0.0.1; 0.0.0.0 for Docker).")
    ] = None,
    triton_url: TritonUrl = None,
    model: ModelName = None,
) -> None:
    """Run the Label Studio ML backend: pre-labels from Triton at /predict, events at /webhook."""
    import uvicorn

    from core.processes import port_in_use
    from core.settings import load_settings
    from ls_bridge.app import create_app

    try:
        settings = load_settings(bridge_port=port, bridge_host=host, triton_url=triton_url, model_name=model)
        if port_in_use(settings.bridge_host, settings.bridge_port):
            raise ConfigError(f"bridge port {settings.bridge_host}:{settings.bridge_port} is already in use")
        application = create_app(settings)
    except LabelloopError as exc:
        raise fail(exc) from exc
    _log_auth(settings)
    # log_config=None keeps the CLI's logging setup instead of uvicorn's own.
    config = uvicorn.Config(application, host=settings.bridge_host, port=settings.bridge_port, log_config=None)
    # uvicorn re-raises the signal that stopped it after a graceful shutdown; end normally instead.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run()


@app.command()
def prelabel(
    project: ProjectId,
    batch_size: Annotated[int | None, typer.Option(help="Tasks per page (default 64).")] = None,
    triton_url: TritonUrl = None,
    model: ModelName = None,
) -> None:
    """Pre-label every task of a project that lacks a prediction of the served model version."""
    from core.settings import load_settings
    from ls_bridge.prelabel import prelabel_project

    try:
        settings = load_settings(prelabel_batch_size=batch_size, triton_url=triton_url, model_name=model)
        report = asyncio.run(prelabel_project(settings, project))
    except LabelloopError as exc:
        raise fail(exc) from exc
    typer.echo(
        f"project {report.project_id}: {report.predicted} predicted ({report.regions} boxes), "
        f"{report.skipped} already had {report.model_version}, {report.failed} failed"
    )
    if report.failed:
        raise typer.Exit(code=2)


@app.command()
def queue(
    project: ProjectId,
    limit: Annotated[int, typer.Option(min=1, help="How many tasks of the queue to print.")] = 10,
    triton_url: TritonUrl = None,
    model: ModelName = None,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"tasks": [{"task": ID, "score": S}, ...]}.')] = False,
) -> None:
    """Order the project's "Most uncertain first" tab and print its head (pre-labels what is missing first)."""
    from core.settings import load_settings
    from ls_bridge.queue import QUEUE_VIEW, refresh_queue

    try:
        settings = load_settings(triton_url=triton_url, model_name=model)
        report = asyncio.run(refresh_queue(settings, project, limit=limit))
    except LabelloopError as exc:
        raise fail(exc) from exc
    if as_json:
        typer.echo(json.dumps({"tasks": [{"task": t.task, "score": t.score} for t in report.tasks]}))
        return
    done = report.prelabel
    typer.echo(
        f"project {report.project_id}: {done.predicted} pre-labelled, {done.failed} failed; "
        f'tab "{QUEUE_VIEW}" sorted by {report.model_version}\'s score, lowest (least sure) first'
    )
    for t in report.tasks:
        typer.echo(f"  task {t.task:>8}  score {'-' if t.score is None else f'{t.score:.4f}'}")
