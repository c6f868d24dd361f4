"""Pre-labels from heads on the backbone: which served head fills which control, and one call per task.

The heads Triton serves are found from its repository index and their configs (their
``labelloop_kind`` and ``classes`` parameters), listed again at most every ``REFRESH_S`` seconds,
so a head published while the bridge runs is picked up without a restart. A control is filled by
a served head whose every class is one of the control's labels; when several are, the one the
project's recorded session names wins, else the first by name. A control no head fills yet gets no
result, and the log says why once: before the first head is trained that is the normal state, not
an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from core.errors import FetchError, LabelloopError, TritonUnavailableError
from core.fetch import ImageFetcher
from core.session import read_recorded
from core.settings import Settings
from core.studio import model_version_name
from core.uncertainty import margin
from ls_bridge.choices import ChoicesControl, choices_controls
from ls_bridge.metrics import BridgeMetrics
from ls_bridge.schemas import Region, Task
from serving.heads import ClassifierClient, ImageClasses, served_heads

__all__ = ["REFRESH_S", "HeadAnswer", "HeadPredictor", "project_id"]

logger = logging.getLogger(__name__)

REFRESH_S = 5.0
_PROGRESS_EVERY = 50
_KIND = "classifier"


def project_id(value: object) -> int | None:
    """Label Studio sends the project as ``"<id>.<timestamp>"`` in /predict and /setup; the id, or None."""
    text = str(value or "").split(".", 1)[0]
    return int(text) if text.isdigit() else None


@dataclass
class HeadAnswer:
    """One task's results from the heads, its uncertainty and the versions that answered."""

    results: list[Region] = field(default_factory=list)
    score: float = 1.0
    versions: list[str] = field(default_factory=list)
    error: LabelloopError | None = None


class HeadPredictor:
    """Answers the heads' controls of a label config with the heads Triton serves now."""

    def __init__(self, settings: Settings, fetcher: ImageFetcher, metrics: BridgeMetrics) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.metrics = metrics
        self._clients: dict[str, ClassifierClient] = {}
        self._served: dict[str, tuple[str, ...]] = {}
        self._listed_at = float("-inf")
        self._versions: dict[str, int] = {}
        self._warned: set[tuple[str, str]] = set()
        self._lock = asyncio.Lock()
        # As for boxes: a big batch never holds every image in memory at once.
        self._in_flight = asyncio.Semaphore(settings.fetch_concurrency + settings.triton_concurrency)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    def _client(self, name: str) -> ClassifierClient:
        client = self._clients.get(name)
        if client is None:
            s = self.settings
            client = ClassifierClient(
                s.triton_url,
                name,
                timeout_s=s.triton_timeout_s,
                concurrency=s.triton_concurrency,
                retries=s.triton_retries,
            )
            self._clients[name] = client
        return client

    async def _heads(self) -> dict[str, tuple[str, ...]]:
        """Served heads and their classes, listed again when the last listing is older than REFRESH_S."""
        async with self._lock:
            if time.monotonic() - self._listed_at >= REFRESH_S:
                listed = await served_heads(self.settings.triton_url, _KIND)
                self._served = {name: served.classes for name, served in listed.items()}
                self._listed_at = time.monotonic()
            return self._served

    def _warn_once(self, control: str, message: str) -> None:
        if (control, message) not in self._warned:
            self._warned.add((control, message))
            logger.warning("%s: %s", control, message)

    async def assign(self, label_config: str, project: int | None) -> list[tuple[ChoicesControl, str]]:
        """Each control a served head fills, with that head's model name."""
        controls = choices_controls(label_config)
        if not controls:
            return []
        heads = await self._heads()
        session = read_recorded(self.settings.state_dir, project) if project is not None else None
        preferred = session.model_name if session is not None else None
        assigned = []
        for control in controls:
            fitting = [name for name, classes in sorted(heads.items()) if control.serves(classes)]
            if not fitting:
                self._warn_once(
                    control.from_name,
                    "no served classifier head has these choices yet: its pre-labels stay empty until one is "
                    "trained (labelloop train --project ID)",
                )
                continue
            chosen = preferred if preferred in fitting else fitting[0]
            if len(fitting) > 1 and chosen != preferred:
                self._warn_once(control.from_name, f"heads {', '.join(fitting)} all fit; using {chosen}")
            assigned.append((control, chosen))
        return assigned

    async def _version(self, name: str) -> int:
        """The version of ``name`` that answered last, else the newest READY one (0: none known)."""
        if name not in self._versions:
            try:
                ready = await self._client(name).ready_versions()
            except LabelloopError:
                return 0
            if not ready:
                return 0
            self._versions[name] = ready[-1]
        return self._versions[name]

    async def versions(self, label_config: str, project: int | None) -> list[str]:
        """``name@vN`` of every head that fills a control of this config (READY versions, no inference)."""
        found = []
        for _, name in await self.assign(label_config, project):
            ready = await self._client(name).ready_versions()
            if ready:
                found.append(model_version_name(name, ready[-1]))
        return list(dict.fromkeys(found))

    async def predict(
        self, tasks: Sequence[Task], assigned: Sequence[tuple[ChoicesControl, str]], deadline: float | None
    ) -> list[HeadAnswer]:
        """One answer per task, in order; a task that fails answers empty with its error.

        Batches of more than ``_PROGRESS_EVERY`` tasks (Label Studio's "Retrieve predictions") log their progress.
        """
        done = [0]

        async def one(task: Task) -> HeadAnswer:
            async with self._in_flight:
                answer = await self._task(task, assigned, deadline)
            done[0] += 1
            if len(tasks) > _PROGRESS_EVERY and done[0] % _PROGRESS_EVERY == 0:
                logger.info("classified %d of %d tasks", done[0], len(tasks))
            return answer

        return list(await asyncio.gather(*(one(task) for task in tasks)))

    async def _task(
        self, task: Task, assigned: Sequence[tuple[ChoicesControl, str]], deadline: float | None
    ) -> HeadAnswer:
        answer = HeadAnswer()
        try:
            for control, name in assigned:
                classes = await self._classify(task, control, name, deadline)
                region = control.region(classes)
                if region is not None:
                    answer.results.append(region)
                answer.score = min(answer.score, margin(classes.probs.tolist()))
                self._versions[name] = classes.model.version
                answer.versions.append(model_version_name(name, classes.model.version))
        except TritonUnavailableError:
            raise
        except LabelloopError as exc:
            logger.warning("task %s: no classifier pre-labels (%s: %s)", task.id, type(exc).__name__, exc)
            self.metrics.errors.inc(where="task", error=type(exc).__name__)
            self.metrics.tasks.inc(outcome="failed")
            versions = [model_version_name(name, await self._version(name)) for _, name in assigned]
            return HeadAnswer(score=0.0, versions=versions, error=exc)
        self.metrics.tasks.inc(outcome="ok")
        return answer

    async def _classify(self, task: Task, control: ChoicesControl, name: str, deadline: float | None) -> ImageClasses:
        url = task.data.get(control.value_key)
        if not isinstance(url, str):
            raise FetchError(f"task data has no {control.value_key!r} image URL")
        with self.metrics.stages.time(stage="fetch"):
            image = await self.fetcher.fetch(url, task.id, deadline)
        with self.metrics.stages.time(stage="infer"):
            return await self._client(name).classify(image, deadline=deadline)
