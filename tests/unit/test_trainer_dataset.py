"""Dataset rebuild: class remapping by name, zip-slip refusal, negatives, splits and the frozen held-out set."""

from __future__ import annotations

import hashlib
import json
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from core.errors import ConfigError, DatasetError
from trainer.dataset import (
    HOLDOUT_DIR,
    Box,
    LabelledImage,
    build_dataset,
    extract_zip,
    labels_from_tasks,
    ls_rect_to_xywhn,
    read_yolo_export,
    summary_table,
)
from trainer.synthetic import CLASSES

ALPHABETICAL = ("concave", "dentado", "perforation")


def _png(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> Path:
    """A small, distinct, deterministic image."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(path, "PNG")
    return path


def _images(folder: Path, n: int, start: int = 0) -> list[LabelledImage]:
    """``n`` images, every third a negative, the rest with one box of a class by turn."""
    out = []
    for i in range(start, start + n):
        boxes = () if i % 3 == 0 else (Box(CLASSES[i % 3], 0.5, 0.5, 0.2, 0.3),)
        out.append(LabelledImage(_png(folder / f"img{i:03d}.png", i), boxes, origin=f"img{i:03d}"))
    return out


def _split_hashes(trainer_dir: Path) -> dict[str, set[str]]:
    root = trainer_dir / "dataset"
    found = {s: {p.stem for p in (root / "images" / s).iterdir()} for s in ("train", "val")}
    found["test"] = {p.stem for p in (trainer_dir / HOLDOUT_DIR / "images").iterdir()}
    return found


def _short_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _labels(folder: Path) -> dict[str, str]:
    return {p.stem: p.read_text() for p in folder.glob("*.txt")}


# --- Label Studio YOLO exports -----------------------------------------------------------------


def _ls_export(root: Path, images_dir: Path) -> None:
    """What Label Studio 1.23 writes: alphabetical classes.txt, notes.json, labels named after the upload."""
    (root / "labels").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "classes.txt").write_text("\n".join(ALPHABETICAL) + "\n")
    notes = {"categories": [{"id": i, "name": n} for i, n in enumerate(ALPHABETICAL)], "info": {}}
    (root / "notes.json").write_text(json.dumps(notes))
    # id 1 is "dentado" in the export, but 0 in the model
    (root / "labels" / "3f2a1b4c-part0.txt").write_text("1 0.500000 0.500000 0.200000 0.300000\n")
    (root / "labels" / "0badcafe-part1.txt").write_text("0 0.250000 0.250000 0.100000 0.100000\n")
    (root / "labels" / "12345678-part2.txt").write_text("2 0.700000 0.700000 0.100000 0.100000\n")
    (root / "labels" / "abcdef01-part3.txt").write_text("")  # annotated, no boxes: a negative
    for i in range(4):
        _png(images_dir / f"part{i}.png", 100 + i)
    _png(images_dir / "never-annotated.png", 999)


def test_ls_export_in_alphabetical_order_maps_by_name(tmp_path: Path) -> None:
    _ls_export(tmp_path / "export", tmp_path / "imgs")
    export = read_yolo_export(tmp_path / "export", tmp_path / "imgs", tmp_path / "work")
    assert export.classes == ALPHABETICAL
    by_image = {img.path.name: img.boxes for img in export.images}
    assert set(by_image) == {"part0.png", "part1.png", "part2.png", "part3.png"}
    assert [b.label for b in by_image["part0.png"]] == ["dentado"]
    assert [b.label for b in by_image["part1.png"]] == ["concave"]
    assert by_image["part3.png"] == ()


def test_zipped_export_lands_in_the_models_class_ids(tmp_path: Path) -> None:
    _ls_export(tmp_path / "export", tmp_path / "imgs")
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "export").rglob("*")):
            zf.write(path, path.relative_to(tmp_path / "export").as_posix())
    export = read_yolo_export(archive, tmp_path / "imgs", tmp_path / "work")
    for i in range(8):  # enough images that train, val and held-out all get some
        _png(tmp_path / "more" / f"m{i}.png", 200 + i)
    extra = [LabelledImage(tmp_path / "more" / f"m{i}.png", (), f"m{i}") for i in range(8)]
    dataset = build_dataset([*export.images, *extra], CLASSES, tmp_path / "trainer")

    assert dataset.classes == CLASSES
    data = yaml.safe_load(dataset.data_yaml.read_text())
    assert data["names"] == dict(enumerate(CLASSES))
    labels = _labels(dataset.root / "labels" / "train") | _labels(dataset.root / "labels" / "val")
    labels |= _labels(tmp_path / "trainer" / HOLDOUT_DIR / "labels")
    lines = sorted(line.split()[0] for text in labels.values() for line in text.splitlines())
    # dentado -> 0, concave -> 1, perforation -> 2: one each
    assert lines == ["0", "1", "2"]
    by_class = {}
    for text in labels.values():
        for line in text.splitlines():
            cls, xc, *_ = line.split()
            by_class[CLASSES[int(cls)]] = float(xc)
    assert by_class == {"dentado": 0.5, "concave": 0.25, "perforation": 0.7}


def test_new_class_names_are_appended(tmp_path: Path) -> None:
    imgs = _images(tmp_path / "imgs", 12)
    imgs.append(LabelledImage(_png(tmp_path / "imgs" / "scratch.png", 77), (Box("arañazo", 0.5, 0.5, 0.1, 0.1),), "s"))
    dataset = build_dataset(imgs, CLASSES, tmp_path / "trainer")
    assert dataset.classes == (*CLASSES, "arañazo")
    assert dataset.new_classes == ("arañazo",)


def test_notes_json_ids_win_over_classes_txt_order(tmp_path: Path) -> None:
    root = tmp_path / "export"
    (root / "labels").mkdir(parents=True)
    (root / "classes.txt").write_text("perforation\nconcave\n")
    notes = {"categories": [{"id": 1, "name": "perforation"}, {"id": 0, "name": "concave"}]}
    (root / "notes.json").write_text(json.dumps(notes))
    (root / "labels" / "a.txt").write_text("1 0.5 0.5 0.1 0.1\n")
    _png(tmp_path / "imgs" / "a.jpg.png", 1)
    _png(tmp_path / "imgs" / "a.png", 2)
    export = read_yolo_export(root, tmp_path / "imgs", tmp_path / "work")
    assert export.classes == ("concave", "perforation")
    assert export.images[0].boxes[0].label == "perforation"


def test_ultralytics_folder_with_data_yaml_is_an_export(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "data.yaml").write_text(yaml.safe_dump({"names": {0: "dentado", 1: "concave"}}))
    _png(root / "images" / "train" / "0001.png", 1)
    _png(root / "images" / "val" / "0001.png", 2)  # same stem, other split: matched by mirrored path
    (root / "labels" / "train" / "0001.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (root / "labels" / "val" / "0001.txt").write_text("1 0.5 0.5 0.1 0.1\n")
    export = read_yolo_export(root, None, tmp_path / "work")
    assert sorted((img.path.parent.name, img.boxes[0].label) for img in export.images) == [
        ("train", "dentado"),
        ("val", "concave"),
    ]


def test_bad_label_lines_and_unknown_ids_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "export"
    (root / "labels").mkdir(parents=True)
    (root / "classes.txt").write_text("a\nb\n")
    _png(tmp_path / "imgs" / "x.png", 1)
    (root / "labels" / "x.txt").write_text("2 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match="class id 2"):
        read_yolo_export(root, tmp_path / "imgs", tmp_path / "work")
    (root / "labels" / "x.txt").write_text("0 0.5 0.5\n")
    with pytest.raises(DatasetError, match="x.txt:1"):
        read_yolo_export(root, tmp_path / "imgs", tmp_path / "work")


def test_export_without_matching_images_is_refused(tmp_path: Path) -> None:
    _ls_export(tmp_path / "export", tmp_path / "imgs")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no label file"):
        read_yolo_export(tmp_path / "export", tmp_path / "empty", tmp_path / "work")
    with pytest.raises(DatasetError, match="not a folder"):
        read_yolo_export(tmp_path / "export", tmp_path / "missing", tmp_path / "work")


# --- zip slip ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "member", ["../evil.txt", "labels/../../evil.txt", "/tmp/evil.txt", "C:/evil.txt", "..\\evil.txt"]
)
def test_zip_members_escaping_the_folder_are_refused(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("classes.txt", "a\n")
        zf.writestr(member, "pwned")
    dest = tmp_path / "deep" / "out"
    with pytest.raises(DatasetError, match="refusing"):
        extract_zip(archive, dest)
    assert not (tmp_path / "deep" / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()
    assert not any(dest.rglob("*"))  # nothing at all is extracted from a refused archive


def test_zip_symlink_members_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        link = zipfile.ZipInfo("labels/x.txt")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(DatasetError, match="symbolic link"):
        extract_zip(archive, tmp_path / "out")


def test_folder_export_with_a_label_linking_outside_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "export"
    (root / "labels").mkdir(parents=True)
    (root / "classes.txt").write_text("a\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("0 0.5 0.5 0.1 0.1\n")
    (root / "labels" / "x.txt").symlink_to(secret)
    _png(tmp_path / "imgs" / "x.png", 1)
    with pytest.raises(DatasetError, match="outside"):
        read_yolo_export(root, tmp_path / "imgs", tmp_path / "work")


def test_not_a_zip_is_a_dataset_error(tmp_path: Path) -> None:
    bogus = tmp_path / "export.zip"
    bogus.write_text("nope")
    with pytest.raises(DatasetError, match="not a readable zip"):
        read_yolo_export(bogus, None, tmp_path / "work")


# --- build: negatives, determinism, held-out set -----------------------------------------------


def test_negatives_are_kept_with_empty_label_files(tmp_path: Path) -> None:
    imgs = _images(tmp_path / "imgs", 30)
    dataset = build_dataset(imgs, CLASSES, tmp_path / "trainer")
    negatives = sum(s.negatives for s in dataset.splits.values())
    assert negatives == 10
    assert sum(s.images for s in dataset.splits.values()) == 30
    empty = [p for s in ("train", "val") for p in (dataset.root / "labels" / s).glob("*.txt") if not p.read_text()]
    empty += [p for p in (tmp_path / "trainer" / HOLDOUT_DIR / "labels").glob("*.txt") if not p.read_text()]
    assert len(empty) == 10
    table = summary_table(dataset)
    assert "(negatives)" in table and "dentado" in table


def test_split_is_deterministic_by_content_not_name_or_order(tmp_path: Path) -> None:
    imgs = _images(tmp_path / "imgs", 40)
    first = build_dataset(imgs, CLASSES, tmp_path / "a")
    renamed = []
    for img in reversed(imgs):
        copy = tmp_path / "renamed" / f"other-{img.path.name}"
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes(img.path.read_bytes())
        renamed.append(LabelledImage(copy, img.boxes, origin=copy.name))
    second = build_dataset(renamed, CLASSES, tmp_path / "b")
    assert first.hash == second.hash
    assert _split_hashes(tmp_path / "a") == _split_hashes(tmp_path / "b")
    splits = _split_hashes(tmp_path / "a")
    assert all(splits.values())
    assert not (splits["train"] & splits["val"]) and not (splits["train"] | splits["val"]) & splits["test"]
    # rebuilding in place changes nothing
    again = build_dataset(imgs, CLASSES, tmp_path / "a")
    assert again.hash == first.hash and again.holdout_added == 0


def test_holdout_is_frozen_and_only_extended(tmp_path: Path) -> None:
    trainer = tmp_path / "trainer"
    batch1 = _images(tmp_path / "imgs", 40)
    first = build_dataset(batch1, CLASSES, trainer, holdout_fraction=0.2)
    held1 = _split_hashes(trainer)["test"]
    manifest = json.loads((trainer / HOLDOUT_DIR / "manifest.json").read_text())
    assert manifest["rule"]["fraction"] == 0.2
    assert first.holdout_added == len(held1) > 0

    # re-annotate a held-out image, drop it from the source, add 40 new images; ask for another fraction
    held_name = next(p for p in (trainer / HOLDOUT_DIR / "images").iterdir())
    held_source = next(i for i in batch1 if held_name.read_bytes() == i.path.read_bytes())
    relabelled = [
        LabelledImage(i.path, (Box("perforation", 0.1, 0.1, 0.05, 0.05),), i.origin) if i == held_source else i
        for i in batch1
    ]
    batch2 = _images(tmp_path / "imgs", 40, start=40)
    second = build_dataset([*relabelled[1:], *batch2], CLASSES, trainer, holdout_fraction=0.9)

    splits = _split_hashes(trainer)
    assert held1 <= splits["test"], "nothing ever leaves the held-out set"
    new_members = splits["test"] - held1
    assert new_members <= {_short_hash(i.path) for i in batch2}, "only new images join"
    assert len(new_members) == second.holdout_added
    assert second.holdout_added < 20, "the frozen fraction (0.2) applies, not the new argument (0.9)"
    assert not (splits["train"] | splits["val"]) & splits["test"], "held-out images are never trained on"
    # the re-annotated held-out image keeps the labels it joined with
    label = (trainer / HOLDOUT_DIR / "labels" / f"{held_name.stem}.txt").read_text()
    assert label == "".join(
        f"{CLASSES.index(b.label)} {b.xc:.6f} {b.yc:.6f} {b.w:.6f} {b.h:.6f}\n" for b in held_source.boxes
    )
    assert second.splits["test"].images == len(held1) + second.holdout_added


def test_holdout_rule_is_a_hash_bucket(tmp_path: Path) -> None:
    from trainer.dataset import bucket

    values = [bucket(f"{i:064x}", "holdout") for i in range(2000)]
    assert all(0 <= v < 1 for v in values)
    share = sum(v < 0.2 for v in values) / len(values)
    assert 0.17 < share < 0.23
    assert bucket("ab", "holdout") == bucket("ab", "holdout") != bucket("ab", "val")


def test_first_build_always_holds_something_out(tmp_path: Path) -> None:
    dataset = build_dataset(_images(tmp_path / "imgs", 4), CLASSES, tmp_path / "trainer", holdout_fraction=0.0)
    assert dataset.splits["test"].images == 1
    assert dataset.splits["train"].images >= 1 and dataset.splits["val"].images >= 1


def test_too_few_images_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="too few"):
        build_dataset(_images(tmp_path / "imgs", 1), CLASSES, tmp_path / "trainer")


def test_unreadable_image_is_a_dataset_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="not a readable image"):
        build_dataset([LabelledImage(bad, (), "bad"), *_images(tmp_path / "imgs", 5)], CLASSES, tmp_path / "t")


def test_data_yaml_points_test_at_the_holdout(tmp_path: Path) -> None:
    dataset = build_dataset(_images(tmp_path / "imgs", 20), CLASSES, tmp_path / "trainer")
    data = yaml.safe_load(dataset.data_yaml.read_text())
    assert Path(data["test"]) == (tmp_path / "trainer" / HOLDOUT_DIR / "images").resolve()
    assert Path(data["path"]) == dataset.root.resolve()
    assert (data["train"], data["val"], data["nc"]) == ("images/train", "images/val", 3)
    assert json.loads((dataset.root / "dataset.json").read_text())["hash"] == dataset.hash


# --- Label Studio task JSON --------------------------------------------------------------------

CONFIG = """<View>
  <Image name="image" value="$img"/>
  <RectangleLabels name="label" toName="image">
    <Label value="perforation"/><Label value="dentado"/><Label value="concave"/>
  </RectangleLabels>
</View>"""


def _rect(label: str, x: float, y: float, w: float, h: float, **extra: object) -> dict[str, object]:
    return {
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": 200,
        "original_height": 100,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label], **extra},
    }


def test_tasks_use_only_completed_non_cancelled_annotations() -> None:
    tasks = [
        {
            "id": 1,
            "data": {"img": "/data/upload/1/a.png"},
            "annotations": [
                {
                    "id": 10,
                    "was_cancelled": False,
                    "updated_at": "2024-01-01",
                    "result": [_rect("dentado", 10, 20, 30, 40)],
                },
                {
                    "id": 11,
                    "was_cancelled": False,
                    "updated_at": "2024-02-01",
                    "result": [_rect("concave", 0, 0, 10, 10)],
                },
            ],
        },
        {
            "id": 2,
            "data": {"img": "/data/upload/1/b.png"},
            "annotations": [
                {"id": 20, "was_cancelled": True, "result": [_rect("dentado", 10, 20, 30, 40)]},
            ],
        },
        {"id": 3, "data": {"img": "/data/upload/1/c.png"}, "annotations": [{"id": 30, "result": []}]},
        {"id": 4, "data": {"img": "/data/upload/1/d.png"}, "annotations": []},
        {
            "id": 5,
            "data": {"img": "http://x/e.png"},
            "annotations": [
                {
                    "id": 50,
                    "ground_truth": True,
                    "updated_at": "2020-01-01",
                    "result": [_rect("perforation", 0, 0, 50, 50)],
                },
                {"id": 51, "updated_at": "2024-01-01", "result": []},
            ],
        },
    ]
    found, order = labels_from_tasks(tasks, CONFIG)
    assert order == ["perforation", "dentado", "concave"]
    by_task = {t.task_id: t for t in found}
    assert set(by_task) == {1, 3, 5}, "cancelled-only and unannotated tasks are left out"
    assert by_task[1].annotation_id == 11 and [b.label for b in by_task[1].boxes] == ["concave"]
    assert by_task[3].boxes == () and by_task[3].image_url == "/data/upload/1/c.png"
    assert by_task[5].annotation_id == 50, "ground truth wins over a newer annotation"


def test_percent_rectangles_become_yolo_xywhn() -> None:
    assert ls_rect_to_xywhn({"x": 10, "y": 20, "width": 30, "height": 40}) == pytest.approx((0.25, 0.4, 0.3, 0.4))
    assert ls_rect_to_xywhn({"x": 90, "y": 90, "width": 30, "height": 30}) == pytest.approx((0.95, 0.95, 0.1, 0.1))
    assert ls_rect_to_xywhn({"x": 150, "y": 0, "width": 10, "height": 10}) is None
    assert ls_rect_to_xywhn({"x": "?"}) is None
    # 90 degrees clockwise about the top-left corner, in a 200x100 image: 20x20 px becomes the square left of it
    rotated = ls_rect_to_xywhn({"x": 50, "y": 40, "width": 10, "height": 20, "rotation": 90}, 200, 100)
    assert rotated == pytest.approx((0.45, 0.5, 0.1, 0.2))


def test_other_result_types_and_controls_are_ignored() -> None:
    tasks = [
        {
            "id": 1,
            "data": {"img": "u"},
            "annotations": [
                {
                    "id": 1,
                    "result": [
                        {"type": "choices", "from_name": "c", "to_name": "image", "value": {"choices": ["ok"]}},
                        {**_rect("dentado", 0, 0, 10, 10), "from_name": "other"},
                        _rect("dentado", 0, 0, 10, 10),
                    ],
                }
            ],
        }
    ]
    found, _ = labels_from_tasks(tasks, CONFIG)
    assert len(found[0].boxes) == 1


def test_bad_label_config_is_a_config_error() -> None:
    """The bridge's parser (core.labelmap), with its error: one parser for both sides."""
    with pytest.raises(ConfigError, match="label config cannot be parsed"):
        labels_from_tasks([], "<View><Image")
