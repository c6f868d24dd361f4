"""core.masks: point to cell, bilinear upsampling (torch's convention), click refinement, mIoU, point accuracy."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from core.masks import balanced_point_accuracy, miou, point_cell, refine_with_clicks, upsample


@pytest.mark.parametrize(
    ("k", "h", "w", "width", "height"),
    [(1, 21, 28, 448, 336), (3, 5, 7, 13, 9), (2, 4, 4, 3, 2), (1, 1, 1, 5, 4), (1, 6, 3, 641, 1283)],
)
def test_upsample_equals_torch_bilinear(k: int, h: int, w: int, width: int, height: int) -> None:
    probs = np.random.default_rng(k * h * w).random((k, h, w)).astype(np.float32)
    got = upsample(probs, width, height)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(probs)[None], size=(height, width), mode="bilinear", align_corners=False
    )[0].numpy()
    assert got.dtype == np.float32 and got.shape == (k, height, width)
    assert np.abs(got - want).max() < 1e-5


def test_upsample_is_fast_on_a_large_image() -> None:
    probs = np.random.default_rng(0).random((1, 21, 28)).astype(np.float32)
    start = time.perf_counter()
    upsample(probs, 4000, 3000)
    assert time.perf_counter() - start < 1.0


def test_point_cell_maps_and_clamps() -> None:
    assert point_cell(0, 0, 448, 336, 21, 28) == (0, 0)
    assert point_cell(447.9, 335.9, 448, 336, 21, 28) == (20, 27)
    assert point_cell(16.0, 15.99, 448, 336, 21, 28) == (0, 1)
    assert point_cell(-5, 1000, 448, 336, 21, 28) == (20, 0)
    assert point_cell(4000, -1, 448, 336, 21, 28) == (0, 27)
    # A 1000 x 300 image on a 6 x 20 grid: cells are 50 x 50 original pixels.
    assert point_cell(125, 260, 1000, 300, 6, 20) == (5, 2)
    with pytest.raises(ValueError):
        point_cell(0, 0, 0, 10, 2, 2)


def test_miou_sums_over_images_and_skips_absent_classes() -> None:
    truth = [np.array([[0, 1], [1, 2]]), np.array([[1, 1], [0, 0]])]
    pred = [
        np.array([[[0, 1], [0, 0]], [[0, 0], [0, 1]], [[0, 0], [0, 0]]], dtype=bool),
        np.array([[[1, 1], [1, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=bool),
    ]
    m = miou(pred, truth, num_classes=3)
    # class 0: inter 1 + 2, union 2 + 3 -> 0.6; class 1: 1 / 1; class 2: absent everywhere.
    assert m["per_class_iou"] == pytest.approx({0: 0.6, 1: 1.0})
    assert m["miou"] == pytest.approx(0.8)
    assert m["intersection"] == [3, 1, 0] and m["union"] == [5, 1, 0]
    none = miou([np.zeros((1, 2, 2), bool)], [np.zeros((2, 2), int)], 1)
    assert none["miou"] is None and none["per_class_iou"] == {}
    with pytest.raises(ValueError):
        miou(pred[:1], truth, 3)


def test_balanced_point_accuracy() -> None:
    probs = np.array([0.9, 0.6, 0.2, 0.1, 0.4, 0.7])
    positive = np.array([True, True, True, False, False, False])
    assert balanced_point_accuracy(probs, positive) == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert balanced_point_accuracy(probs, positive, threshold=0.65) == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert balanced_point_accuracy(np.array([0.9, 0.1]), np.array([True, True])) == 0.5
    assert balanced_point_accuracy(np.array([0.9, 0.1]), np.array([False, False])) == 0.5
    with pytest.raises(ValueError):
        balanced_point_accuracy(np.array([]), np.array([], bool))


def _two_region_tokens(h: int = 12, w: int = 16, c: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Tokens with one direction inside a square and another outside, plus noise; the square's label map."""
    rng = np.random.default_rng(0)
    inside = np.zeros((h, w), bool)
    inside[3:8, 4:10] = True
    a, b = rng.standard_normal(c), rng.standard_normal(c)
    tokens = np.where(inside[:, :, None], a, b) + 0.3 * rng.standard_normal((h, w, c))
    return tokens.astype(np.float16), inside


def test_refine_honours_clicks_and_spreads_to_similar_cells() -> None:
    tokens, inside = _two_region_tokens()
    probs = np.full((2, *inside.shape), 0.5, np.float32)
    clicks = [(5, 6, 0), (0, 0, -1), (10, 14, 1)]
    out = refine_with_clicks(tokens, probs, clicks)
    assert out.shape == probs.shape and out.dtype == np.float32
    assert out[0, 5, 6] > 0.5 and out[1, 5, 6] < 0.5
    assert out[0, 0, 0] < 0.5 and out[1, 0, 0] < 0.5
    assert out[1, 10, 14] > 0.5 and out[0, 10, 14] < 0.5
    # Channel 0 rises inside the square and falls outside it.
    assert out[0][inside].mean() > 0.5 > out[0][~inside].mean()
    np.testing.assert_array_equal(refine_with_clicks(tokens, probs, []), probs)
    with pytest.raises(ValueError):
        refine_with_clicks(tokens, probs, [(12, 0, 0)])
    with pytest.raises(ValueError):
        refine_with_clicks(tokens, probs, [(0, 0, 2)])


def test_refine_is_monotone_in_the_clicked_class() -> None:
    tokens, inside = _two_region_tokens()
    probs = np.random.default_rng(1).uniform(0.2, 0.8, (1, *inside.shape)).astype(np.float32)
    up = refine_with_clicks(tokens, probs, [(5, 6, 0)])
    down = refine_with_clicks(tokens, probs, [(5, 6, -1)])
    assert (up >= probs - 1e-6).all() and (down <= probs + 1e-6).all()


def test_refine_is_fast() -> None:
    rng = np.random.default_rng(2)
    tokens = rng.standard_normal((28, 28, 192)).astype(np.float16)
    probs = rng.random((1, 28, 28)).astype(np.float32)
    clicks = [
        (int(r), int(c), int(k))
        for r, c, k in zip(rng.integers(0, 28, 10), rng.integers(0, 28, 10), [0, -1] * 5, strict=True)
    ]
    refine_with_clicks(tokens, probs, clicks)
    start = time.perf_counter()
    for _ in range(5):
        refine_with_clicks(tokens, probs, clicks)
    assert (time.perf_counter() - start) / 5 < 0.02
