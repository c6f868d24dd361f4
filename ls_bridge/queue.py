"""``labelloop queue``: Label Studio's Data Manager as the labelling queue, most uncertain task first.

Label Studio Community has no active-learning ordering of its own; it can sort a tab by prediction
score. The bridge's task score is an uncertainty, lower first (``ls_bridge.controls``), so a tab
sorted by it ascending, over tasks nobody has labelled or skipped, is the queue. Label Studio
averages that score over the predictions of the project's ``model_version`` only, so the queue
pre-labels what the served version has not seen, then points the project at that version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from core.settings import Settings
from core.studio import StudioClient, studio_settings
from ls_bridge.prelabel import PrelabelReport, prelabel_project

__all__ = ["QUEUE_VIEW", "QueueReport", "QueuedTask", "refresh_queue"]

logger = logging.getLogger(__name__)

QUEUE_VIEW = "Most uncertain first"
_ORDERING = ("tasks:predictions_score",)  # ascending; Label Studio puts tasks without a score last
# Tasks nobody has submitted or skipped (a skip leaves total_annotations at 0).
_TO_LABEL: dict[str, Any] = {
    "conjunction": "and",
    "items": [
        {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
        {"filter": "filter:tasks:cancelled_annotations", "operator": "equal", "type": "Number", "value": 0},
    ],
}


@dataclass(frozen=True)
class QueuedTask:
    """A task in queue order, with the score Label Studio sorts it by (None: no prediction of the version)."""

    task: int
    score: float | None


@dataclass
class QueueReport:
    """What one ``queue`` run did, and the head of the queue."""

    project_id: int
    model_version: str
    view_id: int
    prelabel: PrelabelReport
    tasks: list[QueuedTask] = field(default_factory=list)


async def refresh_queue(settings: Settings, project_id: int, *, limit: int = 10, progress: bool = True) -> QueueReport:
    """Pre-label what the served version has not seen, set the project's version, and order the queue tab."""
    prelabelled = await prelabel_project(settings, project_id, progress=progress)
    async with StudioClient.from_settings(studio_settings(settings, "queue")) as api:
        if prelabelled.predicted + prelabelled.skipped:
            await api.set_model_version(project_id, prelabelled.model_version)
        else:
            logger.warning(
                "project %d: no task holds a prediction of %s, so the queue has no scores to sort by",
                project_id,
                prelabelled.model_version,
            )
        view_id = await api.ensure_view(project_id, QUEUE_VIEW, _ORDERING, _TO_LABEL)
        head = await api.view_tasks(project_id, view_id, limit)
    tasks = [QueuedTask(int(t["id"]), _score(t.get("predictions_score"))) for t in head]
    return QueueReport(project_id, prelabelled.model_version, view_id, prelabelled, tasks)


def _score(value: Any) -> float | None:
    return None if value is None else float(value)
