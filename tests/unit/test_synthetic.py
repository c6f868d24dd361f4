"""The synthetic dataset is what tests and the default model train on, so its labels must be right."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from trainer.synthetic import CLASSES, Box, render_sample, write_dataset

ORIENTATION = 0x0112
LABEL_LINE = re.compile(r"^([0-9]+) (\d\.\d{6}) (\d\.\d{6}) (\d\.\d{6}) (\d\.\d{6})$")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("synth") / "ds", n=60, seed=0).parent


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for sub in ("images", "labels")
        for p in sorted((root / sub).rglob("*"))
        if p.is_file()
    }


def _images(root: Path) -> list[Path]:
    return sorted((root / "images").rglob("*.*"))


def _label_for(image: Path) -> Path:
    return image.parents[2] / "labels" / image.parent.name / f"{image.stem}.txt"


def _labels(image: Path) -> list[tuple[int, float, float, float, float]]:
    rows = []
    for line in _label_for(image).read_text(encoding="utf-8").splitlines():
        m = LABEL_LINE.match(line)
        assert m, f"{_label_for(image)}: bad label line {line!r}"
        rows.append((int(m[1]), float(m[2]), float(m[3]), float(m[4]), float(m[5])))
    return rows


def _iou(a: Box, b: Box) -> float:
    iw = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    ih = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = iw * ih
    return inter / ((a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter)


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = write_dataset(tmp_path / "a", n=12, seed=3).parent
    b = write_dataset(tmp_path / "b", n=12, seed=3).parent
    files_a = _files(a)
    assert len(files_a) == 24
    assert files_a == _files(b)
    # Rewriting in place (an existing dataset of ours) reproduces every byte, data.yaml included.
    yaml_before = (a / "data.yaml").read_bytes()
    write_dataset(a, n=12, seed=3)
    assert _files(a) == files_a
    assert (a / "data.yaml").read_bytes() == yaml_before


def test_different_seed_gives_different_images(tmp_path: Path) -> None:
    a = _files(write_dataset(tmp_path / "a", n=4, seed=1).parent)
    b = _files(write_dataset(tmp_path / "b", n=4, seed=2).parent)
    assert a != b


def test_every_image_has_a_well_formed_label_file(dataset: Path) -> None:
    images = _images(dataset)
    assert len(images) == 60
    assert len(list((dataset / "labels").rglob("*.txt"))) == 60
    for image in images:
        assert image.parent.name in {"train", "val"}
        assert re.fullmatch(r"\d{5}\.(jpg|png)", image.name)
        with Image.open(image) as im:
            width, height = ImageOps.exif_transpose(im).size
        for cls, xc, yc, w, h in _labels(image):
            assert 0 <= cls < len(CLASSES)
            assert 0.0 <= xc - w / 2 and xc + w / 2 <= 1.0
            assert 0.0 <= yc - h / 2 and yc + h / 2 <= 1.0
            assert w * width >= 3 and h * height >= 3, f"{image}: degenerate box"


def test_split_sizes(dataset: Path) -> None:
    assert len(list((dataset / "images" / "val").iterdir())) == 12
    assert len(list((dataset / "images" / "train").iterdir())) == 48


def test_all_classes_and_negatives_appear(dataset: Path) -> None:
    per_image = [_labels(image) for image in _images(dataset)]
    classes = {row[0] for rows in per_image for row in rows}
    assert classes == {0, 1, 2}
    negatives = sum(1 for rows in per_image if not rows)
    assert 1 <= negatives <= 15
    assert max(len(rows) for rows in per_image) <= 4


def test_exif_rotated_jpegs_display_as_labelled(dataset: Path) -> None:
    seen: set[int] = set()
    for image in _images(dataset):
        with Image.open(image) as im:
            orientation = im.getexif().get(ORIENTATION)
            if orientation is None:
                continue
            assert im.format == "JPEG"
            stored = im.size
            shown = ImageOps.exif_transpose(im).size
        seen.add(orientation)
        if orientation in (6, 8):
            assert shown == (stored[1], stored[0])
        else:
            assert shown == stored
    assert seen and seen <= {3, 6, 8}
    assert seen & {6, 8}, "no quarter-turn orientations, so transposition is untested"


def test_perforation_boxes_sit_on_holes_in_display_orientation(dataset: Path) -> None:
    rotated_checked = 0
    for image in _images(dataset):
        with Image.open(image) as im:
            rotated = im.getexif().get(ORIENTATION) in (6, 8)
            grey = np.asarray(ImageOps.exif_transpose(im).convert("L"), dtype=np.float32)
        height, width = grey.shape
        median = float(np.median(grey))
        for cls, xc, yc, w, h in _labels(image):
            if cls != CLASSES.index("perforation"):
                continue
            x0, x1 = int((xc - w / 6) * width), int(np.ceil((xc + w / 6) * width))
            y0, y1 = int((yc - h / 6) * height), int(np.ceil((yc + h / 6) * height))
            centre = float(grey[y0:y1, x0:x1].mean())
            assert centre < 0.5 * median, f"{image}: perforation box centre is not dark"
            rotated_checked += rotated
    assert rotated_checked >= 1, "no perforation on a quarter-turned JPEG to check"


def test_grayscale_and_rgba_pngs(dataset: Path) -> None:
    modes: dict[str, int] = {}
    for image in _images(dataset):
        if image.suffix != ".png":
            continue
        with Image.open(image) as im:
            modes[im.mode] = modes.get(im.mode, 0) + 1
            if im.mode == "RGBA":
                assert np.asarray(im)[:, :, 3].min() == 255
    assert set(modes) == {"L", "RGBA"}
    assert modes["L"] == 9 and modes["RGBA"] == 3


def test_data_yaml(dataset: Path) -> None:
    lines = (dataset / "data.yaml").read_text(encoding="utf-8").splitlines()
    body = [line for line in lines if not line.startswith("#")]
    assert body[0].startswith("path: ")
    assert Path(json.loads(body[0][len("path: ") :])) == dataset.resolve()
    assert body[1:] == [
        "train: images/train",
        "val: images/val",
        "nc: 3",
        "names:",
        "  0: dentado",
        "  1: concave",
        "  2: perforation",
    ]


def test_refuses_foreign_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(ValueError, match="refusing"):
        write_dataset(tmp_path, n=4)
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "keep me"
    assert not (tmp_path / "images").exists()


def test_refuses_foreign_data_yaml(tmp_path: Path) -> None:
    (tmp_path / "data.yaml").write_text("path: /somewhere\nnc: 1\n", encoding="utf-8")
    with pytest.raises(ValueError):
        write_dataset(tmp_path, n=4)


@pytest.mark.parametrize("n", [0, 1])
def test_refuses_too_few_images(tmp_path: Path, n: int) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        write_dataset(tmp_path / "ds", n=n)


def test_overwriting_own_dataset_drops_stale_files(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    write_dataset(out, n=10)
    write_dataset(out, n=3)
    assert len(_images(out)) == 3
    assert len(list((out / "labels").rglob("*.txt"))) == 3


def test_render_sample_respects_size_and_keeps_boxes_apart() -> None:
    sample = render_sample(np.random.default_rng(7), width=300, height=200)
    assert sample.image.size == (300, 200)
    assert sample.image.mode == "RGB"
    for i in range(40):
        sample = render_sample(np.random.default_rng([11, i]))
        width, height = sample.image.size
        assert 200 <= min(width, height) and max(width, height) <= 660
        short = min(width, height)
        for box in sample.boxes:
            assert 0 <= box.x1 < box.x2 <= width and 0 <= box.y1 < box.y2 <= height
            assert 0.03 <= max(box.x2 - box.x1, box.y2 - box.y1) / short <= 0.27
        for j, a in enumerate(sample.boxes):
            for b in sample.boxes[j + 1 :]:
                assert _iou(a, b) < 0.3


def test_render_sample_varies_aspect_ratio() -> None:
    aspects = [render_sample(np.random.default_rng([13, i])).image.size for i in range(30)]
    ratios = [w / h for w, h in aspects]
    assert min(ratios) < 0.8 and max(ratios) > 1.4
    assert len(set(aspects)) > 20


def test_tear_boxes_contain_dark_pixels() -> None:
    checked = 0
    for i in range(30):
        sample = render_sample(np.random.default_rng([17, i]))
        grey = np.asarray(sample.image.convert("L"), dtype=np.float32)
        median = float(np.median(grey))
        for box in sample.boxes:
            if box.cls != CLASSES.index("dentado"):
                continue
            inside = grey[int(box.y1) : int(box.y2), int(box.x1) : int(box.x2)]
            assert np.percentile(inside, 5) < 0.6 * median
            checked += 1
    assert checked >= 5
