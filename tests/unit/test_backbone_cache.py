"""Feature caches (memory LRU, disk), the backbone's resize rule, its Triton config and its runtime files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.errors import RepositoryError
from core.feature_cache import DiskFeatureCache, FeatureKey, MemoryFeatureCache
from serving.client import config_from_pbtxt
from serving.pbtxt import BackboneConfig, render_backbone
from serving.repository import ModelCard, ModelRepository, runtime_files
from serving.triton.features_ops import network_input, resize_for_backbone, resized_size


def _key(n: int, version: int = 1, long_side: int = 448) -> FeatureKey:
    return FeatureKey.for_image(bytes([n]), "dinov3", version, long_side)


def _grid(kib: int) -> np.ndarray:
    """An fp16 grid of ``kib`` KiB."""
    return np.full((kib, 512), kib, np.float16)


def test_memory_cache_hits_and_evicts_the_least_recently_used() -> None:
    cache = MemoryFeatureCache(max_mb=3 / 1024)  # 3 KiB
    for n in range(3):
        cache.put(_key(n), _grid(1))
    assert cache.get(_key(0)) is not None  # 0 is now the most recent: 1 goes first
    cache.put(_key(3), _grid(1))
    assert cache.get(_key(1)) is None
    assert [cache.get(_key(n)) is not None for n in (0, 2, 3)] == [True, True, True]
    assert (cache.hits, cache.misses, len(cache), cache.nbytes) == (4, 1, 3, 3 * 1024)
    cache.put(_key(4), _grid(2))  # two KiB push out the two least recent
    assert [cache.get(_key(n)) is not None for n in (0, 2, 3, 4)] == [False, False, True, True]


def test_memory_cache_skips_a_grid_over_its_budget_and_replaces_a_key() -> None:
    cache = MemoryFeatureCache(max_mb=2 / 1024)
    cache.put(_key(0), _grid(1))
    cache.put(_key(1), _grid(3))
    assert cache.get(_key(1)) is None and cache.get(_key(0)) is not None
    cache.put(_key(0), _grid(2))
    assert cache.nbytes == 2048 and len(cache) == 1
    with pytest.raises(ValueError):
        cache.get(_key(0))[0, 0] = 1  # type: ignore[index]


def test_keys_separate_image_content_backbone_version_and_long_side() -> None:
    base = FeatureKey.for_image(b"image", "dinov3", 1, 448)
    assert base == FeatureKey.for_image(b"image", "dinov3", 1, 448)
    others = [
        FeatureKey.for_image(b"image2", "dinov3", 1, 448),
        FeatureKey.for_image(b"image", "other", 1, 448),
        FeatureKey.for_image(b"image", "dinov3", 2, 448),
        FeatureKey.for_image(b"image", "dinov3", 1, 224),
    ]
    assert all(o != base for o in others)


def test_disk_cache_is_reused_by_a_new_instance_as_fp16(tmp_path: Path) -> None:
    tokens = np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32)
    DiskFeatureCache(tmp_path / "features").put(_key(1), tokens)
    again = DiskFeatureCache(tmp_path / "features")
    got = again.get(_key(1))
    assert got is not None and got.dtype == np.float16 and got.shape == (3, 5, 8)
    np.testing.assert_allclose(got, tokens, atol=2e-3)
    assert again.get(_key(1, version=2)) is None
    assert [p.name for p in (tmp_path / "features").rglob("*") if p.is_file()] == [f"{_key(1).image_sha256}.npy"]


def test_disk_cache_recomputes_a_file_cut_short(tmp_path: Path) -> None:
    cache = DiskFeatureCache(tmp_path)
    path = cache.put(_key(1), np.ones((4, 4, 4)))
    path.write_bytes(path.read_bytes()[:40])
    assert cache.get(_key(1)) is None


@pytest.mark.parametrize(
    ("size", "long_side", "expected"),
    [
        ((500, 300), 224, (224, 128)),  # 300 * 0.448 = 134.4 -> 8.4 patches -> 8
        ((300, 500), 224, (128, 224)),
        ((640, 480), 448, (448, 336)),
        ((1000, 10), 448, (448, 16)),  # never below one patch
        ((77, 123), 224, (144, 224)),  # upscaling too
        ((100, 100), 450, (448, 448)),  # a long side off the patch grid rounds to it
    ],
)
def test_resize_rule(size: tuple[int, int], long_side: int, expected: tuple[int, int]) -> None:
    assert resized_size(*size, long_side, 16) == expected


def test_network_input_is_imagenet_normalised_nchw() -> None:
    pixels = np.zeros((40, 70, 3), np.uint8)
    pixels[..., 0] = 255
    resized = resize_for_backbone(pixels, 64, 16)
    assert resized.shape == (32, 64, 3)
    batch = network_input([resized], (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert batch.shape == (1, 3, 32, 64) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0, :, 0, 0], [2.0, -1.0, -0.5], atol=1e-6)


def test_backbone_config_parses_as_triton_config() -> None:
    parsed = config_from_pbtxt(render_backbone(BackboneConfig(name="feat", long_side=224)))
    assert parsed["name"] == "feat" and parsed["backend"] == "python"
    assert [(i["name"], i.get("optional", False)) for i in parsed["input"]] == [("IMAGE", False), ("LONG_SIDE", True)]
    assert {o["name"]: o["data_type"] for o in parsed["output"]}["TOKENS"] == "TYPE_FP16"
    assert parsed["parameters"]["long_side"]["string_value"] == "224"


def test_runtime_files_per_kind(tmp_path: Path, announced_kind: str) -> None:
    backbone = runtime_files("backbone")
    assert sorted(backbone) == ["features_ops.py", "image_decode.py", "model.py"]
    assert b"patch-token grid" in backbone["model.py"]
    assert b"detector_ops" in runtime_files()["model.py"]
    assert sorted(runtime_files("segmenter")) == ["feature_cache.py", "head_ops.py", "masks.py", "model.py"]
    with pytest.raises(RepositoryError, match="no Triton runtime for model kind 'announced'"):
        runtime_files(announced_kind)


def test_cards_written_before_kinds_are_detectors(tmp_path: Path) -> None:
    card = json.loads(ModelCard(name="det", version=1, classes=["a"], imgsz=320).to_json())
    for key in ("kind", "arch", "patch_size", "hidden_size", "num_register_tokens", "image_mean", "image_std"):
        card.pop(key)
    (tmp_path / "card.json").write_text(json.dumps(card))
    assert ModelCard.from_file(tmp_path / "card.json").kind == "detector"


def test_a_backbone_version_carries_the_backbone_runtime(tmp_path: Path) -> None:
    from serving.backbone import backbone_card, publish_backbone

    repo = ModelRepository(tmp_path / "repo")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    card = backbone_card(
        "feat",
        arch="dinov3_x",
        patch_size=16,
        hidden_size=8,
        num_register_tokens=0,
        image_mean=[0] * 3,
        image_std=[1] * 3,
    )
    version = publish_backbone(repo, card, onnx, BackboneConfig(name="feat"))
    folder = repo.version_dir("feat", version)
    assert (folder / "model.py").read_bytes() == runtime_files("backbone")["model.py"]
    assert repo.card("feat", version).kind == "backbone"
    detector = ModelCard(name="det", version=0, classes=["a"], imgsz=32)
    repo.write_config_text("det", 'name: "det"\n')
    repo.add_version(detector, onnx)
    with pytest.raises(RepositoryError, match="'det' .* is a detector"):
        publish_backbone(repo, backbone_card("det", **_fields()), onnx, BackboneConfig(name="det"))


def _fields() -> dict[str, object]:
    return {
        "arch": "a",
        "patch_size": 16,
        "hidden_size": 8,
        "num_register_tokens": 0,
        "image_mean": [0.0] * 3,
        "image_std": [1.0] * 3,
    }
