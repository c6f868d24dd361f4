"""``labelloop prelabel``: pre-label a whole project through Label Studio's API, page by page.

For projects too big for one "Retrieve predictions" call. Tasks that already hold a prediction of
the served model version are skipped, so a rerun only does what is missing; a task that fails is
not written (a rerun tries it again) and is counted as failed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tqdm import tqdm

from core.fetch import ImageFetcher
from core.settings import Settings
from core.studio import StudioClient, studio_settings
from ls_bridge.metrics import BridgeMetrics
from ls_bridge.predictor import Predictor
from ls_bridge.schemas import Task
from serving.client import make_client

__all__ = ["PrelabelReport", "prelabel_project"]

logger = logging.getLogger(__name__)


@dataclass
class PrelabelReport:
    """What one ``prelabel`` run did."""

    project_id: int
    model_version: str
    total: int = 0
    predicted: int = 0
    skipped: int = 0
    failed: int = 0
    regions: int = 0


def _has_version(task: Task, model_version: str) -> bool:
    return any(p.get("model_version") == model_version for p in task.predictions)


async def prelabel_project(settings: Settings, project_id: int, *, progress: bool = True) -> PrelabelReport:
    """Predict every task of ``project_id`` that lacks a prediction of the served version.

    Without a configured Label Studio, the one ``labelloop up`` runs (its stored admin token).
    """
    settings = studio_settings(settings, "prelabel")
    api = StudioClient.from_settings(settings)
    fetcher = ImageFetcher(settings, api.auth)
    try:
        async with api, make_client(settings) as detector:
            predictor = Predictor(settings, detector, fetcher, BridgeMetrics())
            project = await api.project(project_id)
            plan, info = await predictor.plan(str(project.get("label_config", "")))
            report = PrelabelReport(project_id=project_id, model_version=predictor.version_name(info.version))
            total = project.get("task_number")
            with tqdm(total=total, unit="task", desc=f"prelabel {report.model_version}", disable=not progress) as bar:
                async for raw in api.task_pages(project_id, settings.prelabel_batch_size):
                    page = [Task.model_validate(t) for t in raw]
                    todo = [t for t in page if not _has_version(t, report.model_version)]
                    report.total += len(page)
                    report.skipped += len(page) - len(todo)
                    outcomes = await predictor.predict_tasks(todo, plan, info)
                    done = [(o.task_id, o.prediction) for o in outcomes if o.error is None]
                    if done:
                        await api.import_predictions(project_id, [{"task": i, **p.model_dump()} for i, p in done])
                    report.predicted += len(done)
                    report.failed += len(outcomes) - len(done)
                    report.regions += sum(len(p.result) for _, p in done)
                    bar.update(len(page))
    finally:
        await fetcher.aclose()
    logger.info(
        "project %d: %d predicted, %d skipped, %d failed (%s)",
        project_id,
        report.predicted,
        report.skipped,
        report.failed,
        report.model_version,
    )
    return report
