"""A segmenter's annotations as labelled grid cells: points under their cells, full masks as every cell they decide."""

from __future__ import annotations

from typing import Any

import numpy as np

from core.brush_rle import encode_mask
from trainer.choices_data import ClassifiedImage
from trainer.points_data import image_labels

WIDTH, HEIGHT = 80, 40  # a 4 x 8 grid of 10 px cells


def _point(x: float, y: float, label: str) -> dict[str, Any]:
    value = {"x": 100 * x / WIDTH, "y": 100 * y / HEIGHT, "width": 0.5, "keypointlabels": [label]}
    return {"type": "keypointlabels", "from_name": "points", "value": value}


def _image(*results: dict[str, Any]) -> ClassifiedImage:
    return ClassifiedImage("h", b"", "points", 1, tuple(results))


def test_points_land_in_their_cells_as_class_or_background() -> None:
    labels = image_labels(
        _image(_point(15, 5, "crack"), _point(75, 35, "background"), _point(5, 5, "Pit"), _point(1, 1, "other")),
        ("crack", "pit"),
        {"Pit": "pit"},
        (4, 8),
    )
    assert labels.truth is None and labels.cells == labels.points
    assert list(zip(labels.points.rows, labels.points.cols, labels.points.classes, strict=True)) == [
        (0, 1, 0),
        (3, 7, -1),
        (0, 0, 1),
    ]


def test_a_full_mask_labels_every_cell_it_decides_and_is_the_truth() -> None:
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[0:20, 0:20] = True  # four whole cells
    mask[20:24, 20:30] = True  # 40 % of one cell: undecided
    brush = {
        "type": "brushlabels",
        "from_name": "mask",
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "value": {"format": "rle", "rle": encode_mask(mask), "brushlabels": ["crack"]},
    }
    labels = image_labels(_image(brush, _point(75, 35, "background")), ("crack",), {}, (4, 8))
    assert labels.truth is not None and (labels.truth == mask.astype(np.int32)).all()
    found = zip(labels.cells.rows, labels.cells.cols, labels.cells.classes, strict=True)
    cells = {(int(r), int(c)): int(k) for r, c, k in found}
    assert {rc for rc, k in cells.items() if k == 0} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert (2, 2) not in cells and cells[(3, 7)] == -1
    assert len(cells) == 4 * 8 - 1
    assert len(labels.points) == 1
