"""Which labelling session a project is: the recorded one, else one read from its label config.

``labelloop session create`` records a session per project. A project made by hand (in Label
Studio's UI) has none: when its label config has controls a head kind fills and no detector
control, the session is derived from it (the first such control's labels as classes, the
project's title as the head's name, every other setting at its default).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from types import ModuleType

from pydantic import ValidationError

from core import kinds
from core.errors import ConfigError
from core.labelmap import parse_label_config
from core.session import BACKGROUND, ClassSpec, Session, read_recorded
from core.settings import Settings
from core.studio import StudioClient, studio_settings

__all__ = ["session_for_project", "session_trainer"]

logger = logging.getLogger(__name__)


async def _project(settings: Settings, project: int) -> dict[str, object]:
    async with StudioClient.from_settings(settings) as studio:
        return await studio.project(project)


def session_for_project(settings: Settings, project: int) -> Session | None:
    """The project's session; None for a project the detector trains on (or that no head kind fills)."""
    recorded = read_recorded(settings.state_dir, project)
    if recorded is not None:
        return recorded
    try:
        studio = studio_settings(settings, "training from a project")
    except ConfigError:
        return None  # no Label Studio to read the config from: the detector's run says so, with its fix
    body = asyncio.run(_project(studio, project))
    config = parse_label_config(str(body.get("label_config") or ""))
    heads = [k for k in kinds.KINDS.values() if k.session_run and k.available]
    box_tags = {tag for k in kinds.KINDS.values() if not k.session_run for tag in k.control_tags}
    if config.controls_of(box_tags):
        return None
    for entry in heads:
        for control in config.controls_of(entry.control_tags):
            names = [label.name for label in control.labels if label.name.lower() != BACKGROUND]
            try:
                session = Session(
                    kind=entry.name,  # type: ignore[arg-type]
                    title=str(body.get("title") or f"project {project}"),
                    classes=tuple(ClassSpec(name=name) for name in names),
                    project=project,
                )
            except ValidationError:
                continue  # too few labels for this kind
            logger.info(
                "project %d has no recorded session: a %s session from its %r", project, entry.name, control.name
            )
            return session
    return None


def session_trainer(settings: Settings, project: int) -> tuple[ModuleType, Session] | None:
    """The module training the project's session head (its kind's ``session_run``) and the session; None: detector."""
    session = session_for_project(settings, project)
    if session is None:
        return None
    entry = kinds.kind(session.kind)
    if entry.session_run is None:
        return None
    return importlib.import_module(entry.session_run), session
