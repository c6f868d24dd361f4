"""The classifier's dataset: Choices annotations of a Label Studio project, as (image, class) pairs, split for good.

Each task's chosen annotation (completed, not cancelled; ground truth first, then the newest, as
for boxes) gives one class: the single choice of the session's ``<Choices>`` control, mapped to a
model class by :mod:`core.labelmap`. An annotation with no or several choices there is skipped
with a warning. Images are downloaded with the bridge's fetcher (same origins, limits, credentials).

The held-out set is frozen as for the detector (:func:`trainer.dataset.bucket` on the image's
content hash): ``holdout.json`` lists every held-out image by hash with the class it joined with;
images listed stay held out with that class, new ones join by the same rule, nothing leaves.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from core.errors import DatasetError, FetchError
from core.fetch import ImageFetcher
from core.files import write_json_atomic
from core.labelmap import ConfigControl, LabelConfig, map_labels, parse_label_config
from core.settings import Settings
from core.studio import StudioClient, studio_settings
from trainer.dataset import bucket, chosen_annotation, task_image_url

__all__ = [
    "HOLDOUT_FILE",
    "ClassifiedImage",
    "Collected",
    "Split",
    "collect_annotated",
    "collect_choices",
    "split_holdout",
]

logger = logging.getLogger(__name__)

HOLDOUT_FILE = "holdout.json"


@dataclass(frozen=True)
class ClassifiedImage:
    """One annotated image: its bytes' hash, the bytes, its label and where it came from.

    ``results`` keep the annotation's Label Studio results for kinds that learn from more than a
    label (a segmenter's points and masks); their ``label`` is what the split counts.
    """

    content_hash: str
    data: bytes
    label: str
    task_id: int
    results: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class Split:
    """The training images and the frozen held-out ones (with the class each joined with)."""

    train: tuple[ClassifiedImage, ...]
    holdout: tuple[ClassifiedImage, ...]
    dataset_hash: str

    def to_dict(self) -> dict[str, Any]:
        def counts(items: Sequence[ClassifiedImage]) -> dict[str, int]:
            found: dict[str, int] = {}
            for item in items:
                found[item.label] = found.get(item.label, 0) + 1
            return dict(sorted(found.items()))

        return {
            "hash": self.dataset_hash,
            "train": {"images": len(self.train), "per_class": counts(self.train)},
            "holdout": {"images": len(self.holdout), "per_class": counts(self.holdout)},
        }


def _choice(annotation: Mapping[str, Any], control: str) -> str | None:
    for result in annotation.get("result") or []:
        if isinstance(result, Mapping) and result.get("type") == "choices" and result.get("from_name") == control:
            chosen = (result.get("value") or {}).get("choices") or []
            return str(chosen[0]) if len(chosen) == 1 else None
    return None


@dataclass(frozen=True)
class Collected:
    """A project's annotated images, and its unlabelled tasks most uncertain first (for interim predictions)."""

    images: list[ClassifiedImage]
    pending: list[ClassifiedImage]
    control: str
    to_name: str
    # model class -> the label results store (core.labelmap, as the bridge writes it)
    to_label: Mapping[str, str]


def _uncertainty(task: Mapping[str, Any]) -> float:
    """A task's lowest stored prediction score; a task with none comes first (nothing is known about it)."""
    scores = [
        float(p["score"])
        for p in task.get("predictions") or []
        if isinstance(p, Mapping) and p.get("score") is not None
    ]
    return min(scores, default=-1.0)


async def collect_choices(settings: Settings, project_id: int, classes: Sequence[str], pending: int = 0) -> Collected:
    """Every task of ``project_id`` whose chosen annotation picks one class, its image downloaded.

    The annotations are read from the project's first ``<Choices>`` whose labels show every class.
    The first ``pending`` unlabelled tasks, most uncertain first, are downloaded too (label left empty).
    """

    def controls(config: LabelConfig) -> list[ConfigControl]:
        found = [c for c in config.controls_of(("Choices",)) if not map_labels(c, classes).unlabelled]
        if not found:
            raise DatasetError(
                f"project {project_id} has no <Choices> showing every class [{', '.join(classes)}] "
                f"(found: {config.describe()})"
            )
        return found[:1]

    def read(annotation: Mapping[str, Any], found: Sequence[ConfigControl]) -> tuple[str, tuple[Any, ...]] | None:
        label = _choice(annotation, found[0].name)
        name = map_labels(found[0], classes).class_for(label) if label is not None else None
        if name not in classes:
            return None
        return str(name), ()

    return await collect_annotated(settings, project_id, classes, controls, read, pending, "Choices")


ReadAnnotation = Callable[[Mapping[str, Any], Sequence[ConfigControl]], "tuple[str, tuple[Any, ...]] | None"]


async def collect_annotated(
    settings: Settings,
    project_id: int,
    classes: Sequence[str],
    controls: Callable[[LabelConfig], list[ConfigControl]],
    read: ReadAnnotation,
    pending: int,
    what: str,
) -> Collected:
    """The kind-independent part of collecting: tasks, chosen annotations, image downloads, unlabelled tasks.

    ``controls`` picks the config's controls the kind learns from (the first one's image, and its map
    of ``classes`` to labels, name the results); ``read`` makes ``(label, results)`` of an annotation,
    or None to skip it.
    """
    settings = studio_settings(settings, "training from a project")
    async with StudioClient.from_settings(settings) as studio:
        project = await studio.project(project_id)
        tasks = await studio.tasks(project_id)
    config = parse_label_config(str(project.get("label_config") or ""))
    found = controls(config)
    keys = {o.name: o.value_key for o in config.objects if o.value_key is not None}
    wanted: list[tuple[int, str, str, tuple[Any, ...]]] = []
    unlabelled: list[tuple[float, int, str]] = []
    for task in tasks:
        annotation = chosen_annotation(task)
        url = task_image_url(task, found[0].to_names, keys)
        if annotation is None:
            if url is not None and not task.get("annotations"):
                unlabelled.append((_uncertainty(task), int(task["id"]), url))
            continue
        read_as = read(annotation, found)
        if read_as is None or url is None:
            logger.warning("task %s: no usable %s annotation or no image URL; skipped", task.get("id"), what)
            continue
        wanted.append((int(task["id"]), url, *read_as))
    logger.info("project %d: %d tasks, %d with a usable %s annotation", project_id, len(tasks), len(wanted), what)
    if not wanted:
        raise DatasetError(f"project {project_id} has no completed, non-cancelled {what} annotations")
    todo = [(task_id, url, "", ()) for _, task_id, url in sorted(unlabelled)[:pending]]
    fetcher = ImageFetcher(settings, studio.auth)
    try:
        images = await asyncio.gather(*(_download(fetcher, *item) for item in [*wanted, *todo]))
    finally:
        await fetcher.aclose()
    kept = [image for image in images if image is not None]
    return Collected(
        images=[i for i in kept if i.label],
        pending=[i for i in kept if not i.label],
        control=found[0].name,
        to_name=found[0].to_names[0],
        to_label=dict(map_labels(found[0], classes).to_label),
    )


async def _download(
    fetcher: ImageFetcher, task_id: int, url: str, label: str, results: tuple[Any, ...]
) -> ClassifiedImage | None:
    try:
        data = await fetcher.fetch(url, task_id)
    except FetchError as exc:
        logger.warning("task %d: image not fetched, task skipped: %s", task_id, exc)
        return None
    return ClassifiedImage(hashlib.sha256(data).hexdigest(), data, label, task_id, results)


def split_holdout(images: Sequence[ClassifiedImage], folder: Path, fraction: float) -> Split:
    """Train and held-out images; ``folder/holdout.json`` freezes the held-out set (module docstring)."""
    path = folder / HOLDOUT_FILE
    manifest: dict[str, Any] = {"fraction": fraction, "images": {}}
    if path.is_file():
        manifest = json.loads(path.read_text(encoding="utf-8"))
    listed: dict[str, str] = manifest["images"]
    unique = {image.content_hash: image for image in images}
    for content_hash, image in unique.items():
        if content_hash not in listed and bucket(content_hash, "holdout") < float(manifest["fraction"]):
            listed[content_hash] = image.label
    held = [img for h, img in unique.items() if h in listed]
    if not held and len(unique) > 1:
        # Too few images for the bucket to pick one: the closest joins, so there is always something to judge on.
        closest = min(unique, key=lambda h: bucket(h, "holdout"))
        listed[closest] = unique[closest].label
        held = [unique[closest]]
    train = tuple(img for h, img in unique.items() if h not in listed)
    if not train or not held:
        raise DatasetError(f"{len(unique)} distinct annotated images: need at least one to train on and one held out")
    holdout = tuple(replace(i, label=listed[i.content_hash]) for i in held)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, manifest)
    digest = hashlib.sha256(json.dumps(sorted((i.content_hash, i.label) for i in train)).encode()).hexdigest()
    return Split(train, holdout, digest)
