"""The segmentation head: points to cells, training on labelled cells, export parity, checkpoints, warm start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from core.errors import ConfigError, TrainingError
from trainer.segment import (
    CellPoints,
    HeadParams,
    SegmenterCheckpoint,
    SegmenterHead,
    cell_points,
    export_head_onnx,
    mask_metrics,
    point_metrics,
    predict_proba,
    train_head,
)

C = 16
CLASSES = ("dent", "rust")
FAST = HeadParams(lr=1e-2, batch_size=4, patience=3, max_epochs=25)


def _problem(n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], list[CellPoints]]:
    """fp16 grids of two sizes; channel k (+5) marks class k's 2x2 square; points from the truth."""
    rng = np.random.default_rng(seed)
    grids, truths, points = [], [], []
    for i in range(n):
        h, w = (6, 8) if i % 3 else (7, 5)
        grid = rng.standard_normal((h, w, C)).astype(np.float32)
        truth = np.zeros((h, w), np.int64)
        for k in range(2):  # class 0 in the top half, class 1 in the bottom half
            r, c = rng.integers(k * (h // 2), (h // 2 - 1) + k * (h - h // 2 - 1)), rng.integers(0, w - 1)
            truth[r : r + 2, c : c + 2] = k + 1
        for k in range(2):
            grid[..., k] += 5.0 * (truth == k + 1)
        # Like a person: three points on each square, six on the background.
        fg = [rng.choice(np.flatnonzero(truth == k + 1), size=3, replace=False) for k in range(2)]
        bg = rng.choice(np.flatnonzero(truth == 0), size=6, replace=False)
        rows, cols = np.divmod(np.concatenate([*fg, bg]), w)
        points.append(CellPoints.of(rows, cols, truth[rows, cols] - 1))
        grids.append(grid.astype(np.float16))
        truths.append(truth)
    return grids, truths, points


@pytest.fixture(scope="module")
def trained() -> SegmenterCheckpoint:
    grids, _, points = _problem(16, seed=0)
    result = train_head(grids, points, CLASSES, FAST)
    return SegmenterCheckpoint.from_head(result.head, CLASSES)


def test_cell_points_maps_pixels_to_cells() -> None:
    cells = cell_points([(0.5, 0.5, 0), (447.5, 335.5, -1), (100.0, 50.0, 1)], 448, 336, 21, 28)
    assert cells.rows.tolist() == [0, 20, 3] and cells.cols.tolist() == [0, 27, 6]
    assert cells.classes.tolist() == [0, -1, 1] and len(cells) == 3
    with pytest.raises(ValueError):
        CellPoints.of([0, 1], [0], [0])


def test_head_shapes_and_padding_changes_nothing(trained: SegmenterCheckpoint) -> None:
    head = trained.to_head()
    grids, _, _ = _problem(5, seed=1)
    probs = predict_proba(head, grids)
    assert [p.shape for p in probs] == [(2, *g.shape[:2]) for g in grids]
    assert all(p.dtype == np.float32 for p in probs)
    one = [predict_proba(head, [g])[0] for g in grids]
    for a, b in zip(probs, one, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # A grid zero-padded in a batch with a larger one, masked, gives its lone result.
    big, small = torch.from_numpy(grids[1].astype(np.float32)), torch.from_numpy(grids[0].astype(np.float32))
    batch = torch.zeros(2, 7, 8, C)
    mask = torch.zeros(2, 7, 8, 1)
    batch[0, :7, :5], mask[0, :7, :5] = small, 1.0
    batch[1, :6, :8], mask[1, :6, :8] = big, 1.0
    with torch.inference_mode():
        padded = torch.sigmoid(head(batch, mask))[0, :, :7, :5].numpy()
    np.testing.assert_allclose(padded, one[0], atol=1e-5)


def test_training_learns_points_and_masks_and_is_deterministic() -> None:
    grids, truths, points = _problem(24, seed=2)
    result = train_head(grids[:16], points[:16], CLASSES, FAST)
    assert not result.head.training and result.epochs >= 1
    probs = predict_proba(result.head, grids[16:])
    assert point_metrics(probs, points[16:]) >= 0.9
    assert mask_metrics(probs, truths[16:])["miou"] >= 0.6
    again = train_head(grids[:16], points[:16], CLASSES, FAST)
    assert again.epochs == result.epochs and again.best_loss == result.best_loss
    for a, b in zip(predict_proba(again.head, grids[16:]), probs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_on_epoch_false_stops_and_bad_points_are_refused() -> None:
    grids, _, points = _problem(6, seed=3)
    seen: list[int] = []

    def on_epoch(epoch: int, loss: float, head: SegmenterHead) -> bool:
        seen.append(epoch)
        return epoch < 2

    result = train_head(grids, points, CLASSES, FAST, on_epoch=on_epoch)
    assert seen == [1, 2] and result.epochs == 2 and not result.stopped_early
    with pytest.raises(ValueError):
        train_head(grids[:1], [CellPoints.of([9], [0], [0])], CLASSES, FAST)
    with pytest.raises(ValueError):
        train_head(grids[:1], [CellPoints.of([0], [0], [2])], CLASSES, FAST)
    with pytest.raises(ValueError):
        train_head(grids[:1], [CellPoints.of([], [], [])], CLASSES, FAST)
    with pytest.raises(ConfigError):
        train_head(grids[:1], points[:1], ("a", "a"), FAST)


def test_onnx_export_matches_torch(trained: SegmenterCheckpoint, tmp_path: Path) -> None:
    head = trained.to_head()
    path = export_head_onnx(head, tmp_path / "head.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["tokens"]
    assert [o.name for o in session.get_outputs()] == ["probs"]
    rng = np.random.default_rng(5)
    for h, w in ((3, 5), (9, 4), (21, 28)):
        tokens = rng.standard_normal((1, h, w, C)).astype(np.float32)
        got = session.run(["probs"], {"tokens": tokens})[0]
        want = predict_proba(head, [tokens[0]])[0]
        assert got.shape == (1, 2, h, w) and got.dtype == np.float32
        assert np.abs(got[0] - want).max() < 1e-4


def test_checkpoint_round_trip_and_warm_start(trained: SegmenterCheckpoint, tmp_path: Path) -> None:
    path = trained.save(tmp_path / "ckpt" / "head.pt")
    loaded = SegmenterCheckpoint.load(path)
    assert (loaded.classes, loaded.hidden, loaded.arch) == (trained.classes, trained.hidden, trained.arch)
    grids, _, points = _problem(6, seed=6)
    for a, b in zip(predict_proba(loaded.to_head(), grids), predict_proba(trained.to_head(), grids), strict=True):
        np.testing.assert_array_equal(a, b)
    warm = train_head(grids, points, CLASSES, FAST, warm=loaded)
    assert warm.epochs >= 1
    with pytest.raises(ConfigError, match="classes"):
        train_head(grids, points, ("rust", "dent"), FAST, warm=loaded)
    wide = [np.zeros((4, 4, C + 1), np.float16)]
    with pytest.raises(ConfigError, match="tokens"):
        train_head(wide, [CellPoints.of([0], [0], [0])], CLASSES, FAST, warm=loaded)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError):
        SegmenterCheckpoint.load(tmp_path / "junk.pt")
    other = SegmenterCheckpoint(loaded.state_dict, loaded.classes, loaded.hidden, arch="something-else")
    with pytest.raises(ConfigError):
        other.to_head()
