"""Where verified annotations come from: a Label Studio project (API) or a YOLO export on disk.

Both give :class:`SourceData`: local image files with boxes by class name, and the source's own
class order (used only when no model is served yet). The API path reads the project's tasks with
their annotations and its label config (:class:`core.studio.StudioClient`; without a configured
Label Studio, the one ``labelloop up`` runs), whose labels it maps to the served model's classes as the
bridge does (:mod:`core.labelmap`), and downloads images with the bridge's
:class:`core.fetch.ImageFetcher` (uploads, local files, presigned cloud URLs, allowed http(s)
hosts; same limits and credentials). An export maps its class names the same way when it is
given the project's label config, and uses them as they are otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from core.errors import ConfigError, DatasetError, FetchError
from core.fetch import ImageFetcher
from core.settings import Settings
from core.studio import StudioClient, studio_settings
from trainer.dataset import LabelledImage, TaskLabels, labels_from_tasks, map_export_labels, read_yolo_export

__all__ = ["ExportSource", "ProjectSource", "Source", "SourceData"]

logger = logging.getLogger(__name__)


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
    """A Label Studio project, read through its API with a legacy token or a Personal Access Token.

    Without a configured URL and key, the Label Studio ``labelloop up`` runs (its stored admin token).
    """

    project_id: int

    def collect(self, settings: Settings, work_dir: Path, model_classes: Sequence[str] = ()) -> SourceData:
        return asyncio.run(self._collect(studio_settings(settings, "training from a project"), work_dir, model_classes))

    async def _collect(self, settings: Settings, work_dir: Path, model_classes: Sequence[str]) -> SourceData:
        async with StudioClient.from_settings(settings) as studio:
            project = await studio.project(self.project_id)
            tasks = await studio.tasks(self.project_id)
        found, order = labels_from_tasks(tasks, str(project.get("label_config") or ""), model_classes)
        logger.info("project %d: %d tasks, %d with a usable annotation", self.project_id, len(tasks), len(found))
        if not found:
            raise DatasetError(f"project {self.project_id} has no completed, non-cancelled annotations")
        fetcher = ImageFetcher(settings, studio.auth)
        try:
            images = await asyncio.gather(*(_download(fetcher, item, work_dir) for item in found))
        finally:
            await fetcher.aclose()
        kept = tuple(image for image in images if image is not None)
        if not kept:
            raise DatasetError(f"no image of project {self.project_id} could be downloaded (see the log)")
        return SourceData(kept, tuple(order), f"Label Studio project {self.project_id}")


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
