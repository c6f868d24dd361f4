"""The backbone runtime under load: requests batched together and two instances on their two lanes.

A dynamic batch runs the images of all its requests that resize to one grid through onnxruntime
together; every request still gets its own tokens, and a bad one fails alone. Two instances that
execute at once each run on their one-thread session; the tokens are the same as a lone request's.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.settings import Settings
from serving.backbone import FeaturesClient, backbone_config
from serving.control import load_served_version
from serving.launcher import TritonProcess
from serving.pbtxt import render_backbone
from serving.repository import ModelRepository
from tests.conftest import free_port

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.slow, pytest.mark.triton]

BATCHED = "batched"  # one instance, a 1 s batch delay: concurrent requests share one execute()
LANES = "lanes"  # the default config: two instances


def _jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / (5 + 2 * c + seed)) * np.cos(y / (9 + c)) for c in range(3)], axis=-1)
    pixels = np.clip(127 + 100 * base + rng.normal(0, 10, (height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# Two pairs share a grid at long side 160 (300x200 and 330x220 -> 160x112; 200x300 and 220x330 -> 112x160).
IMAGES = [_jpeg(w, h, k) for k, (w, h) in enumerate([(300, 200), (200, 300), (330, 220), (220, 330), (500, 120)])]


@dataclass
class Served:
    process: TritonProcess

    @property
    def url(self) -> str:
        return self.process.grpc_url


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from trainer.backbone import LoadedBackbone, publish_loaded

    base = tmp_path_factory.mktemp("lanes")
    settings = Settings(model_repository=base / "repo", state_dir=base / "state")  # type: ignore[call-arg]
    torch.manual_seed(3)
    config = transformers.DINOv3ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_register_tokens=2
    )
    config._attn_implementation = "eager"
    model = transformers.DINOv3ViTModel(config).eval()
    repo = ModelRepository(settings.model_repository)
    for name in (BATCHED, LANES):
        publish_loaded(settings, LoadedBackbone(model, "test", Path("random"), None), name)
    cfg = backbone_config(settings, BATCHED)
    repo.write_config_text(
        BATCHED, render_backbone(replace(cfg, instance_count=1, batch_delay_us=1_000_000, max_batch_size=16))
    )
    assert "count: 2 kind: KIND_CPU" in (repo.model_dir(LANES) / "config.pbtxt").read_text()
    process = TritonProcess(repo.root, base / "triton", grpc_port=free_port(), metrics_port=free_port())
    process.start()
    try:
        process.wait_live(60)

        async def load() -> None:
            for name in (BATCHED, LANES):
                async with FeaturesClient(process.grpc_url, name, timeout_s=120) as client:
                    await load_served_version(client, repo)

        asyncio.run(load())
        yield Served(process)
    finally:
        process.stop()


def _alone(url: str, name: str, images: list[bytes], side: int) -> list[np.ndarray]:
    async def run() -> list[np.ndarray]:
        async with FeaturesClient(url, name, timeout_s=120) as client:
            return [(await client.embed(image, side)).tokens for image in images]

    return asyncio.run(run())


def _exec_count(served: Served, model: str) -> float:
    import httpx

    from labelloop.bench import metric_sum, parse_metrics

    text = httpx.get(f"http://127.0.0.1:{served.process.ports['metrics']}/metrics", trust_env=False).text
    return metric_sum(parse_metrics(text), "nv_inference_exec_count", model=model)


def test_a_dynamic_batch_answers_each_request_as_if_alone_and_a_bad_one_fails_alone(served: Served) -> None:
    import tritonclient.grpc.aio as grpcaio
    from tritonclient.utils import InferenceServerException

    side = 160
    alone = _alone(served.url, BATCHED, IMAGES, side)
    # (images, long side) per request: single images of two grids, one request of two images of one
    # grid, an image that does not decode, a long side out of range, two images of different grids.
    requests: list[tuple[list[bytes], int]] = [
        ([IMAGES[0]], side),
        ([IMAGES[1]], side),
        ([IMAGES[2], IMAGES[0]], side),
        ([b"not an image"], side),
        ([IMAGES[3]], side),
        ([IMAGES[4]], 4096),
        ([IMAGES[0], IMAGES[1]], side),
        ([IMAGES[4]], side),
    ]

    async def infer(client: grpcaio.InferenceServerClient, images: list[bytes], long_side: int) -> object:
        tensor = grpcaio.InferInput("IMAGE", [len(images), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[i] for i in images], dtype=np.object_))
        sides = grpcaio.InferInput("LONG_SIDE", [len(images), 1], "INT32")
        sides.set_data_from_numpy(np.full((len(images), 1), long_side, np.int32))
        try:
            result = await client.infer(BATCHED, [tensor, sides])
        except InferenceServerException as exc:
            return exc
        return result.as_numpy("TOKENS")

    async def run() -> list[object]:
        client = grpcaio.InferenceServerClient(served.url)
        try:
            return list(await asyncio.gather(*(infer(client, images, s) for images, s in requests)))
        finally:
            await client.close()

    before = _exec_count(served, BATCHED)
    answers = asyncio.run(run())
    assert _exec_count(served, BATCHED) - before == 1, "the requests did not share one execute()"
    expected = {0: [0], 1: [1], 2: [2, 0], 4: [3], 7: [4]}
    for k, members in expected.items():
        got = answers[k]
        assert isinstance(got, np.ndarray) and got.dtype == np.float16, (k, got)
        assert got.shape == (len(members), *alone[members[0]].shape)
        for row, m in zip(got, members, strict=True):
            np.testing.assert_allclose(row.astype(np.float32), alone[m].astype(np.float32), atol=2e-3)
    assert "cannot decode" in str(answers[3])
    assert "long side 4096 out of range" in str(answers[5])
    assert "different grids" in str(answers[6])


def test_two_instances_at_once_give_the_tokens_of_a_lone_request(served: Served) -> None:
    images = IMAGES * 4
    alone = _alone(served.url, LANES, IMAGES, 224)

    async def run() -> list[np.ndarray]:
        async with FeaturesClient(served.url, LANES, timeout_s=120, concurrency=8) as client:
            return [f.tokens for f in await asyncio.gather(*(client.embed(image, 224) for image in images))]

    together = run()
    for k, tokens in enumerate(asyncio.run(together)):
        np.testing.assert_allclose(tokens.astype(np.float32), alone[k % len(IMAGES)].astype(np.float32), atol=2e-3)
