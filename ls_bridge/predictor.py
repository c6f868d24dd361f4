"""Tasks in, Label Studio predictions out: fetch, detect and format, pipelined per task.

Every task runs fetch -> detect -> format on its own, and all tasks of a batch run at once, bounded
by the fetcher's and the detector's semaphores and by ``fetch_concurrency + triton_concurrency``
tasks in flight (so a big batch never holds every image in memory). While one image downloads,
others are being decoded and run by Triton. A task that fails answers with an empty result and one
warning line; only an unreachable Triton fails the whole batch, since then every task would fail.
An optional deadline (``time.monotonic()``) bounds every download and every Triton call, retries
included: a batch answers before Label Studio stops waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from core.errors import FetchError, LabelloopError, TritonUnavailableError
from core.fetch import ImageFetcher
from core.settings import Settings
from core.studio import model_version_name
from ls_bridge.controls import LabelPlan, plan_for_config
from ls_bridge.metrics import BridgeMetrics
from ls_bridge.schemas import Prediction, Task
from serving.client import DetectorClient, ImageDetections, ModelInfo, probe_image

__all__ = ["Predictor", "TaskOutcome"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


async def _gather_or_cancel(coros: Sequence[Awaitable[T]]) -> list[T]:
    """Like ``gather``, but the first exception cancels the rest instead of leaving them running."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@dataclass(frozen=True)
class TaskOutcome:
    """A task's prediction, and the error that left it empty, if any."""

    task_id: int
    prediction: Prediction
    error: LabelloopError | None = None


class Predictor:
    """Answers batches of tasks for one label config with the model Triton serves now."""

    def __init__(
        self, settings: Settings, detector: DetectorClient, fetcher: ImageFetcher, metrics: BridgeMetrics
    ) -> None:
        self.settings = settings
        self.detector = detector
        self.fetcher = fetcher
        self.metrics = metrics
        self._in_flight = asyncio.Semaphore(settings.fetch_concurrency + settings.triton_concurrency)
        self._served: ModelInfo | None = None

    def version_name(self, version: int) -> str:
        return model_version_name(self.settings.model_name, version)

    async def plan(self, label_config: str, deadline: float | None = None) -> tuple[LabelPlan, ModelInfo]:
        """The plan for this config with the classes of the version that answered last.

        Only the first call asks Triton (a real inference); after that every answer names the
        version that produced it, and a task answered by another version is re-planned with that
        version's classes, so a published version is picked up without an extra request.
        """
        info = self._served
        if info is None:
            info = self._served = (await self.detector.detect(probe_image(), deadline=deadline)).model
        return plan_for_config(label_config, tuple(info.classes), self.settings.conf), info

    async def predict(
        self, tasks: Sequence[Task], label_config: str, deadline: float | None = None
    ) -> list[Prediction]:
        """Exactly one prediction per task, in order."""
        plan, info = await self.plan(label_config, deadline)
        return [outcome.prediction for outcome in await self.predict_tasks(tasks, plan, info, deadline)]

    async def predict_tasks(
        self, tasks: Sequence[Task], plan: LabelPlan, info: ModelInfo, deadline: float | None = None
    ) -> list[TaskOutcome]:
        """One outcome per task, in order; TritonUnavailableError fails the batch."""
        return await _gather_or_cancel([self._predict_task(task, plan, info, deadline) for task in tasks])

    async def _predict_task(self, task: Task, plan: LabelPlan, info: ModelInfo, deadline: float | None) -> TaskOutcome:
        async with self._in_flight:
            try:
                detections = {key: await self._detect_field(task, key, plan, deadline) for key in plan.value_keys}
                # A plan reads at least one image; its answer names the version Triton actually ran.
                served = next(iter(detections.values())).model
                plan = plan.for_classes(tuple(served.classes))
            except TritonUnavailableError:
                raise
            except LabelloopError as exc:
                logger.warning("task %s: no pre-labels (%s: %s)", task.id, type(exc).__name__, exc)
                self.metrics.tasks.inc(outcome="failed")
                self.metrics.errors.inc(where="task", error=type(exc).__name__)
                empty = Prediction(result=[], score=0.0, model_version=self.version_name(info.version))
                return TaskOutcome(task.id, empty, exc)
        if served.version != info.version:
            self._served = served
        with self.metrics.stages.time(stage="format"):
            regions, score = plan.format(detections)
        self.metrics.tasks.inc(outcome="ok")
        version = self.version_name(served.version)
        return TaskOutcome(task.id, Prediction(result=list(regions), score=score, model_version=version))

    async def _detect_field(self, task: Task, key: str, plan: LabelPlan, deadline: float | None) -> ImageDetections:
        url = task.data.get(key)
        if not isinstance(url, str):
            raise FetchError(f"task data has no {key!r} image URL")
        with self.metrics.stages.time(stage="fetch"):
            image = await self.fetcher.fetch(url, task.id, deadline)
        with self.metrics.stages.time(stage="infer"):
            return await self.detector.detect(
                image, conf=plan.request_threshold, iou=self.settings.iou, deadline=deadline
            )
