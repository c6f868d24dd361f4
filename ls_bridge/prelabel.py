"""``labelloop prelabel``: pre-label a whole project through Label Studio's API, page by page.

For projects too big for one "Retrieve predictions" call. Tasks that already hold a prediction of
the served model version are skipped, so a rerun only does what is missing; a task that fails is
not written (a rerun tries it again) and is counted as failed. A project whose controls only heads
fill (a classifier's Choices, a segmenter's masks and points) is pre-labelled by its served heads,
as the bridge answers it; any other by the detector.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from core.errors import ConfigError
from core.fetch import ImageFetcher
from core.labelmap import parse_label_config
from core.settings import Settings
from core.studio import StudioClient, studio_settings
from ls_bridge.controls import CONTROL_MODELS
from ls_bridge.heads import HeadPredictor, HeadRequest, head_controls
from ls_bridge.metrics import BridgeMetrics
from ls_bridge.predictor import Predictor
from ls_bridge.schemas import Prediction, Task
from serving.client import make_client

__all__ = ["PrelabelReport", "prelabel_project"]

PredictPage = Callable[[list[Task]], Awaitable[list[Prediction | None]]]

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
        async with api:
            project = await api.project(project_id)
            config = str(project.get("label_config", ""))
            if head_controls(config) and not parse_label_config(config).controls_of(CONTROL_MODELS):
                report = await _with_heads(settings, api, fetcher, project, progress)
            else:
                report = await _with_detector(settings, api, fetcher, project, progress)
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


async def _pages(
    settings: Settings,
    api: StudioClient,
    project: dict[str, Any],
    report: PrelabelReport,
    predict: PredictPage,
    progress: bool,
) -> PrelabelReport:
    """Every page of tasks: those without a prediction of ``report.model_version`` predicted and stored."""
    with tqdm(
        total=project.get("task_number"), unit="task", desc=f"prelabel {report.model_version}", disable=not progress
    ) as bar:
        async for raw in api.task_pages(report.project_id, settings.prelabel_batch_size):
            page = [Task.model_validate(t) for t in raw]
            todo = [t for t in page if not _has_version(t, report.model_version)]
            report.total += len(page)
            report.skipped += len(page) - len(todo)
            answers = await predict(todo)
            done = [(t.id, p) for t, p in zip(todo, answers, strict=True) if p is not None]
            if done:
                await api.import_predictions(report.project_id, [{"task": i, **p.model_dump()} for i, p in done])
            report.predicted += len(done)
            report.failed += len(todo) - len(done)
            report.regions += sum(len(p.result) for _, p in done)
            bar.update(len(page))
    return report


async def _with_detector(
    settings: Settings, api: StudioClient, fetcher: ImageFetcher, project: dict[str, Any], progress: bool
) -> PrelabelReport:
    async with make_client(settings) as detector:
        predictor = Predictor(settings, detector, fetcher, BridgeMetrics())
        plan, info = await predictor.plan(str(project.get("label_config", "")))
        report = PrelabelReport(project_id=int(project["id"]), model_version=predictor.version_name(info.version))

        async def predict(tasks: list[Task]) -> list[Prediction | None]:
            outcomes = await predictor.predict_tasks(tasks, plan, info)
            return [o.prediction if o.error is None else None for o in outcomes]

        return await _pages(settings, api, project, report, predict, progress)


async def _with_heads(
    settings: Settings, api: StudioClient, fetcher: ImageFetcher, project: dict[str, Any], progress: bool
) -> PrelabelReport:
    heads = HeadPredictor(settings, fetcher, BridgeMetrics())
    try:
        config, project_id = str(project.get("label_config", "")), int(project["id"])
        assigned = await heads.assign(config, project_id)
        versions = await heads.versions(config, project_id)
        if not assigned or not versions:
            raise ConfigError(
                f"project {project_id}: no served head fills its label config yet "
                f"(labelloop train --project {project_id})"
            )
        report = PrelabelReport(project_id=project_id, model_version="+".join(versions))
        request = HeadRequest(session=heads.session(project_id))

        async def predict(tasks: list[Task]) -> list[Prediction | None]:
            answers = await heads.predict(tasks, assigned, None, request)
            return [
                None
                if a.error is not None
                else Prediction(result=a.results, score=a.score, model_version="+".join(a.versions))
                for a in answers
            ]

        return await _pages(settings, api, project, report, predict, progress)
    finally:
        await heads.close()
