"""The backbone through a real tritonserver: imported (Hugging Face folder, Meta checkpoint), served, embedded.

Served tokens are compared with transformers' own model on the same resized pixels, and with the
same ONNX run in-process; odd images (EXIF-rotated, grey, RGBA, 16-bit, a large JPEG) go through it.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from core.errors import ImageError
from core.feature_cache import DiskFeatureCache
from core.image_decode import decode_image
from core.settings import Settings
from labelloop.cli import app
from serving.backbone import FeaturesClient
from serving.control import load_served_version
from serving.launcher import TritonProcess
from serving.repository import ModelRepository
from serving.triton.features_ops import IMAGENET_MEAN, IMAGENET_STD, network_input, resize_for_backbone
from tests.conftest import free_port
from tests.unit.test_backbone import Meta, _meta_forward, _meta_state_dict

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.slow, pytest.mark.triton]

PATCH = 16
META = Meta(48, 2, 3, 4, "swiglu")


def _jpeg(pixels: np.ndarray, orientation: int | None = None, quality: int = 90) -> bytes:
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _scene(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth shapes plus noise: structure for the tokens to differ by."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / (7 + 3 * c)) * np.cos(y / (11 + 2 * c)) for c in range(3)], axis=-1)
    return np.clip(127 + 100 * base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


IMAGES = {
    "exif_rotated.jpg": lambda: _jpeg(_scene(300, 170, 1), orientation=6),
    "grey.png": lambda: _png(Image.fromarray(_scene(77, 123, 2)[..., 0], "L")),
    "rgba.png": lambda: _png(Image.fromarray(np.dstack([_scene(210, 150, 3), np.full((150, 210), 128, np.uint8)]))),
    "grey16.png": lambda: _png(Image.fromarray(_scene(90, 60, 4)[..., 0].astype(np.uint16) * 257)),
    "large.jpg": lambda: _jpeg(_scene(3000, 2000, 5), quality=95),
}


@dataclass
class Served:
    settings: Settings
    url: str
    hf_folder: Path
    meta_sd: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Two imported backbones (``hf``, ``meta``) served by one tritonserver."""
    from trainer.backbone import import_backbone

    base = tmp_path_factory.mktemp("backbone")
    settings = Settings(model_repository=base / "repo", state_dir=base / "state")  # type: ignore[call-arg]
    torch.manual_seed(5)
    config = transformers.DINOv3ViTConfig(
        hidden_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=192,
        num_register_tokens=3,
        patch_size=PATCH,
        layerscale_value=0.7,
    )
    transformers.DINOv3ViTModel(config).save_pretrained(base / "hf")
    import_backbone(settings, base / "hf", "hf")
    meta_sd = _meta_state_dict(META, seed=2)
    torch.save(meta_sd, base / "dinov3_vitmini16_pretrain_test-12345678.pth")
    import_backbone(settings, base / "dinov3_vitmini16_pretrain_test-12345678.pth", "meta")
    process = TritonProcess(settings.model_repository, base / "triton", grpc_port=free_port(), metrics_port=free_port())
    process.start()
    try:
        process.wait_live(60)

        async def load() -> None:
            for name in ("hf", "meta"):
                async with FeaturesClient(process.grpc_url, name, timeout_s=120) as client:
                    await load_served_version(client, ModelRepository(settings.model_repository))

        asyncio.run(load())
        yield Served(
            settings.model_copy(update={"triton_url": process.grpc_url}), process.grpc_url, base / "hf", meta_sd
        )
    finally:
        process.stop()


def _embed(url: str, name: str, data: bytes, long_side: int):  # noqa: ANN202
    async def run():  # noqa: ANN202
        async with FeaturesClient(url, name, timeout_s=120) as client:
            return await client.embed(data, long_side)

    return asyncio.run(run())


def _pixels(data: bytes, long_side: int) -> np.ndarray:
    resized = resize_for_backbone(decode_image(data, 10**9, 10**9).pixels, long_side, PATCH)
    return network_input([resized], IMAGENET_MEAN, IMAGENET_STD)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_served_tokens_match_transformers(served: Served, image: str) -> None:
    data = IMAGES[image]()
    long_side = 224
    features = _embed(served.url, "hf", data, long_side)
    pixels = _pixels(data, long_side)
    _, _, height, width = pixels.shape
    assert features.grid == (height // PATCH, width // PATCH)
    assert features.size == (width, height) and max(features.size) == long_side
    assert features.tokens.dtype == np.float16 and features.tokens.shape == (*features.grid, 96)
    reference = transformers.DINOv3ViTModel.from_pretrained(served.hf_folder).eval()
    with torch.no_grad():
        hidden = reference(pixel_values=torch.from_numpy(pixels)).last_hidden_state[0, 1 + 3 :].numpy()
    expected = hidden.reshape(features.tokens.shape)
    cos = _cosines(features.tokens, expected)
    assert cos.mean() >= 0.9999 and cos.min() >= 0.999
    assert np.abs(features.tokens.astype(np.float32) - expected).max() <= 1e-2


def test_exif_orientation_is_applied_before_the_resize(served: Served) -> None:
    features = _embed(served.url, "hf", IMAGES["exif_rotated.jpg"](), 224)
    assert features.image_size == (170, 300) and features.size == (128, 224)


def test_meta_checkpoint_served_tokens_match_the_dinov3_forward(served: Served) -> None:
    data = IMAGES["rgba.png"]()
    features = _embed(served.url, "meta", data, 160)
    with torch.no_grad():
        expected = _meta_forward(served.meta_sd, META, torch.from_numpy(_pixels(data, 160)))[0].numpy()
    cos = _cosines(features.tokens, expected)
    assert cos.mean() >= 0.9999 and cos.min() >= 0.999
    assert features.model.arch == "dinov3_vitmini16"


def test_served_tokens_equal_the_onnx_run_locally_and_the_disk_cache_reuses_them(
    served: Served, tmp_path: Path
) -> None:
    from trainer.features import LocalBackbone

    repo = ModelRepository(served.settings.model_repository)
    data = IMAGES["large.jpg"]()
    served_tokens = _embed(served.url, "hf", data, 320).tokens
    first = LocalBackbone(repo, "hf", cache=DiskFeatureCache(tmp_path / "features"))
    local = first.features(data, 320)
    np.testing.assert_allclose(local.astype(np.float32), served_tokens.astype(np.float32), atol=2e-3)
    again = LocalBackbone(repo, "hf", cache=DiskFeatureCache(tmp_path / "features"))
    np.testing.assert_array_equal(again.features(data, 320), local)
    assert (first.computed, again.computed) == (1, 0)
    again.features(data, 224)  # another long side is another key
    assert again.computed == 1


def test_a_bad_image_or_long_side_fails_its_request_only(served: Served) -> None:
    with pytest.raises(ImageError, match="cannot decode"):
        _embed(served.url, "hf", b"not an image", 224)
    with pytest.raises(ImageError, match="long side 4096 out of range"):
        _embed(served.url, "hf", IMAGES["grey.png"](), 4096)
    assert _embed(served.url, "hf", IMAGES["grey.png"](), 224).grid == (14, 9)


def test_embed_cli_writes_tokens_grid_and_size(served: Served, tmp_path: Path) -> None:
    paths = []
    for name in ("grey.png", "exif_rotated.jpg"):
        (tmp_path / name).write_bytes(IMAGES[name]())
        paths.append(str(tmp_path / name))
    out = tmp_path / "features.npz"
    env = {"LABELLOOP_MODEL_REPOSITORY": str(served.settings.model_repository)}
    args = ["backbone", "embed", *paths, "--backbone", "hf", "--long-side", "224", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--triton-url", served.url], env=env)
    assert result.exit_code == 0, result.output
    saved = np.load(out)
    assert saved["tokens_0"].shape == (14, 9, 96) and saved["tokens_0"].dtype == np.float16
    assert saved["grid_0"].tolist() == [14, 9] and saved["size_0"].tolist() == [144, 224]
    assert saved["grid_1"].tolist() == [14, 8] and saved["size_1"].tolist() == [128, 224]
    direct = _embed(served.url, "hf", IMAGES["grey.png"](), 224).tokens
    np.testing.assert_array_equal(saved["tokens_0"], direct)


def test_demo_backbone_published_and_embedded_without_a_running_triton(tmp_path: Path) -> None:
    env = {"LABELLOOP_MODEL_REPOSITORY": str(tmp_path / "repo"), "LABELLOOP_STATE_DIR": str(tmp_path / "state")}
    result = CliRunner().invoke(app, ["backbone", "demo", "--json"], env=env)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {k: summary[k] for k in ("name", "version", "kind", "arch", "patch_size", "hidden_size")} == {
        "name": "dinov3",
        "version": 1,
        "kind": "backbone",
        "arch": "dinov3_demo",
        "patch_size": 16,
        "hidden_size": 192,
    }
    assert summary["num_register_tokens"] == 4 and summary["note"] == "random-init demo backbone"
    card = json.loads((tmp_path / "repo" / "dinov3" / "1" / "card.json").read_text())
    assert card["kind"] == "backbone" and card["metrics"]["onnx_max_abs_diff"] <= 1e-4
    image = tmp_path / "image.png"
    image.write_bytes(IMAGES["rgba.png"]())
    out = tmp_path / "f.npz"
    # Nothing listens on this port: the command serves the repository from a tritonserver of its own.
    args = ["backbone", "embed", str(image), "--long-side", "224", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--triton-url", f"127.0.0.1:{free_port()}"], env=env)
    assert result.exit_code == 0, result.output
    assert "random-init demo backbone" in result.output
    assert np.load(out)["tokens_0"].shape == (10, 14, 192)
    assert json.loads(str(np.load(out)["backbone"]))["notes"] == ["random-init demo backbone"]
