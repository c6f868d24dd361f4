"""Where verified annotations come from: a Label Studio project (API) or a YOLO export on disk.

Both give :class:`SourceData`: local image files with boxes by class name, and the source's own
class order (used only when no model is served yet). The API path reads the project's tasks with
their annotations and its label config, whose labels it maps to the served model's classes as the
bridge does (:mod:`core.labelmap`), and downloads images with the bridge's
:class:`core.fetch.ImageFetcher` (uploads, local files, presigned cloud URLs, allowed http(s)
hosts; same limits and credentials). An export maps its class names the same way when it is
given the project's label config, and uses them as they are otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from core.errors import ConfigError, DatasetError, FetchError, LabelStudioError
from core.fetch import ImageFetcher, make_auth
from core.settings import Settings
from trainer.dataset import LabelledImage, TaskLabels, labels_from_tasks, map_export_labels, read_yolo_export

__all__ = ["ExportSource", "ProjectSource", "Source", "SourceData"]

logger = logging.getLogger(__name__)

_API_TIMEOUT_S = 120.0
_PAGE_SIZE = 100


@dataclass(frozen=True)
class SourceData:
    """Annotated images ready for :func:`trainer.dataset.build_dataset`."""

    images: tuple[LabelledImage, ...]
    classes: tuple[str, ...]
    description: str


class Source(Protocol):
    """Something that can produce annotated images into a scratch folder."""

    def collect(self, settings: Settings, work_dir: Path, model_classes: Sequence[str] = ()) -> SourceData:
        """Annotated images under ``work_dir``, boxes named by ``model_classes`` (the served model's) where known."""
        ...


@dataclass(frozen=True)
class ExportSource:
    """A Label Studio YOLO export (zip or folder), the folder holding its images, and the project's label config.

    Without ``label_config`` (a file holding the project's XML) the export's class names are used as they are.
    """

    export: Path
    images: Path | None = None
    label_config: Path | None = None

    def collect(self, settings: Settings, work_dir: Path, model_classes: Sequence[str] = ()) -> SourceData:
        export = read_yolo_export(self.export, self.images, work_dir)
        if self.label_config is not None:
            try:
                config = self.label_config.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot read the label config {self.label_config}: {exc}") from exc
            export = map_export_labels(export, config, model_classes)
        return SourceData(export.images, export.classes, f"export {self.export}")


@dataclass(frozen=True)
class ProjectSource:
    """A Label Studio project, read through its API with a legacy token or a Personal Access Token."""

    project_id: int

    def collect(self, settings: Settings, work_dir: Path, model_classes: Sequence[str] = ()) -> SourceData:
        if not settings.label_studio_url or settings.label_studio_api_key is None:
            raise ConfigError("training from a project needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        return asyncio.run(self._collect(settings, work_dir, model_classes))

    async def _collect(self, settings: Settings, work_dir: Path, model_classes: Sequence[str]) -> SourceData:
        auth = make_auth(settings)
        base = str(settings.label_studio_url).rstrip("/")
        async with httpx.AsyncClient(base_url=base, auth=auth, timeout=_API_TIMEOUT_S, trust_env=False) as client:
            project = await _get(client, f"/api/projects/{self.project_id}/")
            tasks = await _annotated_tasks(client, self.project_id)
        found, order = labels_from_tasks(tasks, str(project.get("label_config") or ""), model_classes)
        logger.info("project %d: %d tasks, %d with a usable annotation", self.project_id, len(tasks), len(found))
        if not found:
            raise DatasetError(f"project {self.project_id} has no completed, non-cancelled annotations")
        fetcher = ImageFetcher(settings, auth)
        try:
            images = await asyncio.gather(*(_download(fetcher, item, work_dir) for item in found))
        finally:
            await fetcher.aclose()
        kept = tuple(image for image in images if image is not None)
        if not kept:
            raise DatasetError(f"no image of project {self.project_id} could be downloaded (see the log)")
        return SourceData(kept, tuple(order), f"Label Studio project {self.project_id}")


async def _get(client: httpx.AsyncClient, path: str, params: Mapping[str, Any] | None = None) -> Any:
    """One API call; transport errors and HTTP errors become LabelStudioError."""
    try:
        response = await client.get(path, params=params)
    except httpx.HTTPError as exc:
        raise LabelStudioError(f"GET {path}: {type(exc).__name__}: {exc}") from exc
    if response.status_code >= 400:
        hint = " (check LABEL_STUDIO_API_KEY)" if response.status_code in (401, 403) else ""
        raise LabelStudioError(f"GET {path}: HTTP {response.status_code}{hint}: {response.text[:300]}")
    try:
        return response.json()
    except ValueError as exc:
        raise LabelStudioError(f"GET {path}: the answer is not JSON") from exc


async def _annotated_tasks(client: httpx.AsyncClient, project_id: int) -> list[dict[str, Any]]:
    """Every task of the project with its annotations, page by page in id order."""
    tasks: list[dict[str, Any]] = []
    page = 1
    while True:
        params = {"project": project_id, "page": page, "page_size": _PAGE_SIZE, "fields": "all"}
        try:
            body = await _get(client, "/api/tasks/", params)
        except LabelStudioError as exc:
            if "HTTP 404" in str(exc) and page > 1:  # Label Studio answers 404 past the last page
                break
            raise
        batch = body.get("tasks", []) if isinstance(body, Mapping) else body
        if not isinstance(batch, list):
            raise LabelStudioError(f"GET /api/tasks/: unexpected answer {str(body)[:200]}")
        tasks.extend(t for t in batch if isinstance(t, dict))
        if len(batch) < _PAGE_SIZE:
            break
        page += 1
    return tasks


async def _download(fetcher: ImageFetcher, item: TaskLabels, work_dir: Path) -> LabelledImage | None:
    """Fetch one task's image into ``work_dir``; a failure skips that task, never the run."""
    try:
        data = await fetcher.fetch(item.image_url, item.task_id)
    except FetchError as exc:
        logger.warning("task %d: image not fetched, task skipped: %s", item.task_id, exc)
        return None
    # No suffix: the dataset names the file after its decoded format, whatever the URL says.
    path = work_dir / "images" / f"task-{item.task_id}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return LabelledImage(path, item.boxes, origin=f"task {item.task_id}")
