"""Version folders: numbering, atomic publish, set-aside, cards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from core.errors import RepositoryError
from serving.pbtxt import DetectorConfig
from serving.repository import ModelCard, ModelRepository


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    repo = ModelRepository(tmp_path / "models")
    repo.write_config(DetectorConfig(name="det"))
    return repo


def _card() -> ModelCard:
    return ModelCard(name="det", version=0, classes=["a", "b"], imgsz=320)


def test_versions_count_up_and_ignore_non_numeric(repo: ModelRepository, tmp_path: Path) -> None:
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"pt")
    assert repo.add_version(_card(), onnx, weights) == 1
    (repo.model_dir("det") / ".staging-leftover").mkdir()
    (repo.model_dir("det") / "notes").mkdir()
    assert repo.add_version(_card(), onnx) == 2
    assert repo.versions("det") == [1, 2]
    card = repo.card("det", 1)
    assert card.version == 1 and card.classes == ["a", "b"] and card.created
    assert card.source_weights_sha256 and card.onnx_sha256
    assert repo.weights_path("det", 1) is not None and repo.weights_path("det", 2) is None
    files = sorted(p.name for p in repo.version_dir("det", 1).iterdir())
    assert files == ["card.json", "detector_ops.py", "image_decode.py", "model.onnx", "model.py", "weights.pt"]


def test_a_card_from_before_int8_reads_as_fp32(repo: ModelRepository, tmp_path: Path) -> None:
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    repo.add_version(_card(), onnx)
    path = repo.version_dir("det", 1) / "card.json"
    old = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("precision", "quantization")}
    path.write_text(json.dumps(old))
    card = repo.card("det", 1)
    assert (card.precision, card.quantization) == ("fp32", {})


def test_failed_write_leaves_no_version(repo: ModelRepository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")

    def broken_rename(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", broken_rename)
    with pytest.raises(RepositoryError, match="disk full"):
        repo.add_version(_card(), onnx)
    assert repo.versions("det") == []
    assert [p.name for p in repo.model_dir("det").iterdir() if p.name.startswith(".staging")] == []


def test_set_aside_hides_version_from_triton(repo: ModelRepository, tmp_path: Path) -> None:
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    repo.add_version(_card(), onnx)
    repo.add_version(_card(), onnx)
    moved = repo.set_aside("det", 2, "broken")
    assert repo.versions("det") == [1]
    assert (moved / "FAILED.txt").read_text().strip() == "broken"
    assert repo.add_version(_card(), onnx) == 2


def test_errors_are_clear(repo: ModelRepository, tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="no ONNX"):
        repo.add_version(_card(), tmp_path / "missing.onnx")
    other = ModelCard(name="nope", version=0, classes=[], imgsz=320)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(RepositoryError, match="config.pbtxt"):
        repo.add_version(other, onnx)
    with pytest.raises(RepositoryError, match="card"):
        repo.card("det", 9)


def test_config_is_rewritten_only_on_change(repo: ModelRepository) -> None:
    path = repo.model_dir("det") / "config.pbtxt"
    before = path.stat().st_mtime_ns
    repo.write_config(DetectorConfig(name="det"))
    assert path.stat().st_mtime_ns == before
    repo.write_config(DetectorConfig(name="det", max_batch_size=2))
    assert "max_batch_size: 2" in path.read_text()
    assert json.loads(ModelCard(name="x", version=1, classes=[], imgsz=1).to_json())["version"] == 1


def test_install_runtime_brings_a_copy_to_this_labelloops_model_code(repo: ModelRepository, tmp_path: Path) -> None:
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    version = repo.add_version(_card(), onnx)
    folder = repo.version_dir("det", version)
    (folder / "model.py").write_text("# written by an older labelloop\n")
    repo.install_runtime("det", version)
    root = Path(__file__).parents[2]
    shipped = {"model.py": "serving/triton", "detector_ops.py": "serving/triton", "image_decode.py": "core"}
    for name, where in shipped.items():
        assert (folder / name).read_bytes() == (root / where / name).read_bytes()
    assert (folder / "model.onnx").read_bytes() == b"onnx"


def test_the_precision_line_says_what_was_published_and_why() -> None:
    from serving.publish import precision_summary

    assert precision_summary("fp32", {}) == "fp32"
    gate = {"agreement": 0.99234, "check_images": 32}
    assert precision_summary("int8", gate) == "int8 (agreement with fp32 0.992 on 32 images)"
    assert precision_summary("fp32", {"refused": "too few"}) == "fp32 (int8 refused: too few)"


def test_a_card_of_a_kind_without_a_runtime_writes_nothing(
    repo: ModelRepository, tmp_path: Path, announced_kind: str
) -> None:
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    card = ModelCard(name="det", version=0, classes=["a"], imgsz=320, kind=announced_kind)
    with pytest.raises(RepositoryError, match="no Triton runtime for model kind 'announced'"):
        repo.add_version(card, onnx)
    assert sorted(p.name for p in repo.model_dir("det").iterdir() if not p.name.startswith(".lock")) == ["config.pbtxt"]


def test_a_models_kind_is_its_newest_readable_cards(repo: ModelRepository, tmp_path: Path) -> None:
    assert repo.kind("det") == "detector"  # no versions: as before kinds
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    repo.write_config_text("feat", 'name: "feat"\n')
    repo.add_version(ModelCard(name="feat", version=0, classes=[], imgsz=224, kind="backbone"), onnx)
    (repo.version_dir("feat", 2)).mkdir()  # a version without a card (hand-made, or half-copied)
    assert repo.kind("feat") == "backbone"
