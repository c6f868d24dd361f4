"""The classification head and its demo data: metrics, training, export parity, checkpoints, generator."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from core.errors import ConfigError
from trainer.classify import (
    ClassifierHead,
    HeadCheckpoint,
    HeadParams,
    classification_metrics,
    export_head_onnx,
    predict_proba,
    train_head,
)
from trainer.synthetic_classes import CLASSES, write_classifier_dataset

C = 16
CLASS_NAMES = ("plain", "spotted")
# A higher rate than the default keeps these runs to a few dozen epochs.
FAST = HeadParams(lr=1e-2)


def _grids(n: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """fp16 grids of varied size; class 1 has a few hot cells in channels 0-3, which only max/std pooling see."""
    rng = np.random.default_rng(seed)
    grids, labels = [], []
    for i in range(n):
        h, w = rng.integers(3, 8, size=2)
        grid = rng.standard_normal((h, w, C)).astype(np.float32)
        label = i % 2
        if label:
            cells = rng.choice(h * w, size=2, replace=False)
            grid.reshape(-1, C)[cells, :4] += 4.0
        grids.append(grid.astype(np.float16))
        labels.append(label)
    return grids, labels


@pytest.fixture(scope="module")
def trained() -> HeadCheckpoint:
    grids, labels = _grids(40, seed=0)
    result = train_head(grids, labels, CLASS_NAMES, FAST)
    return HeadCheckpoint.from_head(result.head, CLASS_NAMES)


def test_metrics_match_hand_computed_values() -> None:
    # d never occurs; c is never predicted.
    m = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c", "d"])
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert m["accuracy"] == pytest.approx(0.6)
    # a: tp 1, fp 1, fn 1 -> 0.5; b: tp 2, fp 1 -> 0.8; c: tp 0, fn 1 -> 0; d: left out.
    assert m["per_class_f1"] == pytest.approx({"a": 0.5, "b": 0.8, "c": 0.0})
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    json.dumps(m)  # plain Python types only


def test_metrics_reject_mismatched_or_out_of_range() -> None:
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0], ["a", "b"])
    with pytest.raises(ValueError):
        classification_metrics([0, 2], [0, 1], ["a", "b"])


def test_training_separates_classes_and_stops_on_patience() -> None:
    grids, labels = _grids(60, seed=1)
    params = HeadParams(lr=FAST.lr, seed=3)
    result = train_head(grids[:40], labels[:40], CLASS_NAMES, params)
    assert result.stopped_early and result.epochs < params.max_epochs
    assert not result.head.training
    predicted = predict_proba(result.head, grids[40:]).argmax(axis=1)
    assert classification_metrics(labels[40:], predicted.tolist(), CLASS_NAMES)["accuracy"] >= 0.9

    again = train_head(grids[:40], labels[:40], CLASS_NAMES, params)
    assert again.epochs == result.epochs and again.best_loss == result.best_loss
    np.testing.assert_array_equal(predict_proba(again.head, grids[40:]), predict_proba(result.head, grids[40:]))


def test_on_epoch_returning_false_stops_the_run() -> None:
    grids, labels = _grids(12, seed=2)
    seen: list[tuple[int, float]] = []

    def on_epoch(epoch: int, loss: float, head: ClassifierHead) -> bool:
        seen.append((epoch, loss))
        return epoch < 3

    result = train_head(grids, labels, CLASS_NAMES, FAST, on_epoch=on_epoch)
    assert [e for e, _ in seen] == [1, 2, 3]
    assert result.epochs == 3 and not result.stopped_early
    assert result.best_loss == pytest.approx(min(loss for _, loss in seen), abs=FAST.min_delta)


def test_onnx_export_matches_torch_at_two_grid_sizes(trained: HeadCheckpoint, tmp_path: Path) -> None:
    head = trained.to_head()
    path = export_head_onnx(head, tmp_path / "head.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["tokens"]
    assert [o.name for o in session.get_outputs()] == ["probs"]
    rng = np.random.default_rng(5)
    for shape in ((1, 3, 5, C), (3, 9, 4, C)):
        tokens = rng.standard_normal(shape).astype(np.float32)
        got = session.run(["probs"], {"tokens": tokens})[0]
        want = predict_proba(head, list(tokens))
        assert got.shape == (shape[0], len(CLASS_NAMES)) and got.dtype == np.float32
        assert np.abs(got - want).max() < 1e-4
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_padded_batch_equals_one_by_one(trained: HeadCheckpoint) -> None:
    head = trained.to_head()
    grids, _ = _grids(7, seed=4)
    batched = predict_proba(head, grids)
    single = np.concatenate([predict_proba(head, [g]) for g in grids])
    np.testing.assert_allclose(batched, single, atol=1e-6)


def test_checkpoint_round_trip(trained: HeadCheckpoint, tmp_path: Path) -> None:
    path = trained.save(tmp_path / "ckpt" / "head.pt")
    loaded = HeadCheckpoint.load(path)
    assert (loaded.classes, loaded.hidden, loaded.arch) == (trained.classes, trained.hidden, trained.arch)
    assert loaded.state_dict.keys() == trained.state_dict.keys()
    grids, _ = _grids(5, seed=6)
    np.testing.assert_array_equal(predict_proba(loaded.to_head(), grids), predict_proba(trained.to_head(), grids))


def test_warm_start_continues_and_refuses_other_classes(trained: HeadCheckpoint) -> None:
    grids, labels = _grids(20, seed=7)
    first_losses: list[float] = []

    def record(epoch: int, loss: float, head: ClassifierHead) -> bool:
        first_losses.append(loss)
        return False

    train_head(grids, labels, CLASS_NAMES, FAST, warm=trained, on_epoch=record)
    train_head(grids, labels, CLASS_NAMES, FAST, on_epoch=record)
    warm_loss, cold_loss = first_losses
    assert warm_loss < cold_loss

    with pytest.raises(ConfigError) as info:
        train_head(grids, labels, ("plain", "spotted", "striped"), FAST, warm=trained)
    message = str(info.value)
    assert "['plain', 'spotted']" in message and "['plain', 'spotted', 'striped']" in message
    narrow = [g[..., :8] for g in grids]  # tokens of another backbone
    with pytest.raises(ConfigError, match="16-d tokens, these are 8-d"):
        train_head(narrow, labels, CLASS_NAMES, FAST, warm=trained)


def test_head_params_are_checked() -> None:
    with pytest.raises(ConfigError):
        HeadParams(batch_size=0)
    with pytest.raises(ConfigError):
        HeadParams(lr=0.0)


def test_head_shapes() -> None:
    head = ClassifierHead(C, 3).eval()
    assert head(torch.zeros(2, 4, 6, C)).shape == (2, 3)


def _dataset_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "images").iterdir())}


def test_generator_is_balanced_deterministic_and_uniquely_named(tmp_path: Path) -> None:
    a = write_classifier_dataset(tmp_path / "a", n=10, seed=3)
    b = write_classifier_dataset(tmp_path / "b", n=10, seed=3)
    meta = json.loads((a / "labels.json").read_text(encoding="utf-8"))
    assert meta["classes"] == list(CLASSES)
    files = _dataset_files(a)
    assert sorted(meta["labels"]) == sorted(files) and len(files) == 10
    counts = Counter(meta["labels"].values())
    assert set(counts) == set(CLASSES) and max(counts.values()) - min(counts.values()) <= 1
    assert files == _dataset_files(b)
    assert (b / "labels.json").read_bytes() == (a / "labels.json").read_bytes()
    for name in files:
        with Image.open(a / "images" / name) as image:
            assert 224 <= min(image.size) and max(image.size) <= 640 and image.mode == "RGB"
    other = write_classifier_dataset(tmp_path / "c", n=10, seed=4)
    assert _dataset_files(other) != files
    rewritten = write_classifier_dataset(tmp_path / "c", n=6, seed=3)  # our own folder: rewritten in place
    assert len(_dataset_files(rewritten)) == 6


def test_generator_takes_custom_class_names(tmp_path: Path) -> None:
    names = ["k0", "k1", "k2", "k3", "k4", "k5", "k6"]  # more classes than texture families
    out = write_classifier_dataset(tmp_path / "custom", n=7, seed=0, classes=names)
    meta = json.loads((out / "labels.json").read_text(encoding="utf-8"))
    assert meta["classes"] == names
    assert sorted(meta["labels"].values()) == names
    with pytest.raises(ValueError):
        write_classifier_dataset(tmp_path / "dup", n=4, seed=0, classes=["x", "x"])


def test_generator_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep", encoding="utf-8")
    with pytest.raises(ValueError):
        write_classifier_dataset(tmp_path, n=4, seed=0)
    assert (tmp_path / "mine.txt").read_text(encoding="utf-8") == "keep"
