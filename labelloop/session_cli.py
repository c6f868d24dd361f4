"""``labelloop session create SESSION.yaml``: a Label Studio project for a labelling session, connected and recorded.

The label config comes from the session's kind (``Kind.label_config`` in the registry); the images
are uploaded as tasks with their file names; the bridge is connected as the project's model; the
session is recorded for ``train`` and the watcher. Running it again for the same title reuses the
project (no second upload) when its classes match, and refuses it when they do not.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from core.console import fail
from core.errors import ConfigError, LabelloopError

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True, help="Labelling sessions: a project per session YAML.")

_SUFFIXES = frozenset({".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})


def _label_config(session: Any) -> str:
    from core import kinds

    entry = kinds.kind(session.kind)
    if not entry.available:
        raise ConfigError(f"kind {session.kind!r} is announced but cannot be served or trained yet")
    if entry.label_config is None:
        raise ConfigError(f"kind {session.kind!r} has no session label config yet")
    module, _, name = entry.label_config.rpartition(".")
    render = getattr(importlib.import_module(module), name)
    return str(render(session))


def _images(folder: Path | None) -> list[Path]:
    if folder is None:
        return []
    if not folder.is_dir():
        raise ConfigError(f"images: {folder} is not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _SUFFIXES)


async def _create(settings: Any, session: Any, bridge_url: str | None) -> dict[str, Any]:
    from core import kinds
    from core.credentials import bridge_credentials
    from core.labelmap import parse_label_config
    from core.session import record_session
    from core.studio import StudioClient

    config = _label_config(session)
    wanted = parse_label_config(config)
    async with StudioClient.from_settings(settings) as studio:
        project_id = await studio.ensure_project(session.title, config)
        project = await studio.project(project_id)
        current = parse_label_config(str(project.get("label_config") or ""))
        for control in wanted.controls:
            have = {c.name: c for c in current.controls}.get(control.name)
            labels = sorted(label.name for label in control.labels)
            found = sorted(label.name for label in have.labels) if have is not None else []
            if found != labels:
                raise ConfigError(
                    f"project {project_id} ({session.title!r}) exists with {control.tag} {control.name!r} "
                    f"[{', '.join(found)}], the session lists [{', '.join(labels)}]: change the title or the classes"
                )
        await studio.use_predictions(project_id)
        tasks = int(project.get("task_number") or 0)
        if tasks == 0:
            tasks = await studio.upload_images(project_id, _images(session.images))
        # Recorded before the bridge is connected: Label Studio's /setup check then names the session's head.
        record_session(settings.state_dir, session, project_id)
        if bridge_url:
            interactive = kinds.kind(session.kind).interactive
            await studio.ensure_ml_backend(
                project_id, bridge_url, bridge_credentials(settings), title="labelloop", interactive=interactive
            )
    return {"project": project_id, "tasks": tasks, "kind": session.kind, "model": session.model_name}


def _stack_bridge(state_dir: Path) -> str | None:
    """The bridge ``labelloop up`` runs, if it runs."""
    from labelloop.stack import StackPaths

    path = StackPaths(state_dir).stack_file
    return json.loads(path.read_text()).get("bridge_url") if path.is_file() else None


@app.command("create")
def create(
    path: Annotated[Path, typer.Argument(help="The session YAML (kind, title, images, classes, ...).")],
    bridge_url: Annotated[
        str | None,
        typer.Option("--bridge-url", help="Connect this bridge as the project's model (default: `labelloop up`'s)."),
    ] = None,
    connect: Annotated[
        bool, typer.Option("--connect/--no-connect", help="Connect the bridge (or leave it to Label Studio's UI).")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print {project, tasks, kind, model} as JSON.")] = False,
) -> None:
    """Create (or reuse) the session's Label Studio project, upload its images, connect the bridge, record it."""
    from core.session import load_session
    from core.settings import load_settings
    from core.studio import studio_settings

    try:
        session = load_session(path)
        settings = studio_settings(load_settings(), "creating a session")
        bridge = (bridge_url or _stack_bridge(settings.state_dir)) if connect else None
        summary = asyncio.run(_create(settings, session, bridge))
    except LabelloopError as exc:
        raise fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(
            f"project {summary['project']}: {summary['tasks']} tasks, {summary['kind']} head {summary['model']!r}"
        )
