"""trainer.synthetic_blobs: consistent files, determinism, and points that land where the mask says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.synthetic_blobs import sample_points, write_segmenter_dataset


def test_dataset_files_are_consistent_and_deterministic(tmp_path: Path) -> None:
    out = write_segmenter_dataset(tmp_path / "a", n=4, seed=3, classes=("dent", "rust"), size=(96, 64))
    meta = json.loads((out / "labels.json").read_text())
    assert meta["classes"] == ["dent", "rust"]
    assert sorted(meta["images"]) == sorted(p.name for p in (out / "images").iterdir())
    seen = set()
    for name, entry in meta["images"].items():
        image = Image.open(out / "images" / name)
        mask = np.asarray(Image.open(out / entry["mask"]))
        assert image.mode == "RGB" and image.size == (96, 64)
        assert mask.dtype == np.uint8 and mask.shape == (64, 96)
        assert mask.max() <= 2 and (mask > 0).any() and (mask == 0).any()
        seen |= set(np.unique(mask).tolist())
    assert seen == {0, 1, 2}
    again = write_segmenter_dataset(tmp_path / "b", n=4, seed=3, classes=("dent", "rust"), size=(96, 64))
    for name in meta["images"]:
        assert (out / "images" / name).read_bytes() == (again / "images" / name).read_bytes()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(ValueError):
        write_segmenter_dataset(tmp_path / "other", n=1)
    write_segmenter_dataset(out, n=2, seed=1, size=(96, 64))  # our own folder: rewritten in place
    assert len(list((out / "images").iterdir())) == 2 and len(list((out / "masks").iterdir())) == 2


def test_sample_points_land_in_the_right_regions() -> None:
    labels = np.zeros((40, 60), np.uint8)
    labels[5:15, 5:20] = 1
    labels[25:35, 30:50] = 2
    rng = np.random.default_rng(0)
    points = sample_points(labels, 9, 7, rng)
    assert len(points) == 16
    classes = [k for _, _, k in points]
    assert classes.count(-1) == 7 and sorted({classes.count(0), classes.count(1)}) == [4, 5]
    for x, y, k in points:
        assert labels[int(y), int(x)] == k + 1
    only_bg = sample_points(np.zeros((8, 8), np.uint8), 5, 3, rng)
    assert [k for _, _, k in only_bg] == [-1, -1, -1]
