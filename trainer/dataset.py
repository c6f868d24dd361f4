"""Turn verified annotations into a YOLO dataset, with a frozen held-out set beside it.

Two sources feed :func:`build_dataset`, both reduced to :class:`LabelledImage` (boxes by class
NAME, never by id): a Label Studio YOLO export (:func:`read_yolo_export`, zip or folder, plus
the image folder) and Label Studio task JSON (:func:`labels_from_tasks`, the API path, where the
label config maps labels to the model's classes as the bridge does).

Splits are decided by the image's content hash (SHA-256 of its bytes), so the same image always
lands in the same split whatever its file name or the order it came in:

- held-out ("test"): ``bucket(hash, "holdout") < fraction``. The set lives in
  ``<trainer>/holdout/`` with a ``manifest.json`` that freezes the fraction and, per image, its
  boxes by name. Images already listed stay there with the boxes they had when they joined; new
  images join by the same rule; nothing ever leaves, and nothing listed is ever trained on.
- val: ``bucket(hash, "val") < val_fraction`` among the rest; train: everything else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import uuid
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from PIL import Image, UnidentifiedImageError

from core.errors import DatasetError
from core.files import write_json_atomic
from core.labelmap import RECTANGLE_LABELS, LabelMap, map_labels, parse_label_config
from serving.repository import sha256_file

__all__ = [
    "DATASET_DIR",
    "HOLDOUT_DIR",
    "IMAGE_SUFFIXES",
    "Box",
    "Dataset",
    "LabelledImage",
    "SplitSummary",
    "TaskLabels",
    "YoloExport",
    "build_dataset",
    "chosen_annotation",
    "bucket",
    "dataset_names",
    "extract_zip",
    "labels_from_tasks",
    "ls_rect_to_xywhn",
    "map_export_labels",
    "merge_classes",
    "read_yolo_export",
    "summary_table",
    "task_image_url",
]

logger = logging.getLogger(__name__)

DATASET_DIR = "dataset"
HOLDOUT_DIR = "holdout"
MANIFEST_FILE = "manifest.json"
IMAGE_SUFFIXES = frozenset({".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})
SPLITS = ("train", "val", "test")
_PIL_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp", "MPO": ".jpg"}
# Label Studio renames uploads to "<8 hex>-<original name>"; its YOLO export names labels after that.
_LS_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-(.+)$")
_MAX_EXPORT_BYTES = 4 << 30
_DEFAULT_HOLDOUT_FRACTION = 0.2
_DEFAULT_VAL_FRACTION = 0.2


@dataclass(frozen=True)
class Box:
    """One box by class name, YOLO-normalised (centre x, centre y, width, height in 0..1)."""

    label: str
    xc: float
    yc: float
    w: float
    h: float


@dataclass(frozen=True)
class LabelledImage:
    """A local image file and its verified boxes; no boxes means a verified negative."""

    path: Path
    boxes: tuple[Box, ...]
    origin: str


@dataclass(frozen=True)
class YoloExport:
    """What a YOLO export holds: its class names by id and the images its labels matched."""

    classes: tuple[str, ...]
    images: tuple[LabelledImage, ...]
    unmatched_labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskLabels:
    """The boxes of one Label Studio task's chosen annotation, before its image is fetched."""

    task_id: int
    image_url: str
    boxes: tuple[Box, ...]
    annotation_id: int | None = None


@dataclass(frozen=True)
class SplitSummary:
    """Counts for one split: images, negatives, and per class the boxes and the images with one."""

    images: int = 0
    negatives: int = 0
    boxes: dict[str, int] = field(default_factory=dict)
    images_per_class: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Dataset:
    """A written YOLO dataset: ``data.yaml`` (train/val here, test = the held-out set) and its hash."""

    root: Path
    data_yaml: Path
    hash: str
    classes: tuple[str, ...]
    new_classes: tuple[str, ...]
    splits: dict[str, SplitSummary]
    holdout_added: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.root),
            "data_yaml": str(self.data_yaml),
            "hash": self.hash,
            "classes": list(self.classes),
            "new_classes": list(self.new_classes),
            "holdout_added": self.holdout_added,
            "splits": {name: asdict(summary) for name, summary in self.splits.items()},
        }


# --- geometry and hashing ---------------------------------------------------------------------


def bucket(content_hash: str, salt: str) -> float:
    """A stable number in [0, 1) from an image hash; different salts give independent draws."""
    digest = hashlib.sha256(f"{salt}:{content_hash}".encode()).hexdigest()
    return int(digest[:12], 16) / float(1 << 48)


def _clip_box(label: str, x1: float, y1: float, x2: float, y2: float) -> Box | None:
    """Clip corners to the image; None when nothing of the box is left."""
    x1, x2 = sorted((min(max(x1, 0.0), 1.0), min(max(x2, 0.0), 1.0)))
    y1, y2 = sorted((min(max(y1, 0.0), 1.0), min(max(y2, 0.0), 1.0)))
    if x2 - x1 <= 0.0 or y2 - y1 <= 0.0:
        return None
    return Box(label, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)


def ls_rect_to_xywhn(
    value: Mapping[str, Any], original_width: float | None = None, original_height: float | None = None
) -> tuple[float, float, float, float] | None:
    """A Label Studio rectangle (top-left x/y, width, height in percent) as clipped YOLO xywhn.

    Label Studio rotates a rectangle about its top-left corner (degrees, clockwise on screen);
    a rotated one becomes its axis-aligned bounding box, computed in pixels when the original
    size is known so the aspect ratio is right.
    """
    try:
        x, y = float(value["x"]), float(value["y"])
        w, h = float(value["width"]), float(value["height"])
        rotation = float(value.get("rotation") or 0.0)
    except (KeyError, TypeError, ValueError):
        return None
    sx = float(original_width) if original_width else 100.0
    sy = float(original_height) if original_height else 100.0
    x0, y0, wp, hp = x / 100 * sx, y / 100 * sy, w / 100 * sx, h / 100 * sy
    theta = math.radians(rotation)
    c, s = math.cos(theta), math.sin(theta)
    xs = [x0 + dx * c - dy * s for dx, dy in ((0, 0), (wp, 0), (wp, hp), (0, hp))]
    ys = [y0 + dx * s + dy * c for dx, dy in ((0, 0), (wp, 0), (wp, hp), (0, hp))]
    box = _clip_box("", min(xs) / sx, min(ys) / sy, max(xs) / sx, max(ys) / sy)
    return None if box is None else (box.xc, box.yc, box.w, box.h)


def _image_suffix(path: Path) -> str:
    """The suffix to store an image under; also proves that it decodes."""
    try:
        with Image.open(path) as img:
            fmt = img.format or ""
            img.verify()
    # ImportError: once imported, ultralytics patches Image.open to retry unknown files with a
    # HEIF plugin, and raises ModuleNotFoundError where pi-heif is not installed.
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, ImportError) as exc:
        raise DatasetError(f"{path} is not a readable image: {exc}") from exc
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return suffix
    if fmt in _PIL_SUFFIX:
        return _PIL_SUFFIX[fmt]
    raise DatasetError(f"{path}: image format {fmt or 'unknown'} is not one ultralytics trains on")


# --- classes ---------------------------------------------------------------------------------


def merge_classes(model_classes: Sequence[str], used: Iterable[str]) -> tuple[str, ...]:
    """The model's classes in their order, then names it does not know yet, sorted (ids never move)."""
    known = list(dict.fromkeys(model_classes))
    extra = sorted(set(used) - set(known))
    if extra:
        logger.warning("new classes %s are appended to the model's %s", extra, known)
    return tuple(known + extra)


# --- Label Studio YOLO export ------------------------------------------------------------------


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def extract_zip(archive: Path, dest: Path) -> Path:
    """Extract ``archive`` into ``dest``, refusing the whole archive if any member could escape it."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{archive} is not a readable zip: {exc}") from exc
    with zf:
        members = zf.infolist()
        total = 0
        for info in members:
            name = info.filename.replace("\\", "/")
            parts = PurePosixPath(name).parts
            if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
                raise DatasetError(f"{archive}: member {info.filename!r} points outside the export; refusing it")
            if _is_symlink(info):
                raise DatasetError(f"{archive}: member {info.filename!r} is a symbolic link; refusing it")
            if not (root / name).resolve().is_relative_to(root):
                raise DatasetError(f"{archive}: member {info.filename!r} resolves outside the export; refusing it")
            total += info.file_size
            if total > _MAX_EXPORT_BYTES:
                raise DatasetError(f"{archive} unpacks to more than {_MAX_EXPORT_BYTES >> 30} GiB; refusing it")
        try:
            for info in members:
                target = root / info.filename.replace("\\", "/")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out)
        except (OSError, zipfile.BadZipFile) as exc:
            raise DatasetError(f"could not extract {archive}: {exc}") from exc
    return root


def _export_root(export: Path) -> Path:
    """The folder holding ``labels/`` (exports are sometimes zipped with one top folder)."""
    if (export / "labels").is_dir():
        return export
    subdirs = [p for p in export.iterdir() if p.is_dir() and not p.name.startswith(("__", "."))]
    if len(subdirs) == 1 and (subdirs[0] / "labels").is_dir():
        return subdirs[0]
    raise DatasetError(f"{export} is not a YOLO export: no labels/ folder")


def _export_classes(root: Path) -> tuple[str, ...]:
    """Class names by id: ``notes.json`` (explicit ids) first, then ``classes.txt``, then ``data.yaml``."""
    notes = root / "notes.json"
    if notes.is_file():
        try:
            categories = json.loads(notes.read_text(encoding="utf-8"))["categories"]
            by_id = {int(c["id"]): str(c["name"]) for c in categories}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{notes} is not a Label Studio notes.json: {exc}") from exc
        if sorted(by_id) != list(range(len(by_id))):
            raise DatasetError(f"{notes}: category ids {sorted(by_id)} are not 0..{len(by_id) - 1}")
        return tuple(by_id[i] for i in range(len(by_id)))
    classes_txt = root / "classes.txt"
    if classes_txt.is_file():
        names = [line.strip() for line in classes_txt.read_text(encoding="utf-8").splitlines() if line.strip()]
        if names:
            return tuple(names)
    data_yaml = root / "data.yaml"
    if data_yaml.is_file() and (from_yaml := dataset_names(data_yaml)):
        return tuple(from_yaml)
    raise DatasetError(f"{root} has no notes.json, classes.txt or data.yaml naming its classes")


def dataset_names(data_yaml: Path) -> list[str]:
    """Class names by id from an ultralytics data.yaml (a list or an ``{id: name}`` mapping)."""
    try:
        data = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DatasetError(f"cannot read {data_yaml}: {exc}") from exc
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names, key=int)]
    if isinstance(names, list):
        return [str(n) for n in names]
    return []


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _index_images(folders: Sequence[Path]) -> dict[str, list[Path]]:
    """Image files by stem, over all ``folders`` (recursively)."""
    index: dict[str, list[Path]] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                index.setdefault(path.stem, []).append(path)
    return index


def _find_image(label: Path, labels_dir: Path, root: Path, index: dict[str, list[Path]]) -> Path | None:
    """The image a label file belongs to: mirrored path first, then by stem (with or without LS's prefix)."""
    rel = label.relative_to(labels_dir).with_suffix("")
    for suffix in sorted(IMAGE_SUFFIXES):
        mirrored = root / "images" / rel.with_suffix(suffix)
        if mirrored.is_file():
            return mirrored
    stems = [label.stem]
    match = _LS_UPLOAD_PREFIX.match(label.stem)
    if match:
        stems.append(match.group(1))
    for stem in stems:
        found = list(dict.fromkeys(p.resolve() for p in index.get(stem, [])))
        if len(found) > 1:
            raise DatasetError(f"{label.name} matches several images: {', '.join(map(str, found))}")
        if found:
            return found[0]
    return None


def _parse_label_file(path: Path, classes: Sequence[str]) -> tuple[Box, ...]:
    """YOLO label lines (boxes, or polygons taken as their bounding box), ids mapped to names."""
    boxes: list[Box] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            cls = int(fields[0])
            values = [float(v) for v in fields[1:]]
        except ValueError as exc:
            raise DatasetError(f"{path}:{number}: not a YOLO label line: {line!r}") from exc
        if not 0 <= cls < len(classes):
            raise DatasetError(f"{path}:{number}: class id {cls} is not in the export's classes {list(classes)}")
        if len(values) == 4:
            xc, yc, w, h = values
            box = _clip_box(classes[cls], xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2)
        elif len(values) >= 6 and len(values) % 2 == 0:
            xs, ys = values[0::2], values[1::2]
            box = _clip_box(classes[cls], min(xs), min(ys), max(xs), max(ys))
        else:
            raise DatasetError(f"{path}:{number}: expected 'class xc yc w h', got {line!r}")
        if box is None:
            logger.warning("%s:%d: empty box skipped", path, number)
            continue
        boxes.append(box)
    return tuple(boxes)


def read_yolo_export(export: Path, images: Path | None, work_dir: Path) -> YoloExport:
    """Read a Label Studio YOLO export (zip or folder); images come from ``images`` or the export's ``images/``.

    Class ids are turned into names here with the export's own table (Label Studio numbers
    classes alphabetically unless the config sets ``category``), so nothing downstream ever
    sees an export id. Only labelled images count: a label file with no lines is a verified
    negative, an image with no label file was never annotated and is left out.
    """
    if not export.exists():
        raise DatasetError(f"no export at {export}")
    if export.is_file():
        root = _export_root(extract_zip(export, work_dir / "export"))
    else:
        root = _export_root(export)
    classes = _export_classes(root)
    labels_dir = root / "labels"
    folders = [f for f in (images, root / "images") if f is not None and f.is_dir()]
    if images is not None and not images.is_dir():
        raise DatasetError(f"--images {images} is not a folder")
    index = _index_images(folders)
    found: list[LabelledImage] = []
    unmatched: list[str] = []
    for label in sorted(labels_dir.rglob("*.txt")):
        if not _inside(label, root):
            raise DatasetError(f"{label} links outside the export; refusing it")
        image = _find_image(label, labels_dir, root, index)
        if image is None:
            unmatched.append(label.name)
            continue
        found.append(LabelledImage(image, _parse_label_file(label, classes), origin=str(label.relative_to(root))))
    if unmatched:
        logger.warning(
            "%d label files have no image in %s: %s%s",
            len(unmatched),
            [str(f) for f in folders],
            unmatched[:5],
            " ..." if len(unmatched) > 5 else "",
        )
    if not found:
        where = ", ".join(str(f) for f in folders) or "(no image folder: pass --images)"
        raise DatasetError(f"no label file in {labels_dir} matches an image in {where}")
    logger.info("export %s: %d labelled images, classes %s", export, len(found), list(classes))
    return YoloExport(classes=classes, images=tuple(found), unmatched_labels=tuple(unmatched))


# --- Label Studio tasks (API) -------------------------------------------------------------------


@dataclass(frozen=True)
class _TaskConfig:
    """What reading annotations needs from a label config: task fields by object, label maps by control."""

    keys: Mapping[str, str]
    maps: Mapping[str, LabelMap]

    @property
    def classes(self) -> list[str]:
        """The classes the config's labels train, in label order."""
        return list(dict.fromkeys(c for m in self.maps.values() for c in m.classes))


def _task_config(label_config: str | None, model_classes: Sequence[str]) -> _TaskConfig:
    if not label_config:
        return _TaskConfig({}, {})
    config = parse_label_config(label_config)
    keys = {o.name: o.value_key for o in config.objects if o.value_key is not None}
    maps = {c.name: map_labels(c, model_classes) for c in config.controls_of({RECTANGLE_LABELS})}
    return _TaskConfig(keys, maps)


def map_export_labels(export: YoloExport, label_config: str, model_classes: Sequence[str] = ()) -> YoloExport:
    """An export's class names turned into ``model_classes`` by the project's label config, as the bridge maps them.

    An export keeps no control per box: each name goes through the first rectangle control listing it.
    """
    maps = list(_task_config(label_config, model_classes).maps.values())

    def class_for(label: str) -> str:
        return next((m.class_for(label) for m in maps if label in m.to_class), label)

    images = tuple(
        LabelledImage(i.path, tuple(Box(class_for(b.label), b.xc, b.yc, b.w, b.h) for b in i.boxes), i.origin)
        for i in export.images
    )
    classes = tuple(dict.fromkeys(class_for(name) for name in export.classes))
    return YoloExport(classes, images, export.unmatched_labels)


def chosen_annotation(task: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The annotation to train on: completed, not cancelled; ground truth first, then the newest."""
    usable = [
        a
        for a in task.get("annotations") or []
        if isinstance(a, Mapping) and not a.get("was_cancelled") and not a.get("skipped")
    ]
    if not usable:
        return None
    return max(
        usable,
        key=lambda a: (
            bool(a.get("ground_truth")),
            str(a.get("updated_at") or a.get("created_at") or ""),
            a.get("id") or 0,
        ),
    )


def task_image_url(task: Mapping[str, Any], to_names: Sequence[str], keys: Mapping[str, str]) -> str | None:
    data = task.get("data") or {}
    for name in [*to_names, *keys]:
        key = keys.get(name)
        if key and isinstance(data.get(key), str):
            return str(data[key])
    if isinstance(data.get("image"), str):
        return str(data["image"])
    strings = [v for v in data.values() if isinstance(v, str)]
    return strings[0] if len(strings) == 1 else None


def labels_from_tasks(
    tasks: Iterable[Mapping[str, Any]], label_config: str | None = None, model_classes: Sequence[str] = ()
) -> tuple[list[TaskLabels], list[str]]:
    """Boxes of each task's chosen annotation, by model class, and the classes the config's labels train.

    Labels become ``model_classes`` (the served model's; empty when none is served) through the
    bridge's own map (:mod:`core.labelmap`), so ``predicted_values`` and aliases train the class
    the bridge shows under that label. Only ``rectanglelabels`` results count; a completed
    annotation with none is a negative. Tasks with no completed, non-cancelled annotation are left out.
    """
    config = _task_config(label_config, model_classes)
    found: list[TaskLabels] = []
    for task in tasks:
        annotation = chosen_annotation(task)
        if annotation is None:
            continue
        boxes: list[Box] = []
        to_names: list[str] = []
        for result in annotation.get("result") or []:
            if not isinstance(result, Mapping) or result.get("type") != "rectanglelabels":
                continue
            label_map = config.maps.get(str(result.get("from_name")))
            if config.maps and label_map is None:
                continue
            if result.get("image_rotation"):
                logger.warning("task %s: a rotated image view is not supported; box skipped", task.get("id"))
                continue
            value = result.get("value") or {}
            xywhn = ls_rect_to_xywhn(value, result.get("original_width"), result.get("original_height"))
            if xywhn is None:
                logger.warning("task %s: unusable rectangle %s skipped", task.get("id"), value)
                continue
            to_names.append(str(result.get("to_name", "")))
            for label in value.get("rectanglelabels") or []:
                name = label_map.class_for(str(label)) if label_map is not None else str(label)
                boxes.append(Box(name, *xywhn))
        url = task_image_url(task, to_names, config.keys)
        if url is None:
            logger.warning("task %s has no image URL in its data; skipped", task.get("id"))
            continue
        found.append(TaskLabels(int(task["id"]), url, tuple(boxes), annotation.get("id")))
    return found, config.classes


# --- the dataset ---------------------------------------------------------------------------------


def _label_text(boxes: Sequence[Box], ids: Mapping[str, int]) -> str:
    return "".join(f"{ids[b.label]} {b.xc:.6f} {b.yc:.6f} {b.w:.6f} {b.h:.6f}\n" for b in boxes)


def _boxes_json(boxes: Sequence[Box]) -> list[list[Any]]:
    return [[b.label, round(b.xc, 6), round(b.yc, 6), round(b.w, 6), round(b.h, 6)] for b in boxes]


def _boxes_from_json(rows: Sequence[Sequence[Any]]) -> tuple[Box, ...]:
    return tuple(Box(str(r[0]), float(r[1]), float(r[2]), float(r[3]), float(r[4])) for r in rows)


def _summarise(entries: Sequence[tuple[str, str, tuple[Box, ...]]], classes: Sequence[str]) -> SplitSummary:
    boxes = dict.fromkeys(classes, 0)
    images_per_class = dict.fromkeys(classes, 0)
    negatives = 0
    for _, _, image_boxes in entries:
        if not image_boxes:
            negatives += 1
        for b in image_boxes:
            boxes[b.label] += 1
        for label in {b.label for b in image_boxes}:
            images_per_class[label] += 1
    return SplitSummary(len(entries), negatives, boxes, images_per_class)


class _Holdout:
    """The frozen held-out set on disk: images, YOLO labels (re-rendered per build) and the manifest."""

    def __init__(self, folder: Path, fraction: float) -> None:
        self.folder = folder
        self.manifest_path = folder / MANIFEST_FILE
        if self.manifest_path.is_file():
            try:
                self.manifest: dict[str, Any] = json.loads(self.manifest_path.read_text(encoding="utf-8"))
                self.fraction = float(self.manifest["rule"]["fraction"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DatasetError(f"{self.manifest_path} is unreadable ({exc}); it must not be rebuilt") from exc
            self.created = False
        else:
            self.fraction = fraction
            self.manifest = {
                "rule": {"kind": "sha256-bucket", "salt": HOLDOUT_DIR, "fraction": fraction},
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "images": {},
            }
            self.created = True

    @property
    def images(self) -> dict[str, dict[str, Any]]:
        entries: dict[str, dict[str, Any]] = self.manifest["images"]
        return entries

    def wants(self, content_hash: str) -> bool:
        return content_hash in self.images or bucket(content_hash, HOLDOUT_DIR) < self.fraction

    def add(self, content_hash: str, image: LabelledImage, suffix: str) -> None:
        (self.folder / "images").mkdir(parents=True, exist_ok=True)
        name = f"{content_hash[:16]}{suffix}"
        shutil.copyfile(image.path, self.folder / "images" / name)
        self.images[content_hash] = {
            "file": name,
            "boxes": _boxes_json(image.boxes),
            "origin": image.origin,
            "added": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def entries(self) -> list[tuple[str, str, tuple[Box, ...]]]:
        return [(h, e["file"], _boxes_from_json(e["boxes"])) for h, e in sorted(self.images.items())]

    def save(self, classes: Sequence[str]) -> None:
        """Write the manifest, then the YOLO label files in the current class order."""
        ids = {name: i for i, name in enumerate(classes)}
        labels = self.folder / "labels"
        labels.mkdir(parents=True, exist_ok=True)
        for _, file, boxes in self.entries():
            (labels / f"{Path(file).stem}.txt").write_text(_label_text(boxes, ids), encoding="utf-8")
        # ultralytics keys its label cache on file sizes: a class-id change of equal length would go unseen.
        (self.folder / "labels.cache").unlink(missing_ok=True)
        write_json_atomic(self.manifest_path, self.manifest)


def build_dataset(
    images: Sequence[LabelledImage],
    model_classes: Sequence[str],
    trainer_dir: Path,
    *,
    val_fraction: float = _DEFAULT_VAL_FRACTION,
    holdout_fraction: float = _DEFAULT_HOLDOUT_FRACTION,
) -> Dataset:
    """Write ``<trainer_dir>/dataset/`` (train/val) and extend ``<trainer_dir>/holdout/``; return the summary.

    ``model_classes`` fixes the class ids (the served model's list); names it lacks are appended.
    ``holdout_fraction`` only matters the first time: the held-out set's manifest freezes it.
    """
    holdout = _Holdout(trainer_dir / HOLDOUT_DIR, holdout_fraction)
    unique: dict[str, tuple[LabelledImage, str]] = {}
    for image in images:
        content_hash = sha256_file(image.path)
        if content_hash in unique and unique[content_hash][0].boxes != image.boxes:
            logger.warning(
                "%s and %s are the same image; keeping %s", unique[content_hash][0].origin, image.origin, image.origin
            )
        unique[content_hash] = (image, _image_suffix(image.path))

    changed_holdout = 0
    added: list[str] = []
    pool: list[str] = []
    for content_hash, (image, _) in sorted(unique.items()):
        if content_hash in holdout.images:
            if _boxes_json(image.boxes) != holdout.images[content_hash]["boxes"]:
                changed_holdout += 1
        elif holdout.wants(content_hash):
            added.append(content_hash)
        else:
            pool.append(content_hash)
    if changed_holdout:
        logger.warning(
            "%d held-out images were re-annotated; the held-out set keeps their first labels", changed_holdout
        )
    if holdout.created and not added and len(pool) >= 3:
        first = min(pool, key=lambda h: bucket(h, HOLDOUT_DIR))
        pool.remove(first)
        added.append(first)
        logger.info("no image fell in the held-out bucket; the closest one starts the held-out set")

    val = [h for h in pool if bucket(h, "val") < val_fraction]
    train = [h for h in pool if h not in set(val)]
    if not val and len(train) >= 2:
        val.append(min(train, key=lambda h: bucket(h, "val")))
        train.remove(val[-1])
    if not train or not val or not (holdout.images or added):
        raise DatasetError(
            f"too few annotated images to train and evaluate: {len(train)} train, {len(val)} val, "
            f"{len(holdout.images) + len(added)} held out (need at least one of each)"
        )

    used = {b.label for h in unique for b in unique[h][0].boxes}
    used |= {row[0] for entry in holdout.images.values() for row in entry["boxes"]}
    classes = merge_classes(model_classes, used)
    for content_hash in added:
        image, suffix = unique[content_hash]
        holdout.add(content_hash, image, suffix)
    holdout.save(classes)
    if added:
        logger.info("held-out set: %d images added, %d in all", len(added), len(holdout.images))

    root = trainer_dir / DATASET_DIR
    staging = trainer_dir / f".{DATASET_DIR}-{uuid.uuid4().hex}"
    ids = {name: i for i, name in enumerate(classes)}
    split_entries: dict[str, list[tuple[str, str, tuple[Box, ...]]]] = {"train": [], "val": []}
    try:
        for split, hashes in (("train", train), ("val", val)):
            (staging / "images" / split).mkdir(parents=True)
            (staging / "labels" / split).mkdir(parents=True)
            for content_hash in sorted(hashes):
                image, suffix = unique[content_hash]
                name = f"{content_hash[:16]}{suffix}"
                shutil.copyfile(image.path, staging / "images" / split / name)
                (staging / "labels" / split / f"{content_hash[:16]}.txt").write_text(
                    _label_text(image.boxes, ids), encoding="utf-8"
                )
                split_entries[split].append((content_hash, name, image.boxes))
        split_entries["test"] = holdout.entries()
        digest_source = {
            "classes": list(classes),
            "splits": {s: [[h, _label_text(b, ids)] for h, _, b in e] for s, e in sorted(split_entries.items())},
        }
        dataset_hash = hashlib.sha256(json.dumps(digest_source, sort_keys=True).encode()).hexdigest()
        data = {
            "path": str(root.resolve()),
            "train": "images/train",
            "val": "images/val",
            "test": str((holdout.folder / "images").resolve()),
            "nc": len(classes),
            "names": dict(enumerate(classes)),
        }
        (staging / "data.yaml").write_text(
            f"# labelloop trainer dataset {dataset_hash}\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True),
            encoding="utf-8",
        )
        summaries = {s: _summarise(split_entries[s], classes) for s in SPLITS}
        write_json_atomic(
            staging / "dataset.json",
            {"hash": dataset_hash, "classes": list(classes), "splits": {s: asdict(v) for s, v in summaries.items()}},
        )
        old = trainer_dir / f".{DATASET_DIR}-old-{uuid.uuid4().hex}"
        if root.exists():
            os.rename(root, old)
        os.rename(staging, root)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise DatasetError(f"could not write the dataset under {trainer_dir}: {exc}") from exc
    new = tuple(c for c in classes if c not in model_classes) if model_classes else ()
    logger.info(
        "dataset %s: %d train, %d val, %d held out", dataset_hash[:12], len(train), len(val), len(holdout.images)
    )
    return Dataset(
        root=root,
        data_yaml=root / "data.yaml",
        hash=dataset_hash,
        classes=classes,
        new_classes=new,
        splits=summaries,
        holdout_added=len(added),
    )


def summary_table(dataset: Dataset) -> str:
    """Images and boxes per class per split, as a fixed-width text table."""
    header = f"{'class':<16}" + "".join(f"{s + ' img':>11}{s + ' box':>11}" for s in SPLITS)
    lines = [header, "-" * len(header)]
    for name in dataset.classes:
        cells = "".join(
            f"{dataset.splits[s].images_per_class.get(name, 0):>11}{dataset.splits[s].boxes.get(name, 0):>11}"
            for s in SPLITS
        )
        lines.append(f"{name:<16}{cells}")
    lines.append(f"{'(negatives)':<16}" + "".join(f"{dataset.splits[s].negatives:>11}{'':>11}" for s in SPLITS))
    total = "".join(f"{dataset.splits[s].images:>11}{sum(dataset.splits[s].boxes.values()):>11}" for s in SPLITS)
    lines.append(f"{'all':<16}{total}")
    return "\n".join(lines)
