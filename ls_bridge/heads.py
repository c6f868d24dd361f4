"""Pre-labels from heads on the backbone: which served head fills which control, and one call per task.

Every head kind in the registry (``core.kinds``) whose results module has ``controls(config)`` takes
part: the classifier's ``<Choices>``, the segmenter's ``<BrushLabels>``/``<KeyPointLabels>``. The
heads Triton serves are found from its repository index and their configs (their ``labelloop_kind``
and ``classes`` parameters), listed again at most every ``REFRESH_S`` seconds, so a head published
while the bridge runs is picked up without a restart. A control is filled by a served head of its
kind whose every class is one of the control's labels; when several are, the one the project's
recorded session names wins, else the first by name. A control no head fills yet gets no result,
and the log says why once: before the first head is trained that is the normal state, not an error.

A control answers through two methods: ``clicks(context, classes)`` turns the regions a person just
placed (Label Studio's interactive ``context.result``) into the head's clicks, and
``answer(output, request)`` turns the head's output into Label Studio results and the task's
uncertainty score (lower first).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any, Protocol

from core import kinds
from core.errors import FetchError, LabelloopError, TritonUnavailableError
from core.fetch import ImageFetcher
from core.session import Session, read_recorded
from core.settings import Settings
from core.studio import model_version_name
from ls_bridge.metrics import BridgeMetrics
from ls_bridge.schemas import Region, Task
from serving.heads import served_heads

__all__ = ["REFRESH_S", "Assigned", "HeadAnswer", "HeadPredictor", "HeadRequest", "head_controls", "project_id"]

logger = logging.getLogger(__name__)

REFRESH_S = 5.0
_PROGRESS_EVERY = 50


def project_id(value: object) -> int | None:
    """Label Studio sends the project as ``"<id>.<timestamp>"`` in /predict and /setup; the id, or None."""
    text = str(value or "").split(".", 1)[0]
    return int(text) if text.isdigit() else None


@dataclass(frozen=True)
class HeadRequest:
    """What a control's answer depends on besides the head's output: the person's clicks and the session."""

    context: Sequence[dict[str, Any]] = ()
    session: Session | None = None

    @property
    def interactive(self) -> bool:
        return bool(self.context)


class HeadControl(Protocol):
    """One control of a label config that a head kind fills."""

    @property
    def from_name(self) -> str: ...

    @property
    def value_key(self) -> str: ...

    def serves(self, model_classes: Sequence[str]) -> bool: ...

    def clicks(
        self, context: Sequence[dict[str, Any]], model_classes: Sequence[str]
    ) -> list[tuple[float, float, int]]: ...

    def answer(self, output: Any, request: HeadRequest) -> tuple[list[Region], float]: ...


@dataclass(frozen=True)
class _HeadKind:
    name: str
    controls: Callable[[str], Sequence[HeadControl]]
    client: type


@cache
def _head_kinds() -> tuple[_HeadKind, ...]:
    """The registry's kinds that fill label-config controls from a head."""
    found = []
    for entry in kinds.KINDS.values():
        if not (entry.available and entry.results and entry.client and entry.label_config):
            continue
        controls = getattr(importlib.import_module(entry.results), "controls", None)
        module, _, name = entry.client.rpartition(".")
        if controls is not None:
            found.append(_HeadKind(entry.name, controls, getattr(importlib.import_module(module), name)))
    return tuple(found)


@lru_cache(maxsize=64)
def head_controls(config: str) -> tuple[tuple[str, HeadControl], ...]:
    """Every control of ``config`` a head kind fills, with its kind's name, in kind order.

    Cached like the label config's parse: every /setup and /predict of a project asks again.
    """
    return tuple((k.name, control) for k in _head_kinds() for control in k.controls(config))


@dataclass(frozen=True)
class Assigned:
    """A control and the served head that fills it."""

    kind: str
    control: HeadControl
    model: str


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
        self._clients: dict[str, Any] = {}
        self._served: dict[str, dict[str, tuple[str, ...]]] = {}
        self._listed_at = float("-inf")
        self._versions: dict[str, int] = {}
        self._warned: set[tuple[str, str]] = set()
        self._lock = asyncio.Lock()
        # As for boxes: a big batch never holds every image in memory at once.
        self._in_flight = asyncio.Semaphore(settings.fetch_concurrency + settings.triton_concurrency)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    def _client(self, kind: str, name: str) -> Any:
        client = self._clients.get(name)
        if client is None:
            s = self.settings
            client_class = next(k.client for k in _head_kinds() if k.name == kind)
            client = client_class(
                s.triton_url,
                name,
                timeout_s=s.triton_timeout_s,
                concurrency=s.triton_concurrency,
                retries=s.triton_retries,
            )
            self._clients[name] = client
        return client

    async def _heads(self, kind: str) -> dict[str, tuple[str, ...]]:
        """Served heads of ``kind`` and their classes, listed again when the last listing is older than REFRESH_S."""
        async with self._lock:
            if time.monotonic() - self._listed_at >= REFRESH_S:
                self._served = {}
                for k in _head_kinds():
                    listed = await served_heads(self.settings.triton_url, k.name)
                    self._served[k.name] = {name: served.classes for name, served in listed.items()}
                self._listed_at = time.monotonic()
            return self._served.get(kind, {})

    def _warn_once(self, control: str, message: str) -> None:
        if (control, message) not in self._warned:
            self._warned.add((control, message))
            logger.warning("%s: %s", control, message)

    def session(self, project: int | None) -> Session | None:
        return read_recorded(self.settings.state_dir, project) if project is not None else None

    async def assign(self, label_config: str, project: int | None) -> list[Assigned]:
        """Each control a served head fills, with that head's model name."""
        controls = head_controls(label_config)
        if not controls:
            return []
        session = self.session(project)
        preferred = session.model_name if session is not None else None
        assigned = []
        for kind, control in controls:
            heads = await self._heads(kind)
            fitting = [name for name, classes in sorted(heads.items()) if control.serves(classes)]
            if not fitting:
                self._warn_once(
                    control.from_name,
                    f"no served {kind} head has these labels yet: its pre-labels stay empty until one is "
                    "trained (labelloop train --project ID)",
                )
                continue
            chosen = preferred if preferred in fitting else fitting[0]
            if len(fitting) > 1 and chosen != preferred:
                self._warn_once(control.from_name, f"heads {', '.join(fitting)} all fit; using {chosen}")
            assigned.append(Assigned(kind, control, chosen))
        return assigned

    async def _version(self, assigned: Assigned) -> int:
        """The version of a head that answered last, else its newest READY one (0: none known)."""
        if assigned.model not in self._versions:
            try:
                ready = await self._client(assigned.kind, assigned.model).ready_versions()
            except LabelloopError:
                return 0
            if not ready:
                return 0
            self._versions[assigned.model] = ready[-1]
        return self._versions[assigned.model]

    async def versions(self, label_config: str, project: int | None) -> list[str]:
        """``name@vN`` of every head that fills a control of this config (READY versions, no inference)."""
        found = []
        for item in await self.assign(label_config, project):
            ready = await self._client(item.kind, item.model).ready_versions()
            if ready:
                found.append(model_version_name(item.model, ready[-1]))
        return list(dict.fromkeys(found))

    async def predict(
        self,
        tasks: Sequence[Task],
        assigned: Sequence[Assigned],
        deadline: float | None,
        request: HeadRequest = HeadRequest(),
    ) -> list[HeadAnswer]:
        """One answer per task, in order; a task that fails answers empty with its error.

        Batches of more than ``_PROGRESS_EVERY`` tasks (Label Studio's "Retrieve predictions") log their progress.
        """
        done = [0]

        async def one(task: Task) -> HeadAnswer:
            async with self._in_flight:
                answer = await self._task(task, assigned, deadline, request)
            done[0] += 1
            if len(tasks) > _PROGRESS_EVERY and done[0] % _PROGRESS_EVERY == 0:
                logger.info("pre-labelled %d of %d tasks with heads", done[0], len(tasks))
            return answer

        return list(await asyncio.gather(*(one(task) for task in tasks)))

    async def _task(
        self, task: Task, assigned: Sequence[Assigned], deadline: float | None, request: HeadRequest
    ) -> HeadAnswer:
        answer = HeadAnswer()
        try:
            for item in assigned:
                output = await self._infer(task, item, deadline, request)
                results, score = item.control.answer(output, request)
                answer.results.extend(results)
                answer.score = min(answer.score, score)
                self._versions[item.model] = output.model.version
                answer.versions.append(model_version_name(item.model, output.model.version))
        except TritonUnavailableError:
            raise
        except LabelloopError as exc:
            logger.warning("task %s: no head pre-labels (%s: %s)", task.id, type(exc).__name__, exc)
            self.metrics.errors.inc(where="task", error=type(exc).__name__)
            self.metrics.tasks.inc(outcome="failed")
            versions = [model_version_name(item.model, await self._version(item)) for item in assigned]
            return HeadAnswer(score=0.0, versions=list(dict.fromkeys(versions)), error=exc)
        answer.versions = list(dict.fromkeys(answer.versions))
        self.metrics.tasks.inc(outcome="ok")
        return answer

    async def _infer(self, task: Task, item: Assigned, deadline: float | None, request: HeadRequest) -> Any:
        url = task.data.get(item.control.value_key)
        if not isinstance(url, str):
            raise FetchError(f"task data has no {item.control.value_key!r} image URL")
        client = self._client(item.kind, item.model)
        clicks = item.control.clicks(request.context, self._served.get(item.kind, {}).get(item.model, ()))
        with self.metrics.stages.time(stage="fetch"):
            image = await self.fetcher.fetch(url, task.id, deadline)
        with self.metrics.stages.time(stage="infer"):
            return await client.predict_image(image, clicks, deadline)
