"""``labelloop bench``'s backbone section: Triton against raw onnxruntime on the same DINOv3 ONNX.

The demo backbone (``labelloop backbone demo``'s builder: random-init, hidden 192, 4 layers, patch 16)
is published into the bench's private repository and loaded into the bench's tritonserver after the
detector's rounds, so the detector's figures are those of a server that holds only the detector.
The bench images go through it three ways, at long sides 224 and 448, in half the detector's rounds
(at least one) of shuffled blocks, the concurrent block sending half a throughput block of requests:

(a) raw       ``InferenceSession.run`` (default options, CPU) on the float32 tensor the Triton model
              builds for the image: decode, resize and normalise are outside the timer;
(p) pipeline  the same in-process with decode, resize and normalise inside the timer (what any server
              must do per image, without the server);
(b) triton    ``FeaturesClient.embed(JPEG bytes, long side)``: one gRPC request per image, decode,
              resize, normalise, onnxruntime and the fp16 tokens back; concurrency 1 and 4.

Ratios are in :mod:`labelloop.bench_report`.

``python -m labelloop.bench_backbone`` runs this section alone, in a tritonserver of its own that holds
only the backbone (a minute or two on 2 cores, no detector, no bridge, no ultralytics); ``--arch
dinov3_vits16`` measures a random-init ViT-S/16 (any ``trainer.backbone.ARCHS`` name) instead of the
demo.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from core.errors import ConfigError
from core.image_decode import decode_image
from core.settings import Settings
from labelloop.bench_rig import BackboneTally, BenchImage, BenchPlan
from serving.backbone import FeaturesClient
from serving.control import load_served_version
from serving.repository import ModelRepository
from serving.triton.features_ops import network_input, resize_for_backbone

__all__ = ["BACKBONE_NAME", "CONCURRENCY", "LONG_SIDES", "BackboneBench", "publish_demo_backbone", "run_backbone_bench"]

logger = logging.getLogger(__name__)

BACKBONE_NAME = "dinov3"
LONG_SIDES = (224, 448)
CONCURRENCY = (1, 4)
SETTLE_S = 0.1

Tensor = npt.NDArray[np.float32]


def publish_demo_backbone(
    settings: Settings, repo: ModelRepository, work: Path, arch: str | None = None, name: str = BACKBONE_NAME
) -> float:
    """Build, export and publish the demo backbone (or a random-init ``arch``) into the private ``repo``;
    the seconds it took."""
    try:
        from trainer.backbone import demo_backbone, publish_loaded
    except ImportError as exc:
        raise ConfigError("the backbone section needs torch and transformers: pip install 'labelloop[train]'") from exc
    started = time.perf_counter()
    loaded = demo_backbone() if arch is None else _random_backbone(arch)
    publish_loaded(settings.model_copy(update={"model_repository": repo.root, "state_dir": work}), loaded, name)
    return time.perf_counter() - started


def _random_backbone(arch: str) -> Any:
    """A published DINOv3 architecture with random weights: the real network's cost, no download."""
    import torch
    from transformers import DINOv3ViTModel

    from trainer.backbone import ARCHS, DEMO_SEED, LoadedBackbone, arch_config

    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; one of {', '.join(ARCHS)}")
    config = arch_config(arch)
    config._attn_implementation = "eager"
    torch.manual_seed(DEMO_SEED)
    model = DINOv3ViTModel(config).eval()  # type: ignore[no-untyped-call]
    return LoadedBackbone(model, arch, Path(f"random-init:seed={DEMO_SEED}"), None, note="random init (bench)")


class BackboneBench:
    """The backbone's blocks over the bench images, and what they measured."""

    def __init__(
        self,
        settings: Settings,
        plan: BenchPlan,
        images: list[BenchImage],
        repo: ModelRepository,
        name: str = BACKBONE_NAME,
    ) -> None:
        import onnxruntime as ort

        self.settings = settings
        self.plan = plan
        self.images = images
        self.name = name
        version = repo.latest(name)
        assert version is not None  # publish_demo_backbone wrote it
        card = repo.card(name, version)
        assert card.patch_size is not None and card.image_mean and card.image_std
        self.patch, self.mean, self.std = card.patch_size, card.image_mean, card.image_std
        self.tally = BackboneTally()
        self.tally.model = {
            "name": name,
            "version": version,
            "arch": card.arch,
            "patch_size": card.patch_size,
            "hidden_size": card.hidden_size,
            "layers": card.train_args.get("layers"),
            "note": card.note,
        }
        # Method (a): onnxruntime as anyone would call it, like the detector's (a).
        self.session = ort.InferenceSession(str(repo.onnx_path(name, version)), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.tensors = {side: [self._prepare(image.data, side) for image in images] for side in LONG_SIDES}
        for side, tensors in self.tensors.items():
            self.tally.tokens[side] = [(t.shape[2] // self.patch) * (t.shape[3] // self.patch) for t in tensors]

    def _prepare(self, data: bytes, side: int) -> Tensor:
        """Decode, resize and normalise exactly as the Triton model does."""
        img = decode_image(data, self.settings.max_image_bytes, self.settings.max_image_pixels)
        tensor: Tensor = network_input([resize_for_backbone(img.pixels, side, self.patch)], self.mean, self.std)
        return tensor

    def _raw(self, tensor: Tensor) -> Tensor:
        out: Tensor = self.session.run(None, {self.input_name: tensor})[0]
        return out

    def _count(self, key: tuple[str, int], images: int, started: float) -> None:
        work = self.tally.work[key]
        work[0] += images
        work[1] += time.perf_counter() - started

    async def _latency_raw(self, side: int) -> None:
        started = time.perf_counter()
        for tensor in self.tensors[side]:
            t0 = time.perf_counter()
            self._raw(tensor)
            self.tally.latency[("raw", side)].append(time.perf_counter() - t0)
        self._count(("raw", side), len(self.images), started)

    async def _latency_pipeline(self, side: int) -> None:
        started = time.perf_counter()
        for image in self.images:
            t0 = time.perf_counter()
            self._raw(self._prepare(image.data, side))
            self.tally.latency[("pipeline", side)].append(time.perf_counter() - t0)
        self._count(("pipeline", side), len(self.images), started)

    async def _latency_triton(self, client: FeaturesClient, side: int) -> None:
        started = time.perf_counter()
        for image in self.images:
            t0 = time.perf_counter()
            await client.embed(image.data, side)
            self.tally.latency[("triton", side)].append(time.perf_counter() - t0)
        self._count(("triton concurrency 1", side), len(self.images), started)

    async def _triton_concurrent(self, client: FeaturesClient, side: int, concurrency: int) -> None:
        slots = asyncio.Semaphore(concurrency)
        n = max(len(self.images), self.plan.block_images // 2)

        async def one(k: int) -> None:
            async with slots:
                await client.embed(self.images[k % len(self.images)].data, side)

        started = time.perf_counter()
        await asyncio.gather(*(one(k) for k in range(n)))
        self._count((f"triton concurrency {concurrency}", side), n, started)

    async def _agreement(self, client: FeaturesClient) -> None:
        """Served tokens against raw onnxruntime's on the same pixels (fp16 rounding apart, they are one model)."""
        for side in LONG_SIDES:
            worst = 0.0
            for image, tensor in zip(self.images[:2], self.tensors[side][:2], strict=False):
                served = (await client.embed(image.data, side)).tokens.astype(np.float32)
                worst = max(worst, float(np.abs(served - self._raw(tensor)[0]).max()))
            self.tally.max_abs_diff[side] = worst

    def blocks(self, client: FeaturesClient) -> dict[str, Any]:
        """Every block of one round, by name."""
        blocks: dict[str, Any] = {}
        for side in LONG_SIDES:
            blocks[f"raw {side}"] = lambda side=side: self._latency_raw(side)
            blocks[f"pipeline {side}"] = lambda side=side: self._latency_pipeline(side)
            blocks[f"triton {side}"] = lambda side=side: self._latency_triton(client, side)
            for c in CONCURRENCY[1:]:
                blocks[f"triton {side} concurrency {c}"] = lambda side=side, c=c: self._triton_concurrent(
                    client, side, c
                )
        return blocks

    async def measure(self, url: str, repo: ModelRepository) -> None:
        """Load the backbone into the running Triton, warm everything up, then run the rounds."""
        started = time.perf_counter()
        timeout = max(self.settings.triton_timeout_s, 120.0)
        client = FeaturesClient(url, self.name, timeout_s=timeout, concurrency=max(CONCURRENCY), retries=0)
        try:
            info = await load_served_version(client, repo)
            self.tally.model["provider"] = info.provider
            for side in LONG_SIDES:  # first runs allocate and optimise; none of them is counted
                self._raw(self.tensors[side][0])
                await client.embed(self.images[0].data, side)
            await self._agreement(client)
            blocks = self.blocks(client)
            self.tally.rounds = max(1, self.plan.rounds // 2)
            for round_no in range(self.tally.rounds):
                names = list(blocks)
                random.Random(self.plan.seed * 1000 + 500 + round_no).shuffle(names)
                for name in names:
                    await asyncio.sleep(SETTLE_S)
                    await blocks[name]()
        finally:
            await client.close()
        self.tally.measure_s = time.perf_counter() - started


def run_backbone_bench(settings: Settings, plan: BenchPlan, arch: str | None = None) -> dict[str, Any]:
    """The backbone section alone: its own tritonserver holding only the backbone; the section as a dict."""
    from labelloop.bench_report import backbone_section
    from labelloop.bench_rig import machine_info, render_images, start_private_triton

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="labelloop-bench-backbone-") as tmp:
        root = Path(tmp)
        repo = ModelRepository(root / "model_repository")
        images = render_images(plan.images, plan.seed)
        publish_s = publish_demo_backbone(settings, repo, root / "backbone", arch)
        triton = start_private_triton(settings, repo.root, root / "triton", "bench-backbone-triton.log")
        try:
            bench = BackboneBench(settings, plan, images, repo)
            bench.tally.publish_s = publish_s
            asyncio.run(bench.measure(triton.grpc_url, repo))
        finally:
            triton.stop()
    machine = machine_info() | {"load_average_before": load_before, "load_average_after": os.getloadavg()}
    return {"machine": machine, "images": plan.images, "backbone": backbone_section(bench.tally)}


def main(argv: list[str] | None = None) -> int:
    """``python -m labelloop.bench_backbone``: the backbone section alone; markdown on stdout."""
    from core.settings import load_settings
    from labelloop.bench_report import backbone_tables
    from labelloop.bench_rig import FULL, QUICK

    parser = argparse.ArgumentParser(prog="python -m labelloop.bench_backbone", description=main.__doc__)
    parser.add_argument("--quick", action="store_true", help="16 images, 1 round (the full run: 32 images, 4 rounds)")
    parser.add_argument("--arch", help="a random-init trainer.backbone.ARCHS network (default: the demo backbone)")
    parser.add_argument("--images", type=int, help="bench images")
    parser.add_argument("--rounds", type=int, help="rounds of the full bench (the backbone runs half of them)")
    parser.add_argument("--json", type=Path, help="write the section as JSON here")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    plan = BenchPlan(
        images=args.images or plan.images,
        rounds=args.rounds or plan.rounds,
        block_images=plan.block_images,
        seed=plan.seed,
    )
    logging.basicConfig(level=logging.WARNING)
    report = run_backbone_bench(load_settings(), plan, args.arch)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    load = report["machine"]
    print(f"Load average {load['load_average_before'][0]:.2f} before, {load['load_average_after'][0]:.2f} after.\n")
    print("\n".join(backbone_tables(report["backbone"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
